"""Which zones can take a server, as the OpenStack driver reads Nova's zone list
through the real openstacksdk from the fake (Nova's code and default policies).

- Member-only: the plain list marks a zone down only once every compute service in
  it is disabled; hypervisors that died without being disabled leave it "available"
  (Nova looks at `disabled` only there), so the create itself fails ("No valid
  host") and the caller waits.
- With the admin connection: the detailed list (admin-only) shows each host's
  nova-compute heartbeat; a zone with no live, enabled compute host is down, and up
  again when one comes back.
- The answer is cached briefly; a failed read is logged, keeps the last answer for a
  while and never makes a zone look dead.
"""

from __future__ import annotations

import logging

import pytest
from openstack import exceptions as os_exc

from broker.catalog import Catalog
from broker.cloud.openstack import zones
from broker.cloud.openstack.zones import ZoneStates
from tests.fakes.openstack import FakeOpenStack
from tests.support.openstack import make_cloud


class Clock:
    """The driver's cache clock, moved by the test (the cache's only input besides Nova)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _zone_hosts(fake: FakeOpenStack, zone: str) -> list[str]:
    return [h.name for h in fake.state.hosts.values() if h.zone == zone]


def _listings(fake: FakeOpenStack) -> int:
    return len(fake.requests("GET", r"/os-availability-zone"))


def test_member_only_sees_a_zone_down_once_its_services_are_disabled(
        openstack_env: object, fake_openstack: FakeOpenStack, catalog: Catalog) -> None:
    cloud = make_cloud(catalog)
    clock = Clock()
    cloud.zone_states = ZoneStates(cloud, clock=clock)
    try:
        assert [cloud.zone_available(z) for z in ("az1", "az2", "az3")] == [True] * 3
        assert not cloud.zone_available("az9")  # no service there: Nova does not list it
        assert _listings(fake_openstack) == 1   # one read served all five answers
        fake_openstack.state.service_down_time = 0.0
        for host in _zone_hosts(fake_openstack, "az2"):
            fake_openstack.state.kill_host(host)
        clock.now += zones.ZONE_CACHE_SECONDS
        assert cloud.zone_available("az2")      # Nova's plain list: dead, not disabled
        for host in _zone_hosts(fake_openstack, "az2"):
            fake_openstack.state.hosts[host].disabled = True
        assert cloud.zone_available("az2")      # cached for a few seconds
        clock.now += zones.ZONE_CACHE_SECONDS
        assert not cloud.zone_available("az2")
        assert cloud.zone_available("az1")
        # Nova's default policy: the detailed list is for admins only.
        with pytest.raises(os_exc.ForbiddenException):
            list(cloud.conn.compute.availability_zones(details=True))
        assert all(r.path.endswith("/os-availability-zone")
                   for r in fake_openstack.requests("GET", r"/os-availability-zone$"))
    finally:
        cloud.close()


def test_admin_sees_a_zone_whose_hosts_died_and_its_return(
        openstack_env: object, fake_openstack: FakeOpenStack, catalog: Catalog) -> None:
    cloud = make_cloud(catalog, admin=True)
    clock = Clock()
    cloud.zone_states = ZoneStates(cloud, clock=clock)
    state = fake_openstack.state
    try:
        assert cloud.zone_available("az2") and cloud.zone_available("az3")
        assert not cloud.zone_available("internal")  # conductor and scheduler only
        az2 = _zone_hosts(fake_openstack, "az2")
        state.kill_host(az2[0])
        state.service_down_time = 0.0               # Nova counts dead hosts down at once
        clock.now += zones.ZONE_CACHE_SECONDS
        assert cloud.zone_available("az2")          # its other host lives
        state.kill_host(az2[1])
        clock.now += zones.ZONE_CACHE_SECONDS
        assert not cloud.zone_available("az2")
        state.revive_host(az2[1])
        clock.now += zones.ZONE_CACHE_SECONDS
        assert cloud.zone_available("az2")
        # Forced down (after the fencing hook) or disabled: no host Nova would use.
        state.hosts[az2[1]].forced_down = True
        clock.now += zones.ZONE_CACHE_SECONDS
        assert not cloud.zone_available("az2")
        state.hosts[az2[1]].forced_down = False
        state.hosts[az2[1]].disabled = True
        clock.now += zones.ZONE_CACHE_SECONDS
        assert not cloud.zone_available("az2")
        assert fake_openstack.requests("GET", r"/os-availability-zone/detail$")
    finally:
        cloud.close()


def test_a_failed_read_keeps_the_last_answer_then_cannot_tell(
        openstack_env: object, fake_openstack: FakeOpenStack, catalog: Catalog,
        caplog: pytest.LogCaptureFixture) -> None:
    cloud = make_cloud(catalog)
    clock = Clock()
    cloud.zone_states = ZoneStates(cloud, clock=clock)
    try:
        for host in _zone_hosts(fake_openstack, "az2"):
            fake_openstack.state.hosts[host].disabled = True
        assert not cloud.zone_available("az2")
        fake_openstack.fail("GET", r"/os-availability-zone$", status=503, times=None)
        clock.now += zones.ZONE_CACHE_SECONDS
        with caplog.at_level(logging.WARNING, logger="broker.cloud.openstack"):
            assert not cloud.zone_available("az2")  # the last answer stands
        assert "cannot tell which availability zones are up" in caplog.text
        assert "503" in caplog.text and "stands" in caplog.text
        failed = _listings(fake_openstack)
        assert not cloud.zone_available("az2")      # no new request before the retry time
        assert _listings(fake_openstack) == failed
        clock.now += zones.STALE_LIMIT_SECONDS
        assert cloud.zone_available("az2")          # too old: can't tell, so not dead
        assert _listings(fake_openstack) == failed + 1
        fake_openstack.clear_faults()
        clock.now += zones.ERROR_RETRY_SECONDS
        assert not cloud.zone_available("az2")      # read again as soon as Nova answers
    finally:
        cloud.close()
