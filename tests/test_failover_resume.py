"""A worker (the real `python -m broker worker` process) is SIGKILLed in the middle of
a failover, right after it fenced the old primary; a restarted worker finishes it."""

from __future__ import annotations

import pytest

from broker.store.models import IN_PROGRESS, READY
from harness.env import failover_env
from harness.faults import kill_server
from harness.scenarios import under_write_load
from harness.waiting import (
    eventually,
    failovers,
    monitor_owner,
    operations,
    settled,
    standby_streaming,
)
from harness.workflows import deprovision, instance, resource_counts
from harness.writer import stored_ids

pytestmark = pytest.mark.e2e


def test_worker_killed_mid_failover_then_restarted_finishes() -> None:
    with failover_env() as env, under_write_load(env, monitor=False) as load:
        instance_id, creds, writer = load.instance_id, load.credentials, load.writer
        before = instance(env.runtime, instance_id)
        primary, standby = before.primary(), before.standby()
        assert primary is not None and standby is not None and primary.server_id
        try:
            first = env.start_worker("worker-1", BROKER_CRASH_AFTER_STEP="failover:fence")
            eventually(lambda: monitor_owner(env, instance_id, first.pid), "worker 1 watching")
            writer.wait_acks(20)
            kill_server(env.cloud, primary.server_id)
            assert first.wait(timeout=60) == -9, env.worker_log("worker-1")
            [op] = operations(env, instance_id, "failover")
            assert op.state == IN_PROGRESS and op.step == "fence"
            stalled_at = writer.acked[-1][1]

            second = env.start_worker("worker-2")
            eventually(lambda: settled(env, instance_id), "the failover finished", 90)
            writer.wait_acks(5, after=stalled_at)
            assert second.poll() is None
        finally:
            load.stop()
            env.stop_workers()

        assert {i for i, _ in writer.acked} <= stored_ids(creds)
        after = instance(env.runtime, instance_id)
        assert after.primary().id == standby.id  # type: ignore[union-attr]
        assert after.state == READY and standby_streaming(env, after) is not None
        [event] = failovers(env, instance_id)
        assert event.outcome == "succeeded" and event.fenced_at and event.promoted_at
        assert [o.state for o in operations(env, instance_id, "failover")] == ["succeeded"]
        assert resource_counts(env.cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
        deprovision(env.runtime, env.engine, instance_id)
