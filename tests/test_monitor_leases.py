"""Monitor leases on both state stores: compare-and-set acquire, renew and release;
exactly one of many racing workers wins; an expired lease, or one whose owner process
is dead, is taken over."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import update

from broker.monitor.leases import Leases, monitor_lease_name
from broker.operations.queue import new_owner_id
from broker.store.db import Store
from broker.store.models import Lease, utcnow


def _store(url: str) -> Store:
    store = Store(url)
    store.upgrade()
    return store


def test_acquire_renew_release(state_url: str) -> None:
    store = _store(state_url)
    a, b = Leases(store, new_owner_id(), 5.0), Leases(store, new_owner_id(), 5.0)
    name = monitor_lease_name("inst-1")
    assert a.acquire(name)
    assert a.acquire(name)            # ours: acquiring again renews
    assert not b.acquire(name)        # held by a live owner
    assert not b.renew(name)
    assert a.renew(name)
    assert a.holder(name) == a.owner
    b.release(name)                   # not b's: nothing happens
    assert a.holder(name) == a.owner
    a.release(name)
    assert a.holder(name) is None
    assert b.acquire(name)
    assert b.live("monitor:") == {name: b.owner}
    store.dispose()


def test_expired_lease_is_taken_over(state_url: str) -> None:
    store = _store(state_url)
    # An owner on another host (never "dead" to us): only the expiry frees it.
    other = Leases(store, "elsewhere:4242:monitor-abcdef", 5.0)
    mine = Leases(store, new_owner_id(), 5.0)
    name = monitor_lease_name("inst-2")
    assert other.acquire(name)
    assert not mine.acquire(name)
    with store.session() as s:
        s.execute(update(Lease).where(Lease.name == name)
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert mine.acquire(name)
    assert not other.renew(name)      # the old owner learns it lost the lease
    store.dispose()


def test_lease_of_a_dead_process_on_this_host_is_taken_at_once(state_url: str) -> None:
    store = _store(state_url)
    host_owner = new_owner_id()
    dead = Leases(store, host_owner.replace(host_owner.split(":")[1], "999999999"), 60.0)
    name = monitor_lease_name("inst-3")
    assert dead.acquire(name)
    mine = Leases(store, new_owner_id(), 5.0)
    assert mine.acquire(name)
    store.dispose()


def test_exactly_one_of_racing_workers_wins(state_url: str) -> None:
    store = _store(state_url)
    name = monitor_lease_name("inst-4")
    for _round in range(3):
        contenders = [Leases(store, f"elsewhere:{i}:monitor-{i:06x}", 30.0) for i in range(8)]
        start = threading.Barrier(len(contenders))
        wins: list[str] = []

        def race(leases: Leases, start: threading.Barrier, wins: list[str]) -> None:
            start.wait()
            if leases.acquire(name):
                wins.append(leases.owner)

        threads = [threading.Thread(target=race, args=(c, start, wins)) for c in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
        assert contenders[0].holder(name) == wins[0]
        with store.session() as s:  # free it for the next round
            s.execute(update(Lease).where(Lease.name == name)
                      .values(expires_at=utcnow() - timedelta(seconds=1)))
        time.sleep(0.01)
    store.dispose()
