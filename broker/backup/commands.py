"""pgBackRest run on a node by the node's own server (superuser `COPY ... TO PROGRAM`,
as the server's OS user): no shell access to the node, the same in every cloud. The
command's output goes to a file beside the node's pgBackRest configuration and is read
back through the server, so a failure says what pgBackRest said."""

from __future__ import annotations

import json
import posixpath
import shlex
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection

from broker.guest import bootstrap
from broker.pg.connection import execute, fetch_one, run_program

OUTPUT_FILE = "broker-command.out"
# pgBackRest's error 050: another pgBackRest process holds the stanza's lock.
LOCK_HELD = "[050]"


class PgBackRestFailed(Exception):
    """pgBackRest exited with an error; the message is its own last lines."""

    @property
    def lock_held(self) -> bool:
        return LOCK_HELD in str(self)


def _backup_dir(conn: Connection) -> str:
    data = str(fetch_one(conn, "SELECT pg_catalog.current_setting('data_directory')"))
    return posixpath.join(posixpath.dirname(data), bootstrap.BACKUP_DIR)


def run(conn: Connection, stanza: str, *args: str) -> str:
    """Run `pgbackrest ARGS` on the node of `conn`; its standard output."""
    base = _backup_dir(conn)
    output = posixpath.join(base, "log", OUTPUT_FILE)
    command = shlex.join([
        "env", f"PGPASSFILE={posixpath.join(base, bootstrap.BACKUP_PASSFILE)}",
        bootstrap.PGBACKREST, f"--config={posixpath.join(base, bootstrap.BACKUP_CONF)}",
        f"--stanza={stanza}", *args]) + f" > {shlex.quote(output)} 2>&1"
    execute(conn, "SET statement_timeout = 0")
    try:
        run_program(conn, command)
    except psycopg2.Error as exc:
        conn.rollback()
        raise PgBackRestFailed(_tail(conn, output) or " ".join(str(exc).split())) from None
    return str(fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (output,)) or "")


def _tail(conn: Connection, path: str, lines: int = 3) -> str:
    try:
        text = str(fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,)) or "")
    except psycopg2.Error:
        conn.rollback()
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def info(conn: Connection, stanza: str) -> dict[str, Any]:
    """`pgbackrest info` of the instance's stanza (JSON): its backups and archive."""
    found = json.loads(run(conn, stanza, "--output=json", "info"))
    return found[0] if found else {}
