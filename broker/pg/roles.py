"""LOGIN roles: the replication role's password and one role per binding.

Passwords are sent as SCRAM verifiers computed here, never as themselves."""

from __future__ import annotations

import hashlib
import time

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import encrypt_password

from broker.pg.connection import PgNotReady, execute, fetch_one, first_line, sibling
from broker.pg.names import APP_DATABASE, APP_OWNER, READ_ONLY_GROUP


def role_exists(conn: Connection, role: str) -> bool:
    return bool(fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)))


def set_password(conn: Connection, role: str, password: str, *, create: str) -> None:
    """CREATE (or ALTER) the role with a SCRAM verifier, never the password itself."""
    verifier = encrypt_password(password, role, conn, "scram-sha-256")
    verb = "ALTER" if role_exists(conn, role) else "CREATE"
    try:
        execute(conn, sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
            sql.SQL(verb), sql.Identifier(role), sql.SQL(create), sql.Literal(verifier)))
    except psycopg2.Error as exc:
        raise psycopg2.DatabaseError(f"could not {verb.lower()} role {role}: "
                                     f"{first_line(exc)}") from None


def binding_role_name(binding_id: str) -> str:
    return "b_" + hashlib.sha256(binding_id.encode()).hexdigest()[:16]


def create_binding_role(conn: Connection, role: str, password: str, *,
                        read_only: bool = False) -> None:
    """LOGIN role for one binding, made from the `postgres` database (`conn`).

    Read-write roles are members of app_owner and start every session as app_owner, so
    their objects belong to it. Read-only roles are members of app_reader only (never
    of app_owner: they could SET ROLE to it), and their transactions are read-only by
    default; what keeps them read-only is that they hold no write privilege."""
    set_password(conn, role, password, create="LOGIN")
    ident = sql.Identifier(role)
    grant, revoke = (READ_ONLY_GROUP, APP_OWNER) if read_only else (APP_OWNER, READ_ONLY_GROUP)
    execute(conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), ident))
    execute(conn, sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(revoke), ident))
    if read_only:
        execute(conn, sql.SQL("ALTER ROLE {} RESET role").format(ident))
        execute(conn, sql.SQL(
            "ALTER ROLE {} SET default_transaction_read_only = on").format(ident))
    else:
        execute(conn, sql.SQL("ALTER ROLE {} SET role = {}").format(
            ident, sql.Literal(APP_OWNER)))
        execute(conn, sql.SQL(
            "ALTER ROLE {} RESET default_transaction_read_only").format(ident))


def drop_binding_role(conn: Connection, role: str) -> None:
    """Terminate the role's sessions and drop it; the app's tables (owned by app_owner) stay."""
    if not role_exists(conn, role):
        return
    ident = sql.Identifier(role)
    # No new sessions from here on, then end the open ones.
    execute(conn, sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
    deadline = time.monotonic() + 10
    while fetch_one(conn, "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity "
                          "WHERE usename = %s", (role,)):
        execute(conn, "SELECT pg_catalog.pg_terminate_backend(pid, 2000) "
                      "FROM pg_catalog.pg_stat_activity WHERE usename = %s", (role,))
        if time.monotonic() > deadline:
            raise PgNotReady(f"sessions of role {role} did not end within 10 s")
        time.sleep(0.02)
    # Objects live per database: the role can only reach the application database (and
    # DROP OWNED there also revokes its grants on shared objects such as the database).
    current = str(fetch_one(conn, "SELECT pg_catalog.current_database()"))
    databases = [current]
    if current != APP_DATABASE and fetch_one(
            conn, "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (APP_DATABASE,)):
        databases.append(APP_DATABASE)
    for db in databases:
        target = conn if db == current else sibling(conn, db)
        try:
            execute(target, sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                ident, sql.Identifier(APP_OWNER)))
            execute(target, sql.SQL("DROP OWNED BY {}").format(ident))
        finally:
            if target is not conn:
                target.close()
    execute(conn, sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
