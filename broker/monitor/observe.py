"""The observe step: read one instance from the store, probe its nodes, build a Snapshot.

Probing follows the detection timing in loop.py: after a first failed probe of the
primary the remaining confirmations are started `recheck` apart, each with the full
connect_timeout, overlapping when they hang; the standby is probed at the same time,
and the cloud is asked about the primary's server once the primary fails.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, replace
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from broker.config import MonitorSettings
from broker.metrics import instruments
from broker.monitor.decide import Certificates, NodeView, Snapshot, Watch, before_probe
from broker.operations import certs, queue
from broker.operations import failover as failover_ops
from broker.operations.promotion import REBUILD, standby_of
from broker.pg import probe, tls
from broker.runtime import Runtime
from broker.store.models import (
    OP_FAILED,
    UNFINISHED,
    Failover,
    Instance,
    Node,
    Operation,
    aware,
    utcnow,
)


@dataclass(frozen=True)
class Target:
    """How to reach one node."""

    address: str
    ca_pem: str | None
    server_id: str | None


@dataclass(frozen=True)
class Prepared:
    """A snapshot before the probes, and what to probe (no primary: nothing to)."""

    snap: Snapshot
    password: str = ""
    primary: Target | None = None
    standby: Target | None = None


class Observer:
    def __init__(self, runtime: Runtime, pool: concurrent.futures.ThreadPoolExecutor,
                 recheck: float) -> None:
        self.runtime = runtime
        self.settings: MonitorSettings = runtime.settings.monitor
        self.pool = pool
        self.recheck = recheck
        self.last_probe_start: dict[str, float] = {}   # instance id → monotonic
        self._passwords: dict[str, tuple[str, str]] = {}  # id → (ciphertext, password)
        # The sweep's last store read of each routine instance: (monotonic, Prepared).
        self._reads: dict[str, tuple[float, Prepared]] = {}

    def snapshot(self, instance_id: str, watch: Watch, *, held: bool) -> Snapshot:
        snap = Snapshot(instance_id, watch, time.monotonic(), held=held)
        if not held:
            return snap
        with self.runtime.store.session() as s:
            inst = s.get(Instance, instance_id)
            if inst is None or inst.deleted_at is not None:
                return replace(snap, exists=False)
            _ = list(inst.nodes)
            busy = queue.busy_with(s, instance_id, except_kinds=queue.BACKGROUND_KINDS)
        prepared = self._prepare(snap, inst, f"{busy.kind} ({busy.description})"
                                 if busy is not None else None)
        snap = prepared.snap
        if prepared.primary is None:
            return snap
        primary = prepared.primary
        snap = self._probe(snap, prepared.password, primary, prepared.standby)
        seen = snap.primary_seen
        assert seen is not None
        if seen.outcome == "down" and snap.watch.primary_failures >= \
                self.settings.failures_before_acting:
            cloud = snap.cloud or probe.cloud_state(self.runtime.cloud, primary.server_id)
            snap = replace(snap, cloud=cloud, last_failover_age=self._last_failover_age(inst))
        elif seen.ok and snap.plan_ha:
            snap = replace(snap, rebuild_failed=self._last_rebuild_failure(inst))
        return snap

    def _prepare(self, snap: Snapshot, inst: Instance, busy: str | None) -> Prepared:
        """The snapshot before the probes, and the nodes to probe (none when a rung before
        the probes applies)."""
        plan = self.runtime.catalog.plan(inst.plan_id)
        primary = inst.primary()
        if primary is not None and not primary.management_address:
            primary = None
        standby = standby_of(inst)
        snap = replace(
            snap, state=inst.state, state_reason=inst.state_reason,
            replication=inst.replication,
            plan_ha=plan.cloud.is_ha if plan is not None else None,
            primary=_view(primary), standby=_view(standby),
            sync_standby_id=inst.sync_standby_node_id, last_lag_bytes=inst.last_lag_bytes,
            busy=busy)
        if before_probe(snap) is not None:
            return Prepared(snap)
        assert primary is not None
        snap = replace(snap, certificates=self._certificates(inst))
        return Prepared(snap, self._password(inst), _target(inst, primary),
                        _target(inst, standby))

    def _password(self, inst: Instance) -> str:
        """The admin password, decrypted once per ciphertext (a sweep reads them all)."""
        cached = self._passwords.get(inst.id)
        if cached is None or cached[0] != inst.admin_password_enc:
            cached = (inst.admin_password_enc,
                      self.runtime.vault.decrypt(inst.admin_password_enc))
            self._passwords[inst.id] = cached
        return cached[1]

    def forget(self, instance_id: str) -> None:
        self.last_probe_start.pop(instance_id, None)
        self._passwords.pop(instance_id, None)
        self.reread(instance_id)

    def reread(self, instance_id: str) -> None:
        """The next sweep reads the instance from the store afresh."""
        self._reads.pop(instance_id, None)

    def prepare_many(self, watches: dict[str, Watch], max_age: float = 0.0) -> list[Prepared]:
        """`_prepare` for many held instances, reading the store in one session; an
        instance read less than `max_age` seconds ago, idle and with a primary to probe,
        is taken from that read. Stale is safe here: the sweep keeps only what it finds
        settled, and every other instance goes to its watcher, which reads afresh."""
        now = time.monotonic()
        prepared: list[Prepared] = []
        ids = []
        for instance_id, watch in watches.items():
            last = self._reads.get(instance_id)
            if last is not None and now - last[0] < max_age:
                cached = last[1]
                prepared.append(replace(cached, snap=replace(cached.snap, watch=watch, now=now)))
            else:
                ids.append(instance_id)
        if not ids:
            return prepared
        with self.runtime.store.session() as s:
            rows = {inst.id: inst for inst in s.scalars(
                select(Instance).where(Instance.id.in_(ids))
                .options(selectinload(Instance.nodes)))}
            busy: dict[str, str] = {}
            for instance_id, kind, description in s.execute(
                    select(Operation.instance_id, Operation.kind, Operation.description)
                    .where(Operation.instance_id.in_(ids))
                    .where(Operation.state.in_(UNFINISHED))
                    .where(Operation.kind.not_in(queue.BACKGROUND_KINDS))
                    .order_by(Operation.created_at.desc())):
                busy[instance_id] = f"{kind} ({description})"   # the oldest wins
            for instance_id in ids:
                snap = Snapshot(instance_id, watches[instance_id], now)
                inst = rows.get(instance_id)
                if inst is None or inst.deleted_at is not None:
                    prepared.append(Prepared(replace(snap, exists=False)))
                    continue
                read = self._prepare(snap, inst, busy.get(instance_id))
                prepared.append(read)
                if read.primary is not None and read.snap.busy is None:
                    self._reads[instance_id] = (now, read)
                else:
                    self._reads.pop(instance_id, None)
        return prepared

    def with_probes(self, snap: Snapshot, primary: probe.Probe,
                    standby: probe.Probe | None) -> Snapshot:
        """A sweep's snapshot once its probes answered: one probe of each node."""
        for role, result in (("primary", primary), ("standby", standby)):
            if result is not None:
                instruments.observe_probe(role, result.outcome, result.elapsed)
        down = primary.outcome == "down"
        failures = snap.watch.primary_failures + 1 if down else 0
        instruments.detection.probed(snap.instance_id, down=down,
                                     first_started=time.monotonic() - primary.elapsed)
        return replace(snap, watch=replace(snap.watch, primary_failures=failures),
                       primary_seen=primary, standby_seen=standby)

    def _probe(self, snap: Snapshot, password: str, primary: Target,
               standby: Target | None) -> Snapshot:
        """Probe the primary (the remaining confirmations after a failure, `recheck`
        apart and overlapping) and the standby, concurrently; ask the cloud when failing."""
        timeout = self.settings.connect_timeout
        failures = snap.watch.primary_failures
        needed = max(1, self.settings.failures_before_acting - failures)
        # After a failure, or a sweep probe left hanging (suspect), every confirmation
        # at once, `recheck` apart; else one probe.
        rounds = needed if failures > 0 or snap.watch.suspect else 1
        now = time.monotonic()
        last = self.last_probe_start.get(snap.instance_id, 0.0)
        first = max(now, last + self.recheck) if failures else now

        def delayed(start: float) -> probe.Probe:
            pause = start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            return probe.probe(primary.address, password, timeout=timeout,
                               ca_pem=primary.ca_pem)

        primary_futures = [self.pool.submit(delayed, first + k * self.recheck)
                           for k in range(rounds)]
        self.last_probe_start[snap.instance_id] = first + (rounds - 1) * self.recheck
        standby_future = None
        if standby is not None:
            standby_future = self.pool.submit(probe.probe, standby.address, password,
                                              timeout=timeout, ca_pem=standby.ca_pem)
        cloud_future = None
        if failures > 0:
            cloud_future = self.pool.submit(probe.cloud_state, self.runtime.cloud,
                                            primary.server_id)
        results = [f.result() for f in primary_futures]
        standby_seen = standby_future.result() if standby_future is not None else None
        for role, result in [*(("primary", r) for r in results), ("standby", standby_seen)]:
            if result is not None:
                instruments.observe_probe(role, result.outcome, result.elapsed)
        seen = results[-1]
        for result in results:
            if result.outcome != "down":
                seen = result  # one answer is enough: alive
                break
            failures += 1
            seen = result
        instruments.detection.probed(snap.instance_id, down=seen.outcome == "down",
                                     first_started=first if snap.watch.primary_failures == 0
                                     else None)
        return replace(
            snap, watch=replace(snap.watch, primary_failures=failures, suspect=False),
            primary_seen=seen,
            standby_seen=standby_seen,
            cloud=cloud_future.result() if cloud_future is not None else None)

    def _last_failover_age(self, inst: Instance) -> float | None:
        """Seconds since the instance's last automatic failover (or resurrect), attempted
        or done. A planned switchover does not count: it says nothing about flapping."""
        with self.runtime.store.session() as s:
            last = s.scalar(select(Failover.detected_at)
                            .where(Failover.instance_id == inst.id)
                            .where(Failover.kind != failover_ops.SWITCHOVER_KIND)
                            .order_by(Failover.detected_at.desc()).limit(1))
        last = aware(last)
        return (utcnow() - last).total_seconds() if last is not None else None

    def _last_rebuild_failure(self, inst: Instance) -> tuple[str, float] | None:
        with self.runtime.store.session() as s:
            last = s.scalars(select(Operation).where(Operation.instance_id == inst.id)
                             .where(Operation.kind == REBUILD)
                             .order_by(Operation.created_at.desc()).limit(1)).first()
        if last is None or last.state != OP_FAILED:
            return None
        finished = aware(last.finished_at)
        if finished is None:
            return None
        return str(last.error), (utcnow() - finished).total_seconds()

    def _certificates(self, inst: Instance) -> Certificates:
        renew_days = self.runtime.settings.tls.renew_days
        window = timedelta(days=renew_days)
        live = inst.live_nodes()
        due = tuple(n.id for n in live if tls.due_for_renewal(aware(n.tls_expires_at), window))
        if not due:
            return Certificates(renew_days=renew_days)
        expired = any(tls.due_for_renewal(aware(n.tls_expires_at), timedelta(0)) for n in live)
        with self.runtime.store.session() as s:
            last = s.scalar(select(Operation.created_at).where(Operation.instance_id == inst.id)
                            .where(Operation.kind == certs.KIND)
                            .order_by(Operation.created_at.desc()).limit(1))
        last = aware(last)
        age = (utcnow() - last).total_seconds() if last is not None else None
        return Certificates(due, expired, age, renew_days)


def _view(node: Node | None) -> NodeView | None:
    return NodeView(node.id, node.application_name) if node is not None else None


def _target(inst: Instance, node: Node | None) -> Target | None:
    if node is None or not node.management_address:
        return None
    return Target(node.management_address, inst.ca_for(node), node.server_id)
