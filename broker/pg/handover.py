"""SQL for handing the primary role from one node to another (switchover, failover).

ALTER SYSTEM writes postgresql.auto.conf, not WAL: it is not replicated, and it
works on a standby during recovery.
"""

from __future__ import annotations

import time

from psycopg2.extensions import connection as Connection

# A standby's pause between two attempts to reach its (gone) primary; see
# prepare_for_promotion.
RETRY_INTERVAL = "100ms"


def end_client_sessions(conn: Connection, timeout: float = 10.0) -> bool:
    """Terminate every client session but this one; False if some are still there
    after `timeout` seconds."""
    query = ("SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
             "WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()")
    deadline = time.monotonic() + timeout
    with conn.cursor() as cur:
        while True:
            cur.execute(query)
            if not cur.fetchall():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def set_read_only(conn: Connection, on: bool) -> None:
    """Make new transactions read-only by default (or no longer), on this node only."""
    with conn.cursor() as cur:
        if on:
            cur.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            cur.execute("ALTER SYSTEM RESET default_transaction_read_only")
        cur.execute("SELECT pg_catalog.pg_reload_conf()")


def current_lsn(conn: Connection) -> int:
    """The primary's current WAL position, in bytes."""
    with conn.cursor() as cur:
        cur.execute("SELECT (pg_catalog.pg_current_wal_lsn() - '0/0'::pg_catalog.pg_lsn)::bigint")
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def prepare_for_promotion(conn: Connection) -> None:
    """Get a standby about to be promoted ready for it.

    - Reset synchronous_standby_names: the standby copied postgresql.auto.conf from
      its primary; left as is, the new primary would wait for a standby that does not
      exist and every commit would hang.
    - wal_retrieve_retry_interval 100 ms (default 5 s): once its primary is gone, a
      PostgreSQL 15 standby may handle a promote request and then still sleep out one
      whole retry interval before it finishes recovery (measured here: 5.1 s instead
      of 0.1 s, one promotion in three). The reload wakes it with the shorter interval."""
    with conn.cursor() as cur:
        cur.execute("ALTER SYSTEM RESET synchronous_standby_names")
        cur.execute(f"ALTER SYSTEM SET wal_retrieve_retry_interval = '{RETRY_INTERVAL}'")
        cur.execute("SELECT pg_catalog.pg_reload_conf()")
