"""Backups taken from the standby, on real nodes with the real pgBackRest: the backup of
an `ha` instance copies the standby's files (pgBackRest's own record of the backup says
so, and the annotation names the standby); it restores to exactly the rows committed
by a point in time; after a failover the next backup comes from the new standby; an
instance whose standby does not stream is backed up on the primary, and
last_operation says why."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker.backup import names
from broker.guest import bootstrap
from broker.store.models import Node, Operation
from harness.backups import node_user, node_volume, pgbackrest, repository
from harness.env import FailoverEnv, background, failover_env
from harness.faults import kill_server
from harness.waiting import eventually, settled, standby_streaming
from harness.workflows import finish, instance, provision
from harness.writer import app_credentials
from tests.test_backup_operations import request_backup
from tests.test_backup_restore import restored_ids, stamped_rows, write_rows

SETTLE_TIMEOUT = 240.0


def backup_of(env: FailoverEnv, instance_id: str, op_id: str) -> dict[str, Any]:
    """pgBackRest's record of the backup the operation took (`info --output=json`)."""
    node = instance(env.runtime, instance_id).primary()
    assert node is not None
    out = pgbackrest(env.cloud, node, instance_id, "--output=json", "info")
    assert out.returncode == 0, out.stderr
    found = [b for b in json.loads(out.stdout)[0]["backup"]
             if b["annotation"]["pgha-operation"] == op_id]
    assert len(found) == 1, found
    return dict(found[0])


def backup_option(env: FailoverEnv, instance_id: str, label: str, option: str) -> str:
    """An option of the backup as pgBackRest recorded it in the backup's manifest."""
    manifest = (repository(env.cloud, instance_id) / "backup" / names.stanza(instance_id)
                / label / "backup.manifest").read_text()
    return next(line.split("=", 1)[1] for line in manifest.splitlines()
                if line.startswith(f"{option}="))


def last_operation(env: FailoverEnv, op_id: str) -> str:
    with env.runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        return op.description or ""


def taken_from(env: FailoverEnv, instance_id: str, op_id: str) -> tuple[str, str]:
    backup = backup_of(env, instance_id, op_id)
    return backup["annotation"]["pgha-source-role"], backup["annotation"]["pgha-source-node"]


def nodes(env: FailoverEnv, instance_id: str) -> tuple[Node, Node]:
    inst = instance(env.runtime, instance_id)
    primary, standby = inst.primary(), inst.standby()
    assert primary is not None and standby is not None
    return primary, standby


@pytest.mark.timeout(900)
def test_an_ha_backup_comes_from_the_standby_restores_exactly_and_follows_a_failover(
        ) -> None:
    with failover_env() as env:
        source = provision(env.runtime, env.engine, "ha")
        creds = app_credentials(env, source)
        write_rows(creds, range(1, 6))
        primary, standby = nodes(env, source)
        op_id = request_backup(env.runtime, source)
        finish(env.engine, op_id)
        assert taken_from(env, source, op_id) == ("standby", standby.id)
        assert backup_option(env, source, backup_of(env, source, op_id)["label"],
                             "option-backup-standby") == "true"
        assert last_operation(env, op_id) == f"full backup taken from the standby (node " \
            f"{standby.id})"
        verify = pgbackrest(env.cloud, primary, source, "verify")
        assert verify.returncode == 0, verify.stderr + verify.stdout

        # Point-in-time restore from it: exactly the rows committed before the target.
        time.sleep(1.1)  # the window opens after the backup's whole-second stop time
        write_rows(creds, range(6, 30))
        rows = stamped_rows(creds)
        target = rows[20]
        assert restored_ids(env, {"restore_from": source, "point_in_time": target.isoformat()}
                            ) == set(range(1, 20))

        # A failover: the old standby is the primary, a rebuilt node the standby, and the
        # next backup comes from that new standby.
        with background(env):
            # The monitor must have seen the standby's lag to promote it.
            eventually(lambda: instance(env.runtime, source).last_lag_bytes is not None,
                       "the monitor seeing the standby stream", 60)
            assert primary.server_id
            kill_server(env.cloud, primary.server_id)
            eventually(lambda: settled(env, source) and nodes(env, source)[0].id == standby.id,
                       "the failover and the rebuilt standby streaming", SETTLE_TIMEOUT)
        _, new_standby = nodes(env, source)
        assert new_standby.id not in (primary.id, standby.id)
        after = request_backup(env.runtime, source)
        finish(env.engine, after)
        assert taken_from(env, source, after) == ("standby", new_standby.id)


def backup_servers(env: FailoverEnv, node: Node) -> list[int]:
    """The node's `pgbackrest server` processes (not the children serving a session)."""
    assert node.server_id
    found = []
    for pid in env.cloud.server_pids(node.server_id):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"pgbackrest") and b"server" in argv:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if b"pgbackrest" not in Path(f"/proc/{parent}/cmdline").read_bytes():
                    found.append(pid)  # a session's child has the server as its parent
    return found


def listening(env: FailoverEnv, node: Node) -> list[str]:
    """The local addresses the node listens on at pgBackRest's port."""
    assert node.server_id
    out = subprocess.run(["ip", "netns", "exec", env.cloud.namespace(node.server_id), "ss",
                          "-Hltn", f"sport = :{bootstrap.BACKUP_SERVER_PORT}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def test_without_a_streaming_standby_the_backup_is_taken_on_the_primary() -> None:
    with failover_env() as env:
        source = provision(env.runtime, env.engine, "ha")
        primary, standby = nodes(env, source)
        # Every node runs pgBackRest's server as its PostgreSQL user, on its management
        # address only; killed, it is started again.
        for node in (primary, standby):
            def servers(node: Node = node) -> list[int]:
                return backup_servers(env, node)
            [server] = eventually(servers, "the server", 60)
            assert os.stat(f"/proc/{server}").st_uid == node_user(env.cloud, node).pw_uid != 0
            assert listening(env, node) == [f"{node.management_address}:8432"]
        [server] = backup_servers(env, primary)
        os.kill(server, signal.SIGKILL)
        eventually(lambda: [p for p in backup_servers(env, primary) if p != server],
                   "the server started again", 60)
        assert standby.server_id
        # The standby's server dies; no monitor runs, so nothing rebuilds it meanwhile.
        kill_server(env.cloud, standby.server_id)
        eventually(lambda: standby_streaming(env, instance(env.runtime, source)) is None,
                   "the primary no longer sees its standby", 60)
        op_id = request_backup(env.runtime, source)
        finish(env.engine, op_id)
        assert taken_from(env, source, op_id) == ("primary", primary.id)
        assert backup_option(env, source, backup_of(env, source, op_id)["label"],
                             "option-backup-standby") == "false"
        assert last_operation(env, op_id) == (
            f"full backup taken on the primary (node {primary.id}): its standby "
            f"{standby.id} is not streaming")


def test_another_instance_cannot_reach_a_node_s_pgbackrest_server() -> None:
    """Instance B's node, as its PostgreSQL user and from its own namespace, with its own
    node certificate and A's CA (public: every binding of A carries it), asks A's
    standby's pgBackRest server for A's stanza: the TLS handshake refuses it."""
    with failover_env() as env:
        victim = provision(env.runtime, env.engine, "ha")
        attacker = provision(env.runtime, env.engine, "standalone")
        _, standby = nodes(env, victim)
        intruder = instance(env.runtime, attacker).primary()
        assert intruder is not None and intruder.server_id
        user = node_user(env.cloud, intruder)
        tls_dir = node_volume(env.cloud, intruder) / bootstrap.TLS_DIR
        ca_file = node_volume(env.cloud, intruder) / bootstrap.BACKUP_DIR / "victim-ca.crt"
        ca_file.write_text(str(instance(env.runtime, victim).tls_ca_cert))
        os.chown(ca_file, user.pw_uid, user.pw_gid)
        attempt = subprocess.run(
            ["nsenter", f"--net=/run/netns/{env.cloud.namespace(intruder.server_id)}",
             f"--setuid={user.pw_uid}", f"--setgid={user.pw_gid}",
             bootstrap.PGBACKREST, "--config=/dev/null", "--log-level-file=off",
             f"--stanza={names.stanza(victim)}",
             f"--repo1-path={repository(env.cloud, victim)}",
             f"--repo1-host={standby.management_address}", "--repo1-host-type=tls",
             f"--repo1-host-port={bootstrap.BACKUP_SERVER_PORT}",
             f"--repo1-host-ca-file={ca_file}",
             f"--repo1-host-cert-file={tls_dir / bootstrap.TLS_CERT_FILE}",
             f"--repo1-host-key-file={tls_dir / bootstrap.TLS_KEY_FILE}", "repo-ls"],
            capture_output=True, text=True, timeout=120, check=False, cwd="/")
        assert attempt.returncode != 0
        assert "unknown ca" in attempt.stderr, attempt.stderr
        assert attempt.stdout == ""
