"""The monitor: watches every instance it holds a lease on, and acts when a node dies.

One `Monitor` runs in each worker process, beside the operation engine. Workers
share the instances through leases (`monitor:<instance id>`, see leases.py): each
takes up to its fair share (instances / live workers), renews what it holds every
interval, and picks up a dead worker's instances once their leases expire (at once
when the dead worker was on this host). Only the lease holder acts on an instance,
and it renews the lease right before acting, so two monitors never act on one.

Each held instance has a watcher thread that runs `check_instance` every
`check_interval`. `check_instance` is a ladder of early returns, like Patroni's HA
loop; each rung returns a status string that says what the monitor saw or did:

    no lease → instance gone → operation in progress → not ready/degraded
    → probe the primary and the standby (and ask the cloud when failing)
    → primary answers but refuses the broker (alive: never a failover)
    → primary unreachable k/N (re-check quickly)
    → primary unreachable N/N and the cloud API too → no failover (partition?)
    → ... last failover too recent → wait (no flapping)
    → ... no eligible standby → degraded, and say why
    → failover (or resurrect) queued
    → primary healthy: standby lost → unsync (ha-sync) and rebuild queued
    → primary healthy, standby streaming, lag N B
    → ... a node certificate within its renewal window → rotate_certs queued

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
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update

from broker.catalog import Plan
from broker.cloud.base import ServerStatus
from broker.config import MonitorSettings
from broker.monitor.leases import WORKER_PREFIX, Leases, monitor_lease_name, new_owner_id
from broker.operations import certs
from broker.operations import failover as failover_ops
from broker.operations.engine import Engine, _owner_is_dead, new_operation
from broker.operations.promotion import (
    REBUILD,
    RUNNER_ROLE,
    derived_id,
    preclaim,
    standby_of,
)
from broker.operations.resurrect import KIND as RESURRECT
from broker.pg import admin, probe, tls
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    IN_PROGRESS,
    OP_FAILED,
    READY,
    SUCCEEDED,
    UNFINISHED,
    UPDATING,
    Failover,
    Instance,
    Node,
    Operation,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

# Instances whose lease a monitor keeps (it acts only on ready/degraded ones).
WATCHED_STATES = (READY, DEGRADED, UPDATING)
# A standby that answers but does not stream is rebuilt after this long.
NOT_STREAMING_GRACE = 30.0
# A failed rebuild is tried again after this long.
REBUILD_RETRY = 60.0
# A certificate rotation the monitor queued is queued again at most this often.
RENEWAL_RETRY = 3600.0
# How long the monitor drives one operation it queued before leaving it to the engine.
DRIVE_TIMEOUT = 900.0


@dataclass
class _Watch:
    """What the monitor remembers about one instance between two checks."""

    primary_failures: int = 0
    last_probe_start: float = 0.0
    first_failure_at: float | None = None
    standby_failures: int = 0
    not_streaming_since: float | None = None
    last_primary_lsn: int | None = None
    sync_mark: tuple[str, int] | None = None   # (standby id, primary LSN when first seen sync)
    urgent: bool = False                      # re-check after `recheck`, not `check_interval`
    last_status: str = ""
    pending_ops: tuple[str, ...] = ()         # queued by the last check: run them now
    decided: bool = False                     # the last check logged a decision itself

    def reset_primary(self) -> None:
        self.primary_failures = 0
        self.first_failure_at = None
        self.urgent = False


def _status_class(status: str) -> str:
    """The status without its numbers: a change of class is worth a log line."""
    return re.sub(r"[\d.]+", "#", status.split(":")[0])


class Monitor:
    def __init__(self, runtime: Runtime, engine: Engine | None = None, *,
                 owner: str | None = None) -> None:
        self.runtime = runtime
        self.engine = engine
        self.settings: MonitorSettings = runtime.settings.monitor
        self.owner = owner or new_owner_id("monitor")
        self.leases = Leases(runtime.store, self.owner, self.settings.lease_seconds)
        self.recheck = max(0.05, min(0.2, self.settings.check_interval / 5))
        self._held: dict[str, float] = {}         # instance id → lease good until (monotonic)
        self._watch: dict[str, _Watch] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32,
                                                           thread_name_prefix="probe")
        self._runner: Engine | None = None
        self._local = threading.local()  # the _Watch of the check running in this thread

    # --- the worker loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("monitor %s started (interval %.1f s, connect_timeout %.1f s, %d failures "
                 "before acting)", self.owner, self.settings.check_interval,
                 self.settings.connect_timeout, self.settings.failures_before_acting)
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
        if release:
            try:
                self.leases.release(monitor_lease_name(instance_id))
            except Exception:
                log.warning("instance %s: could not release the monitor lease", instance_id)

    def _decision(self, level: int, instance_id: str, message: str) -> None:
        """One log line per decision; the watcher then does not repeat the status."""
        log.log(level, "instance %s: %s", instance_id, message)
        watch = getattr(self._local, "watch", None)
        if watch is not None:
            watch.decided = True

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
            delay = self.recheck if watch.urgent else self.settings.check_interval
            stop.wait(max(0.0, delay - (time.monotonic() - started)))

    # --- one check ----------------------------------------------------------------------
    def check_instance(self, instance_id: str) -> str:
        """One run of the ladder for one instance; returns what it saw or did."""
        watch = self._watch.setdefault(instance_id, _Watch())
        watch.decided = False
        self._local.watch = watch
        if not self.holds(instance_id):
            return "no lease"
        store = self.runtime.store
        with store.session() as s:
            inst = s.get(Instance, instance_id)
            if inst is None or inst.deleted_at is not None:
                return "instance gone"
            _ = list(inst.nodes)
            busy = s.scalars(select(Operation).where(Operation.instance_id == instance_id)
                             .where(Operation.state.in_(UNFINISHED))
                             .order_by(Operation.created_at).limit(1)).first()
        if busy is not None:
            watch.reset_primary()
            watch.standby_failures = 0
            return f"operation in progress: {busy.kind} ({busy.description})"
        if inst.state not in (READY, DEGRADED):
            watch.reset_primary()
            return f"instance {inst.state}: not acting"
        primary = inst.primary()
        if primary is None or not primary.management_address:
            return "no primary recorded: nothing to watch"
        plan = self.runtime.catalog.plan(inst.plan_id)
        standby = standby_of(inst)
        password = self.runtime.vault.decrypt(inst.admin_password_enc)

        seen, standby_seen, cloud = self._probe(watch, inst, primary, standby, password)
        if seen.outcome == "answering":
            watch.reset_primary()
            return self._renew_certificates(
                inst, watch, f"primary answers but refuses the broker: {seen.error}")
        if not seen.ok:
            return self._primary_down(inst, plan, watch, primary, standby, seen, standby_seen,
                                      cloud)
        watch.reset_primary()
        if seen.in_recovery:
            return "the recorded primary is in recovery: not acting"
        previous_lsn, watch.last_primary_lsn = watch.last_primary_lsn, seen.lsn
        if standby is None:
            status = self._no_standby(inst, plan, watch)
        else:
            status = self._with_standby(inst, watch, primary, standby, password, seen,
                                        standby_seen, previous_lsn)
        return self._renew_certificates(inst, watch, status)

    def _probe(self, watch: _Watch, inst: Instance, primary: Node, standby: Node | None,
               password: str
               ) -> tuple[probe.Probe, probe.Probe | None, probe.CloudState | None]:
        """Probe the primary (the remaining confirmations after a failure, `recheck`
        apart and overlapping) and the standby, concurrently; ask the cloud when failing."""
        timeout = self.settings.connect_timeout
        needed = max(1, self.settings.failures_before_acting - watch.primary_failures)
        rounds = needed if watch.primary_failures > 0 else 1
        now = time.monotonic()
        first = max(now, watch.last_probe_start + self.recheck) if watch.primary_failures else now
        assert primary.management_address is not None
        address = primary.management_address

        def delayed(start: float) -> probe.Probe:
            pause = start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            return probe.probe(address, password, timeout=timeout,
                                ca_pem=inst.ca_for(primary))

        primary_futures = [self._pool.submit(delayed, first + k * self.recheck)
                           for k in range(rounds)]
        watch.last_probe_start = first + (rounds - 1) * self.recheck
        standby_future = None
        if standby is not None and standby.management_address:
            standby_future = self._pool.submit(probe.probe, standby.management_address,
                                               password, timeout=timeout,
                                               ca_pem=inst.ca_for(standby))
        cloud_future = None
        if watch.primary_failures > 0:
            cloud_future = self._pool.submit(probe.cloud_state, self.runtime.cloud,
                                             primary.server_id)
        results = [f.result() for f in primary_futures]
        seen = results[-1]
        for result in results:
            if result.outcome != "down":
                seen = result  # one answer is enough: alive
                break
            watch.primary_failures += 1
            seen = result
        if seen.outcome == "down" and watch.first_failure_at is None:
            watch.first_failure_at = time.monotonic()
        standby_seen = standby_future.result() if standby_future is not None else None
        cloud = cloud_future.result() if cloud_future is not None else None
        return seen, standby_seen, cloud

    # --- the primary is down -------------------------------------------------------------
    def _primary_down(self, inst: Instance, plan: Plan | None, watch: _Watch, primary: Node,
                      standby: Node | None, seen: probe.Probe,
                      standby_seen: probe.Probe | None,
                      cloud: probe.CloudState | None) -> str:
        limit = self.settings.failures_before_acting
        if watch.primary_failures < limit:
            watch.urgent = True
            return f"primary unreachable {watch.primary_failures}/{limit}: {seen.error}"
        watch.urgent = False
        if cloud is None:
            cloud = probe.cloud_state(self.runtime.cloud, primary.server_id)
        head = f"primary unreachable {limit}/{limit} ({seen.error})"
        if not cloud.reachable:
            self._degrade(inst, f"primary {primary.id} unreachable and the cloud API too: not "
                                "failing over (a partition cannot be told from a crash)")
            return (f"{head} and {cloud.describe}: not failing over (a partition cannot be "
                    "told from a crash)")
        cause = f"primary {primary.id} unreachable ({seen.error}); {cloud.describe}"
        recent = self._recent_failover(inst)
        if recent is not None:
            return (f"{head}; last failover {recent:.0f} s ago, less than "
                    f"{self.settings.min_seconds_between_failovers:.0f} s: waiting")
        if standby is None:
            if plan is not None and not plan.cloud.is_ha:
                return self._queue(inst, watch, RESURRECT, cause, primary, None,
                                   f"resurrect queued: {cause}")
            return self._degrade(inst, f"primary {primary.id} lost and there is no standby")
        if standby_seen is None or not standby_seen.ok:
            why = standby_seen.error if standby_seen is not None else "no address"
            return self._degrade(inst, f"primary {primary.id} lost and the standby {standby.id} "
                                       f"does not answer either ({why}): nothing to promote")
        if not standby_seen.in_recovery:
            return self._degrade(inst, f"primary {primary.id} lost and the standby "
                                       f"{standby.id} is not in recovery: not acting")
        refusal = self._ineligible(inst, watch, standby, standby_seen)
        if refusal is not None:
            return self._degrade(inst, f"primary {primary.id} lost; failover refused: {refusal}")
        detail = None
        if cloud.status == ServerStatus.ACTIVE:
            detail = "the cloud says the server runs: fenced through the cloud (partition?)"
        return self._queue(inst, watch, failover_ops.KIND, cause, primary, standby,
                           f"failover queued: {cause}", detail=detail)

    def _ineligible(self, inst: Instance, watch: _Watch, standby: Node,
                    standby_seen: probe.Probe) -> str | None:
        """The same rules as the failover's own check, on what the monitor knows now:
        refusing here leaves the old primary untouched (it may come back)."""
        if inst.replication == "sync":
            if inst.sync_standby_node_id != standby.id:
                return (f"the standby {standby.id} was not known to be synchronous; promoting "
                        "it could lose acknowledged commits")
            return None
        received = max(standby_seen.receive_lsn or 0, standby_seen.lsn or 0)
        if watch.last_primary_lsn is not None:
            lag: int | None = max(0, watch.last_primary_lsn - received)
        else:
            lag = inst.last_lag_bytes
        limit = self.settings.maximum_lag_on_failover
        if lag is None:
            return f"the standby {standby.id}'s lag is unknown (never seen streaming)"
        if lag > limit:
            return (f"the standby {standby.id} is {lag} bytes behind, more than "
                    f"maximum_lag_on_failover ({limit} bytes)")
        return None

    def _recent_failover(self, inst: Instance) -> float | None:
        """Seconds since the instance's last automatic failover (or resurrect), attempted
        or done, if that is less than `min_seconds_between_failovers` ago. A planned
        switchover does not count: it says nothing about flapping."""
        gap = self.settings.min_seconds_between_failovers
        with self.runtime.store.session() as s:
            last = s.scalar(select(Failover.detected_at)
                            .where(Failover.instance_id == inst.id)
                            .where(Failover.kind != failover_ops.SWITCHOVER_KIND)
                            .order_by(Failover.detected_at.desc()).limit(1))
        last = aware(last)
        if last is None:
            return None
        age = (utcnow() - last).total_seconds()
        return age if age < gap else None

    def _degrade(self, inst: Instance, reason: str) -> str:
        if inst.state != DEGRADED or inst.state_reason != reason:
            with self.runtime.store.session() as s:
                row = s.get(Instance, inst.id)
                if row is not None and row.state in (READY, DEGRADED):
                    row.state = DEGRADED
                    row.state_reason = reason
            self._decision(logging.WARNING, inst.id, f"degraded: {reason}")
        return reason

    def _queue(self, inst: Instance, watch: _Watch, kind: str, cause: str, primary: Node,
               standby: Node | None, status: str, detail: str | None = None) -> str:
        """Renew the lease (are we still the one?), queue the operation, run it next."""
        if not self.leases.renew(monitor_lease_name(inst.id)):
            self._drop(inst.id, release=False)
            return "lease lost: not acting"
        with self.runtime.store.session() as s:
            busy = s.scalars(select(Operation.id).where(Operation.instance_id == inst.id)
                             .where(Operation.state.in_(UNFINISHED)).limit(1)).first()
            if busy is not None:
                return "operation in progress: not acting"
        op_id = failover_ops.queue_failover(
            self.runtime.store, inst.id, kind=kind, cause=cause, old_primary_id=primary.id,
            standby_id=standby.id if standby is not None else None, detected_at=utcnow(),
            last_primary_lsn=watch.last_primary_lsn, detail=detail, owner=self.runner().owner)
        self._decision(logging.WARNING, inst.id, f"{status} (operation {op_id})")
        watch.reset_primary()
        watch.pending_ops = (op_id,)
        return status

    # --- the primary is healthy -------------------------------------------------------------
    def _no_standby(self, inst: Instance, plan: Plan | None, watch: _Watch) -> str:
        self._record(inst, lag=None, sync_id=None)
        if plan is None or not plan.cloud.is_ha:
            return self._healthy_again(inst, "primary healthy (standalone)")
        return self._queue_rebuild(inst, watch, None, "the standby is missing")

    def _with_standby(self, inst: Instance, watch: _Watch, primary: Node, standby: Node,
                      password: str, seen: probe.Probe, standby_seen: probe.Probe | None,
                      previous_lsn: int | None) -> str:
        limit = self.settings.failures_before_acting
        replica = seen.replica(standby.application_name)
        lag = probe.lag_bytes(seen, replica)
        sync_id = self._sync_fact(inst, watch, standby, seen, replica)
        self._record(inst, lag=lag, sync_id=sync_id)
        if standby_seen is not None and standby_seen.outcome == "down":
            watch.standby_failures += 1
            if watch.standby_failures < limit:
                watch.urgent = True
                return (f"primary healthy; standby unreachable "
                        f"{watch.standby_failures}/{limit}: {standby_seen.error}")
            watch.urgent = False
            return self._standby_lost(inst, watch, primary, standby, password,
                                      f"standby {standby.id} unreachable ({standby_seen.error})")
        watch.standby_failures = 0
        watch.urgent = False
        if replica is None or replica.state != "streaming":
            now = time.monotonic()
            watch.not_streaming_since = watch.not_streaming_since or now
            state = replica.state if replica is not None else "not connected"
            waited = now - watch.not_streaming_since
            if waited >= NOT_STREAMING_GRACE:
                return self._standby_lost(inst, watch, primary, standby, password,
                                          f"standby {standby.id} has not streamed for "
                                          f"{waited:.0f} s ({state})")
            if _names(seen, standby):
                # Every commit waits for a standby that does not stream: writes hang.
                if waited >= self.recheck * (limit - 1):
                    self._unsync(inst, primary, password, f"standby {standby.id} does not "
                                                          f"stream ({state})")
                else:
                    watch.urgent = True
            return (f"primary healthy; standby answers but does not stream ({state}) for "
                    f"{waited:.0f} s")
        watch.not_streaming_since = None
        if inst.replication == "sync" and not seen.synchronous_standby_names.strip() and \
                lag is not None and lag <= self.settings.maximum_lag_on_failover:
            _set_sync(primary, password, standby.application_name,
                      self.settings.connect_timeout + 2, ca_pem=inst.ca_for(primary))
            status = (f"primary healthy; standby {standby.id} caught up (lag {lag} B): "
                      "synchronous replication switched on again")
            self._decision(logging.INFO, inst.id, status)
            return status
        status = f"primary healthy, standby streaming ({replica.sync_state}), lag {lag} B"
        if inst.replication == "sync" and sync_id is None:
            return status + "; not yet recorded synchronous"
        return self._healthy_again(inst, status)

    def _sync_fact(self, inst: Instance, watch: _Watch, standby: Node, seen: probe.Probe,
                   replica: probe.ReplicaInfo | None) -> str | None:
        """Which standby holds every acknowledged commit (Patroni's sync key).

        True of a standby as long as synchronous_standby_names names it (commits wait
        for it, streaming or not), once it has been seen `sync` twice with its flush
        position at the second look past the primary's position at the first: then it
        also holds the commits acknowledged before it became synchronous."""
        if inst.replication != "sync" or not _names(seen, standby):
            watch.sync_mark = None
            return None
        if inst.sync_standby_node_id == standby.id:
            return standby.id
        if replica is None or replica.state != "streaming" or replica.sync_state != "sync":
            watch.sync_mark = None
            return None
        mark = watch.sync_mark
        if mark is None or mark[0] != standby.id:
            watch.sync_mark = (standby.id, seen.lsn or 0)
            return None
        if (replica.flush_lsn or 0) >= mark[1]:
            self._decision(logging.INFO, inst.id,
                           f"standby {standby.id} recorded as synchronous (it holds every "
                           "acknowledged commit)")
            return standby.id
        return None

    def _record(self, inst: Instance, *, lag: int | None, sync_id: str | None) -> None:
        with self.runtime.store.session() as s:
            row = s.get(Instance, inst.id)
            if row is None:
                return
            row.last_lag_bytes = lag
            row.last_checked_at = utcnow()
            if row.sync_standby_node_id != sync_id:
                row.sync_standby_node_id = sync_id
        inst.sync_standby_node_id = sync_id

    def _healthy_again(self, inst: Instance, status: str) -> str:
        if inst.state == DEGRADED:
            with self.runtime.store.session() as s:
                row = s.get(Instance, inst.id)
                if row is not None and row.state == DEGRADED:
                    row.state = READY
                    row.state_reason = None
            self._decision(logging.INFO, inst.id, f"healthy again, state ready ({status})")
        return status

    def _unsync(self, inst: Instance, primary: Node, password: str, why: str) -> None:
        """Non-strict synchronous mode: the store forgets the synchronous standby FIRST,
        then the primary stops waiting for it, so that writes do not hang."""
        if inst.replication != "sync":
            return
        self._record(inst, lag=inst.last_lag_bytes, sync_id=None)
        _set_sync(primary, password, None, self.settings.connect_timeout + 2,
                  ca_pem=inst.ca_for(primary))
        self._decision(logging.WARNING, inst.id, f"{why}: synchronous replication switched off "
                       "so that the primary stays writable (non-strict mode)")

    def _standby_lost(self, inst: Instance, watch: _Watch, primary: Node, standby: Node,
                      password: str, cause: str) -> str:
        self._unsync(inst, primary, password, cause)
        watch.standby_failures = 0
        return self._queue_rebuild(inst, watch, standby.id, cause)

    def _queue_rebuild(self, inst: Instance, watch: _Watch, replace_node_id: str | None,
                       cause: str) -> str:
        with self.runtime.store.session() as s:
            last = s.scalars(select(Operation).where(Operation.instance_id == inst.id)
                             .where(Operation.kind == REBUILD)
                             .order_by(Operation.created_at.desc()).limit(1)).first()
        if last is not None and last.state == OP_FAILED:
            finished = aware(last.finished_at)
            if finished is not None and (utcnow() - finished).total_seconds() < REBUILD_RETRY:
                return self._degrade(inst, f"{cause}; the last rebuild failed ({last.error}): "
                                           "trying again soon")
        if not self.leases.renew(monitor_lease_name(inst.id)):
            self._drop(inst.id, release=False)
            return "lease lost: not acting"
        with self.runtime.store.session() as s:
            if s.scalars(select(Operation.id).where(Operation.instance_id == inst.id)
                         .where(Operation.state.in_(UNFINISHED)).limit(1)).first():
                return "operation in progress: not acting"
            op = new_operation(inst.id, REBUILD, params={
                "replace_node_id": replace_node_id, "cause": cause, "failover_id": None,
            }, description=f"queued: rebuilding the standby ({cause})")
            preclaim(op, self.runner().owner)
            s.add(op)
            op_id = op.id
        status = f"{cause}: rebuild queued"
        self._decision(logging.WARNING, inst.id, f"{status} (operation {op_id})")
        watch.pending_ops = (op_id,)
        return status

    def _renew_certificates(self, inst: Instance, watch: _Watch, status: str) -> str:
        """A healthy instance whose node certificate enters its renewal window gets new
        ones (at most once per RENEWAL_RETRY, so a failing rotation is not hammered);
        so does one whose certificate expired (the broker cannot verify it any more)."""
        if watch.pending_ops:
            return status
        window = timedelta(days=self.runtime.settings.tls.renew_days)
        due = [n.id for n in inst.live_nodes()
               if tls.due_for_renewal(aware(n.tls_expires_at), window)]
        expired = any(tls.due_for_renewal(aware(n.tls_expires_at), timedelta(0))
                      for n in inst.live_nodes())
        if not due or not (status.startswith("primary healthy") or expired):
            return status
        with self.runtime.store.session() as s:
            last = s.scalar(select(Operation.created_at).where(Operation.instance_id == inst.id)
                            .where(Operation.kind == certs.KIND)
                            .order_by(Operation.created_at.desc()).limit(1))
        last = aware(last)
        if last is not None and (utcnow() - last).total_seconds() < RENEWAL_RETRY:
            return status
        if not self.leases.renew(monitor_lease_name(inst.id)):
            self._drop(inst.id, release=False)
            return "lease lost: not acting"
        cause = (f"certificate of node {', '.join(due)} expires within "
                 f"{self.runtime.settings.tls.renew_days:g} days")
        try:
            op_id = certs.queue_rotation(self.runtime.store, inst.id, cause=cause,
                                         owner=self.runner().owner)
        except certs.RotationRefused as exc:
            return f"{status}; {cause}, not renewed yet: {exc}"
        status = f"{cause}: rotation queued"
        self._decision(logging.INFO, inst.id, f"{status} (operation {op_id})")
        watch.pending_ops = (op_id,)
        return status

    # --- running what was queued -------------------------------------------------------------
    def _claim(self, op_id: str, owner: str) -> bool:
        """Compare-and-set claim of one operation (free, expired, or its owner dead)."""
        now = utcnow()
        lease = now + timedelta(seconds=15)
        with self.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            if op is None or op.state not in UNFINISHED:
                return False
            not_before = aware(op.not_before)
            if not_before is not None and not_before > now:
                return False
            older = s.scalar(select(Operation.id).where(Operation.instance_id == op.instance_id)
                             .where(Operation.state.in_(UNFINISHED))
                             .where(Operation.created_at < op.created_at).limit(1))
            if older is not None:
                return False
            current_owner = op.owner
        dead = current_owner is not None and _owner_is_dead(current_owner)
        with self.runtime.store.session() as s:
            query = (update(Operation).where(Operation.id == op_id)
                     .where(Operation.state.in_(UNFINISHED)))
            if dead:
                query = query.where(Operation.owner == current_owner)
            else:
                query = query.where(or_(Operation.owner.is_(None), Operation.owner == owner,
                                        Operation.lease_expires_at < now))
            result = s.execute(query.values(owner=owner, lease_expires_at=lease,
                                            state=IN_PROGRESS)
                               .execution_options(synchronize_session=False))
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def _op_state(self, op_id: str) -> str | None:
        with self.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            return op.state if op is not None else None

    def runner(self) -> Engine:
        """This monitor's own engine: runs what the monitor queued, at once."""
        if self._runner is None:
            rt = self.runtime
            self._runner = Engine(rt.store, rt.cloud, rt.vault, rt.catalog, rt.settings)
            self._runner.owner = new_owner_id(RUNNER_ROLE)
        return self._runner

    def drive(self, op_id: str, stop: threading.Event | None = None) -> str | None:
        """Run an operation this monitor queued to its end, here and now (then the
        rebuild it queued). Another worker that claimed it first simply runs it."""
        runner = self.runner()
        if self.engine is not None:
            self.engine.wake()
        deadline = time.monotonic() + DRIVE_TIMEOUT
        state = self._op_state(op_id)
        while state in UNFINISHED and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return state
            if self._claim(op_id, runner.owner):
                state = runner.run(op_id)
                if state in UNFINISHED and self.engine is not None:
                    # Released to be retried later: from here the worker's engine runs it,
                    # so that only one claimer ever competes for the row.
                    self.engine.wake()
                    return state
                continue
            time.sleep(0.05)
            state = self._op_state(op_id)
        if state == SUCCEEDED:
            follow_up = derived_id(op_id, REBUILD)
            if self._op_state(follow_up) in UNFINISHED:
                return self.drive(follow_up, stop)
        return state


def _names(seen: probe.Probe, standby: Node) -> bool:
    """Does the primary's synchronous_standby_names name this standby?"""
    return standby.application_name in seen.synchronous_standby_names


def _set_sync(primary: Node, password: str, application_name: str | None,
              timeout: float, *, ca_pem: str | None) -> None:
    conn = admin.connect(primary.management_address or "", password, timeout=timeout,
                         ca_pem=ca_pem)
    try:
        admin.set_synchronous_standby(conn, application_name)
    finally:
        conn.close()
