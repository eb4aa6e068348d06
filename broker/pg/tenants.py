"""The tenant model of a node: the application database, its owner and reader groups,
their grants, the extensions the broker installs and the database's settings.

Roles are managed from the `postgres` database, which no binding can reach; inside
the application database the broker only runs DDL that executes no tenant code."""

from __future__ import annotations

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from broker.pg.connection import execute, fetch_column, fetch_one, sibling, transaction
from broker.pg.hba import set_hba
from broker.pg.names import (
    ADMIN_USER,
    APP_DATABASE,
    APP_OWNER,
    EXTENSION_SCHEMA,
    LEGACY_READ_ONLY_GROUP,
    READ_ONLY_GROUP,
    REPLICATION_USER,
)
from broker.pg.roles import role_exists, set_password

# The application database's search_path (apps find extension objects unqualified).
APP_SEARCH_PATH = ("$user", "public", EXTENSION_SCHEMA)
# Database-level settings of the application database that the broker sets; any other
# one was set by a tenant while it owned the database (earlier versions) and goes.
BROKER_DATABASE_SETTINGS = ("search_path", "statement_timeout")
# PUBLIC may execute these by default: large objects would be a write for read-only roles.
LARGE_OBJECT_CREATORS = ("lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)")


def ensure_cluster_objects(conn: Connection, *, replication_password: str,
                           database: str = APP_DATABASE) -> None:
    """Replication role, the application database, and the tenant model on it.

    `conn` is on the `postgres` database (no binding can connect there)."""
    set_password(conn, REPLICATION_USER, replication_password, create="REPLICATION LOGIN")
    if not fetch_one(conn, "SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s",
                     (database,)):
        execute(conn, sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(database), sql.Identifier(ADMIN_USER)))
    for db in ("postgres", "template1"):
        execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
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
    return bool(fetch_one(conn, """
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
        if not role_exists(conn, group):
            execute(conn, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
    inside = sibling(conn, database)
    try:
        with transaction(inside):
            _grant_inside_database(inside)
    finally:
        inside.close()
    legacy = _members_of(conn, LEGACY_READ_ONLY_GROUP)
    for role in legacy:
        execute(conn, sql.SQL("GRANT {} TO {}").format(
            sql.Identifier(READ_ONLY_GROUP), sql.Identifier(role)))
        execute(conn, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(
            db, sql.Identifier(role)))
    use_read_only_group_in_hba(conn)
    for role in legacy:
        execute(conn, sql.SQL("REVOKE {} FROM {}").format(
            sql.Identifier(LEGACY_READ_ONLY_GROUP), sql.Identifier(role)))
    with transaction(conn):
        _reset_database_settings(conn, database)  # again: the tenant owned it until now
        # The owner first: a new owner takes over the old owner's own ACL entries.
        execute(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            db, sql.Identifier(ADMIN_USER)))
        execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        execute(conn, sql.SQL("GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {} TO {}").format(
            db, sql.Identifier(APP_OWNER)))
        execute(conn, sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            db, sql.Identifier(READ_ONLY_GROUP)))


def _reset_database_settings(conn: Connection, database: str) -> None:
    for name in _database_settings(conn, database):
        if name not in BROKER_DATABASE_SETTINGS:
            set_database_setting(conn, database, name, None)
    execute(conn, sql.SQL("ALTER DATABASE {} SET search_path = {}").format(
        sql.Identifier(database), sql.SQL(", ").join(sql.Literal(s) for s in APP_SEARCH_PATH)))


def _grant_inside_database(conn_appdb: Connection) -> None:
    owner, reader = sql.Identifier(APP_OWNER), sql.Identifier(READ_ONLY_GROUP)
    admin = sql.Identifier(ADMIN_USER)
    extensions = sql.Identifier(EXTENSION_SCHEMA)
    execute(conn_appdb, sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
        extensions, admin))
    if _schema_is_the_brokers(conn_appdb, EXTENSION_SCHEMA):
        execute(conn_appdb, sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(extensions))
    for schema in _application_schemas(conn_appdb):
        ident = sql.Identifier(schema)
        execute(conn_appdb, sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident, reader))
        execute(conn_appdb, sql.SQL(
            "GRANT SELECT ON ALL TABLES IN SCHEMA {0} TO {1}; "
            "GRANT SELECT ON ALL SEQUENCES IN SCHEMA {0} TO {1}").format(ident, reader))
        if schema == "public":
            execute(conn_appdb, sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}; "
                                        "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
                                        ).format(owner))
    for kind in ("TABLES", "SEQUENCES"):
        execute(conn_appdb, sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT SELECT ON {} TO {}").format(
            owner, sql.SQL(kind), reader))
    execute(conn_appdb, sql.SQL(
        "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT USAGE ON SCHEMAS TO {}").format(
        owner, reader))
    creators = sql.SQL(", ").join(sql.SQL("pg_catalog." + f) for f in LARGE_OBJECT_CREATORS)
    execute(conn_appdb, sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(creators))
    execute(conn_appdb, sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(creators, owner))


def _application_schemas(conn_appdb: Connection) -> list[str]:
    return fetch_column(
        conn_appdb, "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname <> ALL(%s)"
        " AND nspname !~ '^pg_(toast|temp_|toast_temp_)' ORDER BY nspname",
        (["pg_catalog", "information_schema", "pg_toast"],))


def _schema_is_the_brokers(conn_appdb: Connection, schema: str) -> bool:
    return bool(fetch_one(conn_appdb, "SELECT r.rolsuper FROM pg_catalog.pg_namespace n "
                          "JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner "
                          "WHERE n.nspname = %s", (schema,)))


def _members_of(conn: Connection, group: str) -> list[str]:
    return fetch_column(conn, "SELECT r.rolname FROM pg_catalog.pg_auth_members m "
                              "JOIN pg_catalog.pg_roles r ON r.oid = m.member "
                              "JOIN pg_catalog.pg_roles g ON g.oid = m.roleid "
                              "WHERE g.rolname = %s ORDER BY r.rolname", (group,))


def _database_settings(conn: Connection, database: str) -> list[str]:
    return fetch_column(conn, "SELECT pg_catalog.split_part(c, '=', 1)"
                              " FROM pg_catalog.pg_db_role_setting s"
                              " JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase,"
                              " pg_catalog.unnest(s.setconfig) c"
                              " WHERE s.setrole = 0 AND d.datname = %s", (database,))


def use_read_only_group_in_hba(conn: Connection) -> None:
    """Earlier versions admitted read-only roles in pg_hba as `+pg_read_all_data`: the
    same lines now name READ_ONLY_GROUP (a no-op on a node that already does)."""
    path = fetch_one(conn, "SELECT pg_catalog.current_setting('hba_file')")
    lines = str(fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,))).splitlines()
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
        if fetch_one(conn_appdb, "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = %s",
                     (name,)):
            continue
        unsafe = fetch_one(conn_appdb, _TENANT_OWNED_REQUIREMENT, (name,))
        if unsafe:
            raise ValueError(f"extension {name} requires {unsafe}, which is installed in a "
                             "schema the app owns: it is not installed")
        fixed = fetch_one(conn_appdb, "SELECT v.schema"
                           " FROM pg_catalog.pg_available_extension_versions v"
                           " JOIN pg_catalog.pg_available_extensions a ON a.name = v.name"
                           " AND a.default_version = v.version WHERE v.name = %s", (name,))
        execute(conn_appdb, sql.SQL("CREATE EXTENSION IF NOT EXISTS {} {} CASCADE").format(
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
    execute(conn, query)


