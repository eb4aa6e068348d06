"""A hostile tenant with nothing but ordinary bindings, against real instances.

Every attack runs from a real binding (made by the broker's own code, used through
the service address as an app would) and must be refused, while the broker's own
operations on the instance (bind, update with extensions, unbind, health checks)
keep working. An instance made with the earlier privilege model is upgraded by its
next bind.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography.fernet import Fernet
from psycopg2 import sql

from broker.cloud.local import LocalCloud
from broker.operations import bindings
from broker.operations.engine import Engine
from broker.pg import hba, tenants
from broker.pg import probe as health
from broker.pg.names import APP_DATABASE
from broker.runtime import Runtime
from harness.machine import make_local_cloud
from harness.workflows import (
    connect_as_admin,
    connect_with,
    deprovision,
    instance,
    make_engine,
    make_runtime,
    provision,
    update,
)

pytestmark = pytest.mark.e2e
KEY = Fernet.generate_key().decode()
ROOT = Path(__file__).resolve().parent.parent

# Every function the broker's SQL calls (checked against the source below), plus the
# ones such code typically calls: each is shadowed, with pg_catalog's own signatures,
# in `public` and in a schema of the tenant's.
BROKER_CALLS = (
    "count", "current_database", "current_setting", "has_database_privilege",
    "json_agg", "json_build_object", "pg_backend_pid", "pg_create_physical_replication_slot",
    "pg_current_wal_lsn", "pg_drop_replication_slot", "pg_get_userbyid", "pg_is_in_recovery",
    "pg_last_wal_receive_lsn", "pg_last_wal_replay_lsn", "pg_promote", "pg_read_file",
    "pg_reload_conf", "pg_stat_get_wal_senders", "pg_terminate_backend", "pg_wal_lsn_diff",
    "split_part", "unnest",
)
TYPICAL_CALLS = ("format", "quote_ident", "quote_literal", "now", "lower",
                 "array_agg", "string_agg", "set_config", "version")
SHADOW_SCHEMAS = ("public", "tenant_tools")
BROKER_SQL = ("broker/pg", "broker/operations")


@dataclass
class Env:
    cloud: LocalCloud
    runtime: Runtime
    engine: Engine
    instance_id: str

    def bind(self, binding_id: str, *, read_only: bool = False) -> dict[str, Any]:
        return bindings.create_binding(
            self.runtime, self.instance_id, binding_id, app_guid="app",
            bind_resource={"app_guid": "app"}, parameters={"read_only": read_only}
        ).credentials

    def unbind(self, binding_id: str) -> None:
        assert bindings.delete_binding(self.runtime, self.instance_id, binding_id)

    def connect_admin(self, dbname: str = APP_DATABASE, host: str | None = None) -> Any:
        inst = instance(self.runtime, self.instance_id)
        primary = inst.primary()
        assert primary is not None
        return connect_as_admin(self.runtime, inst, host or primary.management_address or "",
                                dbname)

    def admin_value(self, query: str, args: Any = None,
                    dbname: str = APP_DATABASE) -> Any:
        conn = self.connect_admin(dbname)
        try:
            return value(conn, query, args)
        finally:
            conn.close()


def make_env(tmp: Path, plan: str) -> Iterator[Env]:
    with make_local_cloud() as cloud:
        runtime = make_runtime(f"sqlite:///{tmp / 'state.sqlite3'}", KEY, cloud)
        engine = make_engine(runtime)
        instance_id = provision(runtime, engine, plan)
        try:
            yield Env(cloud, runtime, engine, instance_id)
        finally:
            deprovision(runtime, engine, instance_id)
            runtime.store.dispose()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from make_env(tmp_path_factory.mktemp("tenant"), "standalone")


def value(conn: Any, query: str | sql.Composable, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
    return None if row is None else row[0]


def refused(conn: Any, statement: str, code: str = "42501") -> None:
    """The statement fails with `code` (42501: insufficient privilege)."""
    with pytest.raises(psycopg2.Error) as failure, conn.cursor() as cur:
        cur.execute(statement)
    assert failure.value.pgcode == code, (statement, failure.value.pgerror)


def is_superuser(env: Env, role: str) -> bool:
    return bool(env.admin_value("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = %s",
                                (role,), dbname="postgres"))


def logs_in(credentials: dict[str, Any]) -> bool:
    try:
        connect_with(credentials).close()
    except psycopg2.OperationalError:
        return False
    return True


# --- the shadows: every unqualified call a superuser session could make ---------------
def plant_shadows(app: Any, target_role: str) -> int:
    """As the tenant: in each SHADOW_SCHEMA, a function (or aggregate) with the
    signature of each pg_catalog function in the lists, that logs the call and makes
    `target_role` superuser when a superuser runs it. Returns how many were made."""
    with app.cursor() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS tenant_tools")
        cur.execute("CREATE TABLE IF NOT EXISTS public.hijack_calls (fn text, by_user text)")
        cur.execute("GRANT INSERT ON public.hijack_calls TO PUBLIC")
        cur.execute(
            "SELECT p.proname, pg_catalog.oidvectortypes(p.proargtypes),"
            " pg_catalog.pg_get_function_result(p.oid), p.prokind, p.proretset"
            " FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace"
            " AND p.proname = ANY(%s)", (list(BROKER_CALLS + TYPICAL_CALLS),))
        overloads = cur.fetchall()
    made = 0
    for schema in SHADOW_SCHEMAS:
        for name, args, result, kind, returns_set in overloads:
            attack = (f"INSERT INTO public.hijack_calls VALUES ('{schema}.{name}', "
                      f"pg_catalog.session_user()); ALTER ROLE {target_role} SUPERUSER;")
            bare = returns_set or result == "void" or result.startswith("TABLE(")
            done = "RETURN;" if bare else "RETURN NULL;"
            if kind == "a":
                step_args = f"{result}, {args}" if args and args != "*" else result
                statements = [
                    f"CREATE FUNCTION {schema}.{name}_step({step_args}) RETURNS {result} "
                    f"LANGUAGE plpgsql SET search_path = pg_catalog AS "
                    f"$$BEGIN {attack} RETURN NULL; END$$",
                    f"CREATE AGGREGATE {schema}.{name}({args or '*'}) "
                    f"(SFUNC = {schema}.{name}_step, STYPE = {result})"]
            else:
                statements = [
                    f"CREATE FUNCTION {schema}.{name}({args}) RETURNS {result} "
                    f"LANGUAGE plpgsql SET search_path = pg_catalog AS "
                    f"$$BEGIN {attack} {done} END$$"]
            try:
                with app.cursor() as cur:
                    for statement in statements:
                        cur.execute(statement)
                made += 1
            except psycopg2.Error:
                pass  # pseudo-types ("any", internal) cannot be written in PL/pgSQL
    return made


def shadowed_names(env: Env) -> dict[str, set[str]]:
    conn = env.connect_admin()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p"
                        " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
                        " WHERE n.nspname = ANY(%s)", (list(SHADOW_SCHEMAS),))
            found: dict[str, set[str]] = {}
            for schema, name in cur.fetchall():
                found.setdefault(schema, set()).add(name)
            return found
    finally:
        conn.close()


def test_the_shadow_list_covers_every_function_the_broker_calls() -> None:
    called: set[str] = set()
    for part in BROKER_SQL:
        path = ROOT / part
        for source in ([path] if path.is_file() else sorted(path.glob("*.py"))):
            called |= set(re.findall(r"pg_catalog\.(\w+)\s*\(", source.read_text()))
    called -= {"pg_lsn", "json", "text", "int8"}  # types in casts, not calls
    assert called and called <= set(BROKER_CALLS), called - set(BROKER_CALLS)


def test_search_path_hijack_never_reaches_the_broker(env: Env) -> None:
    creds = env.bind("hijacker")
    me = creds["username"]
    app = connect_with(creds)
    assert plant_shadows(app, me) > 2 * len(BROKER_CALLS)
    found = shadowed_names(env)
    for schema in SHADOW_SCHEMAS:
        missing = set(BROKER_CALLS + TYPICAL_CALLS) - found.get(schema, set())
        assert not missing, (schema, missing)
    hijack_path = "tenant_tools, public, pg_catalog"
    # Database level: only the database's owner may, and that is not the tenant.
    refused(app, f"ALTER DATABASE appdb SET search_path = {hijack_path}")
    refused(app, "ALTER ROLE ALL SET search_path = public")
    refused(app, "ALTER ROLE ALL IN DATABASE appdb SET search_path = public")
    refused(app, f"ALTER ROLE postgres SET search_path = {hijack_path}")
    # Role level: allowed for the tenant's own role, and applies to its sessions only.
    with app.cursor() as cur:
        cur.execute("SET ROLE NONE")
        cur.execute(f"ALTER ROLE {me} SET search_path = {hijack_path}")
        cur.execute(f"ALTER ROLE {me} IN DATABASE appdb SET search_path = {hijack_path}")
        cur.execute("SET ROLE app_owner")
        cur.execute(f"ALTER ROLE app_owner SET search_path = {hijack_path}")
    app.close()

    # The broker at work in the instance: bind, update with extensions, health, unbind.
    reader = env.bind("hijack-reader", read_only=True)
    writer = env.bind("hijack-writer")
    update(env.runtime, env.engine, env.instance_id,
           parameters={"extensions": ["pgcrypto", "earthdistance"],
                       "statement_timeout_ms": 4000})
    inst = instance(env.runtime, env.instance_id)
    primary = inst.primary()
    assert primary is not None and primary.management_address
    probe = health.probe(primary.management_address,
                         env.runtime.vault.decrypt(inst.admin_password_enc), timeout=3)
    assert probe.ok and probe.in_recovery is False
    for binding in ("hijack-reader", "hijack-writer"):
        env.unbind(binding)
    assert not logs_in(reader) and not logs_in(writer)

    assert not is_superuser(env, me)
    assert env.admin_value("SELECT count(*) FROM public.hijack_calls") == 0
    # The extensions (earthdistance's requirement cube too) are in the broker's schema,
    # and apps find them through the database's search_path.
    conn = env.connect_admin()
    with conn.cursor() as cur:
        cur.execute("SELECT e.extname, n.nspname FROM pg_catalog.pg_extension e"
                    " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
                    " WHERE e.extname <> 'plpgsql' ORDER BY 1")
        assert cur.fetchall() == [("cube", "extensions"), ("earthdistance", "extensions"),
                                  ("pgcrypto", "extensions")]
    conn.close()
    writer = env.bind("hijack-writer-2")
    app = connect_with(writer)
    assert value(app, "SELECT length(pg_catalog.encode(digest('x', 'sha256'), 'hex'))") == 64
    assert value(app, "SHOW statement_timeout") == "4s"
    app.close()
    env.unbind("hijack-writer-2")

    env.unbind("hijacker")


def test_read_write_binding_stays_in_its_database(env: Env) -> None:
    creds = env.bind("writer")
    me = creds["username"]
    app = connect_with(creds)
    for statement in (
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "SELECT rolpassword FROM pg_catalog.pg_authid",
        "ALTER SYSTEM SET log_min_messages = 'panic'",
        "CREATE ROLE intruder LOGIN PASSWORD 'x'",
        "ALTER DATABASE appdb SET work_mem = '1GB'",
        "ALTER DATABASE appdb OWNER TO app_owner",
        "ALTER DATABASE appdb CONNECTION LIMIT 1",
        "SET ROLE postgres",
        f"GRANT pg_execute_server_program TO {me}",
        f"GRANT pg_read_all_data TO {me}",
        f"ALTER ROLE {me} SUPERUSER",
        f"ALTER ROLE {me} CREATEROLE",
        "SELECT pg_catalog.pg_read_file('/etc/passwd')",
        "CREATE EXTENSION file_fdw",
        "CREATE FUNCTION extensions.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER SCHEMA extensions OWNER TO app_owner",
        "ALTER SCHEMA public OWNER TO app_owner",
    ):
        refused(app, statement)
    with app.cursor() as cur:  # not its schema: a warning, and nothing is granted
        cur.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    assert value(app, "SELECT pg_catalog.has_schema_privilege('public', 'public', 'CREATE')"
                 ) is False
    # What an app needs still works: its own schemas and objects, temp tables, large
    # objects; everything belongs to app_owner.
    with app.cursor() as cur:
        cur.execute("CREATE SCHEMA shop")
        cur.execute("CREATE TABLE shop.orders (id serial PRIMARY KEY, note text)")
        cur.execute("INSERT INTO shop.orders (note) VALUES ('x')")
        cur.execute("CREATE TABLE public.things (id int)")
        cur.execute("CREATE TEMP TABLE scratch (id int)")
        cur.execute("SELECT pg_catalog.lo_from_bytea(0, 'blob')")
        cur.execute("SELECT current_user, pg_catalog.pg_get_userbyid(n.nspowner)"
                    " FROM pg_catalog.pg_namespace n WHERE n.nspname = 'shop'")
        assert cur.fetchone() == ("app_owner", "app_owner")
    app.close()
    assert not is_superuser(env, me)
    env.unbind("writer")


def test_read_only_binding_stays_read_only(env: Env) -> None:
    writer = env.bind("ro-writer")
    app = connect_with(writer)
    with app.cursor() as cur:
        cur.execute("CREATE TABLE public.before (id serial PRIMARY KEY)")
        cur.execute("INSERT INTO public.before DEFAULT VALUES")
    reader = env.bind("reader", read_only=True)
    # Made after the read-only binding: default privileges give it SELECT.
    with app.cursor() as cur:
        cur.execute("CREATE TABLE public.after (id int)")
        cur.execute("INSERT INTO public.after VALUES (2)")
        cur.execute("CREATE SCHEMA reports")
        cur.execute("CREATE TABLE reports.daily (id int)")
        cur.execute("INSERT INTO reports.daily VALUES (3)")
    ro = connect_with(reader)
    assert value(ro, "SELECT count(*) FROM public.before") == 1
    assert value(ro, "SELECT id FROM public.after") == 2
    assert value(ro, "SELECT id FROM reports.daily") == 3
    assert value(ro, "SHOW default_transaction_read_only") == "on"
    writes = ("INSERT INTO public.before DEFAULT VALUES", "UPDATE public.after SET id = 9",
              "DELETE FROM reports.daily", "CREATE TABLE public.mine (id int)",
              "CREATE TABLE reports.mine (id int)", "CREATE SCHEMA mine",
              "SELECT 1 FROM public.after FOR UPDATE")
    for statement in writes:  # refused by read-only transactions, by default
        refused(ro, statement, "25006")
    with ro.cursor() as cur:
        cur.execute("SET default_transaction_read_only = off")
    for statement in writes:  # and refused by privileges, once switched off
        refused(ro, statement)
    refused(ro, "CREATE TEMP TABLE mine (id int)")
    with ro.cursor() as cur:
        cur.execute("BEGIN READ WRITE")
    refused(ro, "INSERT INTO public.before DEFAULT VALUES")
    with ro.cursor() as cur:
        cur.execute("ROLLBACK")
    for statement in ("SET ROLE app_owner", "COPY public.after FROM PROGRAM 'id'",
                      "SELECT pg_catalog.nextval('public.before_id_seq')",
                      "SELECT pg_catalog.lo_from_bytea(0, 'x')",
                      "SELECT pg_catalog.lo_create(0)", "SELECT pg_catalog.lo_creat(-1)",
                      "SELECT pg_catalog.lo_import('/etc/passwd')",
                      "SELECT rolpassword FROM pg_catalog.pg_authid",
                      "SELECT pg_catalog.pg_read_file('pg_hba.conf')"):
        refused(ro, statement)
    assert value(ro, "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata"
                     " WHERE lomowner = current_user::regrole") == 0
    ro.close()
    app.close()
    env.unbind("reader")
    env.unbind("ro-writer")


def test_unbound_credentials_never_log_in_again(env: Env) -> None:
    writer, reader = env.bind("short-lived"), env.bind("short-lived-ro", read_only=True)
    sessions = [connect_with(writer), connect_with(reader)]
    # The tenant changes its own password first, hoping to keep a way in.
    with sessions[0].cursor() as cur:
        cur.execute("SET ROLE NONE")
        cur.execute(f"ALTER ROLE {writer['username']} PASSWORD 'kept-by-the-tenant-1'")
    kept = dict(writer, uri=writer["uri"].replace(writer["password"], "kept-by-the-tenant-1"))
    assert logs_in(kept)
    env.unbind("short-lived")
    env.unbind("short-lived-ro")
    for session in sessions:  # open sessions are ended
        with pytest.raises(psycopg2.Error), session.cursor() as cur:
            cur.execute("SELECT 1")
        session.close()
    for credentials in (writer, reader, kept):
        assert not logs_in(credentials)
    assert env.admin_value("SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = ANY(%s)",
                           ([writer["username"], reader["username"]],), dbname="postgres") == 0


# --- an instance made with the earlier model ---------------------------------------------
def earlier_model_with_a_ledger(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    """A writer and a reader binding, a table the writer made, then the instance put back
    to the earlier model; returns both bindings' credentials."""
    writer, reader = env.bind("old-writer"), env.bind("old-reader", read_only=True)
    app = connect_with(writer)
    with app.cursor() as cur:
        cur.execute("CREATE TABLE public.ledger (id int)")
        cur.execute("INSERT INTO public.ledger VALUES (1)")
    app.close()
    downgrade_to_earlier_model(env, reader["username"],
                               [writer["username"], reader["username"]])
    return writer, reader


def downgrade_to_earlier_model(env: Env, reader_role: str, roles: list[str]) -> None:
    """What earlier versions made: app_owner owns appdb, read-only roles are members of
    pg_read_all_data (and pg_hba names that group), PUBLIC may create large objects."""
    inst = instance(env.runtime, env.instance_id)
    appdb = env.connect_admin()
    with appdb.cursor() as cur:
        cur.execute("DROP OWNED BY app_reader")
        cur.execute("GRANT EXECUTE ON FUNCTION pg_catalog.lo_create(oid),"
                    " pg_catalog.lo_creat(integer), pg_catalog.lo_from_bytea(oid, bytea)"
                    " TO PUBLIC")
        cur.execute("DROP SCHEMA extensions")
        cur.execute("REVOKE ALL ON SCHEMA public FROM app_owner")
    appdb.close()
    conn = env.connect_admin("postgres")
    with conn.cursor() as cur:
        cur.execute("REVOKE ALL ON DATABASE appdb FROM app_owner, app_reader")
        cur.execute("ALTER DATABASE appdb OWNER TO app_owner")
        cur.execute("ALTER DATABASE appdb RESET ALL")
        cur.execute(f"REVOKE app_reader FROM {reader_role}")
        cur.execute(f"GRANT pg_read_all_data TO {reader_role}")
        for role in roles:
            cur.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE appdb TO {role}")
        cur.execute("DROP ROLE app_reader")
    conn.close()
    for node in inst.live_nodes():
        conn = env.connect_admin("postgres", host=node.management_address)
        lines = hba_lines(conn)
        hba.set_hba(conn, [line.replace("+app_reader", "+pg_read_all_data") for line in lines])
        conn.close()


def hba_lines(conn: Any) -> list[str]:
    return str(value(conn, "SELECT pg_catalog.pg_read_file("
                           "pg_catalog.current_setting('hba_file'))")).splitlines()


@pytest.fixture
def ha_env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "ha")


def test_an_instance_of_the_earlier_model_is_hardened_by_its_next_bind(ha_env: Env) -> None:
    env = ha_env
    writer, reader = earlier_model_with_a_ledger(env)
    ro = connect_with(reader)
    assert value(ro, "SELECT count(*) FROM pg_catalog.pg_authid") > 0  # the old hole
    ro.close()

    # While it owns the database, the tenant plants the hijack of the earlier model.
    app = connect_with(writer)
    plant_shadows(app, writer["username"])
    with app.cursor() as cur:
        cur.execute("ALTER DATABASE appdb SET search_path = public, pg_catalog")
        cur.execute("ALTER DATABASE appdb SET default_transaction_read_only = on")
    app.close()

    newcomer = env.bind("new-writer")  # the next bind upgrades the instance
    assert not is_superuser(env, writer["username"])
    assert env.admin_value("SELECT count(*) FROM public.hijack_calls") == 0
    conn = env.connect_admin("postgres")
    assert tenants.tenant_model_in_place(conn)
    assert value(conn, "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database"
                       " WHERE datname = 'appdb'") == "postgres"
    assert value(conn, "SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s"
                       " JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase"
                       " WHERE d.datname = 'appdb' AND s.setrole = 0"
                       ) == ['search_path="$user", public, extensions']
    assert value(conn, "SELECT count(*) FROM pg_catalog.pg_auth_members m"
                       " WHERE m.roleid = 'pg_read_all_data'::regrole") == 0
    conn.close()
    inst = instance(env.runtime, env.instance_id)
    assert len(inst.live_nodes()) == 2
    for node in inst.live_nodes():  # the standby's pg_hba too, for after a failover
        conn = env.connect_admin("postgres", host=node.management_address)
        users = [line.split()[2] for line in hba_lines(conn)
                 if line.strip() and not line.startswith("#")]
        conn.close()
        assert "+app_reader" in users and "+pg_read_all_data" not in users

    # The earlier read-only binding still logs in and reads, and nothing more.
    ro = connect_with(reader)
    assert value(ro, "SELECT id FROM public.ledger") == 1
    with ro.cursor() as cur:
        cur.execute("SET default_transaction_read_only = off")
    for statement in ("SELECT count(*) FROM pg_catalog.pg_authid",
                      "INSERT INTO public.ledger VALUES (2)",
                      "CREATE TEMP TABLE mine (id int)",
                      "SELECT pg_catalog.lo_from_bytea(0, 'x')"):
        refused(ro, statement)
    ro.close()
    # The earlier read-write binding keeps working, and lost the database.
    app = connect_with(writer)
    with app.cursor() as cur:
        cur.execute("INSERT INTO public.ledger VALUES (2)")
        cur.execute("CREATE SCHEMA later")
        cur.execute("CREATE TABLE later.t (id int)")
    refused(app, "ALTER DATABASE appdb SET search_path = public, pg_catalog")
    app.close()
    app = connect_with(newcomer)
    assert value(app, "SELECT count(*) FROM public.ledger") == 2
    app.close()
    for binding in ("old-writer", "old-reader", "new-writer"):
        env.unbind(binding)
    for credentials in (writer, reader, newcomer):
        assert not logs_in(credentials)


@pytest.fixture
def standalone_env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, "standalone")


def test_an_earlier_model_instance_is_hardened_before_its_pg_hba_is_rewritten(
        standalone_env: Env) -> None:
    """A standby added to an instance of the earlier model rewrites the primary's pg_hba
    with the new read-only group: the earlier read-only roles must be in it by then."""
    env = standalone_env
    _writer, reader = earlier_model_with_a_ledger(env)
    update(env.runtime, env.engine, env.instance_id, "ha")
    ro = connect_with(reader)  # admitted by the rewritten pg_hba
    assert value(ro, "SELECT id FROM public.ledger") == 1
    refused(ro, "SELECT count(*) FROM pg_catalog.pg_authid")
    ro.close()
    conn = env.connect_admin("postgres")
    assert tenants.tenant_model_in_place(conn)
    conn.close()
    env.unbind("old-writer")
    env.unbind("old-reader")
