"""PostgreSQL administration over psycopg2: the broker's hands inside a node.

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
import hashlib
import math
import posixpath
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import encrypt_password

from broker.guest import bootstrap
from broker.pg import tls

ADMIN_USER = "postgres"
REPLICATION_USER = "pgha_replicator"
APP_DATABASE = "appdb"
APP_OWNER = "app_owner"
READ_ONLY_GROUP = "app_reader"
# Read-only roles of earlier versions were members of this built-in role, which also
# reads the catalogs (pg_authid): the tenant model moves them to READ_ONLY_GROUP.
LEGACY_READ_ONLY_GROUP = "pg_read_all_data"
# Owned by the broker, USAGE for everyone: extension scripts run as superuser with
# this schema on their search_path, so no tenant may create anything in it.
EXTENSION_SCHEMA = "extensions"
# The application database's search_path (apps find extension objects unqualified).
APP_SEARCH_PATH = ("$user", "public", EXTENSION_SCHEMA)
# Database-level settings of the application database that the broker sets; any other
# one was set by a tenant while it owned the database (earlier versions) and goes.
BROKER_DATABASE_SETTINGS = ("search_path", "statement_timeout")
# PUBLIC may execute these by default: large objects would be a write for read-only roles.
LARGE_OBJECT_CREATORS = ("lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)")
SESSION_OPTIONS = "-c search_path=pg_catalog,pg_temp"
APPLICATION_NAME = "pgha-broker"


class PgNotReady(Exception):
    """PostgreSQL did not accept connections in time."""


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


def _first_line(exc: BaseException) -> str:
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
            last = _first_line(exc)
        if time.monotonic() >= deadline:
            raise PgNotReady(f"PostgreSQL at {host}:{port} not ready after {timeout:.0f} s: "
                             f"{last}")
        time.sleep(0.05)


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


def _fetch_one(conn: Connection, query: sql.Composable | str, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
    return None if row is None else row[0]


def _execute(conn: Connection, query: sql.Composable | str, args: Any = None) -> None:
    with conn.cursor() as cur:
        cur.execute(query, args)


def set_hba(conn: Connection, lines: list[str]) -> None:
    """Replace pg_hba.conf on the node and reload (used when a node's peers change).

    The server writes its own file (COPY as superuser), so no shell access is needed.
    If PostgreSQL finds an error in the new file, the old content is put back."""
    for line in lines:
        if "\n" in line or "\\" in line or "\t" in line:
            raise ValueError("pg_hba lines must not contain newlines, tabs or backslashes")
    path = _fetch_one(conn, "SELECT pg_catalog.current_setting('hba_file')")
    old = _fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,))
    wanted = "\n".join(lines) + "\n"
    if old == wanted:
        return
    _write_server_file(conn, path, lines)
    errors = _fetch_one(conn, "SELECT pg_catalog.count(*) FROM pg_catalog.pg_hba_file_rules "
                                  "WHERE error IS NOT NULL")
    if errors:
        _write_server_file(conn, path, old.rstrip("\n").split("\n"))
        raise ValueError("the new pg_hba.conf has errors; the old one was kept")
    _execute(conn, "SELECT pg_catalog.pg_reload_conf()")


def _write_server_file(conn: Connection, path: str, lines: list[str]) -> None:
    # COPY's text format escapes only backslashes, tabs and newlines, refused above.
    _execute(conn, sql.SQL("COPY (SELECT pg_catalog.unnest(%s::pg_catalog.text[])) TO {}")
             .format(sql.Literal(path)), (lines,))


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
    data = str(_fetch_one(conn, "SELECT current_setting('data_directory')"))
    beside = posixpath.join(posixpath.dirname(data), bootstrap.TLS_DIR)
    if _fetch_one(conn, "SELECT (pg_stat_file(%s, true)).isdir", (beside,)):
        directory, prefix = beside, ""
    else:
        directory, prefix = data, bootstrap.LEGACY_TLS_PREFIX
    texts = {bootstrap.TLS_CA_FILE: ca_pem, bootstrap.TLS_CERT_FILE: cert_pem,
             bootstrap.TLS_KEY_FILE: key_pem, bootstrap.TLS_ISSUED_FILE: str(issued_at)}
    for name, text in texts.items():  # the issue number last: it vouches for the others
        _write_private_server_file(conn, posixpath.join(directory, prefix + name),
                                   text.strip("\n").split("\n"))
    for name, value in bootstrap.tls_settings(directory, prefix).items():
        if _fetch_one(conn, "SELECT setting FROM pg_settings WHERE name = %s", (name,)) != value:
            _execute(conn, sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(value)))
    _execute(conn, "SELECT pg_reload_conf()")
    _wait_setting(conn, "ssl", "on")
    return posixpath.join(directory, prefix + bootstrap.TLS_CA_FILE)


def verify_replication(conn: Connection, ca_path: str) -> None:
    """A standby made before TLS: its replication connection verifies the primary too."""
    if not _fetch_one(conn, "SELECT pg_is_in_recovery()"):
        return
    conninfo = str(_fetch_one(conn, "SELECT current_setting('primary_conninfo')") or "")
    if not conninfo or "sslmode=verify-full" in conninfo:
        return
    wanted = f"{conninfo} sslmode=verify-full sslrootcert={ca_path}"
    _execute(conn, sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
        sql.Literal(wanted)))
    _execute(conn, "SELECT pg_reload_conf()")
    _wait_setting(conn, "primary_conninfo", wanted)


def _wait_setting(conn: Connection, name: str, wanted: str, timeout: float = 5.0) -> None:
    """A reload is a signal: wait until this backend runs with the new value."""
    deadline = time.monotonic() + timeout
    while _fetch_one(conn, "SELECT current_setting(%s)", (name,)) != wanted:
        if time.monotonic() > deadline:
            raise PgNotReady(f"{name} was not applied within {timeout:.0f} s")
        time.sleep(0.01)


def _write_private_server_file(conn: Connection, path: str, lines: list[str]) -> None:
    """Like _write_server_file, but 0600 and replaced atomically: COPY TO a file creates
    it world-readable (PostgreSQL then refuses a key file), so the server's own user
    writes it through a shell with a private umask and renames it into place."""
    temporary = path + ".new"
    command = (f"umask 077 && cat > {shlex.quote(temporary)} && "
               f"mv -f {shlex.quote(temporary)} {shlex.quote(path)}")
    _execute(conn, sql.SQL("COPY (SELECT unnest(%s::text[])) TO PROGRAM {}").format(
        sql.Literal(command)), (lines,))


def _role_exists(conn: Connection, role: str) -> bool:
    return bool(_fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)))


def _set_password(conn: Connection, role: str, password: str, *, create: str) -> None:
    """CREATE (or ALTER) the role with a SCRAM verifier, never the password itself."""
    verifier = encrypt_password(password, role, conn, "scram-sha-256")
    verb = "ALTER" if _role_exists(conn, role) else "CREATE"
    try:
        _execute(conn, sql.SQL("{} ROLE {} WITH {} PASSWORD {}").format(
            sql.SQL(verb), sql.Identifier(role), sql.SQL(create), sql.Literal(verifier)))
    except psycopg2.Error as exc:
        raise psycopg2.DatabaseError(f"could not {verb.lower()} role {role}: "
                                     f"{_first_line(exc)}") from None


def ensure_cluster_objects(conn: Connection, *, replication_password: str,
                           database: str = APP_DATABASE) -> None:
    """Replication role, the application database, and the tenant model on it.

    `conn` is on the `postgres` database (no binding can connect there)."""
    _set_password(conn, REPLICATION_USER, replication_password, create="REPLICATION LOGIN")
    if not _fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s",
                      (database,)):
        _execute(conn, sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(database), sql.Identifier(ADMIN_USER)))
    for db in ("postgres", "template1"):
        _execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(db)))
    ensure_tenant_model(conn, database=database)


# --- the tenant model --------------------------------------------------------------------
# - The application database belongs to `postgres`: no binding can change its settings,
#   its owner, or the `public` schema's ACL, so no tenant decides what a broker session
#   in it resolves or runs.
# - app_owner (NOLOGIN; read-write bindings are members and start as it): CONNECT, TEMP
#   and CREATE on the database, USAGE and CREATE on `public`; owns the app's objects.
# - app_reader (NOLOGIN; read-only bindings are members): CONNECT, USAGE on the
#   application schemas, SELECT on their tables and sequences, now and (default
#   privileges of app_owner) later. No TEMP, no large objects, no catalog secrets.

def tenant_model_in_place(conn: Connection, *, database: str = APP_DATABASE) -> bool:
    """One query: False for an instance made by an earlier version (or half-made)."""
    return bool(_fetch_one(conn, """
        SELECT pg_catalog.pg_get_userbyid(d.datdba) = %(admin)s
           AND pg_catalog.has_database_privilege(%(owner)s, d.oid, 'CREATE')
           AND EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = %(reader)s)
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                           JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                           WHERE g.rolname = %(legacy)s)
          FROM pg_catalog.pg_database d WHERE d.datname = %(db)s""",
        {"admin": ADMIN_USER, "owner": APP_OWNER, "reader": READ_ONLY_GROUP,
         "legacy": LEGACY_READ_ONLY_GROUP, "db": database}))


def ensure_tenant_model(conn: Connection, *, database: str = APP_DATABASE) -> None:
    """Put the tenant model in place (idempotent); `conn` is on the `postgres` database.

    Also upgrades an instance made by an earlier version, where app_owner owned the
    database and read-only roles were members of pg_read_all_data: those move to
    app_reader (this node's pg_hba is switched to it in between, so they keep logging
    in), and database settings the tenant made as owner are removed. The database's
    owner changes last: `tenant_model_in_place` is true only once everything is done."""
    db = sql.Identifier(database)
    # First, so that no setting of the tenant's applies to the session opened below.
    _reset_database_settings(conn, database)
    for group in (APP_OWNER, READ_ONLY_GROUP):
        if not _role_exists(conn, group):
            _execute(conn, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
    inside = _sibling(conn, database)
    try:
        with _transaction(inside):
            _grant_inside_database(inside)
    finally:
        inside.close()
    legacy = _members_of(conn, LEGACY_READ_ONLY_GROUP)
    for role in legacy:
        _execute(conn, sql.SQL("GRANT {} TO {}").format(
            sql.Identifier(READ_ONLY_GROUP), sql.Identifier(role)))
        _execute(conn, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(
            db, sql.Identifier(role)))
    use_read_only_group_in_hba(conn)
    for role in legacy:
        _execute(conn, sql.SQL("REVOKE {} FROM {}").format(
            sql.Identifier(LEGACY_READ_ONLY_GROUP), sql.Identifier(role)))
    with _transaction(conn):
        _reset_database_settings(conn, database)  # again: the tenant owned it until now
        # The owner first: a new owner takes over the old owner's own ACL entries.
        _execute(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            db, sql.Identifier(ADMIN_USER)))
        _execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        _execute(conn, sql.SQL("GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {} TO {}").format(
            db, sql.Identifier(APP_OWNER)))
        _execute(conn, sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            db, sql.Identifier(READ_ONLY_GROUP)))


def _reset_database_settings(conn: Connection, database: str) -> None:
    for name in _database_settings(conn, database):
        if name not in BROKER_DATABASE_SETTINGS:
            set_database_setting(conn, database, name, None)
    _execute(conn, sql.SQL("ALTER DATABASE {} SET search_path = {}").format(
        sql.Identifier(database), sql.SQL(", ").join(sql.Literal(s) for s in APP_SEARCH_PATH)))


def _grant_inside_database(conn_appdb: Connection) -> None:
    owner, reader = sql.Identifier(APP_OWNER), sql.Identifier(READ_ONLY_GROUP)
    admin = sql.Identifier(ADMIN_USER)
    extensions = sql.Identifier(EXTENSION_SCHEMA)
    _execute(conn_appdb, sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
        extensions, admin))
    if _schema_is_the_brokers(conn_appdb, EXTENSION_SCHEMA):
        _execute(conn_appdb, sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(extensions))
    for schema in _application_schemas(conn_appdb):
        ident = sql.Identifier(schema)
        _execute(conn_appdb, sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident, reader))
        _execute(conn_appdb, sql.SQL(
            "GRANT SELECT ON ALL TABLES IN SCHEMA {0} TO {1}; "
            "GRANT SELECT ON ALL SEQUENCES IN SCHEMA {0} TO {1}").format(ident, reader))
        if schema == "public":
            _execute(conn_appdb, sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}; "
                                         "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
                                         ).format(owner))
    for kind in ("TABLES", "SEQUENCES"):
        _execute(conn_appdb, sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT SELECT ON {} TO {}").format(
            owner, sql.SQL(kind), reader))
    _execute(conn_appdb, sql.SQL(
        "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT USAGE ON SCHEMAS TO {}").format(
        owner, reader))
    creators = sql.SQL(", ").join(sql.SQL("pg_catalog." + f) for f in LARGE_OBJECT_CREATORS)
    _execute(conn_appdb, sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(creators))
    _execute(conn_appdb, sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(creators, owner))


def _application_schemas(conn_appdb: Connection) -> list[str]:
    with conn_appdb.cursor() as cur:
        cur.execute("SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname <> ALL(%s)"
                    " AND nspname !~ '^pg_(toast|temp_|toast_temp_)' ORDER BY nspname",
                    (["pg_catalog", "information_schema", "pg_toast"],))
        return [r[0] for r in cur.fetchall()]


def _schema_is_the_brokers(conn_appdb: Connection, schema: str) -> bool:
    return bool(_fetch_one(conn_appdb, "SELECT r.rolsuper FROM pg_catalog.pg_namespace n "
                           "JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner "
                           "WHERE n.nspname = %s", (schema,)))


def _members_of(conn: Connection, group: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT r.rolname FROM pg_catalog.pg_auth_members m "
                    "JOIN pg_catalog.pg_roles r ON r.oid = m.member "
                    "JOIN pg_catalog.pg_roles g ON g.oid = m.roleid "
                    "WHERE g.rolname = %s ORDER BY r.rolname", (group,))
        return [r[0] for r in cur.fetchall()]


def _database_settings(conn: Connection, database: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_catalog.split_part(c, '=', 1) FROM pg_catalog.pg_db_role_setting s"
                    " JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase,"
                    " pg_catalog.unnest(s.setconfig) c"
                    " WHERE s.setrole = 0 AND d.datname = %s", (database,))
        return [r[0] for r in cur.fetchall()]


@contextlib.contextmanager
def _transaction(conn: Connection) -> Iterator[None]:
    conn.autocommit = False
    try:
        yield
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = True


def use_read_only_group_in_hba(conn: Connection) -> None:
    """Earlier versions admitted read-only roles in pg_hba as `+pg_read_all_data`: the
    same lines now name READ_ONLY_GROUP (a no-op on a node that already does)."""
    path = _fetch_one(conn, "SELECT pg_catalog.current_setting('hba_file')")
    lines = str(_fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,))).splitlines()
    legacy, wanted = "+" + LEGACY_READ_ONLY_GROUP, "+" + READ_ONLY_GROUP
    if any(legacy in line.split() for line in lines):
        set_hba(conn, [line.replace(legacy, wanted) if legacy in line.split() else line
                       for line in lines])


def ensure_extensions(conn_appdb: Connection, names: list[str]) -> None:
    """CREATE EXTENSION into EXTENSION_SCHEMA, as superuser.

    The script's search_path is that schema plus the schemas of the extensions it
    requires: all must belong to a superuser, or a function a tenant planted there
    would run with the broker's rights. An extension that exists is left alone."""
    if not _schema_is_the_brokers(conn_appdb, EXTENSION_SCHEMA):
        raise ValueError(f"schema {EXTENSION_SCHEMA} does not belong to the broker: "
                         "extensions are not installed")
    for name in names:
        if _fetch_one(conn_appdb, "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = %s",
                      (name,)):
            continue
        unsafe = _fetch_one(conn_appdb, _TENANT_OWNED_REQUIREMENT, (name,))
        if unsafe:
            raise ValueError(f"extension {name} requires {unsafe}, which is installed in a "
                             "schema the app owns: it is not installed")
        fixed = _fetch_one(conn_appdb, "SELECT v.schema"
                           " FROM pg_catalog.pg_available_extension_versions v"
                           " JOIN pg_catalog.pg_available_extensions a ON a.name = v.name"
                           " AND a.default_version = v.version WHERE v.name = %s", (name,))
        _execute(conn_appdb, sql.SQL("CREATE EXTENSION IF NOT EXISTS {} {} CASCADE").format(
            sql.Identifier(name), sql.SQL("") if fixed else
            sql.SQL("SCHEMA {}").format(sql.Identifier(EXTENSION_SCHEMA))))


# The first extension that `name` requires (directly or not), is installed, and lives
# in a schema whose owner is not a superuser.
_TENANT_OWNED_REQUIREMENT = """
WITH RECURSIVE required(name) AS (
    SELECT pg_catalog.unnest(v.requires) FROM pg_catalog.pg_available_extension_versions v
      JOIN pg_catalog.pg_available_extensions a
        ON a.name = v.name AND a.default_version = v.version
     WHERE v.name = %s
    UNION
    SELECT pg_catalog.unnest(v.requires) FROM required r
      JOIN pg_catalog.pg_available_extensions a ON a.name = r.name
      JOIN pg_catalog.pg_available_extension_versions v
        ON v.name = a.name AND v.version = a.default_version)
SELECT e.extname FROM required r
  JOIN pg_catalog.pg_extension e ON e.extname = r.name
  JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
  JOIN pg_catalog.pg_roles o ON o.oid = n.nspowner
 WHERE NOT o.rolsuper
 LIMIT 1"""


def set_database_setting(conn: Connection, database: str, name: str, value: str | None) -> None:
    """ALTER DATABASE .. SET name = value (None resets)."""
    setting = sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))
    if value is None:
        query = sql.SQL("ALTER DATABASE {} RESET {}").format(sql.Identifier(database), setting)
    else:
        query = sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(database), setting, sql.Literal(value))
    _execute(conn, query)


def ensure_slot(conn: Connection, slot_name: str) -> None:
    if _fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                  (slot_name,)):
        return
    # Reserve WAL now: the standby's base backup starts from this slot's position.
    with contextlib.suppress(psycopg2.errors.DuplicateObject):
        _execute(conn, "SELECT pg_catalog.pg_create_physical_replication_slot(%s, true)",
                 (slot_name,))


def drop_slot(conn: Connection, slot_name: str) -> None:
    """Drop if present (terminates its walsender first if still active)."""
    deadline = time.monotonic() + 10
    while True:
        row_active = _fetch_one(
            conn, "SELECT coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots "
                  "WHERE slot_name = %s", (slot_name,))
        if row_active is None:
            return
        if row_active:
            _execute(conn, "SELECT pg_catalog.pg_terminate_backend(%s, 2000)", (row_active,))
        try:
            _execute(conn, "SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot_name,))
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
        _execute(conn, "ALTER SYSTEM RESET synchronous_standby_names")
        wanted = ""
    else:
        wanted = '"' + application_name.replace('"', '""') + '"'
        _execute(conn, sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
            sql.Literal(wanted)))
    _execute(conn, "SELECT pg_catalog.pg_reload_conf()")
    # The reload is a signal: wait until this backend sees it, so that the caller's next
    # commit already runs under the new rule.
    deadline = time.monotonic() + 5
    while _fetch_one(conn, "SELECT pg_catalog.current_setting('synchronous_standby_names')"
                     ) != wanted:
        if time.monotonic() > deadline:
            raise PgNotReady("synchronous_standby_names was not applied within 5 s")
        time.sleep(0.01)


def _lsn(conn: Connection, expression: str) -> int | None:
    value = _fetch_one(conn, f"SELECT pg_catalog.pg_wal_lsn_diff({expression}, '0/0')::bigint")
    return None if value is None else int(value)


def replication_status(conn: Connection) -> ReplicationStatus:
    in_recovery = bool(_fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"))
    names = str(_fetch_one(conn, "SELECT pg_catalog.current_setting('synchronous_standby_names')"))
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
    """pg_promote(); a node already out of recovery is fine (idempotent).

    Before promoting, synchronous_standby_names is cleared: the standby inherited the
    old primary's value, and a new primary waiting for itself hangs every write.
    Once out of recovery nothing is touched, so a retried promote never undoes a
    synchronous standby configured after it."""
    if not _fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"):
        return
    _execute(conn, "ALTER SYSTEM RESET synchronous_standby_names")
    _execute(conn, "SELECT pg_catalog.pg_reload_conf()")
    try:
        done = _fetch_one(conn, "SELECT pg_catalog.pg_promote(true, %s)",
                          (max(1, math.ceil(timeout)),))
    except psycopg2.errors.ObjectNotInPrerequisiteState as exc:
        if "recovery is not in progress" not in str(exc):
            raise
        return
    if not done:
        raise PgNotReady(f"promotion did not finish within {timeout:.0f} s")


def binding_role_name(binding_id: str) -> str:
    return "b_" + hashlib.sha256(binding_id.encode()).hexdigest()[:16]


def create_binding_role(conn: Connection, role: str, password: str, *,
                        read_only: bool = False) -> None:
    """LOGIN role for one binding, made from the `postgres` database (`conn`).

    Read-write roles are members of app_owner and start every session as app_owner, so
    their objects belong to it. Read-only roles are members of app_reader only (never
    of app_owner: they could SET ROLE to it), and their transactions are read-only by
    default; what keeps them read-only is that they hold no write privilege."""
    _set_password(conn, role, password, create="LOGIN")
    ident = sql.Identifier(role)
    grant, revoke = (READ_ONLY_GROUP, APP_OWNER) if read_only else (APP_OWNER, READ_ONLY_GROUP)
    _execute(conn, sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), ident))
    _execute(conn, sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(revoke), ident))
    if read_only:
        _execute(conn, sql.SQL("ALTER ROLE {} RESET role").format(ident))
        _execute(conn, sql.SQL(
            "ALTER ROLE {} SET default_transaction_read_only = on").format(ident))
    else:
        _execute(conn, sql.SQL("ALTER ROLE {} SET role = {}").format(
            ident, sql.Literal(APP_OWNER)))
        _execute(conn, sql.SQL(
            "ALTER ROLE {} RESET default_transaction_read_only").format(ident))


def _sibling(conn: Connection, dbname: str) -> Connection:
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


def drop_binding_role(conn: Connection, role: str) -> None:
    """Terminate the role's sessions and drop it; the app's tables (owned by app_owner) stay."""
    if not _role_exists(conn, role):
        return
    ident = sql.Identifier(role)
    # No new sessions from here on, then end the open ones.
    _execute(conn, sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
    deadline = time.monotonic() + 10
    while _fetch_one(conn, "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity "
                           "WHERE usename = %s", (role,)):
        _execute(conn, "SELECT pg_catalog.pg_terminate_backend(pid, 2000) "
                       "FROM pg_catalog.pg_stat_activity WHERE usename = %s", (role,))
        if time.monotonic() > deadline:
            raise PgNotReady(f"sessions of role {role} did not end within 10 s")
        time.sleep(0.02)
    # Objects live per database: the role can only reach the application database (and
    # DROP OWNED there also revokes its grants on shared objects such as the database).
    current = str(_fetch_one(conn, "SELECT pg_catalog.current_database()"))
    databases = [current]
    if current != APP_DATABASE and _fetch_one(
            conn, "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (APP_DATABASE,)):
        databases.append(APP_DATABASE)
    for db in databases:
        target = conn if db == current else _sibling(conn, db)
        try:
            _execute(target, sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                ident, sql.Identifier(APP_OWNER)))
            _execute(target, sql.SQL("DROP OWNED BY {}").format(ident))
        finally:
            if target is not conn:
                target.close()
    _execute(conn, sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
