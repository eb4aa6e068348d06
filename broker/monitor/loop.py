"""The monitor: watches every instance it holds a lease on, and acts when a node dies.

One `Monitor` runs in each worker process, beside the operation engine. Workers
share the instances through leases (`monitor:<instance id>`, see leases.py): each
takes up to its fair share (instances / live workers), renews what it holds every
interval, and picks up a dead worker's instances once their leases expire (at once
when the dead worker was on this host). Only the lease holder acts on an instance,
and it renews the lease right before acting, so two monitors never act on one.

Each held instance has a watcher thread that runs `check_instance` every
`check_interval`: observe (observe.py: the store and the probes, as a Snapshot) →
decide (decide.py: a pure ladder of early returns, each with a status sentence and
at most one action) → act (act.py). The watcher logs the status when its class
changes, and runs at once whatever the action queued.

Settings (MonitorSettings, from the environment) and their defaults:

    BROKER_MONITOR_INTERVAL          1 s     check_interval: one check per instance
    BROKER_MONITOR_CONNECT_TIMEOUT   1 s     connect_timeout: deadline of one probe
                                             (connect + query; sub-second values work)
    BROKER_MONITOR_FAILURES          3       failures_before_acting
    BROKER_MONITOR_MIN_FAILOVER_GAP  60 s    min_seconds_between_failovers (no flapping)
    BROKER_MAXIMUM_LAG_ON_FAILOVER   1 MiB   maximum_lag_on_failover (ha only)
    BROKER_MONITOR_LEASE_SECONDS     5 s     lease_seconds: a dead worker's instances
                                             move after at most this long

Detection timing with the defaults: after a first failed probe the remaining probes
follow `recheck` (interval / 5, at most 0.2 s) apart, each with the full
connect_timeout, overlapping when they hang. A crashed primary (connection refused)
is acted on ~0.4 s after the first failed probe, i.e. ~0.9 s after the crash on
average; a frozen or black-holed one ~2.2 s after the start of the first probe that
hung (~2.7 s after the fault on average).

The monitor runs the operations it queues itself (claiming them at once with its
own Engine object), so a failover never waits behind another instance's long
operation. The operation stays durable: any worker's engine resumes it after a crash.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from broker.backup.schedule import Scheduler
from broker.config import MonitorSettings
from broker.metrics import instruments
from broker.monitor.act import Executor
from broker.monitor.decide import Watch, decide, recheck_delay
from broker.monitor.leases import WORKER_PREFIX, Leases, monitor_lease_name
from broker.monitor.observe import Observer
from broker.operations import queue, workflows
from broker.operations.engine import Engine
from broker.operations.promotion import REBUILD, derived_id
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    READY,
    SUCCEEDED,
    UPDATING,
    Instance,
)

log = logging.getLogger(__name__)

# Instances whose lease a monitor keeps (it acts only on ready/degraded ones).
WATCHED_STATES = (READY, DEGRADED, UPDATING)
# How long the monitor drives one operation it queued before leaving it to the engine.
DRIVE_TIMEOUT = 900.0


@dataclass
class _Watch:
    """What the monitor remembers about one instance between two checks."""

    counters: Watch = field(default_factory=Watch)
    last_status: str = ""
    pending_ops: tuple[str, ...] = ()         # queued by the last check: run them now
    decided: bool = False                     # the last check logged a decision itself


def _status_class(status: str) -> str:
    """The status without its numbers: a change of class is worth a log line."""
    return re.sub(r"[\d.]+", "#", status.split(":")[0])


class Monitor:
    def __init__(self, runtime: Runtime, engine: Engine | None = None, *,
                 owner: str | None = None) -> None:
        self.runtime = runtime
        self.engine = engine
        self.settings: MonitorSettings = runtime.settings.monitor
        self.owner = owner or queue.new_owner_id("monitor")
        self.leases = Leases(runtime.store, self.owner, self.settings.lease_seconds)
        self.recheck = recheck_delay(self.settings)
        self._held: dict[str, float] = {}         # instance id → lease good until (monotonic)
        self._watch: dict[str, _Watch] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32,
                                                           thread_name_prefix="probe")
        self._runner: Engine | None = None
        self.observer = Observer(runtime, self._pool, self.recheck)
        self.executor = Executor(runtime, self.leases, lambda: self.runner().owner)
        self.backups = Scheduler(runtime)

    # --- the worker loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("monitor %s started (interval %.1f s, connect_timeout %.1f s, %d failures "
                 "before acting)", self.owner, self.settings.check_interval,
                 self.settings.connect_timeout, self.settings.failures_before_acting)
        # The backup schedule and the archiving check connect to nodes one by one: in
        # their own thread, so they never hold up the lease renewals of this loop.
        scheduler = threading.Thread(target=self._schedule_backups, args=(stop,),
                                     name="backup-scheduler", daemon=True)
        scheduler.start()
        while not stop.is_set():
            try:
                self.tick(stop)
            except Exception:
                log.exception("monitor: unexpected error; continuing")
            stop.wait(self.settings.check_interval)
        # Watchers notice `stop` within one check; one running a failover may take
        # longer: its operation is durable and another worker resumes it.
        deadline = time.monotonic() + self.settings.connect_timeout * 2 + 1
        for thread in list(self._threads.values()):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for instance_id in list(self._held):
            self._drop(instance_id, release=True)
        try:
            self.leases.release(WORKER_PREFIX + self.owner)
        except Exception:
            log.warning("monitor: could not release the worker heartbeat")
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("monitor %s stopped", self.owner)

    def _schedule_backups(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.backups.maybe_tick(self.holds)
            except Exception:
                log.exception("backup schedule: unexpected error; continuing")
            stop.wait(1.0)

    def tick(self, stop: threading.Event) -> None:
        """Heartbeat, renew what we hold, take a fair share of the rest, start watchers."""
        self.leases.acquire(WORKER_PREFIX + self.owner)
        self.leases.purge_expired(WORKER_PREFIX)
        with self.runtime.store.session() as s:
            ids = set(s.scalars(select(Instance.id).where(Instance.deleted_at.is_(None))
                                .where(Instance.state.in_(WATCHED_STATES))))
        for instance_id in list(self._held):
            if instance_id not in ids:
                self._drop(instance_id, release=True)
            elif self.leases.renew(monitor_lease_name(instance_id)):
                self._held[instance_id] = time.monotonic() + self.settings.lease_seconds
            else:
                log.warning("instance %s: monitor lease lost to another worker", instance_id)
                self._drop(instance_id, release=False)
        workers = max(1, len(self.leases.live(WORKER_PREFIX)))
        share = math.ceil(len(ids) / workers) if ids else 0
        free = [i for i in ids if i not in self._held]
        random.shuffle(free)  # workers starting together do not all race for the same ones
        for instance_id in free:
            if len(self._held) >= share:
                break
            if self.leases.acquire(monitor_lease_name(instance_id)):
                self._held[instance_id] = time.monotonic() + self.settings.lease_seconds
                log.info("instance %s: now watched by this monitor", instance_id)
        if len(self._held) > share:
            # A worker joined: hand over one healthy instance per interval.
            for instance_id, watch in list(self._watch.items()):
                if instance_id in self._held and watch.last_status.startswith("primary healthy"):
                    log.info("instance %s: handed over to another monitor (fair share)",
                             instance_id)
                    self._drop(instance_id, release=True)
                    break
        with self._lock:
            for instance_id in list(self._held):
                thread = self._threads.get(instance_id)
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=self._watch_loop, args=(instance_id, stop),
                                              name=f"watch-{instance_id[:12]}", daemon=True)
                    self._threads[instance_id] = thread
                    thread.start()

    def _drop(self, instance_id: str, *, release: bool) -> None:
        self._held.pop(instance_id, None)
        self._watch.pop(instance_id, None)
        self.observer.last_probe_start.pop(instance_id, None)
        instruments.check_clock.forget(instance_id)
        if release:
            try:
                self.leases.release(monitor_lease_name(instance_id))
            except Exception:
                log.warning("instance %s: could not release the monitor lease", instance_id)

    def holds(self, instance_id: str) -> bool:
        good_until = self._held.get(instance_id)
        return good_until is not None and good_until > time.monotonic()

    def take(self, instance_id: str) -> bool:
        """Acquire one instance's lease (tests and tools; `tick` does it for workers)."""
        if self.leases.acquire(monitor_lease_name(instance_id)):
            self._held[instance_id] = time.monotonic() + self.settings.lease_seconds
            return True
        return False

    def _watch_loop(self, instance_id: str, stop: threading.Event) -> None:
        instruments.check_clock.watch(instance_id)
        while not stop.is_set() and instance_id in self._held:
            started = time.monotonic()
            try:
                status = self.check_instance(instance_id)
            except Exception as exc:
                log.exception("instance %s: check failed", instance_id)
                status = f"check failed: {exc.__class__.__name__}"
            watch = self._watch.get(instance_id)
            if watch is None:
                break
            instruments.checked(instance_id, watch.counters.primary_failures)
            if watch.decided:
                pass  # already said, in words, by the decision itself
            elif _status_class(status) != _status_class(watch.last_status):
                log.info("instance %s: %s", instance_id, status)
            else:
                log.debug("instance %s: %s", instance_id, status)
            watch.last_status = status
            pending, watch.pending_ops = watch.pending_ops, ()
            for op_id in pending:
                self.drive(op_id, stop)
            if pending:
                continue
            delay = self.recheck if watch.counters.urgent else self.settings.check_interval
            stop.wait(max(0.0, delay - (time.monotonic() - started)))

    # --- one check ----------------------------------------------------------------------
    def check_instance(self, instance_id: str) -> str:
        """One run of observe → decide → act for one instance; returns what it saw or did."""
        watch = self._watch.setdefault(instance_id, _Watch())
        watch.decided = False
        snap = self.observer.snapshot(instance_id, watch.counters, held=self.holds(instance_id))
        decision = decide(snap, self.settings)
        watch.counters = decision.watch
        outcome = self.executor.carry_out(snap, decision)
        if outcome.lease_lost:
            self._drop(instance_id, release=False)
        watch.decided = outcome.logged
        watch.pending_ops = outcome.queued
        return outcome.status

    # --- running what was queued -------------------------------------------------------------
    def _op_state(self, op_id: str) -> str | None:
        return queue.state_of(self.runtime.store, op_id)

    def runner(self) -> Engine:
        """This monitor's own engine: runs what the monitor queued, at once."""
        if self._runner is None:
            rt = self.runtime
            workflows.install()
            self._runner = Engine(rt.store, rt.cloud, rt.vault, rt.catalog, rt.settings,
                                  owner=queue.new_owner_id(queue.RUNNER_ROLE))
        return self._runner

    def drive(self, op_id: str, stop: threading.Event | None = None) -> str | None:
        """Run an operation this monitor queued to its end, here and now (then the
        rebuild it queued). Another worker that claimed it first simply runs it."""
        runner = self.runner()
        if self.engine is not None:
            self.engine.wake()
        deadline = time.monotonic() + DRIVE_TIMEOUT
        state = self._op_state(op_id)
        while queue.is_unfinished(state) and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return state
            if runner.claim(op_id) is not None:
                state = runner.run(op_id)
                if queue.is_unfinished(state) and self.engine is not None:
                    # Released to be retried later: from here the worker's engine runs it,
                    # so that only one claimer ever competes for the row.
                    self.engine.wake()
                    return state
                continue
            time.sleep(0.05)
            state = self._op_state(op_id)
        if state == SUCCEEDED:
            follow_up = derived_id(op_id, REBUILD)
            if queue.is_unfinished(self._op_state(follow_up)):
                return self.drive(follow_up, stop)
        return state

