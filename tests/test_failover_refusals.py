"""What the monitor refuses to do, one check at a time (no background threads):

- ha-sync: a standby that is not recorded synchronous is never promoted;
- ha: a standby further behind than maximum_lag_on_failover is never promoted;
- the cloud API unreachable too: no failover (a partition cannot be told from a crash);
- the old primary cannot be confirmed stopped: nothing is promoted, the instance is
  degraded and says why, and no new attempt before the anti-flapping gap;
and once the facts allow it, the very same monitor fails over."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from datetime import timedelta
from typing import Any

import pytest

from broker.cloud.base import FenceError, TransientCloudError
from broker.cloud.local import LocalCloud, namespace_pids
from broker.monitor.loop import Monitor
from broker.pg import connection, replication
from broker.pg.names import APP_DATABASE
from broker.store.models import DEGRADED, OP_FAILED, SUCCEEDED, Failover, Instance
from harness.env import FailoverEnv, failover_env
from harness.faults import kill_server
from harness.waiting import failovers, operations, settled
from harness.workflows import deprovision, instance, provision

pytestmark = pytest.mark.e2e


class CloudApiDown:
    """The local cloud, except that its API does not answer about servers."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._cloud = cloud

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cloud, name)

    def get_server(self, server_id: str) -> Any:
        raise TransientCloudError("the compute API timed out")


class CannotStop:
    """The local cloud, except that it cannot confirm a server stopped (a dead host)."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._cloud = cloud

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cloud, name)

    def stop_server(self, server_id: str) -> None:
        raise FenceError("the hypervisor does not answer")


def _decide(monitor: Monitor, instance_id: str) -> str:
    """Check until the monitor has made up its mind about the dead primary."""
    for _ in range(6):
        status = monitor.check_instance(instance_id)
        if not status.startswith("primary unreachable") or "/3:" not in status:
            return status
    raise AssertionError(f"no decision: {status}")


def _pending(monitor: Monitor, instance_id: str) -> tuple[str, ...]:
    return monitor._watch[instance_id].pending_ops


def test_ha_sync_refuses_an_unrecorded_standby_and_a_silent_cloud() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        inst = instance(env.runtime, instance_id)
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and standby is not None and primary.server_id
        monitor = Monitor(env.runtime)
        assert monitor.take(instance_id)
        assert monitor.check_instance(instance_id).startswith("primary healthy")

        # As after a standby blip: not synchronous any more (store first, then primary).
        with env.runtime.store.session() as s:
            s.get(Instance, instance_id).sync_standby_node_id = None  # type: ignore[union-attr]
        conn = connection.connect(primary.management_address or "",
                                  env.runtime.vault.decrypt(inst.admin_password_enc))
        replication.set_synchronous_standby(conn, None)
        conn.close()
        kill_server(env.cloud, primary.server_id)
        status = _decide(monitor, instance_id)
        assert "failover refused" in status and "not known to be synchronous" in status
        assert instance(env.runtime, instance_id).state == DEGRADED
        assert operations(env, instance_id, "failover") == []

        # Recorded synchronous again, but the cloud API is down: still no failover.
        with env.runtime.store.session() as s:
            s.get(Instance, instance_id).sync_standby_node_id = standby.id  # type: ignore[union-attr]
        env.runtime.cloud = CloudApiDown(env.cloud)  # type: ignore[assignment]
        status = _decide(monitor, instance_id)
        assert "cloud API unreachable" in status and "not failing over" in status
        assert operations(env, instance_id, "failover") == []

        # The cloud answers but cannot confirm the old primary stopped: nothing promoted.
        env.runtime.cloud = CannotStop(env.cloud)  # type: ignore[assignment]
        status = _decide(monitor, instance_id)
        assert status.startswith("failover queued"), status
        [op_id] = _pending(monitor, instance_id)
        assert monitor.drive(op_id) == OP_FAILED
        after = instance(env.runtime, instance_id)
        assert after.state == DEGRADED and "could not be confirmed stopped" in (
            after.state_reason or "")
        assert _in_recovery(env, after, standby.id)  # the standby was not promoted
        [event] = failovers(env, instance_id)
        assert event.outcome == "refused" and event.promoted_at is None

        # The cloud works again: after the anti-flapping gap, the same monitor fails over.
        env.runtime.cloud = env.cloud
        monitor.driver.reset()
        status = _decide(monitor, instance_id)
        assert "last failover" in status and "waiting" in status, status
        with env.runtime.store.session() as s:  # as if the gap had passed
            for row in s.query(Failover).filter(Failover.instance_id == instance_id):
                row.detected_at = row.detected_at - timedelta(hours=1)
        status = _decide(monitor, instance_id)
        assert status.startswith("failover queued"), status
        [op_id] = _pending(monitor, instance_id)
        assert monitor.drive(op_id) == SUCCEEDED
        assert settled(env, instance_id)
        assert instance(env.runtime, instance_id).primary().id == standby.id  # type: ignore[union-attr]
        assert [e.outcome for e in failovers(env, instance_id)] == ["refused", "succeeded"]
        deprovision(env.runtime, env.engine, instance_id)


def _in_recovery(env: FailoverEnv, inst: Instance, node_id: str) -> bool:
    node = next(n for n in inst.nodes if n.id == node_id)
    conn = connection.connect(node.management_address or "",
                              env.runtime.vault.decrypt(inst.admin_password_enc))
    try:
        return replication.replication_status(conn).in_recovery
    finally:
        conn.close()


def _walreceiver(cloud: LocalCloud, server_id: str) -> int:
    for pid in namespace_pids(cloud.namespace(server_id)):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"walreceiver" in f.read():
                return pid
    raise AssertionError("no walreceiver")


def test_ha_refuses_a_standby_too_far_behind() -> None:
    with failover_env() as env:
        settings = env.runtime.settings
        env.runtime.settings = dataclasses.replace(settings, monitor=dataclasses.replace(
            settings.monitor, maximum_lag_on_failover=4096))
        _lagging_standby_is_refused(env)


def _lagging_standby_is_refused(env: FailoverEnv) -> None:
    instance_id = provision(env.runtime, env.engine, "ha")
    inst = instance(env.runtime, instance_id)
    primary, standby = inst.primary(), inst.standby()
    assert primary is not None and standby is not None
    assert primary.server_id and standby.server_id
    monitor = Monitor(env.runtime)
    assert monitor.take(instance_id)
    receiver = _walreceiver(env.cloud, standby.server_id)
    os.kill(receiver, signal.SIGSTOP)  # the standby stops receiving
    try:
        conn = connection.connect(primary.management_address or "",
                                  env.runtime.vault.decrypt(inst.admin_password_enc),
                                  dbname=APP_DATABASE)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE public.filler AS SELECT g, repeat('x', 200) AS pad "
                        "FROM generate_series(1, 2000) g")
        conn.close()
        status = monitor.check_instance(instance_id)
        assert status.startswith("primary healthy"), status
        assert (instance(env.runtime, instance_id).last_lag_bytes or 0) > 4096
        kill_server(env.cloud, primary.server_id)
        status = _decide(monitor, instance_id)
        assert "failover refused" in status and "maximum_lag_on_failover" in status, status
        assert instance(env.runtime, instance_id).state == DEGRADED
        assert operations(env, instance_id, "failover") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(receiver, signal.SIGCONT)
    deprovision(env.runtime, env.engine, instance_id)
