"""What the command line shows of an instance's archiving and backups."""

from __future__ import annotations

from typing import Any

from broker.backup import archiver, records
from broker.pg import connection
from broker.runtime import Runtime
from broker.store.models import DEPROVISIONED, BackupRepository, Instance

CONNECT_TIMEOUT = 3.0


def archiving(runtime: Runtime, inst: Instance) -> dict[str, Any]:
    """The primary's archiving, or why it cannot be read."""
    primary = inst.primary()
    if inst.deleted_at is not None or primary is None or not primary.management_address:
        return {"reachable": False, "error": "no primary"}
    try:
        conn = connection.connect(primary.management_address,
                                  runtime.vault.decrypt(inst.admin_password_enc),
                                  timeout=CONNECT_TIMEOUT, ca_pem=inst.ca_for(primary))
    except Exception as exc:
        return {"reachable": False, "error": exc.__class__.__name__}
    try:
        state = archiver.archiving(conn)
    except Exception as exc:
        return {"reachable": False, "error": exc.__class__.__name__}
    finally:
        conn.close()
    status = state.status
    return {
        "reachable": True, "summary": state.describe(),
        "last_archived_wal": status.last_archived_wal,
        "last_archived_age_s": state.age_seconds, "waiting_wal_files": state.waiting,
        "failing": status.failing, "failed_count": status.failed_count,
        "last_failed_wal": status.last_failed_wal,
    }


def backups(runtime: Runtime, inst: Instance) -> dict[str, Any]:
    """The backups the store knows, the restorable window, the repository's fate."""
    deleted = inst.deleted_at is not None or inst.state == DEPROVISIONED
    with runtime.store.session() as s:
        kept = records.backups(s, inst.id)
        window = records.window(s, inst.id, deleted=deleted)
        row = s.get(BackupRepository, inst.id)
        return {
            "instance": inst.id, "deleted": deleted,
            "window": window.describe() if window else None,
            "keep_until": row.keep_until.isoformat() if row and row.keep_until else None,
            "purged": bool(row and row.purged_at),
            "backups": [{"label": b.label, "type": b.type,
                         "started_at": b.started_at.isoformat(),
                         "stopped_at": b.stopped_at.isoformat()} for b in kept],
        }
