"""Two worker processes share the instances on a PostgreSQL state store: each watches
its share, exactly one failover happens when a primary dies, and when a worker dies its
instance moves to the other, which then fails it over too."""

from __future__ import annotations

import signal

import pytest

from harness.env import FailoverEnv, failover_env
from harness.faults import kill_server
from harness.waiting import eventually, failovers, monitor_owner, operations, settled
from harness.workflows import deprovision, instance, provision
from harness.writer import Writer, app_credentials, stored_ids

pytestmark = pytest.mark.e2e


def _owner_pid(env: FailoverEnv, instance_id: str) -> int | None:
    owner = monitor_owner(env, instance_id)
    return int(owner.split(":")[1]) if owner else None


def _fail_over(env: FailoverEnv, instance_id: str) -> None:
    inst = instance(env.runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.server_id
    creds = app_credentials(env, instance_id, f"app-{instance_id[:8]}")
    writer = Writer(creds)
    writer.start()
    try:
        writer.wait_acks(20)
        kill_server(env.cloud, primary.server_id)
        eventually(lambda: settled(env, instance_id) and
                   instance(env.runtime, instance_id).primary().id != primary.id,  # type: ignore[union-attr]
                   "the failover finished", 90)
        writer.wait_acks(5, after=writer.acked[-1][1])
    finally:
        writer.stop()
    if instance(env.runtime, instance_id).replication == "sync":
        assert {i for i, _ in writer.acked} <= stored_ids(creds)


def test_two_workers_share_instances_and_fail_over_once(pg_state_url: str) -> None:
    with failover_env(pg_state_url) as env:
        sync_id = provision(env.runtime, env.engine, "ha-sync")
        async_id = provision(env.runtime, env.engine, "ha")
        workers = {w.pid: w for w in (env.start_worker("worker-a"), env.start_worker("worker-b"))}
        # Each worker takes its fair share: one instance each.
        eventually(lambda: {_owner_pid(env, sync_id), _owner_pid(env, async_id)} == set(workers),
                   "each worker watching one instance", 60)

        _fail_over(env, sync_id)
        [event] = failovers(env, sync_id)
        assert event.outcome == "succeeded"
        assert len(operations(env, sync_id, "failover")) == 1

        # The worker watching the other instance dies: the survivor takes it over.
        holder = _owner_pid(env, async_id)
        assert holder is not None
        workers[holder].send_signal(signal.SIGKILL)
        workers[holder].wait(timeout=30)
        survivor = next(pid for pid in workers if pid != holder)
        eventually(lambda: _owner_pid(env, async_id) == survivor,
                   "the surviving worker watching the instance", 30)
        _fail_over(env, async_id)
        [event] = failovers(env, async_id)
        assert event.outcome == "succeeded"
        assert len(operations(env, async_id, "failover")) == 1
        assert len(failovers(env, sync_id)) == 1
        assert workers[survivor].poll() is None, env.worker_log("worker-a")
        env.stop_workers()
        deprovision(env.runtime, env.engine, sync_id)
        deprovision(env.runtime, env.engine, async_id)
