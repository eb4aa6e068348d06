"""A node's TLS files, installed through its own server and served without a restart."""

from __future__ import annotations

import posixpath
import shlex

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from broker.guest import bootstrap
from broker.pg.connection import execute, fetch_one, wait_setting


def install_tls(conn: Connection, *, ca_pem: str, cert_pem: str, key_pem: str,
                issued_at: int) -> str:
    """Write the node's TLS files through its own server and serve them: no restart.

    The files go beside the data directory (where the guest bootstrap keeps them, with
    their issue number, so a reboot keeps the newer ones); a node bootstrapped before
    TLS has no such directory and PostgreSQL cannot make one, so there they go into the
    data directory and `ssl` is switched on with ALTER SYSTEM. Returns the CA file's
    path on the node."""
    for pem in (ca_pem, cert_pem, key_pem):
        if "\\" in pem or "\t" in pem:
            raise ValueError("PEM text must not contain tabs or backslashes")
    data = str(fetch_one(conn, "SELECT current_setting('data_directory')"))
    beside = posixpath.join(posixpath.dirname(data), bootstrap.TLS_DIR)
    if fetch_one(conn, "SELECT (pg_stat_file(%s, true)).isdir", (beside,)):
        directory, prefix = beside, ""
    else:
        directory, prefix = data, bootstrap.LEGACY_TLS_PREFIX
    texts = {bootstrap.TLS_CA_FILE: ca_pem, bootstrap.TLS_CERT_FILE: cert_pem,
             bootstrap.TLS_KEY_FILE: key_pem, bootstrap.TLS_ISSUED_FILE: str(issued_at)}
    for name, text in texts.items():  # the issue number last: it vouches for the others
        write_private_server_file(conn, posixpath.join(directory, prefix + name),
                                   text.strip("\n").split("\n"))
    for name, value in bootstrap.tls_settings(directory, prefix).items():
        if fetch_one(conn, "SELECT setting FROM pg_settings WHERE name = %s", (name,)) != value:
            execute(conn, sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(value)))
    execute(conn, "SELECT pg_reload_conf()")
    wait_setting(conn, "ssl", "on")
    return posixpath.join(directory, prefix + bootstrap.TLS_CA_FILE)


def verify_replication(conn: Connection, ca_path: str) -> None:
    """A standby made before TLS: its replication connection verifies the primary too."""
    if not fetch_one(conn, "SELECT pg_is_in_recovery()"):
        return
    conninfo = str(fetch_one(conn, "SELECT current_setting('primary_conninfo')") or "")
    if not conninfo or "sslmode=verify-full" in conninfo:
        return
    wanted = f"{conninfo} sslmode=verify-full sslrootcert={ca_path}"
    execute(conn, sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
        sql.Literal(wanted)))
    execute(conn, "SELECT pg_reload_conf()")
    wait_setting(conn, "primary_conninfo", wanted)


def write_private_server_file(conn: Connection, path: str, lines: list[str]) -> None:
    """Written like pg_hba.conf (`broker.pg.hba`), but 0600 and replaced atomically:
    COPY TO a file creates it world-readable (PostgreSQL then refuses a key file), so
    the server's own user writes it through a shell with a private umask and renames
    it into place."""
    temporary = path + ".new"
    command = (f"umask 077 && cat > {shlex.quote(temporary)} && "
               f"mv -f {shlex.quote(temporary)} {shlex.quote(path)}")
    execute(conn, sql.SQL("COPY (SELECT unnest(%s::text[])) TO PROGRAM {}").format(
        sql.Literal(command)), (lines,))

