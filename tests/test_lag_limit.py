"""The lag limit at its default (maximum_lag_on_failover, 1 MiB) on an `ha` instance.

The standby stops receiving (its walreceiver frozen; its server still answers) while
the primary writes 4 MiB, then the primary dies. The broker counts what the standby
has received, not what it has replayed (a promotion replays everything received), so
pausing replay alone would not put it behind: receiving is what has to stop.
- The monitor refuses to fail over, and the instance's status sentence says why.
- A failover operation queued by hand and run refuses by its own check, before it
  fences anything: the standby is not promoted."""

from __future__ import annotations

import time

import pytest

from broker.operations.failover import KIND as FAILOVER
from broker.operations.failover import queue_failover
from broker.pg import probe as health
from broker.store.models import DEGRADED, OP_FAILED, Operation, utcnow
from harness.env import background, failover_env
from harness.faults import freeze_walreceiver, kill_server
from harness.waiting import eventually, failovers, operations, settled
from harness.workflows import connect_with, instance, provision
from harness.writer import app_credentials

pytestmark = pytest.mark.e2e

LIMIT = 1024 * 1024
WRITTEN = 4 * LIMIT


def test_a_standby_more_than_1_mib_behind_is_never_promoted() -> None:
    with failover_env() as env:
        assert env.runtime.settings.monitor.maximum_lag_on_failover == LIMIT  # the default
        instance_id = provision(env.runtime, env.engine, "ha")
        creds = app_credentials(env, instance_id)
        inst = instance(env.runtime, instance_id)
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and primary.server_id
        assert standby is not None and standby.server_id and standby.management_address
        password = env.runtime.vault.decrypt(inst.admin_password_enc)

        def standby_probe() -> health.Probe:
            return health.probe(standby.management_address or "", password, timeout=3.0,
                                ca_pem=inst.ca_for(standby))

        with background(env):
            eventually(lambda: settled(env, instance_id), "the standby streaming")
            freeze_walreceiver(env.cloud, standby.server_id)
            conn = connect_with(creds)
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE filler (payload text)")
                cur.execute("INSERT INTO filler SELECT md5(i::text) || repeat('x', 968) "
                            "FROM generate_series(1, %s) AS i", (WRITTEN // 1000,))
                cur.execute("SELECT (pg_catalog.pg_current_wal_lsn() - '0/0')::bigint")
                row = cur.fetchone()
                assert row is not None
                primary_lsn = int(row[0])
            conn.close()
            received = standby_probe().receive_lsn or 0
            assert primary_lsn - received > LIMIT, (primary_lsn, received)
            time.sleep(2.5)  # the monitor has seen the primary's position after the writes

            kill_server(env.cloud, primary.server_id, links_down=True)
            reason = eventually(
                lambda: (lambda i: i.state == DEGRADED and "refused" in (i.state_reason or "")
                         and i.state_reason)(instance(env.runtime, instance_id)),
                "the monitor's refusal", timeout=30)
            assert f"standby {standby.id} is " in reason
            assert f"more than maximum_lag_on_failover ({LIMIT} bytes)" in reason
            time.sleep(3.0)  # and it stays refused
            assert instance(env.runtime, instance_id).state_reason == reason
            assert operations(env, instance_id, FAILOVER) == []
            assert standby_probe().in_recovery

        # The failover operation's own check, driven directly.
        op_id = queue_failover(env.runtime.store, instance_id, kind=FAILOVER,
                               cause="queued by hand", old_primary_id=primary.id,
                               standby_id=standby.id, detected_at=utcnow(),
                               last_primary_lsn=primary_lsn)
        assert env.engine.run_until_finished(op_id, timeout=60) == OP_FAILED
        with env.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            assert op is not None and op.step == "check", (op.step if op else None)
        [event] = failovers(env, instance_id)
        assert event.outcome == "refused" and event.detail is not None
        assert f"more than maximum_lag_on_failover ({LIMIT} bytes)" in event.detail
        assert event.fenced_at is None and event.promoted_at is None
        seen = standby_probe()
        assert seen.ok and seen.in_recovery
        after = instance(env.runtime, instance_id)
        assert after.primary() is not None and after.primary().id == primary.id  # type: ignore[union-attr]
        assert after.state == DEGRADED and "maximum_lag_on_failover" in (after.state_reason or "")
