"""Backups taken from the standby, on real nodes with the real pgBackRest: the backup of
an `ha` instance copies the standby's files (pgBackRest's own record of the backup says
so, and the annotation names the standby); it restores to exactly the rows committed
by a point in time; after a failover the next backup comes from the new standby; an
instance whose standby does not stream is backed up on the primary, and
last_operation says why."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from broker.backup import names
from broker.store.models import Node, Operation
from harness.backups import pgbackrest, repository
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


def test_without_a_streaming_standby_the_backup_is_taken_on_the_primary() -> None:
    with failover_env() as env:
        source = provision(env.runtime, env.engine, "ha")
        primary, standby = nodes(env, source)
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
