"""The whole flow through the OpenStack driver, with real PostgreSQL behind the fake.

The fake OpenStack's servers are local-cloud namespaces that run the bootstrap taken
from the broker's own cloud-init user-data (tests/fakes/openstack/local_backend.py).
The broker runs unchanged with its OpenStack driver: provision, bind, a hypervisor
that dies under write load (fenced by Nova's local delete once the compute service
counts as down, 6 s here: longer than the monitor's detection, so the fence meets a
host Nova still counts up, which accepts the stop and never does it), promotion, the
service port moved, a standby rebuilt in the failed zone, deprovision, and nothing
left in either cloud. The fake has Nova's default policies: the flow passes with
member-only credentials and with an admin connection.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.scenarios import under_write_load
from harness.waiting import eventually, failovers, settled
from harness.workflows import deprovision, instance
from harness.writer import stored_ids
from tests.fakes.openstack.on_namespaces import OpenStackEnv, openstack_on_namespaces

pytestmark = pytest.mark.e2e

@pytest.mark.parametrize("admin", [False, True], ids=["member-only", "admin"])
def test_ha_sync_survives_a_dead_hypervisor_through_the_openstack_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admin: bool) -> None:
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv, admin=admin) as env, \
            under_write_load(env, "ha-sync") as load:
        state = env.fake.state
        instance_id, creds, writer = load.instance_id, load.credentials, load.writer
        before = instance(env.runtime, instance_id)
        old_primary, old_standby = before.primary(), before.standby()
        assert old_primary is not None and old_standby is not None
        assert old_primary.server_id is not None

        # Each node was made by the real bootstrap found in the broker's user-data.
        assert [b["config"]["role"] for b in env.backend.booted] == ["primary", "standby"]
        assert all("updates" not in b["cloud_config"]  # no cloud-init hotplug
                   for b in env.backend.booted)
        zones = {state.servers[n.server_id].zone for n in (old_primary, old_standby)
                 if n.server_id}
        assert zones == {"az1", "az2"}

        writer.wait_acks(20)
        dead_host = state.host_of(old_primary.server_id)
        assert dead_host is not None
        state.kill_host(dead_host)  # a hardware outage: the hypervisor is gone
        kill_at = time.monotonic()
        first = writer.wait_acks(5, after=kill_at, timeout=90)
        print(f"first write through the service address {first - kill_at:.1f} s "
              "after the hypervisor died")
        eventually(lambda: settled(env, instance_id) and
                   instance(env.runtime, instance_id).primary().id  # type: ignore[union-attr]
                   != old_primary.id,
                   "the instance ready again with a streaming standby", 120)
        load.stop()
        assert writer.acked and not ({i for i, _ in writer.acked} - stored_ids(creds))

        after = instance(env.runtime, instance_id)
        primary, standby = after.primary(), after.standby()
        assert primary is not None and standby is not None
        assert primary.id == old_standby.id
        assert after.service_address == before.service_address == creds["host"]
        assert standby.availability_zone == old_primary.availability_zone
        assert standby.server_id is not None
        with state.lock:
            assert old_primary.server_id not in state.servers       # Nova's local delete
            assert state.servers[standby.server_id].host != dead_host
            assert after.service_port_id is not None
            assert state.ports[after.service_port_id].device_id == primary.server_id
        events = failovers(env, instance_id)
        assert events and events[-1].fenced_at is not None

        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.find_resources(instance_id) == []
        assert env.cloud.find_security_groups(instance_id) == []
        with state.lock:
            assert not state.servers and not state.ports
            assert all(v.status == "deleting" for v in state.volumes.values())


def test_standalone_resurrect_with_a_volume_stuck_in_use_keeps_the_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv) as env, \
            under_write_load(env, "standalone") as load:
        state = env.fake.state
        instance_id, creds, writer = load.instance_id, load.credentials, load.writer
        before = instance(env.runtime, instance_id)
        old = before.primary()
        assert old is not None and old.server_id and old.volume_id
        writer.wait_acks(20)
        with state.lock:
            state.volumes[old.volume_id].stuck = True  # Nova never lets go of it
        dead_host = state.host_of(old.server_id)
        assert dead_host is not None
        state.kill_host(dead_host)
        kill_at = time.monotonic()
        writer.wait_acks(5, after=kill_at, timeout=120)
        eventually(lambda: settled_standalone(env, instance_id, old.id),
                   "the instance resurrected", 120)
        load.stop()
        assert writer.acked and not ({i for i, _ in writer.acked} - stored_ids(creds))

        after = instance(env.runtime, instance_id)
        new = after.primary()
        assert new is not None and new.id != old.id and new.server_id is not None
        assert new.volume_id == old.volume_id                       # the same disk
        assert new.availability_zone == old.availability_zone
        assert after.service_address == before.service_address == creds["host"]
        with state.lock:
            assert state.servers[new.server_id].volume_ids == [old.volume_id]
        # The stuck attachment was deleted through Cinder, not by a status reset.
        assert env.fake.requests("DELETE", r"/attachments/")
        [event] = failovers(env, instance_id)
        assert (event.kind, event.outcome) == ("resurrect", "succeeded")
        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.find_resources(instance_id) == []


def settled_standalone(env: OpenStackEnv, instance_id: str, old_node_id: str) -> bool:
    from broker.store.models import READY
    from harness.waiting import unfinished

    inst = instance(env.runtime, instance_id)
    primary = inst.primary()
    return (inst.state == READY and not unfinished(env, instance_id)
            and primary is not None and primary.id != old_node_id)
