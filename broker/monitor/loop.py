"""The monitor: watches every instance it holds a lease on, and acts when a node dies.

One `Monitor` runs in each worker process, beside the operation engine. Workers
share the instances through leases (`monitor:<instance id>`, see leases.py): each
takes up to its fair share (instances / live workers), renews what it holds every
interval, and picks up a dead worker's instances once their leases expire (at once
when the dead worker was on this host). Only the lease holder acts on an instance,
and it renews the lease right before acting, so two monitors never act on one.

Every check is observe (observe.py: the store and the probes, as a Snapshot) →
decide (decide.py: a pure ladder of early returns, each with a status sentence and
at most one action) → act (act.py). Two paths run it (schedule.py says which):

- the sweep, one thread for every held instance: each `check_interval` it reads
  them from the store (one session per slice, `SLICES` slices spread over the
  interval; a routine instance at most every STORE_READ_SECONDS), probes their
  nodes over persistent sessions driven by one event loop (sweep.py), decides, and
  writes the routine records of the interval in one transaction. Idle sessions stay
  watched: one the server closes (a crash, a shutdown) is probed at once, so a dead
  primary counts its first failure within milliseconds, not at its next check;
- a watcher thread per instance that is not settled (a failed probe to confirm, an
  action to take): the full check with fresh probes, until it is settled again.
  It runs at once whatever it queued.

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
follow `recheck` (interval / 10, at most 0.1 s) apart, each with the full
connect_timeout, overlapping when they hang: no fewer confirmations than before, a
closed session counts as one failed probe only. A sweep probe of a primary that hangs
on its open session for `suspect_delay` (connect_timeout / 3) is not waited out: its
watcher starts all `failures_before_acting` probes at once, `recheck` apart, each
with the full deadline. A crashed primary (its sessions closed, then connection
refused) is acted on ~0.2 s after the crash, whatever the phase of the sweep; a
frozen or black-holed one ~1.5 s after the start of the first probe that hung
(0.33 s of suspicion, three probes 0.1 s apart of 1 s each), ~2 s after the fault
on average. (With 0.2 s between confirmations, measured on the failover benchmark:
crashed decided 0.41 s after the fault and first write 1.02 s; with 0.1 s, 0.22 s
and 0.90 s. Three confirmations still guard against one lost packet or a refusal
during a restart the monitor did not see coming.)

The monitor runs the operations it queues itself, at once (drive.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field, replace
from queue import Empty, SimpleQueue

from sqlalchemy import select

from broker.backup.schedule import Scheduler
from broker.config import MonitorSettings
from broker.metrics import instruments
from broker.monitor import schedule
from broker.monitor.act import Executor
from broker.monitor.decide import Snapshot, Watch, decide, recheck_delay, suspect_delay
from broker.monitor.drive import Driver
from broker.monitor.leases import WORKER_PREFIX, Leases, monitor_lease_name
from broker.monitor.observe import Observer, Prepared
from broker.monitor.sweep import STOP_POLL, Key, ProbeLoop
from broker.operations import queue
from broker.operations.engine import Engine
from broker.pg.probe import Probe
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    PRIMARY,
    READY,
    STANDBY,
    UPDATING,
    Instance,
)

log = logging.getLogger(__name__)

# Instances whose lease a monitor keeps (it acts only on ready/degraded ones).
WATCHED_STATES = (READY, DEGRADED, UPDATING)
# A sweep spreads its checks over the interval in this many slices, each with its own
# store read: 1,000 probes at once would queue on the servers' cores.
SLICES = 10
# How often the sweep looks for instances back from their watcher.
RETURN_POLL = 0.25
# How long the sweep drives the sessions between two looks at a store read it waits for.
READ_POLL = 0.005
# At most this many instances at once go to their watcher because a probe hung (each
# watcher opens new sessions: on a saturated host, slow answers must not snowball into
# more load). Beyond it a hung probe simply runs to its deadline.
MAX_SUSPECTED = 8
# A routine instance is read from the store at most this often by the sweep (its nodes
# are probed every interval regardless): reading 1,000 instances with their nodes every
# second costs more CPU than probing them. Anything but a routine check hands the
# instance to its watcher, which reads afresh, so a stale read never decides an action.
STORE_READ_SECONDS = 5.0


@dataclass
class _Watch:
    """What the monitor remembers about one instance between two checks."""

    counters: Watch = field(default_factory=Watch)
    last_status: str = ""
    pending_ops: tuple[str, ...] = ()         # queued by the last check: run them now
    decided: bool = False                     # the last check logged a decision itself
    settled: bool = False                     # the last full check: back to the sweep


def _status_class(status: str) -> str:
    """The status without its numbers: a change of class is worth a log line."""
    return re.sub(r"[\d.]+", "#", status.split(":")[0])


class Monitor:
    def __init__(self, runtime: Runtime, engine: Engine | None = None, *,
                 owner: str | None = None, drive_queued: bool = True) -> None:
        self.runtime = runtime
        self.engine = engine
        self.settings: MonitorSettings = runtime.settings.monitor
        self.owner = owner or queue.new_owner_id("monitor")
        self.leases = Leases(runtime.store, self.owner, self.settings.lease_seconds)
        self.recheck = recheck_delay(self.settings)
        self._held: dict[str, float] = {}         # instance id → lease good until (monotonic)
        self._watch: dict[str, _Watch] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._full: set[str] = set()              # instances their own watcher checks
        self._suspected: set[str] = set()         # in `_full` for a hung probe
        self._returning: list[str] = []           # back from their watcher: probe now
        self._lock = threading.Lock()
        self._to_launch: SimpleQueue[str] = SimpleQueue()   # instances for a watcher
        # False (benchmarks): queue what the ladder decides and leave it queued.
        self.drive_queued = drive_queued
        self.probes = ProbeLoop(self.settings.connect_timeout, self._on_probe,
                                suspect_after=suspect_delay(self.settings),
                                on_slow=self._on_slow)
        # The sweep's probes in flight (instance id → what was read, the answers so far)
        # and the routine records of this interval, written at the next one.
        self._pending: dict[str, tuple[Prepared, dict[str, Probe]]] = {}
        self._records: dict[str, int | None] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32,
                                                           thread_name_prefix="probe")
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                             thread_name_prefix="sweep-read")
        self.driver = Driver(runtime, engine)
        self.observer = Observer(runtime, self._pool, self.recheck)
        self.executor = Executor(runtime, self.leases, lambda: self.driver.runner().owner)
        self.backups = Scheduler(runtime)

    # --- the worker loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("monitor %s started (interval %.1f s, connect_timeout %.1f s, %d failures "
                 "before acting)", self.owner, self.settings.check_interval,
                 self.settings.connect_timeout, self.settings.failures_before_acting)
        launcher = threading.Thread(target=self._launcher, args=(stop,),
                                    name="monitor-launcher", daemon=True)
        launcher.start()
        # The backup schedule and the archiving check connect to nodes one by one: in
        # their own thread, so they never hold up a check of a primary.
        scheduler = threading.Thread(target=self._schedule_backups, args=(stop,),
                                     name="backup-scheduler", daemon=True)
        scheduler.start()
        while not stop.is_set():
            until = time.monotonic() + self.settings.check_interval
            try:
                self.tick(stop)
                self.sweep(stop, until)
            except Exception:
                log.exception("monitor: unexpected error; continuing")
                stop.wait(max(0.0, until - time.monotonic()))
        # Watchers notice `stop` within one check; one running a failover may take
        # longer: its operation is durable and another worker resumes it.
        deadline = time.monotonic() + self.settings.connect_timeout * 2 + 1
        launcher.join(timeout=STOP_POLL * 4)
        scheduler.join(timeout=STOP_POLL * 4)
        for thread in list(self._threads.values()):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for instance_id in list(self._held):
            self._drop(instance_id, release=True)
        try:
            self.leases.release(WORKER_PREFIX + self.owner)
        except Exception:
            log.warning("monitor: could not release the worker heartbeat")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reader.shutdown(wait=False, cancel_futures=True)
        self.probes.close_all()
        log.info("monitor %s stopped", self.owner)

    def _schedule_backups(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.backups.maybe_tick(self.holds)
            except Exception:
                log.exception("backup schedule: unexpected error; continuing")
            stop.wait(1.0)

    def tick(self, stop: threading.Event) -> None:
        """Heartbeat, renew what we hold (one statement), take a fair share of the rest."""
        self.leases.acquire(WORKER_PREFIX + self.owner)
        self.leases.purge_expired(WORKER_PREFIX)
        with self.runtime.store.session() as s:
            ids = set(s.scalars(select(Instance.id).where(Instance.deleted_at.is_(None))
                                .where(Instance.state.in_(WATCHED_STATES))))
        for instance_id in [i for i in self._held if i not in ids]:
            self._drop(instance_id, release=True)
        renewed = self.leases.renew_many([monitor_lease_name(i) for i in self._held])
        good_until = time.monotonic() + self.settings.lease_seconds
        for instance_id in list(self._held):
            if monitor_lease_name(instance_id) in renewed:
                self._held[instance_id] = good_until
            else:
                log.warning("instance %s: monitor lease lost to another worker", instance_id)
                self._drop(instance_id, release=False)
        workers = max(1, len(self.leases.live(WORKER_PREFIX)))
        share = math.ceil(len(ids) / workers) if ids else 0
        free = [i for i in ids if i not in self._held]
        random.shuffle(free)  # workers starting together do not all race for the same ones
        wanted = free[:max(0, share - len(self._held))]
        taken = self.leases.acquire_many([monitor_lease_name(i) for i in wanted])
        good_until = time.monotonic() + self.settings.lease_seconds
        for instance_id in wanted:
            if monitor_lease_name(instance_id) in taken:
                self._held[instance_id] = good_until
                log.info("instance %s: now watched by this monitor", instance_id)
        if len(self._held) > share:
            # A worker joined: hand over one healthy instance per interval.
            for instance_id, watch in list(self._watch.items()):
                if instance_id in self._held and watch.last_status.startswith("primary healthy"):
                    log.info("instance %s: handed over to another monitor (fair share)",
                             instance_id)
                    self._drop(instance_id, release=True)
                    break

    def _drop(self, instance_id: str, *, release: bool) -> None:
        self._held.pop(instance_id, None)
        self._suspected.discard(instance_id)
        self._watch.pop(instance_id, None)
        self.observer.forget(instance_id)
        self._pending.pop(instance_id, None)
        self.probes.close((instance_id, PRIMARY))
        self.probes.close((instance_id, STANDBY))
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

    # --- the sweep ----------------------------------------------------------------------
    def sweep(self, stop: threading.Event, until: float) -> None:
        """One interval of the sweep, until `until` (monotonic): the routine records of
        the last interval in one transaction, then the held instances the sweep keeps
        in `SLICES` slices spread over the interval (each keeps its slice, so it is
        checked once per interval), the idle sessions watched throughout."""
        started = time.monotonic()
        records, self._records = self._records, {}
        self.executor.record_many(records)
        self._escalate_lost()
        ids = sorted(i for i in list(self._held)
                     if i not in self._full and i not in self._pending and self.holds(i))
        self.probes.keep_only({*ids, *self._pending})
        count = max(1, min(SLICES, len(ids)))
        span = max(0.0, until - started)
        for k in range(count):
            self.probes.run(until=started + span * k / count, stop=stop)
            if stop.is_set():
                return
            self._start_slice(ids[k::count], stop)
        log.debug("sweep: %d instances, %d probes in flight, started %.3f s late, slices "
                  "started in %.3f s", len(ids), self.probes.in_flight,
                  max(0.0, started - (until - self.settings.check_interval)),
                  time.monotonic() - started)
        while time.monotonic() < until and not stop.is_set():
            self.probes.run(until=min(until, time.monotonic() + RETURN_POLL), stop=stop)
            self._escalate_lost()
            with self._lock:
                returning, self._returning = self._returning, []
            if returning:  # settled again: a session now, not at the next interval
                self._start_slice([i for i in returning if self.holds(i)], stop)

    def _start_slice(self, ids: list[str], stop: threading.Event) -> None:
        """Read the slice's instances from the store in one session and start the probes
        of those past the rungs that need none. The read runs in its own thread while
        this one keeps driving the sessions: a session being set up takes several round
        trips, each of which would otherwise wait for the read (its deadline counts)."""
        watches = {i: self._watch.setdefault(i, _Watch()) for i in ids}
        read = self._reader.submit(self.observer.prepare_many,
                                   {i: w.counters for i, w in watches.items()},
                                   STORE_READ_SECONDS)
        while not read.done() and not stop.is_set():
            self.probes.run(until=time.monotonic() + READ_POLL, stop=stop)
        jobs: list[Key] = []
        for p in read.result():
            instance_id = p.snap.instance_id
            if instance_id in self._full or not self.holds(instance_id):
                continue  # a session failed during the read: its watcher has it
            instruments.check_clock.watch(instance_id)
            if p.primary is None:
                self._conclude(p.snap)
                continue
            self._pending[instance_id] = (p, {})
            for role, target in ((PRIMARY, p.primary), (STANDBY, p.standby)):
                if target is not None:
                    self.probes.link((instance_id, role), target.address, p.password,
                                     target.ca_pem)
                    jobs.append((instance_id, role))
        self.probes.submit(jobs)

    def _escalate_lost(self) -> None:
        """A pending instance waits for probes that run (each ends by its deadline) or
        wait for a connecting slot. Should one ever be lost, the instance would sit in
        `_pending`, out of every sweep, with nobody deciding on it: its own watcher
        checks it afresh instead."""
        tracked = self.probes.tracked()
        for instance_id, (prepared, seen) in list(self._pending.items()):
            roles = [PRIMARY] if prepared.standby is None else [PRIMARY, STANDBY]
            if not all((instance_id, r) in tracked for r in roles if r not in seen):
                log.warning("instance %s: its probes were lost: checking it on its own",
                            instance_id)
                self._escalate(instance_id)

    def _on_probe(self, key: Key, result: Probe) -> None:
        instance_id, role = key
        pending = self._pending.get(instance_id)
        if pending is None or role in pending[1]:
            self._early(instance_id, role, result)
            return
        prepared, seen = pending
        seen[role] = result
        if PRIMARY in seen and (STANDBY in seen or prepared.standby is None):
            del self._pending[instance_id]
            self._conclude(self.observer.with_probes(prepared.snap, seen[PRIMARY],
                                                     seen.get(STANDBY)))

    def _conclude(self, snap: Snapshot) -> None:
        """Decide on a sweep's snapshot: keep a settled instance (its routine record
        batched), hand any other to its own watcher, which decides afresh."""
        instance_id = snap.instance_id
        watch = self._watch.get(instance_id)
        if watch is None:
            return
        decision = decide(snap, self.settings)
        watch.counters = decision.watch
        if not schedule.settled(decision):
            if snap.primary_seen is not None and snap.primary_seen.outcome == "down":
                self.observer.last_probe_start[instance_id] = \
                    time.monotonic() - snap.primary_seen.elapsed
            log.debug("instance %s: %s: checking it on its own", instance_id, decision.status)
            self._escalate(instance_id)
            return
        watch.decided = False
        if schedule.record_only(snap, decision):
            assert decision.record is not None
            self._records[instance_id] = decision.record.lag
            status = decision.status
        else:
            self.observer.reread(instance_id)   # it changes the instance's row
            outcome = self.executor.carry_out(snap, decision)
            watch.decided = outcome.logged
            status = outcome.status
        self._report(instance_id, watch, status)

    def _early(self, instance_id: str, role: str, result: Probe) -> None:
        """A session turned readable while idle and was probed at once."""
        watch = self._watch.get(instance_id)
        if result.outcome == "ok" or watch is None or instance_id in self._full:
            return
        if role == PRIMARY:
            started = time.monotonic() - result.elapsed
            instruments.observe_probe(role, result.outcome, result.elapsed)
            instruments.detection.probed(instance_id, down=result.outcome == "down",
                                         first_started=started)
            if result.outcome == "down":
                watch.counters = replace(watch.counters, urgent=True,
                                         primary_failures=watch.counters.primary_failures + 1)
                self.observer.last_probe_start[instance_id] = started
        log.info("instance %s: the %s's probe session failed (%s): checking now",
                 instance_id, role, result.error)
        self._escalate(instance_id)

    def _on_slow(self, key: Key) -> None:
        """The sweep's probe of a primary, on its open session, has had no answer for
        `suspect_delay`: its watcher starts every confirmation now (each with the full
        deadline) instead of after this probe's deadline."""
        instance_id, role = key
        watch = self._watch.get(instance_id)
        if role != PRIMARY or watch is None or instance_id not in self._pending:
            return
        with self._lock:
            if (len(self._suspected) >= MAX_SUSPECTED or instance_id in self._full
                    or instance_id not in self._held):
                return   # a watcher of its own will not start: nothing to count
            self._suspected.add(instance_id)
        watch.counters = replace(watch.counters, suspect=True)
        log.info("instance %s: the primary has not answered its probe in %.2f s: "
                 "confirming now", instance_id, suspect_delay(self.settings))
        self._escalate(instance_id)

    def _escalate(self, instance_id: str) -> None:
        """Hand the instance to its own watcher thread (the full check) until settled."""
        with self._lock:
            if instance_id in self._full or instance_id not in self._held:
                return
            self._full.add(instance_id)
            self._pending.pop(instance_id, None)
            self.observer.reread(instance_id)
            self.probes.close((instance_id, PRIMARY))
            self.probes.close((instance_id, STANDBY))
        # Starting a thread waits for it to run: not in the probe loop's thread.
        self._to_launch.put(instance_id)

    def _launcher(self, stop: threading.Event) -> None:
        """Start the watcher threads `_escalate` asked for."""
        while not stop.is_set():
            try:
                instance_id = self._to_launch.get(timeout=STOP_POLL)
            except Empty:
                continue
            thread = threading.Thread(target=self._watch_loop, args=(instance_id, stop),
                                      name=f"watch-{instance_id[:12]}", daemon=True)
            with self._lock:
                self._threads[instance_id] = thread
            thread.start()

    def _report(self, instance_id: str, watch: _Watch, status: str) -> None:
        instruments.checked(instance_id, watch.counters.primary_failures)
        if watch.decided:
            pass  # already said, in words, by the decision itself
        elif _status_class(status) != _status_class(watch.last_status):
            log.info("instance %s: %s", instance_id, status)
        else:
            log.debug("instance %s: %s", instance_id, status)
        watch.last_status = status

    def _watch_loop(self, instance_id: str, stop: threading.Event) -> None:
        instruments.check_clock.watch(instance_id)
        try:
            while not stop.is_set() and self.holds(instance_id):
                started = time.monotonic()
                try:
                    status = self.check_instance(instance_id)
                except Exception as exc:
                    log.exception("instance %s: check failed", instance_id)
                    status = f"check failed: {exc.__class__.__name__}"
                watch = self._watch.get(instance_id)
                if watch is None:
                    break
                self._report(instance_id, watch, status)
                pending, watch.pending_ops = watch.pending_ops, ()
                if self.drive_queued:
                    for op_id in pending:
                        self.drive(op_id, stop)
                if pending:
                    continue
                if watch.settled:
                    break
                delay = self.recheck if watch.counters.urgent else self.settings.check_interval
                stop.wait(max(0.0, delay - (time.monotonic() - started)))
        finally:
            with self._lock:
                self._full.discard(instance_id)
                self._threads.pop(instance_id, None)
                self._suspected.discard(instance_id)
                self.observer.reread(instance_id)
                self._returning.append(instance_id)

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
            # Held no more: the watcher stops; the sweep's thread drops it at its next
            # renewal (the probe loop is that thread's alone).
            self._held[instance_id] = 0.0
        watch.decided = outcome.logged
        watch.pending_ops = outcome.queued
        watch.settled = schedule.settled(decision)
        return outcome.status

    # --- running what was queued -----------------------------------------------------------
    def runner(self) -> Engine:
        return self.driver.runner()

    def drive(self, op_id: str, stop: threading.Event | None = None) -> str | None:
        return self.driver.drive(op_id, stop)
