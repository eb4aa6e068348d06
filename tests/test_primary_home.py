"""When the engines queue the switchover that brings a primary back from a fallback
zone, decided from the state store and the cloud's zone list (the OpenStack driver
reading the fake's Nova through openstacksdk), without booting anything; the whole
flow with real PostgreSQL is in test_host_failure.py.

Queued only for a ready, idle instance of a plan with fallback zones and
`primary_returns_home` (the default) whose primary is in a fallback zone while its
standby sits in one of the plan's zones, in sync (ha-sync) or caught up (ha), with
that zone up; once per primary node.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.catalog import Catalog
from broker.cloud.openstack import OpenStackCloud
from broker.config import ConfigError
from broker.operations import queue, requests, zones
from broker.operations.refusals import Busy
from broker.operations.switchover import HOME_KIND
from broker.store.db import Store
from broker.store.models import (
    DEGRADED,
    NODE_RUNNING,
    PRIMARY,
    READY,
    STANDBY,
    Instance,
    Node,
    Operation,
)
from tests.fakes.openstack import FakeOpenStack
from tests.support.catalogs import catalog_with


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    s.upgrade()
    try:
        yield s
    finally:
        s.dispose()


def _instance(store: Store, catalog: Catalog, plan_name: str, primary_zone: str,
              standby_zone: str, *, in_sync: bool = True, lag: int | None = 0,
              state: str = READY) -> Instance:
    plan = next(p for s in catalog.services for p in s.plans if p.name == plan_name)
    inst_id = str(uuid.uuid4())
    primary = Node(id=uuid.uuid4().hex[:8], instance_id=inst_id, role=PRIMARY,
                   state=NODE_RUNNING, availability_zone=primary_zone)
    standby = Node(id=uuid.uuid4().hex[:8], instance_id=inst_id, role=STANDBY,
                   state=NODE_RUNNING, availability_zone=standby_zone)
    inst = Instance(id=inst_id, service_id=catalog.services[0].id, plan_id=plan.id,
                    organization_guid="org", space_guid="space", state=state,
                    replication=plan.cloud.replication, admin_password_enc="x",
                    replication_password_enc="x", last_lag_bytes=lag,
                    sync_standby_node_id=standby.id if in_sync else None)
    with store.session() as s:
        s.add(inst)
        s.add_all([primary, standby])
    with store.session() as s:
        found = s.get(Instance, inst_id)
        assert found is not None
        _ = found.nodes
        s.expunge_all()
        return found


def _queued(store: Store) -> dict[str, str]:
    with store.session() as s:
        return {op.instance_id: op.description or "" for op in
                s.scalars(select(Operation).where(Operation.kind == HOME_KIND))}


def test_a_primary_in_the_fallback_zone_is_switched_home_once_its_standby_is_in_sync(
        store: Store, tmp_path: Path, openstack_cloud: OpenStackCloud) -> None:
    catalog = catalog_with(tmp_path / "c.yml", fallback_zones=["az3"])
    away = _instance(store, catalog, "ha-sync", "az3", "az1")
    not_in_sync = _instance(store, catalog, "ha-sync", "az3", "az1", in_sync=False)
    at_home = _instance(store, catalog, "ha-sync", "az2", "az1")
    degraded = _instance(store, catalog, "ha-sync", "az3", "az1", state=DEGRADED)
    standby_away = _instance(store, catalog, "ha-sync", "az1", "az3")
    no_fallback = _instance(store, catalog, "ha", "az3", "az1")  # ha has none here

    assert zones.queue_primaries_home(store, openstack_cloud, catalog) \
        and set(_queued(store)) == {away.id}
    assert "from the fallback zone az3 to az1" in _queued(store)[away.id]
    # Once per primary: a failed or finished one is not queued again.
    with store.session() as s:
        for op in s.scalars(select(Operation).where(Operation.kind == HOME_KIND)):
            op.state = "failed"
    assert zones.queue_primaries_home(store, openstack_cloud, catalog) == []
    for inst in (not_in_sync, at_home, degraded, standby_away, no_fallback):
        assert inst.id not in _queued(store)


def test_never_while_busy_nor_while_the_home_zone_is_down(
        store: Store, tmp_path: Path, openstack_cloud: OpenStackCloud,
        fake_openstack: FakeOpenStack) -> None:
    catalog = catalog_with(tmp_path / "c.yml", fallback_zones=["az3"])
    inst = _instance(store, catalog, "ha-sync", "az3", "az1")
    with store.session() as s:
        s.add(queue.new_operation(inst.id, "rotate_certs", description="queued"))
    assert zones.queue_primaries_home(store, openstack_cloud, catalog) == []
    with store.session() as s:
        for op in s.scalars(select(Operation)):
            op.state = "succeeded"
    for host in fake_openstack.state.hosts.values():
        host.disabled = host.zone == "az1"  # the operator took az1 out: Nova's list says so
    assert zones.queue_primaries_home(store, openstack_cloud, catalog) == []
    for host in fake_openstack.state.hosts.values():
        host.disabled = False
    openstack_cloud.zone_states.read_at -= 60  # the driver's cache: read Nova again
    assert zones.queue_primaries_home(store, openstack_cloud, catalog) != []


def test_ha_needs_a_caught_up_standby_and_the_plan_flag_turns_it_off(
        store: Store, tmp_path: Path, openstack_cloud: OpenStackCloud) -> None:
    catalog = catalog_with(tmp_path / "c.yml", "ha", fallback_zones=["az3"])
    _instance(store, catalog, "ha", "az3", "az1", lag=64 * 1024 * 1024)  # far behind
    _instance(store, catalog, "ha", "az3", "az1", lag=None)  # the monitor saw no lag yet
    caught_up = _instance(store, catalog, "ha", "az3", "az1", lag=4096)
    zones.queue_primaries_home(store, openstack_cloud, catalog)
    assert set(_queued(store)) == {caught_up.id}

    off = catalog_with(tmp_path / "off.yml", "ha", fallback_zones=["az3"],
                       primary_returns_home=False)
    _instance(store, off, "ha", "az3", "az1")
    assert zones.queue_primaries_home(store, openstack_cloud, off) == []
    with pytest.raises(ConfigError, match="primary_returns_home"):
        catalog_with(tmp_path / "bad.yml", "ha", primary_returns_home="yes")


def test_a_deprovision_is_accepted_behind_it_not_refused(
        store: Store, tmp_path: Path, openstack_cloud: OpenStackCloud) -> None:
    """Not the platform's operation: `cf delete-service` meanwhile is queued after it,
    as after a failover, where the platform's own switchover gets 422."""
    catalog = catalog_with(tmp_path / "c.yml", fallback_zones=["az3"])
    inst = _instance(store, catalog, "ha-sync", "az3", "az1")
    [op_id] = zones.queue_primaries_home(store, openstack_cloud, catalog)
    accepted = requests.deprovision(store, inst.id, accepts_incomplete=True)
    assert accepted.queued and accepted.operation_id != op_id
    with store.session() as s:
        deprovision = s.get(Operation, accepted.operation_id)
        assert deprovision is not None
        assert deprovision.description == "queued: deprovisioning (after the " \
            "switchover-home in progress)"

    platform = _instance(store, catalog, "ha-sync", "az1", "az2")
    with store.session() as s:
        requests.queue_switchover(s, s.get(Instance, platform.id))  # type: ignore[arg-type]
    with pytest.raises(Busy):
        requests.deprovision(store, platform.id, accepts_incomplete=True)
