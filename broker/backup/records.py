"""What the state store knows of each instance's backups: its repository row and the
backups pgBackRest last reported, so that the restorable window of an instance is
known without reaching a node (a deleted instance has none)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from broker.backup import names
from broker.store.models import Backup, BackupRepository, aware, utcnow

ANNOTATION = "pgha-operation"


@dataclass(frozen=True)
class Window:
    """From the end of the oldest backup kept to the newest archived commit (now, for a
    live instance)."""

    start: datetime
    end: datetime

    def describe(self) -> str:
        return f"{_rfc3339(self.start)} to {_rfc3339(self.end)}"

    def holds(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def repository(session: Session, instance_id: str) -> BackupRepository:
    """The instance's repository row, made on first use."""
    row = session.get(BackupRepository, instance_id)
    if row is None:
        row = BackupRepository(instance_id=instance_id, stanza=names.stanza(instance_id))
        session.add(row)
        session.flush()
    return row


def record_backups(session: Session, instance_id: str, reported: list[dict[str, Any]]) -> None:
    """Replace the instance's backup rows with what pgBackRest reported (it expires old
    ones itself)."""
    session.execute(delete(Backup).where(Backup.instance_id == instance_id))
    for item in reported:
        stamps = item.get("timestamp") or {}
        session.add(Backup(
            id=f"{instance_id}/{item['label']}", instance_id=instance_id, label=item["label"],
            type=item.get("type", "full"),
            started_at=datetime.fromtimestamp(stamps.get("start", 0), UTC),
            stopped_at=datetime.fromtimestamp(stamps.get("stop", 0), UTC),
            operation_id=(item.get("annotation") or {}).get(ANNOTATION)))


def stopped_at(backup: Backup) -> datetime:
    """The earliest time the backup restores to: pgBackRest reports whole seconds, the
    backup ended before the next one."""
    return backup.stopped_at.replace(tzinfo=backup.stopped_at.tzinfo or UTC) \
        + timedelta(seconds=1)


def backups(session: Session, instance_id: str) -> list[Backup]:
    return list(session.scalars(select(Backup).where(Backup.instance_id == instance_id)
                                .order_by(Backup.stopped_at)))


def window(session: Session, instance_id: str, *, deleted: bool) -> Window | None:
    """None when nothing can be restored (no backup yet, or purged)."""
    row = session.get(BackupRepository, instance_id)
    if row is not None and row.purged_at is not None:
        return None
    kept = backups(session, instance_id)
    if not kept:
        return None
    start = stopped_at(kept[0])
    end = aware(row.archive_end_at) if deleted and row is not None else utcnow()
    if end is None:
        return None
    # Right after a backup its end (rounded up) may still lie ahead: the latest point
    # is restorable all the same.
    return Window(start=start, end=max(start, end))
