"""Fencing and moving the service port on OpenStack, against the fake's failure modes.

- a kernel panic: the hypervisor lives, stop and detach work within seconds;
- a dead hypervisor: Nova accepts requests and never carries them out until it counts
  the compute service down (service_down_time) or an admin forces it down;
- a volume left in-use on a dead server.
The rule under test: the driver never reports the service port free while Neutron
still binds it to the old server, so a failover never attaches it twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from broker.catalog import Catalog
from broker.cloud.base import TAG_INSTANCE, CloudError, FenceError, ServerStatus
from broker.cloud.openstack import OpenStackCloud, reporting
from tests.fakes.openstack import FakeOpenStack
from tests.support.openstack import build_node, make_cloud

INSTANCE = "0e4d2c1b-7a6f-4e3d-9c8b-1a2b3c4d5e6f"


@dataclass
class Pair:
    cloud: OpenStackCloud
    fake: FakeOpenStack
    primary: Any
    standby: Any
    primary_volume: Any
    service_port: Any

    def port_device(self) -> str:
        with self.fake.state.lock:
            return self.fake.state.ports[self.service_port.id].device_id

    def host_of_primary(self) -> str:
        host = self.fake.state.host_of(self.primary.id)
        assert host is not None
        return host


def make_pair(cloud: OpenStackCloud, fake: FakeOpenStack) -> Pair:
    tags = {TAG_INSTANCE: INSTANCE, "pgha-managed": "true"}
    group = cloud.ensure_server_group(f"pgha-{INSTANCE}", tags)
    service = cloud.create_port(f"pgha-{INSTANCE}-service", "service", tags)
    primary, _, volume, _ = build_node(cloud, INSTANCE, "aaaa0001", "az1", "primary", group)
    standby, *_ = build_node(cloud, INSTANCE, "bbbb0002", "az2", "standby", group)
    cloud.attach_port(service.id, primary.id)
    pair = Pair(cloud, fake, primary, standby, volume, service)
    assert pair.port_device() == primary.id
    return pair


@pytest.fixture
def pair(openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> Pair:
    return make_pair(openstack_cloud, fake_openstack)


@pytest.fixture
def progress() -> Iterator[list[str]]:
    lines: list[str] = []
    with reporting(lines.append):
        yield lines


def test_kernel_panic_stop_detach_and_reattach_within_seconds(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    cloud = pair.cloud
    fake_openstack.fail("POST", r"/os-interface$", status=409, times=1, body={
        "conflictingRequest": {"code": 409, "message": "Cannot 'attach_interface' instance "
                                                       "while it is in task_state spawning"}})
    cloud.stop_server(pair.primary.id)
    assert fake_openstack.state.servers[pair.primary.id].vm_state == "stopped"
    server = cloud.get_server(pair.primary.id)
    assert server is not None and server.status == ServerStatus.SHUTOFF
    cloud.detach_port(pair.service_port.id, pair.primary.id)
    assert pair.port_device() == ""
    cloud.attach_port(pair.service_port.id, pair.standby.id)
    assert pair.port_device() == pair.standby.id
    port = cloud.get_port(pair.service_port.id)
    assert port is not None and port.address == pair.service_port.address
    # A live hypervisor: stopping was enough, nothing was deleted.
    assert fake_openstack.requests("DELETE", r"/servers/[^/]+$") == []
    assert [r.status for r in fake_openstack.requests("POST", r"/os-interface$")][-2:] \
        == [409, 200]


@pytest.mark.parametrize("admin", [False, True], ids=["member-only", "admin"])
def test_dead_hypervisor_fence_waits_for_nova_then_deletes_and_frees_port_and_volume(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack,
        progress: list[str], admin: bool) -> None:
    cloud = make_cloud(catalog, admin=admin)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        state.service_down_time = 1.0
        state.kill_host(pair.host_of_primary())
        cloud.stop_server(pair.primary.id)  # returns only once fenced

        assert pair.primary.id not in state.servers          # Nova's local delete
        assert pair.port_device() == ""                       # ... unbound the port
        assert state.volumes[pair.primary_volume.id].status == "available"
        assert any("fencing server" in line and "by deleting it" in line
                   for line in progress)
        # Only an admin sees host_status (Nova's default policy): a member-only broker
        # never learns that the host is down; its repeated delete just succeeds.
        assert any("counts the compute host" in line for line in progress) == admin
        cloud.detach_port(pair.service_port.id, pair.primary.id)  # nothing left to do
        cloud.attach_port(pair.service_port.id, pair.standby.id)
        assert pair.port_device() == pair.standby.id
    finally:
        cloud.close()


def test_dead_hypervisor_port_is_never_reported_unbound_while_neutron_binds_it(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    state = fake_openstack.state
    state.service_down_time = 600.0   # Nova will not count the host down in this test
    pair.cloud.options = replace(pair.cloud.options, host_down_timeout=1.0)
    state.kill_host(pair.host_of_primary())

    with pytest.raises(FenceError) as detach:
        pair.cloud.detach_port(pair.service_port.id, pair.primary.id)
    assert "still bound" in str(detach.value)
    assert fake_openstack.requests("DELETE", r"/os-interface/")[-1].status == 202  # accepted
    assert pair.port_device() == pair.primary.id            # ... and never done

    with pytest.raises(CloudError, match="bound to server"):
        pair.cloud.attach_port(pair.service_port.id, pair.standby.id)
    assert pair.port_device() == pair.primary.id

    with pytest.raises(FenceError) as stop:
        pair.cloud.stop_server(pair.primary.id)
    assert "no promotion" in str(stop.value)
    assert "compute service set --down" in str(stop.value)
    assert pair.primary.id in state.servers and pair.port_device() == pair.primary.id


def test_only_the_admin_connection_sees_the_host_counted_down(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    cloud = make_cloud(catalog, admin=True)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        state.service_down_time = 0.2
        state.kill_host(pair.host_of_primary())
        assert cloud.fencer.hosts.read(pair.primary.id).host_status == "UP"  # not yet
        cloud.wait("the host to count as down", lambda: True if cloud.fencer.hosts.read(
            pair.primary.id).host_status == "UNKNOWN" else None, 5.0)
        server = cloud.get_server(pair.primary.id)   # read through the admin connection
        assert server is not None and server.status == ServerStatus.UNKNOWN
        # A server's status never reflects its host (vm_state and task_state only), and
        # a member is not shown host_status at all.
        member = cloud.raw_server(pair.primary.id)
        assert (member.status, member.host_status) == ("ACTIVE", None)
        member_only = make_cloud(catalog)
        try:
            server = member_only.get_server(pair.primary.id)
            assert server is not None and server.status == ServerStatus.ACTIVE
        finally:
            member_only.close()
    finally:
        cloud.close()


def _hook(tmp_path: Path, exit_code: int) -> tuple[Path, Path]:
    """A fencing hook that records the host it was asked to power off."""
    calls = tmp_path / "hook-calls"
    hook = tmp_path / "fence-hook"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexit {exit_code}\n')
    hook.chmod(0o755)
    return hook, calls


def test_fencing_hook_confirmed_off_then_the_service_is_forced_down(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack,
        progress: list[str], tmp_path: Path) -> None:
    hook, calls = _hook(tmp_path, 0)
    cloud = make_cloud(catalog, admin=True, fence_hook=str(hook), fence_hook_after=0.3,
                       stop_timeout=5.0)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        state.service_down_time = 600.0   # Nova alone would take ten minutes
        host = pair.host_of_primary()
        state.kill_host(host)
        cloud.stop_server(pair.primary.id)
        assert calls.read_text().split() == [host]
        assert state.hosts[host].forced_down
        put = fake_openstack.requests("PUT", r"/os-services/")
        assert [r.body for r in put] == [{"forced_down": True}]
        assert pair.primary.id not in state.servers and pair.port_device() == ""
        assert any("fencing hook confirmed host" in line for line in progress)
        # Other hosts were left alone.
        assert [h.name for h in state.hosts.values() if h.forced_down] == [host]
    finally:
        cloud.close()


def test_no_forcing_when_the_hook_does_not_confirm_or_nova_counts_the_host_down(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack,
        tmp_path: Path) -> None:
    hook, calls = _hook(tmp_path, 1)
    cloud = make_cloud(catalog, admin=True, fence_hook=str(hook), fence_hook_after=0.3)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        state.service_down_time = 2.0
        host = pair.host_of_primary()
        state.kill_host(host)
        cloud.stop_server(pair.primary.id)     # the hook says no: wait for Nova
        assert calls.read_text().split() == [host]   # asked once, not again and again
        assert not state.hosts[host].forced_down
        assert pair.primary.id not in state.servers

        # A host Nova already counts down is neither powered off nor forced.
        calls.unlink()
        other = pair.standby.id
        state.kill_host(pair.fake.state.host_of(other) or "")
        cloud.wait("the host to count as down", lambda: True if cloud.fencer.hosts.read(
            other).host_status == "UNKNOWN" else None, 10.0)
        cloud.stop_server(other)
        assert not calls.exists()
        assert fake_openstack.requests("PUT", r"/os-services/") == []
        assert other not in state.servers
    finally:
        cloud.close()


def test_host_dying_after_the_stop_still_frees_the_port(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    state = fake_openstack.state
    pair.cloud.stop_server(pair.primary.id)
    state.service_down_time = 0.5
    state.kill_host(pair.host_of_primary())
    pair.cloud.detach_port(pair.service_port.id, pair.primary.id)
    assert pair.port_device() == ""
    assert pair.primary.id not in state.servers  # the stopped server had to go


def test_a_server_in_error_is_fenced_by_deleting_it(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    with fake_openstack.state.lock:
        fake_openstack.state.servers[pair.primary.id].vm_state = "error"
    pair.cloud.stop_server(pair.primary.id)
    assert pair.primary.id not in fake_openstack.state.servers
    assert pair.port_device() == ""


def test_volume_stuck_in_use_on_a_dead_server_is_released_through_cinder(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    state = fake_openstack.state
    volume_id = pair.primary_volume.id
    state.volumes[volume_id].stuck = True
    state.service_down_time = 0.5
    state.kill_host(pair.host_of_primary())
    pair.cloud.stop_server(pair.primary.id)
    assert pair.primary.id not in state.servers
    assert state.volumes[volume_id].status == "in-use"     # the backend kept it
    with pytest.raises(CloudError, match="with force"):
        pair.cloud.detach_volume(volume_id, pair.primary.id)
    pair.cloud.detach_volume(volume_id, pair.primary.id, force=True)
    volume = pair.cloud.get_volume(volume_id)
    assert volume is not None and volume.status == "available" and volume.attached_to is None
    assert fake_openstack.requests("DELETE", r"/attachments/")[-1].status == 200
    assert fake_openstack.requests("POST", r"/volumes/[^/]+/action$") == []  # no admin step


def test_stuck_attachment_falls_back_to_admin_force_detach(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    cloud = make_cloud(catalog, admin=True, retry_budget=0.2)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        volume_id = pair.primary_volume.id
        state.volumes[volume_id].stuck = True
        state.volumes[volume_id].attachment_delete_fails = True
        state.service_down_time = 0.3
        state.kill_host(pair.host_of_primary())
        cloud.stop_server(pair.primary.id)
        cloud.detach_volume(volume_id, pair.primary.id, force=True)
        assert state.volumes[volume_id].status == "available"
        action = fake_openstack.requests("POST", r"/volumes/[^/]+/action$")[-1]
        assert "os-force_detach" in action.body
        # A stuck volume whose server is gone is also freed by deleting it.
        state.volumes[volume_id].stuck = False
        cloud.delete_volume(volume_id)
        assert volume_id not in state.volumes
    finally:
        cloud.close()


def test_force_detach_is_refused_while_the_server_may_run(
        pair: Pair, fake_openstack: FakeOpenStack) -> None:
    with pytest.raises(CloudError, match="refusing to force"):
        pair.cloud.detach_volume(pair.primary_volume.id, pair.primary.id, force=True)
    assert fake_openstack.state.volumes[pair.primary_volume.id].status == "in-use"
    # Stopped first: a plain Nova detach releases it.
    pair.cloud.stop_server(pair.primary.id)
    pair.cloud.detach_volume(pair.primary_volume.id, pair.primary.id, force=True)
    assert fake_openstack.state.volumes[pair.primary_volume.id].status == "available"


def test_a_host_counted_down_is_no_evidence_that_its_server_is_off(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    """nova-compute (or its message bus) can die while the VM still writes: the volume is
    forced off only once the server is confirmed off, in ERROR, or deleted."""
    cloud = make_cloud(catalog, admin=True)
    try:
        pair = make_pair(cloud, fake_openstack)
        state = fake_openstack.state
        volume_id = pair.primary_volume.id
        state.service_down_time = 0.2
        state.kill_host(pair.host_of_primary())
        cloud.wait("the host to count as down", lambda: True if cloud.fencer.hosts.read(
            pair.primary.id).host_status == "UNKNOWN" else None, 5.0)
        with pytest.raises(CloudError, match="may be running"):
            cloud.detach_volume(volume_id, pair.primary.id, force=True)
        assert state.volumes[volume_id].status == "in-use"
        assert fake_openstack.requests("DELETE", r"/attachments/") == []
        cloud.stop_server(pair.primary.id)           # fenced: Nova's local delete
        cloud.detach_volume(volume_id, pair.primary.id, force=True)
        assert state.volumes[volume_id].status == "available"
    finally:
        cloud.close()
