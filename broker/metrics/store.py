"""Metrics read from the state store at scrape time, so every `web` process answers alike.

Per-instance series are labelled `instance_id` (Prometheus itself sets `instance` to
the scraped target) and `plan` (the plan's name). Failover phases are computed from
the timestamps each failover row keeps; `first write` is the applications' view and
is not known to the broker, and detection starts with the monitor's decision (the
row's `detected_at`), so phases start there.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from broker.catalog import Catalog
from broker.monitor.leases import MONITOR_PREFIX, WORKER_PREFIX
from broker.store.db import Store
from broker.store.models import (
    DEGRADED,
    DEPROVISIONED,
    FAILED,
    NODE_RUNNING,
    OP_FAILED,
    PROVISIONING,
    QUEUED,
    READY,
    STANDBY,
    UNFINISHED,
    UPDATING,
    Failover,
    Instance,
    Lease,
    Node,
    Operation,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

INSTANCE_STATES = (PROVISIONING, READY, UPDATING, DEGRADED, FAILED, "deprovisioning")
WATCHED = (READY, DEGRADED, UPDATING)
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A failover row's stamps in the order a failover sets them; each phase is named by
# the stamp that ends it and lasts from the previous stamp that is set.
_STAMPS = (("fence", "fenced_at"), ("port", "port_attached_at"),
           ("promote", "promoted_at"), ("standby", "standby_streaming_at"))


class Stamps(Protocol):
    """A failover's timestamps: a `Failover` row, or a result row of those columns."""

    @property
    def detected_at(self) -> datetime | None: ...
    @property
    def fenced_at(self) -> datetime | None: ...
    @property
    def port_attached_at(self) -> datetime | None: ...
    @property
    def promoted_at(self) -> datetime | None: ...
    @property
    def standby_streaming_at(self) -> datetime | None: ...


class StoreCollector(Collector):
    def __init__(self, store: Store, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog

    def _plan(self, plan_id: str) -> str:
        plan = self.catalog.plan(plan_id)
        return plan.name if plan is not None else plan_id

    def collect(self) -> Iterator[Metric]:
        try:
            metrics = list(self._read())
        except Exception as exc:
            log.warning("metrics: the state store cannot be read (%s)", type(exc).__name__)
            metrics = []
        yield GaugeMetricFamily("pgha_state_store_up",
                                "Whether this scrape could read the state store.",
                                value=1 if metrics else 0)
        yield from metrics

    def _read(self) -> Iterator[Metric]:
        with self.store.session() as s:
            by_state = s.execute(
                select(Instance.plan_id, Instance.state, func.count())
                .where(Instance.deleted_at.is_(None)).where(Instance.state != DEPROVISIONED)
                .group_by(Instance.plan_id, Instance.state)).all()
            watched = s.execute(
                select(Instance.id, Instance.plan_id, Instance.replication,
                       Instance.last_lag_bytes, Instance.sync_standby_node_id,
                       Instance.last_checked_at)
                .where(Instance.deleted_at.is_(None)).where(Instance.state.in_(WATCHED))).all()
            standbys = dict(s.execute(
                select(Node.instance_id, func.count()).where(Node.role == STANDBY)
                .where(Node.state == NODE_RUNNING).group_by(Node.instance_id)).all())
            operations = s.execute(select(Operation.kind, Operation.state, func.count())
                                   .group_by(Operation.kind, Operation.state)).all()
            # Columns, not ORM objects: a scrape reads every failover ever recorded.
            failovers = s.execute(select(
                Failover.kind, Failover.outcome, Failover.detected_at, Failover.fenced_at,
                Failover.port_attached_at, Failover.promoted_at,
                Failover.standby_streaming_at)).all()
            leases = s.execute(select(Lease.name, Lease.expires_at)
                               .where(Lease.name.startswith(MONITOR_PREFIX)
                                      | Lease.name.startswith(WORKER_PREFIX))).all()
        yield self._instances(by_state)
        yield from self._replication(watched, standbys)
        yield from self._watchers([row[0] for row in watched], leases)
        yield from self._operations(operations)
        yield from self._failovers(failovers)

    def _instances(self, rows: Sequence[tuple[str, str, int]]) -> Metric:
        family = GaugeMetricFamily("pgha_instances", "Service instances by plan and state.",
                                   labels=["plan", "state"])
        counts = {(self._plan(plan_id), state): count for plan_id, state, count in rows}
        # Every plan and state, zeros included: an alert on a missing series never fires.
        for name in (p.name for service in self.catalog.services for p in service.plans):
            for state in INSTANCE_STATES:
                counts.setdefault((name, state), 0)
        for (name, state), count in sorted(counts.items()):
            family.add_metric([name, state], count)
        return family

    def _replication(self, rows: Sequence[tuple[str, str, str, int | None, str | None,
                                                 datetime | None]],
                     standbys: dict[str, int]) -> Iterable[Metric]:
        lag = GaugeMetricFamily("pgha_instance_replication_lag_bytes",
                                "Bytes the standby trails the primary, at the monitor's "
                                "last check.", labels=["instance_id", "plan"])
        sync = GaugeMetricFamily("pgha_instance_sync_standby",
                                 "1 while a synchronous standby is recorded (it holds every "
                                 "acknowledged commit); ha-sync plans only.",
                                 labels=["instance_id", "plan"])
        running = GaugeMetricFamily("pgha_instance_standbys_running",
                                    "Running standbys of an instance whose plan has one.",
                                    labels=["instance_id", "plan"])
        checked = GaugeMetricFamily("pgha_instance_last_check_timestamp_seconds",
                                    "When the monitor last recorded a check that found the "
                                    "primary answering (Unix time).",
                                    labels=["instance_id", "plan"])
        for instance_id, plan_id, replication, lag_bytes, sync_id, last_checked in rows:
            labels = [instance_id, self._plan(plan_id)]
            at = aware(last_checked)
            if at is not None:
                checked.add_metric(labels, at.timestamp())
            if replication == "none":
                continue  # one node: nothing replicates, no standby is expected
            running.add_metric(labels, standbys.get(instance_id, 0))
            if lag_bytes is not None:
                lag.add_metric(labels, lag_bytes)
            if replication == "sync":
                sync.add_metric(labels, 1 if sync_id else 0)
        yield from (lag, sync, running, checked)

    def _watchers(self, watched: list[str],
                  leases: Sequence[tuple[str, datetime]]) -> Iterable[Metric]:
        now = utcnow()
        live = [name for name, expires in leases if (aware(expires) or now) > now]
        held = {name.removeprefix(MONITOR_PREFIX) for name in live
                if name.startswith(MONITOR_PREFIX)}
        yield GaugeMetricFamily("pgha_instances_unwatched",
                                "Instances the monitor should watch that no live worker "
                                "holds a lease on.", value=sum(1 for i in watched if i not in held))
        yield GaugeMetricFamily("pgha_workers_live",
                                "Workers whose monitor heartbeat lease is current.",
                                value=sum(1 for n in live if n.startswith(WORKER_PREFIX)))

    def _operations(self, rows: Sequence[tuple[str, str, int]]) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily("pgha_operations_in_flight",
                                      "Operations queued or running, by kind and state.",
                                      labels=["kind", "state"])
        failed = CounterMetricFamily("pgha_operations_failed",
                                     "Operations that ended failed, by kind.", labels=["kind"])
        for kind, state, count in sorted(rows):
            if state in UNFINISHED:
                in_flight.add_metric([kind, "queued" if state == QUEUED else "running"], count)
            elif state == OP_FAILED:
                failed.add_metric([kind], count)
        yield in_flight
        yield failed

    def _failovers(self, rows: Sequence[Any]) -> Iterable[Metric]:
        done = CounterMetricFamily("pgha_failovers",
                                   "Finished failovers, switchovers and resurrects by outcome.",
                                   labels=["kind", "outcome"])
        running = GaugeMetricFamily("pgha_failovers_in_progress",
                                    "Failovers, switchovers and resurrects under way.",
                                    labels=["kind"])
        outcomes: Tally[tuple[str, str]] = Tally()
        unfinished: Tally[str] = Tally()
        phases: dict[tuple[str, str], list[float]] = {}
        for row in rows:
            if row.outcome is None:
                unfinished[row.kind] += 1
            else:
                outcomes[(row.kind, row.outcome)] += 1
            for phase, seconds in failover_phases(row):
                phases.setdefault((row.kind, phase), []).append(seconds)
        for (kind, outcome), count in sorted(outcomes.items()):
            done.add_metric([kind, outcome], count)
        for kind, count in sorted(unfinished.items()):
            running.add_metric([kind], count)
        histogram = HistogramMetricFamily(
            "pgha_failover_phase_seconds",
            "Phases of failovers: detected→fence, →port (service address moved), "
            "→promote, →standby (a new standby streams); total: detected→promoted.",
            labels=["kind", "phase"])
        for (kind, phase), values in sorted(phases.items()):
            buckets = [(str(le), sum(1 for v in values if v <= le)) for le in PHASE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([kind, phase], buckets, sum(values))
        yield from (done, running, histogram)


def failover_phases(row: Stamps) -> list[tuple[str, float]]:
    """(phase, seconds) for each stage the failover reached, plus `total` once promoted."""
    detected = aware(row.detected_at)
    if detected is None:
        return []
    stamps = [(phase, at) for phase, attr in _STAMPS
              if (at := aware(getattr(row, attr))) is not None]
    stamps.sort(key=lambda item: item[1])
    out = []
    previous = detected
    for phase, at in stamps:
        out.append((phase, max(0.0, (at - previous).total_seconds())))
        previous = at
    promoted = aware(row.promoted_at)
    if promoted is not None:
        out.append(("total", max(0.0, (promoted - detected).total_seconds())))
    return out
