"""pg_hba.conf of a running node, written through its own server (no shell access)."""

from __future__ import annotations

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from broker.guest import bootstrap
from broker.pg.connection import execute, fetch_one
from broker.pg.names import APP_DATABASE


def render_hba(*, admin_cidrs: list[str], peer_addresses: list[str], app_cidrs: list[str],
               database: str = APP_DATABASE, tls: bool = True) -> list[str]:
    """pg_hba.conf lines: admin only from the broker, replication only between the
    instance's nodes, app roles (members of app_owner/app_reader) only to `database`;
    with `tls`, over TLS only."""
    try:
        return bootstrap.render_hba(admin_cidrs=admin_cidrs, peer_addresses=peer_addresses,
                                    app_cidrs=app_cidrs, database=database, tls=tls)
    except bootstrap.BootstrapError as exc:
        raise ValueError(str(exc)) from None


def set_hba(conn: Connection, lines: list[str]) -> None:
    """Replace pg_hba.conf on the node and reload (used when a node's peers change).

    The server writes its own file (COPY as superuser), so no shell access is needed.
    If PostgreSQL finds an error in the new file, the old content is put back."""
    for line in lines:
        if "\n" in line or "\\" in line or "\t" in line:
            raise ValueError("pg_hba lines must not contain newlines, tabs or backslashes")
    path = fetch_one(conn, "SELECT pg_catalog.current_setting('hba_file')")
    old = fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,))
    wanted = "\n".join(lines) + "\n"
    if old == wanted:
        return
    _write_server_file(conn, path, lines)
    errors = fetch_one(conn, "SELECT pg_catalog.count(*) FROM pg_catalog.pg_hba_file_rules "
                                  "WHERE error IS NOT NULL")
    if errors:
        _write_server_file(conn, path, old.rstrip("\n").split("\n"))
        raise ValueError("the new pg_hba.conf has errors; the old one was kept")
    execute(conn, "SELECT pg_catalog.pg_reload_conf()")


def _write_server_file(conn: Connection, path: str, lines: list[str]) -> None:
    # COPY's text format escapes only backslashes, tabs and newlines, refused above.
    execute(conn, sql.SQL("COPY (SELECT pg_catalog.unnest(%s::pg_catalog.text[])) TO {}")
            .format(sql.Literal(path)), (lines,))

