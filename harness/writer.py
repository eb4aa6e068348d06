"""The app: a Writer inserting through the service address the whole time, with client
deadlines (a frozen server must not hang it), recording which commits were
acknowledged and when; the binding it writes with and what the database kept."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg2
import psycopg2.errors

from broker.operations import bindings
from broker.pg.probe import DeadlinePassed, wait_async
from harness.env import HasRuntime
from harness.workflows import app_tls


class WriteLog:
    """What a writer saw: the acknowledged ids and the failures, with their times
    (CLOCK_MONOTONIC, the same in every process of the machine)."""

    def __init__(self, acked: list[tuple[int, float]] | None = None,
                 errors: list[tuple[float, str]] | None = None) -> None:
        self.acked: list[tuple[int, float]] = acked or []    # (id, monotonic time of the ack)
        self.errors: list[tuple[float, str]] = errors or []  # (monotonic time, what failed)

    def acked_after(self, moment: float) -> list[int]:
        return [i for i, t in self.acked if t > moment]

    def first_ack_after(self, moment: float) -> float | None:
        return next((t for _i, t in self.acked if t > moment), None)

    def first_error_after(self, moment: float) -> float | None:
        return next((t for t, _e in self.errors if t > moment), None)

    def recovered_at(self, fault_at: float) -> float | None:
        """The first acknowledged write after the outage the fault caused (a commit that
        was in flight at the fault and returned right after it does not count)."""
        failed = self.first_error_after(fault_at)
        return None if failed is None else self.first_ack_after(failed)


class Writer(threading.Thread, WriteLog):
    """Inserts increasing ids through the service address; an id counts as acknowledged
    only when its COMMIT returned. Client deadlines: connect 0.5 s, statement 1 s (a
    frozen server would otherwise hang the app, as it would without driver timeouts)."""

    def __init__(self, credentials: dict[str, Any], *, connect_timeout: float = 0.5,
                 statement_timeout: float = 1.0, pause: float = 0.005,
                 retry_pause: float | None = None) -> None:
        threading.Thread.__init__(self, daemon=True)
        WriteLog.__init__(self)
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.pause = pause                 # between two acknowledged writes
        self.retry_pause = pause if retry_pause is None else retry_pause  # after a failure
        self.failures = 0
        self.last_error = ""
        self._halt = threading.Event()
        self._next = 1
        self._conn: Any = None

    def _connect(self) -> Any:
        c = self.credentials
        conn = psycopg2.connect(host=c["host"], port=c["port"], user=c["username"],
                                password=c["password"], dbname=c["name"], async_=True,
                                sslmode=c.get("sslmode", "prefer"), **app_tls(c))
        try:
            wait_async(conn, time.monotonic() + self.connect_timeout)
        except DeadlinePassed:
            conn.close()
            raise DeadlinePassed("connect timed out") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _insert(self, value: int) -> None:
        if self._conn is None:
            self._conn = self._connect()
        cur = self._conn.cursor()
        cur.execute("INSERT INTO acked (id) VALUES (%s)", (value,))
        try:
            wait_async(self._conn, time.monotonic() + self.statement_timeout)
        except DeadlinePassed:
            raise DeadlinePassed("statement timed out") from None

    def run(self) -> None:
        while not self._halt.is_set():
            value = self._next
            self._next += 1
            pause = self.retry_pause
            try:
                self._insert(value)
                self.acked.append((value, time.monotonic()))
                pause = self.pause
            except (psycopg2.Error, DeadlinePassed, OSError) as exc:
                self.failures += 1
                self.last_error = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:120]}"
                self.errors.append((time.monotonic(), self.last_error))
                # Like a connection pool: a session is dropped on a connection error,
                # not on an SQL error. A read-only error comes from the standby that the
                # service address reaches just before its promotion, and the session
                # writes once it is promoted; reconnecting (TLS, SCRAM) every 5 ms
                # instead kept the two cores busy when ten instances failed over at once.
                read_only = isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction)
                if self._conn is not None and not (read_only and not self._conn.closed):
                    with contextlib.suppress(Exception):
                        self._conn.close()
                    self._conn = None
            time.sleep(pause)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def wait_recovery(self, fault_at: float, timeout: float = 60.0) -> float:
        """Until `recovered_at(fault_at)` is known; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            first = self.recovered_at(fault_at)
            if first is not None:
                return first
            if time.monotonic() > deadline:
                raise AssertionError(f"writes did not resume within {timeout:.0f} s "
                                     f"(last error: {self.last_error})")
            time.sleep(0.01)

    def wait_acks(self, count: int, after: float = 0.0, timeout: float = 60.0) -> float:
        """Until `count` acks happened after `after`; returns the first such ack's time."""
        deadline = time.monotonic() + timeout
        while len(self.acked_after(after)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"writes did not resume within {timeout:.0f} s "
                                     f"(last error: {self.last_error})")
            time.sleep(0.01)
        first = self.first_ack_after(after)
        assert first is not None
        return first


def app_credentials(env: HasRuntime, instance_id: str, binding_id: str = "app") -> dict[str, Any]:
    creds = bindings.create_binding(env.runtime, instance_id, binding_id, app_guid="app-guid",
                                    bind_resource={}, parameters={}).credentials
    conn = psycopg2.connect(creds["uri"], connect_timeout=5, **app_tls(creds))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    conn.close()
    return creds


def stored_ids(credentials: dict[str, Any]) -> set[int]:
    conn = psycopg2.connect(credentials["uri"], connect_timeout=5, **app_tls(credentials))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM acked")
            return {int(r[0]) for r in cur.fetchall()}
    finally:
        conn.close()


