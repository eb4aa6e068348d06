"""Health checks: one connection, one query, a hard deadline.

A probe connects to a node's management address as the broker's superuser and runs
one statement that returns `pg_is_in_recovery()`, the node's LSNs, its
`synchronous_standby_names` and (on a primary) `pg_stat_replication`. libpq's
`connect_timeout` counts whole seconds (and does not bound the query), so the probe
uses an asynchronous psycopg2 connection and `select()` with its own deadline:
sub-second timeouts work and a frozen server costs exactly the deadline.

Outcomes, because they mean different things to the monitor:
- `ok`: the node answered the query.
- `down`: nothing answers (refused, timed out, no route, connection lost) or
  PostgreSQL says it is starting up / shutting down / in crash recovery. Counts
  towards failover.
- `answering`: PostgreSQL is alive but refuses the broker (too many clients,
  authentication, pg_hba): never a reason to fail over.

The server's state from the cloud is fetched separately (`cloud_state`), with a
bound on the wait, so that an unreachable cloud API is told apart from a dead server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import select
import selectors
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg2
import psycopg2.extensions as ext

from broker.cloud.base import Cloud, CloudError, ServerStatus
from broker.pg.connection import SESSION_OPTIONS, ssl_params

Outcome = Literal["ok", "down", "answering"]

APPLICATION_NAME = "pgha-monitor"

_QUERY = """
SELECT pg_catalog.pg_is_in_recovery(),
       ((CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
              ELSE pg_catalog.pg_current_wal_lsn() END) - '0/0'::pg_catalog.pg_lsn)::bigint,
       (pg_catalog.pg_last_wal_receive_lsn() - '0/0'::pg_catalog.pg_lsn)::bigint,
       pg_catalog.current_setting('synchronous_standby_names'),
       CASE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_stat_get_wal_senders())
            THEN '[]'::pg_catalog.json
            ELSE COALESCE((SELECT pg_catalog.json_agg(pg_catalog.json_build_object(
                    'application_name', application_name,
                    'state', state,
                    'sync_state', sync_state,
                    'flush_lsn', (flush_lsn - '0/0'::pg_catalog.pg_lsn)::bigint,
                    'replay_lsn', (replay_lsn - '0/0'::pg_catalog.pg_lsn)::bigint))
                 FROM pg_catalog.pg_stat_replication), '[]'::pg_catalog.json) END
"""
# pg_stat_replication joins every backend's status (pg_stat_get_activity copies them
# all, once per transaction): on a node with hundreds of app connections that is most
# of the probe's cost on the server. The WAL senders' own list is cheap, and without a
# sender the view is empty anyway, so a standalone node or a standby never pays for it.

# A persistent probe session prepares the query once (its first probe) and then only
# executes it: no parse and plan on the node at every check.
_PREPARED = "pgha_probe"
_PREPARE_AND_EXECUTE = f"PREPARE {_PREPARED} AS {_QUERY}; EXECUTE {_PREPARED}"
_EXECUTE = f"EXECUTE {_PREPARED}"

# PostgreSQL answers, but is not serving: as good as down for the apps.
_NOT_SERVING = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "not yet accepting connections",
    "not accepting connections",
)
# PostgreSQL answers and is alive; the broker just cannot get in.
_ANSWERING = (
    "too many clients",
    "too many connections",
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "remaining connection slots are reserved",
    # TLS refused (a certificate that does not verify, a server without TLS): the
    # server is up; a failover would not mend a certificate.
    "certificate verify failed",
    "does not match host name",
    "server does not support ssl",
)


@dataclass(frozen=True)
class ReplicaInfo:
    """One row of the primary's pg_stat_replication."""

    application_name: str
    state: str              # streaming | catchup | startup | backup | stopping
    sync_state: str         # sync | async | potential | quorum
    flush_lsn: int | None
    replay_lsn: int | None


@dataclass(frozen=True)
class Probe:
    """What one check of one node saw."""

    address: str
    outcome: Outcome
    elapsed: float
    error: str | None = None          # in words, never with a secret
    in_recovery: bool | None = None
    lsn: int | None = None            # primary: current WAL LSN; standby: replay LSN
    receive_lsn: int | None = None    # standby: last received (and flushed) LSN
    synchronous_standby_names: str = ""
    replicas: tuple[ReplicaInfo, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def replica(self, application_name: str) -> ReplicaInfo | None:
        return next((r for r in self.replicas if r.application_name == application_name), None)


class DeadlinePassed(Exception):
    """An asynchronous connection or query did not finish in time."""


def wait_async(conn: Any, deadline: float) -> None:
    """Drive an asynchronous psycopg2 connection until it is ready, or the deadline."""
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed
        fd = conn.fileno()
        if state == ext.POLL_READ:
            select.select([fd], [], [], remaining)
        elif state == ext.POLL_WRITE:
            select.select([], [fd], [], remaining)
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def _classify(message: str) -> tuple[Outcome, str]:
    text = " ".join(message.split())
    lowered = text.lower()
    if "refused" in lowered:
        return "down", "connection refused"
    if any(s in lowered for s in _NOT_SERVING):
        return "down", f"PostgreSQL is not serving: {text}"
    if any(s in lowered for s in _ANSWERING):
        return "answering", f"PostgreSQL answers but refuses the broker: {text}"
    if "no route" in lowered or "unreachable" in lowered:
        return "down", "no route to the node"
    if "closed the connection" in lowered or "terminat" in lowered:
        return "down", "the server closed the connection"
    return "down", text or "connection failed"


def probe(address: str, password: str, *, timeout: float, port: int = 5432,
          ca_pem: str | None = None) -> Probe:
    """Connect (over TLS verified by the instance's CA when given), run the health query
    and close, all within `timeout` seconds."""
    start = time.monotonic()
    deadline = start + timeout
    conn: Any = None
    try:
        conn = psycopg2.connect(
            host=address, port=port, user="postgres", password=password, dbname="postgres",
            application_name=APPLICATION_NAME, async_=True, **ssl_params(ca_pem),
            options=SESSION_OPTIONS,  # no search_path a tenant could set applies
        )
        wait_async(conn, deadline)
        cur = conn.cursor()
        cur.execute(_QUERY)
        wait_async(conn, deadline)
        row = cur.fetchone()
    except DeadlinePassed:
        return Probe(address, "down", time.monotonic() - start,
                     error=f"no answer within {timeout:g} s")
    except psycopg2.Error as exc:
        outcome, error = _classify(str(exc))
        return Probe(address, outcome, time.monotonic() - start, error=error)
    except OSError as exc:
        return Probe(address, "down", time.monotonic() - start, error=exc.strerror or str(exc))
    finally:
        if conn is not None:
            with contextlib.suppress(psycopg2.Error):
                conn.close()
    return _answered(address, row, time.monotonic() - start)


def _answered(address: str, row: Any, elapsed: float) -> Probe:
    in_recovery, lsn, receive_lsn, sync_names, replicas = row
    return Probe(
        address, "ok", elapsed,
        in_recovery=bool(in_recovery),
        lsn=int(lsn) if lsn is not None else None,
        receive_lsn=int(receive_lsn) if receive_lsn is not None else None,
        synchronous_standby_names=str(sync_names or ""),
        replicas=tuple(
            ReplicaInfo(
                application_name=str(r.get("application_name") or ""),
                state=str(r.get("state") or ""),
                sync_state=str(r.get("sync_state") or ""),
                flush_lsn=r.get("flush_lsn"),
                replay_lsn=r.get("replay_lsn"),
            )
            for r in (replicas or [])
        ),
    )


class Link:
    """A persistent probe connection to one node, driven by the caller's event loop.

    It connects once (TLS verified as `probe` does) and then runs the health query on
    the same session at every check: no handshake per check. Between checks the socket
    is idle; when it turns readable the server has closed it or said goodbye (crash,
    shutdown, a terminated backend): the caller then probes at once (`start`), which
    fails at once on a dead session, instead of waiting for the next check."""

    def __init__(self, address: str, password: str, *, ca_pem: str | None = None,
                 port: int = 5432) -> None:
        self.address, self.port = address, port
        self.password, self.ca_pem = password, ca_pem
        self.conn: Any = None
        self.busy = False           # a probe is running (connect or query)
        self.started = 0.0
        self.deadline = 0.0
        self.events = selectors.EVENT_READ
        self._cursor: Any = None
        self._prepared = False      # this session has the probe query prepared

    def same_target(self, address: str, password: str, ca_pem: str | None) -> bool:
        return (self.address, self.password, self.ca_pem) == (address, password, ca_pem)

    def fileno(self) -> int:
        return int(self.conn.fileno())

    @property
    def connecting(self) -> bool:
        """A probe is setting up the session (handshake, authentication)."""
        return self.busy and self._cursor is None

    def start(self, timeout: float) -> Probe | None:
        """Begin a probe (connect first if needed); a result only when it failed at once."""
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.busy = True
        try:
            if self.conn is None:
                self.conn = psycopg2.connect(
                    host=self.address, port=self.port, user="postgres",
                    password=self.password, dbname="postgres",
                    application_name=APPLICATION_NAME, async_=True,
                    **ssl_params(self.ca_pem), options=SESSION_OPTIONS)
                self._cursor = None
            else:
                self._send()
        except psycopg2.Error as exc:
            return self._failed(*_classify(str(exc)))
        except OSError as exc:
            return self._failed("down", exc.strerror or str(exc))
        return self.advance()

    def _send(self) -> None:
        self._cursor = self.conn.cursor()
        # Several statements in one simple query: the cursor holds the last one's rows.
        self._cursor.execute(_EXECUTE if self._prepared else _PREPARE_AND_EXECUTE)

    def advance(self) -> Probe | None:
        """Drive the running probe on a socket event; its result once it is known."""
        try:
            state = self.conn.poll()
            if state == ext.POLL_OK:
                if self._cursor is None:   # connected: now the query
                    self._send()
                    return self.advance()
                row = self._cursor.fetchone()
                self.busy = False
                self._prepared = True
                self.events = selectors.EVENT_READ
                return _answered(self.address, row, time.monotonic() - self.started)
        except psycopg2.Error as exc:
            return self._failed(*_classify(str(exc)))
        except OSError as exc:
            return self._failed("down", exc.strerror or str(exc))
        self.events = selectors.EVENT_WRITE if state == ext.POLL_WRITE else selectors.EVENT_READ
        return None

    def expire(self) -> Probe:
        """The deadline passed: the probe failed; the session is dropped (its state is
        unknown) and the next probe connects afresh."""
        return self._failed("down", f"no answer within {self.deadline - self.started:g} s")

    def _failed(self, outcome: Outcome, error: str) -> Probe:
        elapsed = time.monotonic() - self.started
        self.close()
        return Probe(self.address, outcome, elapsed, error=error)

    def close(self) -> None:
        self.busy = False
        self._cursor = None
        self._prepared = False
        if self.conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self.conn.close()
        self.conn = None


@dataclass(frozen=True)
class CloudState:
    """The server as the cloud sees it; `error` when the cloud API did not answer."""

    status: ServerStatus | None       # None: the server is gone (or unknown, see error)
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None

    @property
    def describe(self) -> str:
        if self.error is not None:
            return f"cloud API unreachable ({self.error})"
        return "server gone" if self.status is None else f"server {self.status.value}"


_CLOUD_CALLS = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                     thread_name_prefix="cloud-state")


def cloud_state(cloud: Cloud, server_id: str | None, *, timeout: float = 5.0) -> CloudState:
    """get_server with a bound: a cloud API that hangs counts as unreachable."""
    if not server_id:
        return CloudState(None)
    future = _CLOUD_CALLS.submit(cloud.get_server, server_id)
    try:
        server = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return CloudState(None, error=f"no answer within {timeout:g} s")
    except CloudError as exc:
        return CloudState(None, error=" ".join(str(exc).split()) or exc.__class__.__name__)
    except Exception as exc:  # a driver bug or a network error below the SDK
        return CloudState(None, error=exc.__class__.__name__)
    return CloudState(server.status if server is not None else None)


def lag_bytes(primary: Probe, replica: ReplicaInfo | None) -> int | None:
    """Bytes the standby has not flushed yet: what a failover now could lose."""
    if primary.lsn is None or replica is None or replica.flush_lsn is None:
        return None
    return max(0, primary.lsn - int(replica.flush_lsn))
