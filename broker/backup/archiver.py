"""What a node's archiver reports (pg_stat_archiver): the last WAL file pushed to the
repository and when, the last failure. On the primary this is the instance's
archiving; a standby does not archive."""

from __future__ import annotations

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
