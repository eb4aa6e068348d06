"""Connections to a node's PostgreSQL over psycopg2, and the statement helpers the
broker's administration (`broker.pg.hba`, `tenants`, `roles`, `replication`,
`tls_files`) runs on them.

Every function is idempotent (operations re-run their steps after a crash).
Connections are autocommit, user `postgres`, application_name `pgha-broker`.

Every session is immune to what a tenant controls: its search_path comes from the
connection options (`pg_catalog, pg_temp`, which database- and role-level settings
cannot override), every function and relation named here is qualified with
`pg_catalog`, and roles are managed from the `postgres` database, which no binding
can reach. Inside the application database the broker only runs DDL that executes no
tenant code (grants, default privileges, and extensions into its own schema).

Secrets never reach a message: passwords are sent as SCRAM verifiers computed here
(so neither the server log nor an error's statement excerpt shows them), and errors
raised here carry PostgreSQL's message only, never the statement.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from broker.pg import tls
from broker.pg.names import ADMIN_USER

SESSION_OPTIONS = "-c search_path=pg_catalog,pg_temp"
APPLICATION_NAME = "pgha-broker"


class PgNotReady(Exception):
    """PostgreSQL did not accept connections in time."""


def first_line(exc: BaseException) -> str:
    """PostgreSQL's message without the statement excerpt (which could hold a value)."""
    text = str(getattr(exc, "pgerror", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ssl_params(ca_pem: str | None, *, bind_channel: bool = False) -> dict[str, Any]:
    """libpq's TLS parameters: verify the node's certificate and address against the
    instance's CA; without one (a node made before TLS) TLS when the server offers it.
    `bind_channel` (a node whose certificate expired, which nothing can verify): TLS,
    the server proven instead by SCRAM channel binding, i.e. by knowing the password's
    verifier; a man in the middle cannot relay that exchange."""
    if bind_channel:
        return {"sslmode": "require", "channel_binding": "require"}
    if ca_pem is None:
        return {"sslmode": "prefer"}
    return {"sslmode": "verify-full", "sslrootcert": tls.ca_file(ca_pem)}


def connect(host: str, password: str, *, dbname: str = "postgres", port: int = 5432,
            timeout: float = 5.0, ca_pem: str | None = None,
            bind_channel: bool = False) -> Connection:
    conn: Connection = psycopg2.connect(
        host=host, port=port, user=ADMIN_USER, password=password, dbname=dbname,
        # libpq takes whole seconds, and a black-holed node costs all of them.
        connect_timeout=max(1, math.ceil(timeout)), application_name=APPLICATION_NAME,
        **ssl_params(ca_pem, bind_channel=bind_channel), options=SESSION_OPTIONS,
    )
    conn.autocommit = True
    return conn


def wait_ready(host: str, password: str, *, timeout: float = 60.0, port: int = 5432,
               ca_pem: str | None = None) -> None:
    """Until a connection and `SELECT 1` work; PgNotReady after `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        try:
            conn = connect(host, password, port=port, timeout=min(max(remaining, 1), 5),
                           ca_pem=ca_pem)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return
            finally:
                conn.close()
        except psycopg2.Error as exc:
            last = first_line(exc)
        if time.monotonic() >= deadline:
            raise PgNotReady(f"PostgreSQL at {host}:{port} not ready after {timeout:.0f} s: "
                             f"{last}")
        time.sleep(0.05)


def fetch_one(conn: Connection, query: sql.Composable | str, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
    return None if row is None else row[0]


def execute(conn: Connection, query: sql.Composable | str, args: Any = None) -> None:
    with conn.cursor() as cur:
        cur.execute(query, args)


def run_program(conn: Connection, command: str) -> None:
    """Run a shell command on the node, as its server's OS user (superuser COPY TO
    PROGRAM). No row is copied: with nothing for the server to write into the pipe, a
    command that never reads its input and exits first is no 'Broken pipe' error."""
    execute(conn, sql.SQL("COPY (SELECT 1 WHERE false) TO PROGRAM {}").format(
        sql.Literal(command)))


def fetch_column(conn: Connection, query: sql.Composable | str, args: Any = None) -> list[Any]:
    """The first column of every row."""
    with conn.cursor() as cur:
        cur.execute(query, args)
        return [row[0] for row in cur.fetchall()]


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    conn.autocommit = False
    try:
        yield
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = True


def wait_setting(conn: Connection, name: str, wanted: str, timeout: float = 5.0) -> None:
    """A reload is a signal: wait until this backend runs with the new value."""
    deadline = time.monotonic() + timeout
    while fetch_one(conn, "SELECT pg_catalog.current_setting(%s)", (name,)) != wanted:
        if time.monotonic() > deadline:
            raise PgNotReady(f"{name} was not applied within {timeout:.0f} s")
        time.sleep(0.01)


def sibling(conn: Connection, dbname: str) -> Connection:
    """Another connection like `conn`, to another database."""
    info = conn.info
    params = info.dsn_parameters
    ca_pem = None
    if params.get("sslmode") == "verify-full" and params.get("sslrootcert"):
        with open(params["sslrootcert"]) as f:
            ca_pem = f.read()
    return connect(params.get("host", "localhost"), info.password or "", dbname=dbname,
                   port=int(params.get("port", 5432)),
                   timeout=float(params.get("connect_timeout") or 5), ca_pem=ca_pem)
