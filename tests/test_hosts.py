"""Hypervisors of the local cloud and the bounds on mass failovers, without booting
anything: the host map an operator configures, where servers land, a zone with no
host up, the catalog's fallback zones, and the per-worker failover and rebuild slots."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from broker.catalog import parse_catalog
from broker.cloud.base import NoValidHost, ServerStatus
from broker.cloud.local.hosts import DEFAULT_HOSTS, place
from broker.cloud.local.records import Records, ServerRecord
from broker.config import (
    DEFAULT_CATALOG,
    ConfigError,
    OperationSettings,
    default_max_failovers,
    load_settings,
)
from broker.operations import slots

ENV = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": "/tmp/x"}


def test_the_host_map_and_the_bounds_come_from_the_environment() -> None:
    settings = load_settings({**ENV, "BROKER_LOCAL_HOSTS": "az1: h1 , h2;az2:h3",
                              "BROKER_MAX_FAILOVERS": "3", "BROKER_MAX_REBUILDS": "1"})
    assert settings.local_hosts == (("az1", ("h1", "h2")), ("az2", ("h3",)))
    assert settings.operations == OperationSettings(max_failovers=3, max_rebuilds=1)
    defaults = load_settings(ENV)
    assert dict(defaults.local_hosts) == DEFAULT_HOSTS
    # The local cloud's failovers share this machine's CPU: fewer at once by default.
    assert defaults.operations == OperationSettings(max_failovers=4, max_rebuilds=2)
    assert default_max_failovers("openstack") == 16


@pytest.mark.parametrize(("name", "value", "message"), [
    ("BROKER_LOCAL_HOSTS", "az1", "BROKER_LOCAL_HOSTS must be zone:host,host;zone:host"),
    ("BROKER_LOCAL_HOSTS", "az1:h1,,h2", "BROKER_LOCAL_HOSTS must be zone:host"),
    ("BROKER_LOCAL_HOSTS", "az1:h1;az2:h1", "BROKER_LOCAL_HOSTS names 'h1' twice"),
    ("BROKER_LOCAL_HOSTS", "az1:h1 h2", "BROKER_LOCAL_HOSTS must be zone:host"),
    ("BROKER_MAX_FAILOVERS", "0", "BROKER_MAX_FAILOVERS must be a whole number from 1"),
    ("BROKER_MAX_REBUILDS", "two", "BROKER_MAX_REBUILDS must be a whole number from 1"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({**ENV, name: value})


def test_the_worker_stops_on_a_bad_host_map_with_its_name(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "broker", "worker"], capture_output=True,
                         text=True, check=False, timeout=60,
                         env={"PATH": "/usr/bin:/bin", **ENV, "BROKER_STATE_DIR": str(tmp_path),
                              "BROKER_LOCAL_HOSTS": "az1:a;az2:a"})
    assert out.returncode == 2
    assert "BROKER_LOCAL_HOSTS names 'a' twice" in out.stderr and "Traceback" not in out.stderr


def _server(st: Records, name: str, zone: str, host: str) -> None:
    st.servers[name] = ServerRecord(id=name, name=name, availability_zone=zone, flavor="f",
                                    image="i", management_port_id="p", volume_id="v",
                                    status=ServerStatus.ACTIVE, host=host)


def test_servers_spread_over_the_live_hosts_of_their_zone() -> None:
    hosts = {"az1": ("h1", "h2"), "az2": ("h3",)}
    st = Records()
    placed = []
    for n in range(4):
        host = place(st, hosts, "az1")
        _server(st, f"s{n}", "az1", host)
        placed.append(host)
    assert placed == ["h1", "h2", "h1", "h2"]
    st.hosts_down.append("h1")
    assert place(st, hosts, "az1") == "h2"   # a dead host takes nothing new
    assert place(st, hosts, "az3") == "az3-host-a"  # an unnamed zone: one implicit host
    st.hosts_down.append("h2")
    with pytest.raises(NoValidHost, match="no valid host in availability zone az1"):
        place(st, hosts, "az1")


def test_hosts_down_survive_a_round_trip_of_the_records() -> None:
    st = Records(hosts_down=["h2"])
    _server(st, "s1", "az1", "h1")
    again = Records.from_json(st.to_json())
    assert again.hosts_down == ["h2"] and again.servers["s1"].host == "h1"
    assert [s.id for s in again.servers_on("h1")] == ["s1"]


def _ha_sync(doc: dict) -> dict:  # type: ignore[type-arg]
    cloud: dict = next(p for p in doc["services"][0]["plans"]  # type: ignore[type-arg]
                       if p["name"] == "ha-sync")["cloud"]
    return cloud


def test_fallback_zones_are_read_and_checked() -> None:
    doc = copy.deepcopy(yaml.safe_load(DEFAULT_CATALOG.read_text()))
    _ha_sync(doc)["fallback_zones"] = ["az3"]
    plan = parse_catalog(doc).plan_by_name("ha-sync")
    assert plan.cloud.fallback_zones == ("az3",)
    _ha_sync(doc)["fallback_zones"] = ["az2"]
    with pytest.raises(ConfigError, match=r"cloud\.fallback_zones: a fallback zone must not"):
        parse_catalog(doc)
    _ha_sync(doc)["fallback_zones"] = [""]
    with pytest.raises(ConfigError, match=r"fallback_zones"):
        parse_catalog(doc)


def test_failovers_beyond_the_bound_wait_for_a_slot_and_rebuilds_do_not_hold_them() -> None:
    settings = OperationSettings(max_failovers=2, max_rebuilds=1)
    release = threading.Event()
    inside: list[str] = []
    waiting: list[str] = []
    lock = threading.Lock()

    def run(kind: str, name: str) -> None:
        with slots.slot(settings, kind, waiting.append):
            with lock:
                inside.append(name)
            release.wait(30)

    threads = [threading.Thread(target=run, args=(kind, name), daemon=True)
               for kind, name in (("rebuild", "r1"), ("failover", "f1"),
                                  ("switchover", "f2"), ("failover", "f3"))]
    deadline = threading.Event()
    threads[0].start()
    for _ in range(300):  # the rebuild first: one queued after a failover would wait
        with lock:
            if inside:
                break
        deadline.wait(0.1)
    for t in threads[1:]:
        t.start()
    for _ in range(300):  # until the three that fit are in and the fourth waits
        with lock:
            if len(inside) == 3 and waiting:
                break
        deadline.wait(0.1)
    # The rebuild took its own slot: two failovers run beside it, the third waits.
    assert len(inside) == 3 and "r1" in inside
    assert waiting == ["queued: waiting for a free failover slot (2 run at once per worker)"]
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(inside) == ["f1", "f2", "f3", "r1"]
    # Not bounded: provisions and the platform's other operations.
    assert slots.slot_class("provision") is None and slots.slot_class("deprovision") is None


def test_a_rebuild_waits_for_the_failovers_of_its_worker() -> None:
    """A dead host's failovers are not slowed by the base backups of the first ones'
    rebuilds: a rebuild starts once no failover of the worker runs or waits."""
    settings = OperationSettings(max_failovers=1, max_rebuilds=2)
    release = {name: threading.Event() for name in ("f1", "f2")}
    order: list[str] = []
    waiting: list[str] = []
    lock = threading.Lock()

    def run(kind: str, name: str) -> None:
        with slots.slot(settings, kind, lambda text: waiting.append(f"{name}: {text}")):
            with lock:
                order.append(name)
            if name in release:
                release[name].wait(30)

    def until(what: Callable[[], bool]) -> None:
        pause = threading.Event()
        for _ in range(450):
            with lock:
                if what():
                    return
            pause.wait(0.1)
        raise AssertionError("never happened")

    f1 = threading.Thread(target=run, args=("failover", "f1"), daemon=True)
    f1.start()
    until(lambda: order == ["f1"])
    f2 = threading.Thread(target=run, args=("failover", "f2"), daemon=True)
    r1 = threading.Thread(target=run, args=("rebuild", "r1"), daemon=True)
    f2.start()
    r1.start()
    until(lambda: len(waiting) == 2)
    assert sorted(waiting) == [
        "f2: queued: waiting for a free failover slot (1 run at once per worker)",
        "r1: queued: waiting for this worker's failovers to finish first"]
    release["f1"].set()
    until(lambda: order == ["f1", "f2"])  # the waiting failover goes first
    assert "r1" not in order
    release["f2"].set()
    for t in (f1, f2, r1):
        t.join(30)
    assert order == ["f1", "f2", "r1"]
    # A rebuild already running goes on while failovers come.
    r2_in, r2_out = threading.Event(), threading.Event()

    def long_rebuild() -> None:
        with slots.slot(settings, "rebuild", waiting.append):
            r2_in.set()
            r2_out.wait(30)

    r2 = threading.Thread(target=long_rebuild, daemon=True)
    r2.start()
    assert r2_in.wait(45)
    run("failover", "f3")
    assert order[-1] == "f3"
    r2_out.set()
    r2.join(30)
