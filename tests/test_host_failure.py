"""Whole hypervisors and zones die on the local cloud, under write load.

- A host carrying the primaries of two instances dies (links down, processes killed):
  both fail over, no acknowledged write is lost, and their new standbys are built on
  the zone's live host.
- A whole zone dies and the plan has no fallback zone: the rebuild of the standby
  waits, saying so, and completes once the zone is back.
- The standby's zone dies and the plan has a fallback zone: the standby is rebuilt
  there, and returns to its own zone once that zone is back.
- Then the primary's zone dies too: the standby in the fallback zone is promoted.
  Once the zones are back and a standby in the plan's zone is in sync, a switchover
  brings the primary home (once), and the old primary is replaced in the plan's
  other zone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store.models import READY, Instance
from harness.env import FailoverEnv, background, failover_env
from harness.faults import host_of, kill_host, kill_zone, revive_host, revive_zone
from harness.waiting import eventually, failovers, operations, rebuild_waiting_for, settled
from harness.workflows import deprovision, instance, provision, resource_counts
from harness.writer import Writer, app_credentials, stored_ids
from tests.support.catalogs import catalog_with

pytestmark = pytest.mark.e2e
# Loose bounds: this machine is shared; the benchmark keeps the real figures.
SETTLE = 240.0


def _sync_standby(env: FailoverEnv, instance_id: str) -> bool:
    inst = instance(env.runtime, instance_id)
    standby = inst.standby()
    return settled(env, instance_id) and standby is not None \
        and inst.sync_standby_node_id == standby.id


def _standby_zone(inst: Instance) -> str | None:
    standby = inst.standby()
    return standby.availability_zone if standby is not None else None


@contextlib.contextmanager
def _writing(env: FailoverEnv, instance_ids: list[str]) -> Iterator[dict[str, Writer]]:
    writers = {i: Writer(app_credentials(env, i, f"app-{i}")) for i in instance_ids}
    try:
        for w in writers.values():
            w.start()
        for w in writers.values():
            w.wait_acks(10)
        yield writers
    finally:
        for w in writers.values():
            w.stop()


def _lost(writer: Writer) -> set[int]:
    return {i for i, _ in writer.acked} - stored_ids(writer.credentials)


def test_a_dead_host_with_two_primaries() -> None:
    with failover_env() as env:
        # az1-host-b in maintenance while they are made: both primaries land on az1-host-a.
        kill_host(env.cloud, "az1-host-b")
        ids = [provision(env.runtime, env.engine, "ha-sync") for _ in range(2)]
        revive_host(env.cloud, "az1-host-b")
        before = {i: instance(env.runtime, i) for i in ids}
        primaries = [inst.primary() for inst in before.values()]
        old = {i: n.id for i, n in zip(ids, primaries, strict=True) if n is not None}
        servers = {n.server_id for n in primaries if n is not None and n.server_id}
        assert len(old) == len(servers) == 2
        assert {host_of(env.cloud, s) for s in servers} == {"az1-host-a"}
        with _writing(env, ids) as writers, background(env):
            eventually(lambda: all(_sync_standby(env, i) for i in ids), "synchronous", 120)
            dead = kill_host(env.cloud, "az1-host-a")
            assert servers <= set(dead)

            def back(i: str) -> bool:
                primary = instance(env.runtime, i).primary()
                return primary is not None and primary.id != old[i] and _sync_standby(env, i)
            eventually(lambda: all(back(i) for i in ids), "both failed over, standbys back",
                       SETTLE)
            for w in writers.values():
                w.wait_acks(5, after=w.acked[-1][1])
        for i in ids:
            assert not _lost(writers[i]), "acknowledged writes lost"
            after = instance(env.runtime, i)
            assert after.state == READY and after.service_address == before[i].service_address
            [event] = failovers(env, i)
            assert event.outcome == "succeeded" and event.old_primary_node_id == old[i]
            standby = after.standby()
            assert standby is not None and standby.server_id is not None
            assert standby.availability_zone == "az1"
            assert host_of(env.cloud, standby.server_id) == "az1-host-b"  # the live one
            assert resource_counts(env.cloud, i) == {"server": 2, "volume": 2, "port": 3}
            deprovision(env.runtime, env.engine, i)


def test_a_rebuild_waits_for_its_dead_zone_and_completes_when_it_returns() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        old = instance(env.runtime, instance_id).primary()
        assert old is not None and old.availability_zone == "az1"
        with _writing(env, [instance_id]) as writers, background(env):
            eventually(lambda: _sync_standby(env, instance_id), "synchronous", 120)
            kill_zone(env.cloud, "az1")
            rebuild = rebuild_waiting_for(env, instance_id, "az1", SETTLE)
            assert "no host there is up; the plan has no fallback zone" in (
                rebuild.description or "")
            inst = instance(env.runtime, instance_id)
            assert inst.primary().availability_zone == "az2"  # type: ignore[union-attr]
            assert "waiting for availability zone az1" in (inst.state_reason or "")
            writers[instance_id].wait_acks(5, after=writers[instance_id].acked[-1][1])

            revive_zone(env.cloud, "az1")
            eventually(lambda: _sync_standby(env, instance_id), "a standby in az1 again",
                       SETTLE)
        assert not _lost(writers[instance_id])
        inst = instance(env.runtime, instance_id)
        assert _standby_zone(inst) == "az1"
        assert [op.state for op in operations(env, instance_id, "rebuild")] == ["succeeded"]
        deprovision(env.runtime, env.engine, instance_id)


def test_a_standby_uses_the_fallback_zone_and_returns_home(tmp_path: Path) -> None:
    with failover_env() as env:
        catalog = catalog_with(tmp_path / "catalog.yml", fallback_zones=["az3"])
        env.runtime.catalog = env.engine.catalog = catalog
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        with _writing(env, [instance_id]) as writers, background(env):
            eventually(lambda: _sync_standby(env, instance_id), "synchronous", 120)
            kill_zone(env.cloud, "az2")
            eventually(lambda: _standby_zone(instance(env.runtime, instance_id)) == "az3"
                       and _sync_standby(env, instance_id), "a standby in az3", SETTLE)
            standby = instance(env.runtime, instance_id).standby()
            assert standby is not None and standby.server_id is not None
            assert host_of(env.cloud, standby.server_id) == "az3-host-a"

            revive_zone(env.cloud, "az2")
            eventually(lambda: _standby_zone(instance(env.runtime, instance_id)) == "az2"
                       and _sync_standby(env, instance_id), "the standby home in az2", SETTLE)
        assert not _lost(writers[instance_id])
        inst = instance(env.runtime, instance_id)
        assert inst.primary().availability_zone == "az1"  # type: ignore[union-attr]
        rebuilds = operations(env, instance_id, "rebuild")
        assert [op.state for op in rebuilds] == ["succeeded", "succeeded"]
        assert resource_counts(env.cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
        deprovision(env.runtime, env.engine, instance_id)


def _zones(env: FailoverEnv, instance_id: str) -> tuple[str | None, str | None]:
    inst = instance(env.runtime, instance_id)
    primary, standby = inst.primary(), inst.standby()
    return (primary.availability_zone if primary else None,
            standby.availability_zone if standby else None)


def test_a_primary_left_in_the_fallback_zone_is_switched_back_home(tmp_path: Path) -> None:
    with failover_env() as env:
        catalog = catalog_with(tmp_path / "catalog.yml", fallback_zones=["az3"])
        env.runtime.catalog = env.engine.catalog = catalog
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        address = instance(env.runtime, instance_id).service_address
        with _writing(env, [instance_id]) as writers, background(env):
            writer = writers[instance_id]
            eventually(lambda: _sync_standby(env, instance_id), "synchronous", 120)
            kill_zone(env.cloud, "az2")
            eventually(lambda: _zones(env, instance_id) == ("az1", "az3")
                       and _sync_standby(env, instance_id), "a standby in az3", SETTLE)
            kill_zone(env.cloud, "az1")
            eventually(lambda: _zones(env, instance_id)[0] == "az3",
                       "the standby in az3 promoted", SETTLE)
            writer.wait_acks(5, after=writer.acked[-1][1], timeout=SETTLE)
            # No standby can be placed (az1 and az2 dead): nothing to switch over to.
            assert not operations(env, instance_id, "switchover-home")

            revive_zone(env.cloud, "az1")
            revive_zone(env.cloud, "az2")
            eventually(lambda: _zones(env, instance_id) == ("az1", "az2")
                       and _sync_standby(env, instance_id),
                       "the primary back in az1, the standby in az2", 2 * SETTLE)
            writer.wait_acks(5, after=writer.acked[-1][1], timeout=SETTLE)
        assert not _lost(writer)
        inst = instance(env.runtime, instance_id)
        assert inst.state == READY and inst.service_address == address
        [home] = operations(env, instance_id, "switchover-home")
        assert home.state == "succeeded"
        events = failovers(env, instance_id)
        assert [(e.kind, e.outcome) for e in events] == [("failover", "succeeded"),
                                                         ("switchover", "succeeded")]
        assert events[1].cause == "returning the primary from the fallback zone az3 to az1"
        assert resource_counts(env.cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
        deprovision(env.runtime, env.engine, instance_id)
