"""Carries out what the decision ladder (decide.py) chose, on the store and the primary.

Before it queues an operation the executor renews the instance's lease (are we still
the one?) and looks again for an unfinished operation; a queued operation is born
claimed by the monitor's own engine, which runs it next.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, update

from broker.ha import rules
from broker.metrics import instruments
from broker.monitor.decide import (
    Action,
    Decision,
    Degrade,
    EnableSync,
    QueueFailover,
    QueueRebuild,
    QueueRotation,
    Record,
    Snapshot,
    Unsync,
)
from broker.monitor.leases import Leases, monitor_lease_name
from broker.operations import certs, queue
from broker.operations import failover as failover_ops
from broker.operations.params import RebuildParams
from broker.operations.promotion import REBUILD
from broker.operations.resurrect import KIND as RESURRECT
from broker.pg import connection, replication
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    READY,
    Instance,
    utcnow,
)

log = logging.getLogger(__name__)

LEASE_LOST = "lease lost: not acting"


@dataclass
class Outcome:
    """The status to report, the operations queued (to run now), and whether a decision
    was logged already (then the watcher does not repeat the status)."""

    status: str
    queued: tuple[str, ...] = ()
    logged: bool = False
    lease_lost: bool = False


class Executor:
    def __init__(self, runtime: Runtime, leases: Leases,
                 runner_owner: Callable[[], str]) -> None:
        self.runtime = runtime
        self.leases = leases
        self.runner_owner = runner_owner
        self._local = threading.local()  # watcher threads share the executor

    def carry_out(self, snap: Snapshot, decision: Decision) -> Outcome:
        self._local.logged = False
        if decision.record is not None:
            self._record(snap, decision.record, decision.status)
        status = decision.status
        queued: tuple[str, ...] = ()
        if decision.action is not None:
            status, queued = self._act(snap, decision.action, status)
        return Outcome(status, queued, bool(self._local.logged), status == LEASE_LOST)

    def _act(self, snap: Snapshot, action: Action, status: str) -> tuple[str, tuple[str, ...]]:
        if isinstance(action, Degrade):
            if action.unsync:
                self._unsync(snap, action.unsync)
            self._degrade(snap, action.reason)
            return status, ()
        if isinstance(action, Unsync):
            self._unsync(snap, action.why)
            return status, ()
        if isinstance(action, EnableSync):
            self._set_sync(snap, action.application_name)
            self._decision(logging.INFO, snap.instance_id, status)
            return status, ()
        if not self.leases.renew(monitor_lease_name(snap.instance_id)):
            return LEASE_LOST, ()
        if isinstance(action, QueueFailover):
            return self._queue(snap, action, status)
        if isinstance(action, QueueRebuild):
            if action.unsync:
                self._unsync(snap, action.unsync)
            return self._queue_rebuild(snap, action.replace_node_id, action.cause)
        return self._queue_rotation(snap, action, status)

    # --- the store -------------------------------------------------------------------
    def _record(self, snap: Snapshot, record: Record, status: str) -> None:
        with self.runtime.store.session() as s:
            row = s.get(Instance, snap.instance_id)
            if row is None:
                return
            row.last_lag_bytes = record.lag
            row.last_checked_at = utcnow()
            if row.sync_standby_node_id != record.sync_standby_id:
                row.sync_standby_node_id = record.sync_standby_id
        if record.sync_standby_id is not None and record.sync_standby_id != snap.sync_standby_id:
            self._decision(logging.INFO, snap.instance_id,
                           f"standby {record.sync_standby_id} recorded as synchronous (it "
                           "holds every acknowledged commit)")
        if record.healthy and snap.state == DEGRADED:
            with self.runtime.store.session() as s:
                row = s.get(Instance, snap.instance_id)
                if row is not None and row.state == DEGRADED:
                    row.state = READY
                    row.state_reason = None
            self._decision(logging.INFO, snap.instance_id,
                           f"healthy again, state ready ({status})")

    def record_many(self, lags: dict[str, int | None]) -> None:
        """The routine record of many healthy checks (lag, time of the check) in one
        transaction: a sweep of 1,000 instances costs one commit, not 1,000."""
        if not lags:
            return
        table = cast(Table, Instance.__table__)
        statement = (update(table).where(table.c.id == bindparam("instance_id"))
                     .values(last_lag_bytes=bindparam("lag"), last_checked_at=bindparam("now")))
        now = utcnow()
        with self.runtime.store.session() as s:
            s.execute(statement, [{"instance_id": instance_id, "lag": lag, "now": now}
                                  for instance_id, lag in lags.items()])

    def _degrade(self, snap: Snapshot, reason: str) -> None:
        if snap.state == DEGRADED and snap.state_reason == reason:
            return
        with self.runtime.store.session() as s:
            row = s.get(Instance, snap.instance_id)
            if row is not None and row.state in (READY, DEGRADED):
                row.state = DEGRADED
                row.state_reason = reason
        self._decision(logging.WARNING, snap.instance_id, f"degraded: {reason}")

    def _decision(self, level: int, instance_id: str, message: str) -> None:
        log.log(level, "instance %s: %s", instance_id, message)
        self._local.logged = True

    # --- the primary --------------------------------------------------------------------
    def _set_sync(self, snap: Snapshot, application_name: str | None) -> None:
        with self.runtime.store.session() as s:
            inst = s.get(Instance, snap.instance_id)
            primary = inst.primary() if inst is not None else None
            if inst is None or primary is None:
                return
            password = self.runtime.vault.decrypt(inst.admin_password_enc)
            address, ca_pem = primary.management_address or "", inst.ca_for(primary)
        conn = connection.connect(address, password,
                                  timeout=self.runtime.settings.monitor.connect_timeout + 2,
                                  ca_pem=ca_pem)
        try:
            replication.set_synchronous_standby(conn, application_name)
        finally:
            conn.close()

    def _unsync(self, snap: Snapshot, why: str) -> None:
        if snap.replication != rules.SYNC:
            return

        def forget() -> None:
            with self.runtime.store.session() as s:
                row = s.get(Instance, snap.instance_id)
                if row is not None:
                    row.last_checked_at = utcnow()
                    row.sync_standby_node_id = None

        rules.unsync(forget, lambda: self._set_sync(snap, None))
        self._decision(logging.WARNING, snap.instance_id, f"{why}: synchronous replication "
                       "switched off so that the primary stays writable (non-strict mode)")

    # --- queueing ------------------------------------------------------------------------
    def _busy(self, instance_id: str) -> bool:
        return queue.busy_kind(self.runtime.store, instance_id,
                               except_kinds=queue.BACKGROUND_KINDS) is not None

    def _queue(self, snap: Snapshot, action: QueueFailover,
               status: str) -> tuple[str, tuple[str, ...]]:
        if self._busy(snap.instance_id):
            return "operation in progress: not acting", ()
        op_id = failover_ops.queue_failover(
            self.runtime.store, snap.instance_id,
            kind=RESURRECT if action.resurrect else failover_ops.KIND, cause=action.cause,
            old_primary_id=action.old_primary_id, standby_id=action.standby_id,
            detected_at=utcnow(), last_primary_lsn=action.last_primary_lsn,
            detail=action.detail, owner=self.runner_owner())
        instruments.detection.acted(snap.instance_id)
        self._decision(logging.WARNING, snap.instance_id, f"{status} (operation {op_id})")
        return status, (op_id,)

    def _queue_rebuild(self, snap: Snapshot, replace_node_id: str | None,
                       cause: str) -> tuple[str, tuple[str, ...]]:
        with self.runtime.store.session() as s:
            if queue.busy_with(s, snap.instance_id,
                               except_kinds=queue.BACKGROUND_KINDS) is not None:
                return "operation in progress: not acting", ()
            op = queue.new_operation(
                snap.instance_id, REBUILD,
                params=RebuildParams(replace_node_id=replace_node_id, cause=cause),
                owner=self.runner_owner(),
                description=f"queued: rebuilding the standby ({cause})")
            s.add(op)
            op_id = op.id
        status = f"{cause}: rebuild queued"
        self._decision(logging.WARNING, snap.instance_id, f"{status} (operation {op_id})")
        return status, (op_id,)

    def _queue_rotation(self, snap: Snapshot, action: QueueRotation,
                        status: str) -> tuple[str, tuple[str, ...]]:
        try:
            op_id = certs.queue_rotation(self.runtime.store, snap.instance_id,
                                         cause=action.cause, owner=self.runner_owner())
        except certs.RotationRefused as exc:
            return f"{status}; {action.cause}, not renewed yet: {exc}", ()
        status = f"{action.cause}: rotation queued"
        self._decision(logging.INFO, snap.instance_id, f"{status} (operation {op_id})")
        return status, (op_id,)
