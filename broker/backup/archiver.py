"""What a node's archiver reports (pg_stat_archiver): the last WAL file pushed to the
repository and when, the last failure. On the primary this is the instance's
archiving; a standby does not archive."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ArchiverStatus:
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None

    @property
    def failing(self) -> bool:
        """The last attempt failed (a later success clears it)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


def archiver_status(conn: Any) -> ArchiverStatus:
    with conn.cursor() as cur:
        cur.execute("SELECT archived_count, last_archived_wal, last_archived_time, "
                    "failed_count, last_failed_wal, last_failed_time "
                    "FROM pg_catalog.pg_stat_archiver")
        row = cur.fetchone()
    return ArchiverStatus(*row)


class NotArchived(Exception):
    """The WAL file closed by `seal` was not archived in time; the message says why."""


def seal(conn: Any, timeout: float) -> datetime:
    """Close the current WAL file and wait until it is archived: everything committed
    before the returned (server) time is then in the repository."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_catalog.current_setting('archive_mode')")
        if cur.fetchone()[0] == "off":
            raise NotArchived("this node does not archive")
        cur.execute("SELECT pg_catalog.now(), "
                    "pg_catalog.pg_walfile_name(pg_catalog.pg_switch_wal())")
        sealed_at, wal = cur.fetchone()
    deadline = time.monotonic() + timeout
    while (status := archiver_status(conn)).last_archived_wal is None \
            or status.last_archived_wal < wal:
        if time.monotonic() > deadline:
            raise NotArchived(f"WAL file {wal} was not archived within {timeout:.0f} s (last "
                              f"archived: {status.last_archived_wal or 'none'}, last failed: "
                              f"{status.last_failed_wal or 'none'})")
        time.sleep(0.2)
    return sealed_at  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Archiving:
    """A primary's archiving as an operator reads it."""

    status: ArchiverStatus
    current_wal: str                 # the WAL file being written
    waiting: int                     # completed WAL files not archived yet
    now: datetime

    @property
    def age_seconds(self) -> float | None:
        """How old the newest archived WAL file is."""
        last = self.status.last_archived_time
        return None if last is None else max(0.0, (self.now - last).total_seconds())

    def describe(self) -> str:
        last = self.status.last_archived_wal
        text = (f"last archived {last}, {self.age_seconds:.0f} s ago" if last
                else "nothing archived yet")
        text += f"; {self.waiting} WAL file(s) waiting"
        if self.status.failing:
            text += (f"; FAILING since {self.status.last_failed_time:%Y-%m-%d %H:%M:%S}Z "
                     f"({self.status.failed_count} failures, on {self.status.last_failed_wal})")
        return text


def _segment(name: str) -> int | None:
    """A WAL file's position on its timeline (None for history and partial files)."""
    if len(name) != 24:
        return None
    return int(name[8:16], 16) * 0x100 + int(name[16:], 16)


def archiving(conn: Any) -> Archiving:
    status = archiver_status(conn)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_catalog.now(), "
                    "pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn())")
        now, current = cur.fetchone()
    waiting = 0
    last = _segment(status.last_archived_wal or "")
    here = _segment(current)
    if here is not None:
        same_timeline = last is not None and (status.last_archived_wal or "")[:8] == current[:8]
        waiting = max(0, here - last - 1) if same_timeline and last is not None else 0
    return Archiving(status=status, current_wal=current, waiting=waiting, now=now)

