"""Planned switchover in `ha` (asynchronous replication), asked for through the
operator CLI: the standby becomes primary with no acknowledged write lost, the address
stays, and a new standby streams again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker.operations.failover import start_switchover
from broker.operations.refusals import Busy
from broker.store.models import READY
from harness.env import ROOT, FailoverEnv
from harness.scenarios import UnderLoad
from harness.waiting import eventually, failovers, operations, settled, standby_streaming
from harness.workflows import deprovision, instance, resource_counts
from harness.writer import stored_ids

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("ha_under_load", ["ha"], indirect=True)
def test_switchover_ha_loses_no_acknowledged_write(ha_under_load: UnderLoad[FailoverEnv]) -> None:
    env, instance_id = ha_under_load.env, ha_under_load.instance_id
    creds, writer = ha_under_load.credentials, ha_under_load.writer
    before = instance(env.runtime, instance_id)
    primary, standby = before.primary(), before.standby()
    assert primary is not None and standby is not None
    writer.wait_acks(50)
    cli = subprocess.run(
        [sys.executable, "-m", "broker", "instances", "switchover", instance_id],
        cwd=ROOT, env=env.worker_env(), capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "switchover queued" in cli.stdout
    with pytest.raises(Busy):  # one at a time
        start_switchover(env.runtime.store, instance_id)
    asked_at = writer.acked[-1][1]
    eventually(lambda: settled(env, instance_id) and
               instance(env.runtime, instance_id).primary().id == standby.id,  # type: ignore[union-attr]
               "the switchover and the rebuild finished", 90)
    writer.wait_acks(20, after=asked_at)
    ha_under_load.stop()

    assert {i for i, _ in writer.acked} <= stored_ids(creds), "acknowledged writes lost"
    after = instance(env.runtime, instance_id)
    assert after.service_address == before.service_address == creds["host"]
    assert after.state == READY and standby_streaming(env, after) is not None
    new_standby = after.standby()
    assert new_standby is not None
    assert new_standby.availability_zone == primary.availability_zone
    [event] = failovers(env, instance_id)
    assert (event.kind, event.outcome, event.lag_bytes_at_promotion) == \
        ("switchover", "succeeded", 0)
    assert [op.state for op in operations(env, instance_id, "switchover")] == ["succeeded"]
    assert resource_counts(env.cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
    deprovision(env.runtime, env.engine, instance_id)
