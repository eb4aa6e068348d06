"""Streaming replication: slots, the synchronous standby, status, promotion."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from broker.pg.connection import PgNotReady, execute, fetch_one, wait_setting

# How often promote() looks whether the promotion has finished.
PROMOTION_POLL = 0.01


@dataclass(frozen=True)
class StandbyInfo:
    application_name: str
    state: str              # streaming | catchup | startup | backup
    sync_state: str         # sync | async | potential | quorum
    replay_lsn: int | None  # bytes
    lag_bytes: int | None   # primary's current LSN minus replay_lsn


@dataclass(frozen=True)
class ReplicationStatus:
    in_recovery: bool
    lsn: int                 # primary: pg_current_wal_lsn; standby: pg_last_wal_replay_lsn
    receive_lsn: int | None = None  # standby: pg_last_wal_receive_lsn
    standbys: tuple[StandbyInfo, ...] = field(default_factory=tuple)  # primary only
    synchronous_standby_names: str = ""


def ensure_slot(conn: Connection, slot_name: str) -> None:
    if fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                 (slot_name,)):
        return
    # Reserve WAL now: the standby's base backup starts from this slot's position.
    with contextlib.suppress(psycopg2.errors.DuplicateObject):
        execute(conn, "SELECT pg_catalog.pg_create_physical_replication_slot(%s, true)",
                (slot_name,))


def drop_slot(conn: Connection, slot_name: str) -> None:
    """Drop if present (terminates its walsender first if still active)."""
    deadline = time.monotonic() + 10
    while True:
        row_active = fetch_one(
            conn, "SELECT coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots "
                  "WHERE slot_name = %s", (slot_name,))
        if row_active is None:
            return
        if row_active:
            execute(conn, "SELECT pg_catalog.pg_terminate_backend(%s, 2000)", (row_active,))
        try:
            execute(conn, "SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot_name,))
            return
        except psycopg2.errors.UndefinedObject:
            return
        except psycopg2.errors.ObjectInUse:
            # The standby reconnected in between: terminate again, bounded.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def set_synchronous_standby(conn: Connection, application_name: str | None) -> None:
    """ALTER SYSTEM synchronous_standby_names (None → reset) and reload."""
    if application_name is None:
        execute(conn, "ALTER SYSTEM RESET synchronous_standby_names")
        wanted = ""
    else:
        wanted = '"' + application_name.replace('"', '""') + '"'
        execute(conn, sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
            sql.Literal(wanted)))
    execute(conn, "SELECT pg_catalog.pg_reload_conf()")
    # The caller's next commit already runs under the new rule.
    wait_setting(conn, "synchronous_standby_names", wanted)


def _lsn(conn: Connection, expression: str) -> int | None:
    value = fetch_one(conn, f"SELECT pg_catalog.pg_wal_lsn_diff({expression}, '0/0')::bigint")
    return None if value is None else int(value)


def replication_status(conn: Connection) -> ReplicationStatus:
    in_recovery = bool(fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"))
    names = str(fetch_one(conn, "SELECT pg_catalog.current_setting('synchronous_standby_names')"))
    if in_recovery:
        return ReplicationStatus(
            in_recovery=True, lsn=_lsn(conn, "pg_catalog.pg_last_wal_replay_lsn()") or 0,
            receive_lsn=_lsn(conn, "pg_catalog.pg_last_wal_receive_lsn()"),
            synchronous_standby_names=names)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), '0/0')"
            "::bigint, application_name, state, sync_state,"
            " pg_catalog.pg_wal_lsn_diff(replay_lsn, '0/0')::bigint,"
            " pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), replay_lsn)"
            "::bigint"
            " FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_stat_replication ON true"
            " ORDER BY application_name")
        rows = cur.fetchall()
    standbys = tuple(
        StandbyInfo(application_name=r[1], state=r[2], sync_state=r[3],
                    replay_lsn=None if r[4] is None else int(r[4]),
                    lag_bytes=None if r[5] is None else int(r[5]))
        for r in rows if r[1] is not None)
    return ReplicationStatus(in_recovery=False, lsn=int(rows[0][0]), standbys=standbys,
                             synchronous_standby_names=names)


def wait_streaming(conn_primary: Connection, application_name: str, *, timeout: float = 60.0,
                   max_lag_bytes: int = 0) -> StandbyInfo:
    """Until the standby streams with replay lag <= max_lag_bytes; PgNotReady on timeout."""
    deadline = time.monotonic() + timeout
    seen: StandbyInfo | None = None
    while True:
        status = replication_status(conn_primary)
        if status.in_recovery:
            raise PgNotReady("wait_streaming was asked of a server in recovery")
        for standby in status.standbys:
            if standby.application_name != application_name:
                continue
            seen = standby
            if (standby.state == "streaming" and standby.lag_bytes is not None
                and standby.lag_bytes <= max_lag_bytes):
                return standby
        if time.monotonic() > deadline:
            where = (f"state {seen.state}, lag {seen.lag_bytes} bytes" if seen
                     else "not connected")
            raise PgNotReady(f"standby {application_name} not streaming within "
                             f"{timeout:.0f} s ({where})")
        time.sleep(0.02)


def promote(conn: Connection, *, timeout: float = 30.0) -> None:
    """Promote a standby; a node already out of recovery is fine (idempotent).

    Before promoting:
    - synchronous_standby_names is cleared: the standby inherited the old primary's
      value, and a new primary waiting for itself hangs every write;
    - restore_command is switched off: at promotion PostgreSQL 15 calls it for the
      segment it was waiting for and for each timeline history file it probes, and
      each pgBackRest call costs ~0.1 s (measured here: pg_promote took 0.41 s with
      it, the writes waited for that). Nothing the plan promises is in the archive
      alone: ha-sync promotes only the synchronous standby (every acknowledged commit
      is on it), ha only one within maximum_lag_on_failover, and archiving trails
      streaming (only whole segments are pushed).
    pg_promote is asked not to wait (its own wait polls every 100 ms); this polls
    every 10 ms instead. Once out of recovery, synchronous_standby_names is left as
    it is, so a retried promote never undoes a synchronous standby configured after
    it; restore_command is put back (a primary does not use it, a node that becomes
    a standby again does)."""
    if fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"):
        execute(conn, "ALTER SYSTEM RESET synchronous_standby_names")
        execute(conn, "ALTER SYSTEM SET restore_command = ''")
        execute(conn, "SELECT pg_catalog.pg_reload_conf()")
        try:
            fetch_one(conn, "SELECT pg_catalog.pg_promote(false)")
        except psycopg2.errors.ObjectNotInPrerequisiteState as exc:
            if "recovery is not in progress" not in str(exc):
                raise
        deadline = time.monotonic() + timeout
        while fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"):
            if time.monotonic() > deadline:
                raise PgNotReady(f"promotion did not finish within {timeout:.0f} s")
            time.sleep(PROMOTION_POLL)
    if fetch_one(conn, "SELECT pg_catalog.current_setting('restore_command')") == "":
        execute(conn, "ALTER SYSTEM RESET restore_command")
        execute(conn, "SELECT pg_catalog.pg_reload_conf()")

