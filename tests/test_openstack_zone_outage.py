"""A whole availability zone dies under the OpenStack driver (the fake's servers are
namespaces running real PostgreSQL; the real openstacksdk reads Nova's zone list).

Every hypervisor of the primary's zone dies. The failover fences the primary once
Nova counts its host down (its local delete), so the rebuild that follows meets a
zone Nova knows to be dead:
- Admin connection, a plan with a fallback zone: /detail shows the zone with no live
  compute host, so the rebuild puts the standby in the fallback zone, and a rebuild
  brings it home when the zone's hosts are back.
- Member-only, no fallback zone: the plain list cannot tell a zone whose hosts died
  (Nova marks only disabled zones there); the rebuild's create ends in "No valid
  host" and the rebuild waits, saying so, retrying until the zone is back.
- Admin connection, the standby's zone dies: its rebuild starts within seconds,
  while Nova still counts the dead hosts up, so the new server is scheduled onto one
  and never boots; once the zone shows down the driver gives that server up and the
  rebuild moves the new standby (its volume made again) to the fallback zone.
No acknowledged write is lost in any.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.store.models import Instance
from harness.scenarios import under_write_load
from harness.waiting import eventually, operations, rebuild_waiting_for, settled
from harness.workflows import deprovision, instance
from harness.writer import stored_ids
from tests.fakes.openstack.on_namespaces import OpenStackEnv, openstack_on_namespaces
from tests.support.catalogs import catalog_with

pytestmark = pytest.mark.e2e
SETTLE = 240.0  # loose: the machine is shared
# Nova counts a silent compute service down after this (60 s upstream; short here).
SERVICE_DOWN_TIME = 3.0


def _standby_zone(env: OpenStackEnv, instance_id: str) -> str | None:
    standby = instance(env.runtime, instance_id).standby()
    return standby.availability_zone if standby is not None else None


def _in_sync(env: OpenStackEnv, instance_id: str) -> bool:
    inst: Instance = instance(env.runtime, instance_id)
    standby = inst.standby()
    return settled(env, instance_id) and standby is not None \
        and inst.sync_standby_node_id == standby.id


def _kill_zone(env: OpenStackEnv, zone: str) -> list[str]:
    hosts = [h.name for h in env.fake.state.hosts.values() if h.zone == zone]
    for host in hosts:
        env.fake.state.kill_host(host)
    return hosts


def test_admin_rebuilds_the_standby_in_the_fallback_zone_and_brings_it_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv, admin=True,
                                 service_down_time=SERVICE_DOWN_TIME) as env:
        env.runtime.catalog = env.engine.catalog = catalog_with(
            tmp_path / "catalog.yml", fallback_zones=["az3"])
        with under_write_load(env, "ha-sync") as load:
            instance_id, writer = load.instance_id, load.writer
            eventually(lambda: _in_sync(env, instance_id), "synchronous", 120)
            assert _standby_zone(env, instance_id) == "az2"
            dead = _kill_zone(env, "az1")
            eventually(lambda: _standby_zone(env, instance_id) == "az3"
                       and _in_sync(env, instance_id), "a standby in az3", SETTLE)
            standby = instance(env.runtime, instance_id).standby()
            assert standby is not None and standby.server_id is not None
            with env.fake.state.lock:
                assert env.fake.state.servers[standby.server_id].zone == "az3"

            for host in dead:
                env.fake.state.revive_host(host)
            eventually(lambda: _standby_zone(env, instance_id) == "az1"
                       and _in_sync(env, instance_id), "the standby home in az1", SETTLE)
            writer.wait_acks(5, after=writer.acked[-1][1])
            load.stop()
        assert writer.acked and not {i for i, _ in writer.acked} - stored_ids(load.credentials)
        inst = instance(env.runtime, instance_id)
        assert inst.primary().availability_zone == "az2"  # type: ignore[union-attr]
        standby = inst.standby()
        assert standby is not None and standby.server_id is not None
        with env.fake.state.lock:
            assert env.fake.state.servers[standby.server_id].host in dead
        rebuilds = operations(env, instance_id, "rebuild")
        assert [op.state for op in rebuilds] == ["succeeded", "succeeded"]
        assert env.fake.requests("GET", r"/os-availability-zone/detail$")
        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.find_resources(instance_id) == []


def test_member_only_rebuild_waits_for_its_dead_zone_and_completes_when_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv, admin=False,
                                 service_down_time=SERVICE_DOWN_TIME) as env, \
            under_write_load(env, "ha-sync") as load:
        instance_id, writer = load.instance_id, load.writer
        eventually(lambda: _in_sync(env, instance_id), "synchronous", 120)
        dead = _kill_zone(env, "az1")
        rebuild = rebuild_waiting_for(env, instance_id, "az1", SETTLE)
        assert "No valid host was found" in (rebuild.description or "")
        inst = instance(env.runtime, instance_id)
        assert inst.primary().availability_zone == "az2"  # type: ignore[union-attr]
        assert "waiting for availability zone az1" in (inst.state_reason or "")
        writer.wait_acks(5, after=writer.acked[-1][1])  # the primary writes on meanwhile

        for host in dead:
            env.fake.state.revive_host(host)
        eventually(lambda: _standby_zone(env, instance_id) == "az1"
                   and _in_sync(env, instance_id), "a standby in az1 again", SETTLE)
        load.stop()
        assert not {i for i, _ in writer.acked} - stored_ids(load.credentials)
        assert [op.state for op in operations(env, instance_id, "rebuild")] == ["succeeded"]
        # Member-only credentials never ask for what Nova's policy keeps from them.
        assert not env.fake.requests("GET", r"/os-availability-zone/detail$")
        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.find_resources(instance_id) == []


def test_a_standby_whose_zone_dies_under_its_build_moves_to_the_fallback_zone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Longer than the monitor takes to see the standby dead: the rebuild's first
    # server meets hosts Nova still counts up.
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv, admin=True,
                                 service_down_time=15.0) as env:
        env.runtime.catalog = env.engine.catalog = catalog_with(
            tmp_path / "catalog.yml", fallback_zones=["az3"])
        with under_write_load(env, "ha-sync") as load:
            instance_id, writer = load.instance_id, load.writer
            eventually(lambda: _in_sync(env, instance_id), "synchronous", 120)
            creates_before = len(env.fake.requests("POST", r"/servers$"))
            _kill_zone(env, "az2")
            eventually(lambda: _standby_zone(env, instance_id) == "az3"
                       and _in_sync(env, instance_id), "a standby in az3", SETTLE)
            writer.wait_acks(5, after=writer.acked[-1][1])
            load.stop()
        assert not {i for i, _ in writer.acked} - stored_ids(load.credentials)
        zones = [(r.body or {}).get("server", {}).get("availability_zone")
                 for r in env.fake.requests("POST", r"/servers$")[creates_before:]]
        assert zones == ["az2", "az3"]  # given up in the dead zone, then the fallback
        [rebuild] = operations(env, instance_id, "rebuild")
        assert rebuild.state == "succeeded"
        with env.fake.state.lock:
            volumes = [v for v in env.fake.state.volumes.values()
                       if v.name.startswith(f"pgha-{instance_id}") and v.status != "deleting"]
            assert sorted(v.zone for v in volumes) == ["az1", "az3"]  # none left in az2
        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.find_resources(instance_id) == []
