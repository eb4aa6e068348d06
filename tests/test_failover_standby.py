"""The standby dies (ha-sync): the primary stays writable (non-strict synchronous mode:
synchronous replication is switched off while no standby can confirm), a new standby
is built in the same zone, streams, and becomes synchronous again. No acknowledged
commit is lost and there is no failover."""

from __future__ import annotations

import pytest

from broker.store.models import NODE_DELETED, READY
from harness.env import FailoverEnv
from harness.faults import kill_server
from harness.scenarios import UnderLoad
from harness.waiting import eventually, failovers, operations, settled, standby_streaming
from harness.workflows import deprovision, instance, resource_counts
from harness.writer import stored_ids

pytestmark = pytest.mark.e2e


def test_standby_death_ha_sync(ha_under_load: UnderLoad[FailoverEnv]) -> None:
    env, instance_id = ha_under_load.env, ha_under_load.instance_id
    creds, writer = ha_under_load.credentials, ha_under_load.writer
    before = instance(env.runtime, instance_id)
    primary, old_standby = before.primary(), before.standby()
    assert primary is not None and old_standby is not None and old_standby.server_id
    writer.wait_acks(20)
    killed_at = writer.acked[-1][1]
    kill_server(env.cloud, old_standby.server_id, links_down=True)
    # The primary keeps acknowledging writes while there is no standby.
    writer.wait_acks(20, after=killed_at + 0.5, timeout=60)
    eventually(lambda: settled(env, instance_id) and
               instance(env.runtime, instance_id).standby().id  # type: ignore[union-attr]
               != old_standby.id, "a new standby streaming", 90)
    writer.wait_acks(5, after=writer.acked[-1][1])
    ha_under_load.stop()

    assert {i for i, _ in writer.acked} <= stored_ids(creds)
    after = instance(env.runtime, instance_id)
    assert after.primary().id == primary.id  # type: ignore[union-attr]
    standby = after.standby()
    assert standby is not None and standby.availability_zone == old_standby.availability_zone
    info = standby_streaming(env, after)
    assert info is not None and info.sync_state == "sync"
    assert after.state == READY and after.sync_standby_node_id == standby.id
    assert failovers(env, instance_id) == []
    assert [op.state for op in operations(env, instance_id, "rebuild")] == ["succeeded"]
    old = next(n for n in after.nodes if n.id == old_standby.id)
    assert old.state == NODE_DELETED
    assert resource_counts(env.cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
    deprovision(env.runtime, env.engine, instance_id)
