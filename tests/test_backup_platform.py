"""A backup never holds the platform back, through the OSB API with a real pgBackRest
backup running: `cf bind-service` and `cf unbind-service` work meanwhile (the new
binding writes), and `cf delete-service` is accepted, stops the backup (its operation
ends cancelled) and deletes the instance; the deleted instance's repository passes
`pgbackrest verify` and restores to every row committed before the delete.

The backup is held mid-copy by stopping its pgBackRest processes (SIGSTOP): a backup
of hours, without a database of that size. They get SIGCONT once the deprovision has
sent them its SIGTERM (pending on the stopped process), so the order is certain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from broker.backup import names
from broker.guest.bootstrap import BACKUP_DIR
from broker.operations.backup import CANCELLED
from broker.store.models import OP_FAILED, Operation
from harness.backups import node_volume, repository
from harness.env import FailoverEnv, background, failover_env
from harness.waiting import eventually
from harness.workflows import connect_with, finish, instance, make_engine, provision
from harness.writer import app_credentials
from tests.test_api_cloud_controller_e2e import Platform
from tests.test_backup_operations import backup_processes, request_backup
from tests.test_backup_restore import restore, stamped_rows, write_rows

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _sigterm_pending(pid: int) -> bool:
    """A SIGTERM waits on the (stopped) process."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & SIGTERM_BIT:
                return True
    return False


def _copying(env: FailoverEnv, instance_id: str) -> list[int]:
    """pgBackRest's backup processes once the backup holds its lock (it has started)."""
    node = instance(env.runtime, instance_id).primary()
    assert node is not None
    lock = (node_volume(env.cloud, node) / BACKUP_DIR / "lock"
            / f"{names.stanza(instance_id)}-backup.lock")
    return backup_processes(env, instance_id) if lock.exists() else []


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _request_backup_through_api(platform: Platform, iid: str) -> str:
    r = platform.client.patch(f"/v2/service_instances/{iid}", headers=platform.headers,
                              query_string={"accepts_incomplete": "true"},
                              json={"service_id": platform.service_id,
                                    "parameters": {"backup": True}})
    assert r.status_code == 202, r.get_data(as_text=True)
    return str(r.get_json()["operation"])


def _verify_repository(env: FailoverEnv, instance_id: str) -> subprocess.CompletedProcess[str]:
    """`pgbackrest verify` of a deleted instance's repository (its nodes are gone: run
    on the host with a configuration naming only the repository)."""
    with tempfile.TemporaryDirectory(prefix="pgha-verify-") as scratch:
        conf = Path(scratch) / "pgbackrest.conf"
        conf.write_text("[global]\n"
                        f"repo1-path={repository(env.cloud, instance_id)}\n"
                        f"lock-path={scratch}\nlog-path={scratch}\nlog-level-file=off\n")
        return subprocess.run(["pgbackrest", f"--config={conf}",
                               f"--stanza={names.stanza(instance_id)}", "verify"],
                              capture_output=True, text=True, timeout=300, check=False)


def test_binds_go_on_during_a_backup_and_a_delete_stops_it() -> None:
    with failover_env() as env:
        iid = provision(env.runtime, env.engine, "standalone")
        creds = app_credentials(env, iid)
        write_rows(creds, range(1, 6))
        finish(env.engine, request_backup(env.runtime, iid))  # what the restore starts from
        conn = connect_with(creds)
        with conn.cursor() as cur:  # something for the next backup to copy
            cur.execute("CREATE TABLE big AS SELECT i, md5(i::text) AS m "
                        "FROM generate_series(1, 300000) AS i")
        conn.close()
        platform = Platform(env)
        platform.plan_id = env.runtime.catalog.plan_by_name("standalone").id
        backup_op = _request_backup_through_api(platform, iid)
        backup_engine = make_engine(env.runtime)
        assert backup_engine.claim(backup_op) == backup_op
        runner = threading.Thread(target=backup_engine.run, args=(backup_op,))
        runner.start()
        held: list[int] = []
        try:
            held = eventually(lambda: _copying(env, iid), "pgBackRest copying", 120,
                              interval=0.01)
            _signal_all(held, signal.SIGSTOP)
            assert platform.last_operation(iid, backup_op)["state"] == "in progress"
            # Binds and unbinds while the backup runs.
            status, body = platform.bind(iid, "during-backup")
            assert status == 201, body
            write_rows(body["credentials"], range(6, 11))
            assert platform.unbind(iid, "during-backup") == (200, {})
            write_rows(creds, range(11, 16))
            status, body = platform.delete_service(iid)
            assert status == 202, body
            deprovision_op = body["operation"]
            with background(env):
                eventually(lambda: any(_sigterm_pending(pid) for pid in held),
                           "the deprovision's SIGTERM to the backup", 120, interval=0.05)
                _signal_all(held, signal.SIGCONT)
                platform.deleted(iid, deprovision_op)
        finally:
            _signal_all(held, signal.SIGCONT)
            runner.join(timeout=120)
        assert not runner.is_alive()
        with env.runtime.store.session() as s:
            op = s.get(Operation, backup_op)
            assert op is not None and (op.state, op.error) == (OP_FAILED, CANCELLED)
        answer: dict[str, Any] = platform.last_operation(iid, backup_op)
        assert answer["state"] == "failed" and CANCELLED in answer["description"], answer
        verify = _verify_repository(env, iid)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # Every row committed before the delete, the one the binding made during the
        # backup included, is in a restore of the deleted instance.
        copy, op_id = restore(env.runtime, "standalone", {"restore_from": iid})
        assert op_id is not None
        finish(env.engine, op_id)
        got = set(stamped_rows(app_credentials(env, copy, f"app-{copy}")))
        assert got == set(range(1, 16))
        assert instance(env.runtime, copy).state == "ready"
