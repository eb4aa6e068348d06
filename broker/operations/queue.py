"""The operation queue: the one place that decides who runs which Operation row.

- Owner ids are `host:pid:role-nonce`. The host is `host_identity()` (the host name,
  or BROKER_HOST_IDENTITY), so two workers of one machine can act as two hosts.
- An operation is claimable when it is unfinished, its `not_before` has passed, no
  older unfinished operation of its instance is waiting (backups excepted: nothing
  waits behind one), and it is free, its lease
  expired, or its owner is a dead process of the claimer's own host. Claiming a
  given id also takes a row pre-claimed for the claimer (born owned by it).
- A deprovision is queued behind the broker's own work on the instance (oldest
  first, as above); once one is requested, no follow-up (a rebuild after a failover)
  is queued any more: it would build what the deprovision is about to delete.
- Every claim is a compare-and-set on the owner and lease that were read; on
  PostgreSQL the candidates are also locked FOR UPDATE SKIP LOCKED, so workers
  never wait on each other. Either way two racing claimers never both win.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from broker import config
from broker.operations.params import Params
from broker.store.db import Store
from broker.store.models import (
    IN_PROGRESS,
    OP_FAILED,
    QUEUED,
    UNFINISHED,
    Operation,
    aware,
    utcnow,
)

HOST_IDENTITY_ENV = "BROKER_HOST_IDENTITY"
DEPROVISION = "deprovision"
# Backups run beside everything else: nothing waits behind one (a failover least of
# all), and the monitor acts while one runs. A backup caught by a failover fails its
# attempt and is retried on the new primary.
BACKGROUND_KINDS = ("backup", "scheduled_backup")
LEASE_SECONDS = 15.0
# The role of the engines a monitor runs what it queued with: they run follow-ups next.
RUNNER_ROLE = "monitor-runner"


def host_identity() -> str:
    """The host of this process's owner ids, by the rule its settings were checked
    with at start (a process's environment does not change after that)."""
    try:
        return config.host_identity(os.environ)
    except config.ConfigError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class OwnerId:
    host: str
    pid: int
    role: str

    @classmethod
    def parse(cls, text: str | None) -> OwnerId | None:
        parts = (text or "").split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2].rpartition("-")[0])


def new_owner_id(role: str = "monitor", host: str | None = None) -> str:
    return f"{host or host_identity()}:{os.getpid()}:{role}-{uuid.uuid4().hex[:6]}"


def owner_is_dead(owner: str | None, host: str | None = None) -> bool:
    """True when nobody holds it, or it is a process of `host` (this one's by default)
    that no longer runs. An owner on another host only loses its lease by expiry."""
    if not owner:
        return True
    parsed = OwnerId.parse(owner)
    if parsed is None or parsed.host != (host or host_identity()):
        return False
    try:
        with open(f"/proc/{parsed.pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1:2] for line in f)
    except FileNotFoundError:
        return True


def is_runner(owner: str | None) -> bool:
    parsed = OwnerId.parse(owner)
    return parsed is not None and parsed.role == RUNNER_ROLE


# --- enqueue -----------------------------------------------------------------------------
def new_operation(instance_id: str, kind: str, *, params: Params | None = None,
                  binding_id: str | None = None, description: str = "queued",
                  op_id: str | None = None, owner: str | None = None) -> Operation:
    """A queued Operation row; the caller adds it in its own transaction. With `owner`
    the row is pre-claimed: born owned by that engine, which runs it next; another
    engine takes it only when the owner dies or lets the lease expire."""
    op = Operation(
        id=op_id or str(uuid.uuid4()), instance_id=instance_id, binding_id=binding_id,
        kind=kind, state=QUEUED, params=(params or Params()).dump(), description=description,
        step_index=0,
    )
    if owner:
        op.owner = owner
        op.lease_expires_at = utcnow() + timedelta(seconds=LEASE_SECONDS)
    return op


def enqueue_follow_up(session: Session, parent_id: str, op_id: str, instance_id: str,
                      kind: str, *, params: Params, description: str) -> None:
    """Queue `op_id` (derived from its parent, so once) to run after the parent. When a
    monitor runner runs the parent, the follow-up is born owned by it: it runs it next."""
    if session.get(Operation, op_id) is not None or deprovision_requested(session, instance_id):
        return
    parent = session.get(Operation, parent_id)
    owner = parent.owner if parent is not None and is_runner(parent.owner) else None
    session.add(new_operation(instance_id, kind, params=params, description=description,
                              op_id=op_id, owner=owner))


# --- the unfinished operations of an instance ----------------------------------------------
def deprovision_requested(session: Session, instance_id: str, *,
                          before: datetime | None = None) -> bool:
    """A deprovision of the instance is queued, running or done (one that failed can be
    asked for again: it does not count); with `before`, one requested before then."""
    query = (select(Operation.id).where(Operation.instance_id == instance_id)
             .where(Operation.kind == DEPROVISION).where(Operation.state != OP_FAILED))
    if before is not None:
        query = query.where(Operation.created_at < before)
    return session.scalar(query.limit(1)) is not None


def unfinished_for(session: Session, instance_id: str, *, kinds: Iterable[str] | None = None,
                   except_kinds: Iterable[str] = (), except_id: str | None = None
                   ) -> list[Operation]:
    """The instance's unfinished operations, oldest first."""
    query = (select(Operation).where(Operation.instance_id == instance_id)
             .where(Operation.state.in_(UNFINISHED)).order_by(Operation.created_at))
    if kinds is not None:
        query = query.where(Operation.kind.in_(tuple(kinds)))
    if tuple(except_kinds):
        query = query.where(Operation.kind.not_in(tuple(except_kinds)))
    if except_id is not None:
        query = query.where(Operation.id != except_id)
    return list(session.scalars(query))


def busy_with(session: Session, instance_id: str, *, except_kinds: Iterable[str] = ()
              ) -> Operation | None:
    """The instance's oldest unfinished operation (None when it is idle)."""
    found = unfinished_for(session, instance_id, except_kinds=except_kinds)
    return found[0] if found else None


def busy_kind(store: Store, instance_id: str, *, except_kinds: Iterable[str] = ()) -> str | None:
    with store.session() as s:
        busy = busy_with(s, instance_id, except_kinds=except_kinds)
        return busy.kind if busy is not None else None


def is_unfinished(state: str | None) -> bool:
    return state in UNFINISHED


def state_of(store: Store, op_id: str) -> str | None:
    with store.session() as s:
        op = s.get(Operation, op_id)
        return op.state if op is not None else None


# --- claim, renew, release -----------------------------------------------------------------
class Queue:
    """The queue as one owner (an engine) sees it."""

    def __init__(self, store: Store, owner: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        parsed = OwnerId.parse(owner)
        self.host = parsed.host if parsed is not None else host_identity()

    def claim(self, op_id: str | None = None) -> str | None:
        """Claim `op_id`, or the oldest claimable operation; returns the id claimed."""
        now = utcnow()
        with self.store.session() as s:
            query = (select(Operation).where(Operation.state.in_(UNFINISHED))
                     .where(or_(Operation.not_before.is_(None), Operation.not_before <= now))
                     .order_by(Operation.created_at).limit(20)
                     .with_for_update(skip_locked=True))
            if op_id is not None:
                query = query.where(Operation.id == op_id)
            for op in s.scalars(query):
                if not self._claimable(op, now, given=op_id is not None):
                    continue
                if _has_older(s, op):
                    continue  # one operation at a time per instance: the oldest first
                # SQLite has no row locks: this condition is what stops two claimers.
                claimed = s.execute(
                    update(Operation).where(Operation.id == op.id)
                    .where(Operation.state.in_(UNFINISHED))
                    .where(Operation.owner.is_not_distinct_from(op.owner))
                    .where(Operation.lease_expires_at.is_not_distinct_from(op.lease_expires_at))
                    .values(owner=self.owner, lease_expires_at=self._expiry(now),
                            state=IN_PROGRESS)
                    .execution_options(synchronize_session=False))
                if getattr(claimed, "rowcount", 0) == 1:
                    return op.id
        return None

    def _claimable(self, op: Operation, now: datetime, *, given: bool) -> bool:
        if op.owner is None or (given and op.owner == self.owner):
            return True
        expires = aware(op.lease_expires_at)
        if expires is None or expires <= now:
            return True
        return op.owner != self.owner and owner_is_dead(op.owner, self.host)

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_seconds)

    def renew(self, op_id: str) -> bool:
        """Extend our lease; False when the row is no longer ours (stop renewing)."""
        with self.store.session() as s:
            result = s.execute(
                update(Operation).where(Operation.id == op_id)
                .where(Operation.owner == self.owner)
                .values(lease_expires_at=self._expiry(utcnow()))
                .execution_options(synchronize_session=False))
            return bool(getattr(result, "rowcount", 0) == 1)

    def release(self, op_id: str, *, delay: float, note: str | None = None) -> None:
        """Give the row back to be run again after `delay` seconds (by any worker).
        With `note` the attempt counts, and the description says why it is retried."""
        with self.store.session() as s:
            op = s.get(Operation, op_id)
            if op is None:
                return
            if note is not None:
                op.attempts += 1
                op.description = f"{op.description} (retrying: {note})"
            op.not_before = utcnow() + timedelta(seconds=delay)
            op.owner = None
            op.lease_expires_at = None

    def finish(self, op_id: str, state: str, description: str, *,
               error: str | None = None, step_index: int | None = None) -> None:
        """End the operation (succeeded or failed) and free its row; `step_index`: every
        step done."""
        with self.store.session() as s:
            op = s.get(Operation, op_id)
            if op is None:
                return
            if step_index is not None:
                op.step_index = step_index
                op.attempts = 0
            op.state = state
            op.description = description
            op.error = error
            op.finished_at = utcnow()
            op.owner = None
            op.lease_expires_at = None
            if error is None:
                op.step = None


def _has_older(session: Session, op: Operation) -> bool:
    query = (select(Operation.id).where(Operation.instance_id == op.instance_id)
             .where(Operation.state.in_(UNFINISHED))
             .where(Operation.created_at < op.created_at))
    if op.kind not in BACKGROUND_KINDS:
        query = query.where(Operation.kind.not_in(BACKGROUND_KINDS))
    return session.scalar(query.limit(1)) is not None
