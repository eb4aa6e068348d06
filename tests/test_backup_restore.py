"""Point-in-time restore on real nodes: provisioning with `restore_from` and
`point_in_time` gives exactly the transactions committed by then (none after), before
and after a failover of the source and after the source was deleted; a tenant of
another organization cannot restore it; times outside the window are refused with
the window in the answer.

Exactness without clock games: the app's rows carry `clock_timestamp()` taken inside
their own transaction, and one session commits them one after the other, so row i
commits after its own stamp and before row i+1's. Restoring to the stamp of a row
must give exactly the rows stamped before it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.operations import requests
from broker.operations.refusals import InvalidRequest
from broker.runtime import Runtime
from harness.env import FailoverEnv, failover_env
from harness.faults import kill_server
from harness.scenarios import fail_primary, under_write_load
from harness.workflows import connect_with, deprovision, finish, new_instance_id, provision
from harness.writer import app_credentials
from tests.test_backup_operations import request_backup


def write_rows(credentials: dict[str, Any], ids: range) -> None:
    conn = connect_with(credentials)
    try:
        with conn.cursor() as cur:
            for i in ids:
                cur.execute("INSERT INTO acked (id) VALUES (%s)", (i,))
                time.sleep(0.01)
    finally:
        conn.close()


def stamped_rows(credentials: dict[str, Any]) -> dict[int, datetime]:
    conn = connect_with(credentials)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, at FROM acked")
            return dict(cur.fetchall())
    finally:
        conn.close()


def restore(runtime: Runtime, plan: str, parameters: dict[str, Any], *,
            organization: str = "org") -> tuple[str, str | None]:
    """The platform's create-service with restore parameters: (instance id, operation)."""
    instance_id = new_instance_id()
    target = runtime.catalog.plan_by_name(plan)
    accepted = requests.provision(runtime.store, runtime.vault, requests.NewInstance(
        id=instance_id, service_id=target.service_id, plan=target,
        organization_guid=organization, space_guid="space", parameters=parameters),
        accepts_incomplete=True)
    return instance_id, accepted.operation_id


def restored_ids(env: FailoverEnv, parameters: dict[str, Any], plan: str = "standalone"
                 ) -> set[int]:
    instance_id, op_id = restore(env.runtime, plan, parameters)
    assert op_id is not None
    finish(env.engine, op_id)
    return set(stamped_rows(app_credentials(env, instance_id, f"app-{instance_id}")))


def test_restore_to_a_point_in_time_gives_exactly_what_was_committed_by_then() -> None:
    with failover_env() as env:
        source = provision(env.runtime, env.engine, "standalone")
        creds = app_credentials(env, source)
        write_rows(creds, range(1, 6))
        finish(env.engine, request_backup(env.runtime, source))
        # The restorable window opens at the backup's stop time, which pgBackRest keeps
        # in whole seconds (rounded up): the rows the test aims at come after it.
        time.sleep(1.1)
        write_rows(creds, range(6, 40))
        rows = stamped_rows(creds)
        target = rows[25]
        expected = {i for i, at in rows.items() if at < target}
        assert expected == set(range(1, 25))
        got = restored_ids(env, {"restore_from": source, "point_in_time": target.isoformat()})
        assert got == expected
        # The copy is an instance of its own: the source's binding does not open it,
        # the source goes on unchanged.
        write_rows(creds, range(40, 41))
        assert 40 in stamped_rows(creds)


def test_restore_is_refused_across_organizations_and_outside_the_window() -> None:
    with failover_env() as env:
        source = provision(env.runtime, env.engine, "standalone")
        with pytest.raises(InvalidRequest, match="no backup to restore from yet"):
            restore(env.runtime, "standalone", {"restore_from": source})
        finish(env.engine, request_backup(env.runtime, source))
        # Another organization's tenant, knowing the id: the same answer as for an id
        # that does not exist, and nothing is queued.
        with pytest.raises(InvalidRequest, match=r"no instance .* in this organization") as other:
            restore(env.runtime, "standalone", {"restore_from": source},
                    organization="another-org")
        with pytest.raises(InvalidRequest) as unknown:
            restore(env.runtime, "standalone", {"restore_from": "no-such-instance"},
                    organization="another-org")
        assert str(other.value).replace(source, "X") == \
            str(unknown.value).replace("no-such-instance", "X")
        with pytest.raises(InvalidRequest, match=r"outside the restorable window .* to "):
            restore(env.runtime, "standalone", {"restore_from": source,
                                                "point_in_time": "2020-01-01T00:00:00Z"})
        with pytest.raises(InvalidRequest, match="not an RFC 3339 time"):
            restore(env.runtime, "standalone", {"restore_from": source,
                                                "point_in_time": "yesterday"})
        with env.runtime.store.session() as s:
            assert len(requests.unfinished(s, source)) == 0


def test_restores_before_and_after_a_failover_and_of_a_deleted_instance() -> None:
    """ha-sync under write load; a backup; the primary killed (failover, new timeline);
    restores to a time before and to one after the failover; then the source deleted and
    restored once more, as late as possible: each gives exactly the rows committed by
    its time."""
    with failover_env() as env, under_write_load(env, "ha-sync") as load:
        source, creds = load.instance_id, load.credentials
        load.writer.wait_acks(20)
        finish(env.engine, request_backup(env.runtime, source))
        backed_up = datetime.now(UTC)
        time.sleep(3)  # the app goes on writing
        killed = datetime.now(UTC)
        outcome = fail_primary(env, source, creds, load.writer, kill_server)
        assert not outcome.lost
        load.writer.wait_acks(20, after=time.monotonic())
        load.stop()
        rows = stamped_rows(creds)
        stamps = sorted(rows.values())
        between = [at for at in stamps if backed_up < at < killed]
        before = between[len(between) // 2]
        after = stamps[-10]
        assert after > killed + timedelta(seconds=outcome.settled)
        for target in (before, after):
            got = restored_ids(env, {"restore_from": source,
                                     "point_in_time": target.isoformat()})
            assert got == {i for i, at in rows.items() if at < target}, target
        deprovision(env.runtime, env.engine, source)
        assert restored_ids(env, {"restore_from": source}) == set(rows)
