"""The backup schedule, kept in the state store and shared by every worker.

Each live instance has a row (`backup_repositories`) with the times of its next full
and differential backups (the plan's `full_every_days`, `diff_every_days`; the first
full backup FIRST_BACKUP_DELAY after the instance is first seen ready). Every
worker ticks (at most every TICK_SECONDS); a due row is advanced with a
compare-and-set on the times it read, in the same transaction that queues the
backup operation, so however many workers tick, one backup is queued, and a restart
changes nothing. The tick also purges the repositories of deleted instances whose
restore window has passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.backup import records, report, s3
from broker.cloud.base import CloudError
from broker.operations import backup, queue
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    READY,
    Backup,
    BackupRepository,
    Instance,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

TICK_SECONDS = 10.0
# A new instance's first full backup: soon, but not in the middle of its first minutes
# (its app's schema migrations, a switchover test...).
FIRST_BACKUP_DELAY = timedelta(minutes=10)
WARN_AGAIN_SECONDS = 600.0
# Each held instance's archiving is read about this often, over a fresh session to its
# primary (a backend started on the node each time), at most ARCHIVING_BATCH per call
# of `maybe_tick` (the monitor calls it every second): 1,000 instances cost the nodes
# about 25 connections a second, spread, instead of 1,000 in a burst every tick. The
# warning's own threshold is minutes (2 x archive_timeout + 60 s), so a minute's delay
# in noticing is within it.
ARCHIVING_CHECK_SECONDS = 60.0
ARCHIVING_BATCH = 25


class Scheduler:
    def __init__(self, runtime: Runtime, *, now: Callable[[], datetime] = utcnow) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.catalog = runtime.catalog
        self.now = now
        self._last = 0.0
        self._warned: dict[str, float] = {}  # instance → when its lag was last logged
        self._archiving_round = float("-inf")   # when the current round of checks began
        self._archiving_due: list[str] = []     # instances the round has yet to check

    def maybe_tick(self, holds: Callable[[str], bool] = lambda _: True) -> None:
        """Tick if TICK_SECONDS passed; then check the archiving of the next few
        instances this worker's monitor `holds` (one worker warns about each)."""
        if time.monotonic() - self._last >= TICK_SECONDS:
            self._last = time.monotonic()
            self.tick()
        self.check_archiving(holds)

    def check_archiving(self, holds: Callable[[str], bool]) -> None:
        """A warning when an instance's archiving fails or falls behind (again every
        WARN_AGAIN_SECONDS while it lasts), a note when it has caught up: the next
        ARCHIVING_BATCH instances of the round (a round every ARCHIVING_CHECK_SECONDS)."""
        if not self._archiving_due:
            if time.monotonic() - self._archiving_round < ARCHIVING_CHECK_SECONDS:
                return
            self._archiving_round = time.monotonic()
            with self.store.session() as s:
                self._archiving_due = list(s.scalars(
                    select(Instance.id).where(Instance.deleted_at.is_(None))
                    .where(Instance.state.in_((READY, DEGRADED)))))
        batch = [i for i in self._archiving_due[:ARCHIVING_BATCH] if holds(i)]
        del self._archiving_due[:ARCHIVING_BATCH]
        if not batch:
            return
        with self.store.session() as s:
            live = [(inst, self.catalog.plan(inst.plan_id)) for inst in s.scalars(
                select(Instance).where(Instance.id.in_(batch))
                .where(Instance.deleted_at.is_(None))
                .where(Instance.state.in_((READY, DEGRADED))))]
            for inst, _ in live:
                _ = list(inst.nodes)
        for inst, plan in live:
            found = report.archiving(self.runtime, inst)
            if not found["reachable"] or plan is None:
                continue
            lagging = found["failing"] or (
                found["waiting_wal_files"] > 0 and (found["last_archived_age_s"] or 0)
                > 2 * plan.cloud.backups.archive_timeout_s + 60)
            warned = self._warned.get(inst.id)
            if lagging and (warned is None or time.monotonic() - warned > WARN_AGAIN_SECONDS):
                log.warning("instance %s: archiving is behind: %s", inst.id, found["summary"])
                self._warned[inst.id] = time.monotonic()
            elif not lagging and warned is not None:
                log.info("instance %s: archiving caught up: %s", inst.id, found["summary"])
                del self._warned[inst.id]

    def enabled(self) -> bool:
        """Repositories on the local cloud's host, or in object storage (anywhere)."""
        return (self.runtime.settings.backup_s3 is not None or self.runtime.cloud.name == "local"
                or any(p.cloud.backups.object_storage is not None
                       for service in self.catalog.services for p in service.plans))

    def tick(self) -> list[str]:
        """Queue the backups that are due; purge expired repositories. The ids queued."""
        if not self.enabled():
            return []
        now = self.now()
        try:
            self._add_missing_rows(now)
        except IntegrityError:  # another worker added them meanwhile
            log.debug("backup schedule: rows added by another worker")
        queued = []
        with self.store.session() as s:
            for inst, row in s.execute(
                    select(Instance, BackupRepository)
                    .join(BackupRepository, BackupRepository.instance_id == Instance.id)
                    .where(Instance.deleted_at.is_(None))
                    .where(Instance.state.in_((READY, DEGRADED)))).all():
                op_id = self._queue_if_due(s, inst, row, now)
                if op_id is not None:
                    queued.append(op_id)
        self._purge_expired(now)
        return queued

    def _add_missing_rows(self, now: datetime) -> None:
        """A schedule for each live instance without one (its row may exist already: made
        with its first node, or by a backup the platform asked for)."""
        with self.store.session() as s:
            missing = s.scalars(
                select(Instance).outerjoin(BackupRepository,
                                           BackupRepository.instance_id == Instance.id)
                .where(BackupRepository.next_full_at.is_(None))
                .where(BackupRepository.keep_until.is_(None))
                .where(Instance.deleted_at.is_(None))
                .where(Instance.state.in_((READY, DEGRADED)))).all()
            for inst in missing:
                if self.runtime.cloud.name != "local" and s3.instance_storage(
                        s, self.runtime.settings, self.catalog, inst.id, inst.plan_id) is None:
                    continue  # no repository: this plan has no object storage
                row = records.repository(s, inst.id)
                row.next_full_at = now + FIRST_BACKUP_DELAY

    def _queue_if_due(self, s: Session, inst: Instance, row: BackupRepository,
                      now: datetime) -> str | None:
        plan = self.catalog.plan(inst.plan_id)
        full_at, diff_at = aware(row.next_full_at), aware(row.next_diff_at)
        if plan is None or full_at is None:
            return None
        kind = "full" if full_at <= now else "diff" if diff_at is not None and diff_at <= now \
            else None
        if kind is None or queue.unfinished_for(s, inst.id, kinds=(backup.KIND,
                                                                   backup.SCHEDULED_KIND)):
            return None
        settings = plan.cloud.backups
        values = {"next_diff_at": now + timedelta(days=settings.diff_every_days)}
        if kind == "full":
            values["next_full_at"] = now + timedelta(days=settings.full_every_days)
        advanced = s.execute(
            update(BackupRepository)
            .where(BackupRepository.instance_id == inst.id)
            .where(BackupRepository.next_full_at == row.next_full_at)
            .where(BackupRepository.next_diff_at == row.next_diff_at
                   if row.next_diff_at is not None else BackupRepository.next_diff_at.is_(None))
            .values(**values).execution_options(synchronize_session=False))
        if advanced.rowcount != 1:  # type: ignore[attr-defined]
            return None  # another worker queued it
        op = backup.new_backup(inst.id, kind, cause="scheduled", kind=backup.SCHEDULED_KIND)
        s.add(op)
        log.info("instance %s: scheduled %s backup queued (operation %s)", inst.id, kind, op.id)
        return op.id

    def _purge_expired(self, now: datetime) -> None:
        with self.store.session() as s:
            expired = [(row.instance_id, row.stanza) for row in s.scalars(
                select(BackupRepository).where(BackupRepository.purged_at.is_(None))
                .where(BackupRepository.keep_until.is_not(None))
                .where(BackupRepository.keep_until <= now))]
        for instance_id, stanza in expired:
            purge(self.runtime, instance_id, stanza, now=now)


def purge(runtime: Runtime, instance_id: str, stanza: str, *,
          now: datetime | None = None) -> bool:
    """Delete a deleted instance's repository (once, whoever asks); False when another
    worker did or does it."""
    store = runtime.store
    with store.session() as s:
        claimed = s.execute(
            update(BackupRepository).where(BackupRepository.instance_id == instance_id)
            .where(BackupRepository.purged_at.is_(None))
            .values(purged_at=now or utcnow()).execution_options(synchronize_session=False))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return False
    try:
        _delete_repository(runtime, instance_id, stanza)
    except (CloudError, OSError, s3.ObjectStorageError) as exc:
        log.warning("instance %s: backup repository not deleted (%s); retried later",
                    instance_id, exc)
        with store.session() as s:
            s.execute(update(BackupRepository).where(BackupRepository.instance_id == instance_id)
                      .values(purged_at=None).execution_options(synchronize_session=False))
        return False
    with store.session() as s:
        s.query(Backup).filter(Backup.instance_id == instance_id).delete()
    log.info("instance %s: backup repository deleted", instance_id)
    return True


def _delete_repository(runtime: Runtime, instance_id: str, stanza: str) -> None:
    """Where it is: in object storage (every object under the stanza's prefix), or the
    cloud's own."""
    with runtime.store.session() as s:
        row = s.get(BackupRepository, instance_id)
        place = row.location if row is not None else None
    if place is None:  # never stored (made before 0005): where the settings put them
        place = s3.location(runtime.settings.backup_s3)
    storage = s3.at(place, runtime.settings)
    if storage is not None:
        s3.delete_repository(storage, stanza)
    elif runtime.cloud.name == "local":
        runtime.cloud.delete_repository(stanza)
    # else: a plan without object storage on a cloud with no repository of its own
    # never archived anywhere: nothing to delete.
