"""PostgreSQL administration over psycopg2: the broker's hands inside a node.

Every function is idempotent (operations re-run their steps after a crash).
Connections are autocommit, user `postgres`, application_name `pgha-broker`.

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
READ_ONLY_GROUP = "pg_read_all_data"
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
        # libpq takes whole seconds (NOTES §3: a black-holed node costs all of it).
        connect_timeout=max(1, math.ceil(timeout)), application_name=APPLICATION_NAME,
        **ssl_params(ca_pem, bind_channel=bind_channel),
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
    instance's nodes, app roles (members of app_owner/pg_read_all_data) only to `database`;
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
    path = _fetch_one(conn, "SELECT current_setting('hba_file')")
    old = _fetch_one(conn, "SELECT pg_read_file(%s)", (path,))
    wanted = "\n".join(lines) + "\n"
    if old == wanted:
        return
    _write_server_file(conn, path, lines)
    errors = _fetch_one(conn, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL")
    if errors:
        _write_server_file(conn, path, old.rstrip("\n").split("\n"))
        raise ValueError("the new pg_hba.conf has errors; the old one was kept")
    _execute(conn, "SELECT pg_reload_conf()")


def _write_server_file(conn: Connection, path: str, lines: list[str]) -> None:
    # COPY's text format escapes only backslashes, tabs and newlines, refused above.
    _execute(conn, sql.SQL("COPY (SELECT unnest(%s::text[])) TO {}").format(sql.Literal(path)),
             (lines,))


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
    return bool(_fetch_one(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)))


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
    """Replication role, group role app_owner, database owned by app_owner, PUBLIC revoked."""
    _set_password(conn, REPLICATION_USER, replication_password, create="REPLICATION LOGIN")
    if not _role_exists(conn, APP_OWNER):
        _execute(conn, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(APP_OWNER)))
    if not _fetch_one(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (database,)):
        _execute(conn, sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(database), sql.Identifier(APP_OWNER)))
    _execute(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
        sql.Identifier(database), sql.Identifier(APP_OWNER)))
    # Only roles granted CONNECT (bindings, and app_owner's members as owner) get in.
    for db in (database, "postgres", "template1"):
        _execute(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(db)))


def ensure_extensions(conn_appdb: Connection, names: list[str]) -> None:
    for name in names:
        _execute(conn_appdb, sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(
            sql.Identifier(name)))


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
    if _fetch_one(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                  (slot_name,)):
        return
    # Reserve WAL now: the standby's base backup starts from this slot's position.
    with contextlib.suppress(psycopg2.errors.DuplicateObject):
        _execute(conn, "SELECT pg_create_physical_replication_slot(%s, true)", (slot_name,))


def drop_slot(conn: Connection, slot_name: str) -> None:
    """Drop if present (terminates its walsender first if still active)."""
    deadline = time.monotonic() + 10
    while True:
        row_active = _fetch_one(
            conn, "SELECT coalesce(active_pid, 0) FROM pg_replication_slots "
                  "WHERE slot_name = %s", (slot_name,))
        if row_active is None:
            return
        if row_active:
            _execute(conn, "SELECT pg_terminate_backend(%s, 2000)", (row_active,))
        try:
            _execute(conn, "SELECT pg_drop_replication_slot(%s)", (slot_name,))
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
    _execute(conn, "SELECT pg_reload_conf()")
    # The reload is a signal: wait until this backend sees it, so that the caller's next
    # commit already runs under the new rule.
    deadline = time.monotonic() + 5
    while _fetch_one(conn, "SELECT current_setting('synchronous_standby_names')") != wanted:
        if time.monotonic() > deadline:
            raise PgNotReady("synchronous_standby_names was not applied within 5 s")
        time.sleep(0.01)


def _lsn(conn: Connection, expression: str) -> int | None:
    value = _fetch_one(conn, f"SELECT pg_wal_lsn_diff({expression}, '0/0')::bigint")
    return None if value is None else int(value)


def replication_status(conn: Connection) -> ReplicationStatus:
    in_recovery = bool(_fetch_one(conn, "SELECT pg_is_in_recovery()"))
    names = str(_fetch_one(conn, "SELECT current_setting('synchronous_standby_names')"))
    if in_recovery:
        return ReplicationStatus(
            in_recovery=True, lsn=_lsn(conn, "pg_last_wal_replay_lsn()") or 0,
            receive_lsn=_lsn(conn, "pg_last_wal_receive_lsn()"),
            synchronous_standby_names=names)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, application_name,"
            " state, sync_state, pg_wal_lsn_diff(replay_lsn, '0/0')::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint"
            " FROM (SELECT 1) one LEFT JOIN pg_stat_replication ON true"
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
    if not _fetch_one(conn, "SELECT pg_is_in_recovery()"):
        return
    _execute(conn, "ALTER SYSTEM RESET synchronous_standby_names")
    _execute(conn, "SELECT pg_reload_conf()")
    try:
        done = _fetch_one(conn, "SELECT pg_promote(true, %s)", (max(1, math.ceil(timeout)),))
    except psycopg2.errors.ObjectNotInPrerequisiteState as exc:
        if "recovery is not in progress" not in str(exc):
            raise
        return
    if not done:
        raise PgNotReady(f"promotion did not finish within {timeout:.0f} s")


def binding_role_name(binding_id: str) -> str:
    return "b_" + hashlib.sha256(binding_id.encode()).hexdigest()[:16]


def create_binding_role(conn_appdb: Connection, role: str, password: str, *,
                        read_only: bool = False) -> None:
    """LOGIN role for one binding; objects it creates are owned by app_owner.

    Read-write roles are members of app_owner and start every session as app_owner.
    Read-only roles are NOT members of app_owner (they could SET ROLE to it and write):
    they read through pg_read_all_data, with read-only transactions by default."""
    database = str(_fetch_one(conn_appdb, "SELECT current_database()"))
    _set_password(conn_appdb, role, password, create="LOGIN")
    ident = sql.Identifier(role)
    grant, revoke = (READ_ONLY_GROUP, APP_OWNER) if read_only else (APP_OWNER, READ_ONLY_GROUP)
    _execute(conn_appdb, sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), ident))
    _execute(conn_appdb, sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(revoke), ident))
    _execute(conn_appdb, sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
        sql.Identifier(database), ident))
    if read_only:
        _execute(conn_appdb, sql.SQL("ALTER ROLE {} RESET role").format(ident))
        _execute(conn_appdb, sql.SQL(
            "ALTER ROLE {} SET default_transaction_read_only = on").format(ident))
    else:
        _execute(conn_appdb, sql.SQL("ALTER ROLE {} SET role = {}").format(
            ident, sql.Literal(APP_OWNER)))
        _execute(conn_appdb, sql.SQL(
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
    while _fetch_one(conn, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)):
        _execute(conn, "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity "
                       "WHERE usename = %s", (role,))
        if time.monotonic() > deadline:
            raise PgNotReady(f"sessions of role {role} did not end within 10 s")
        time.sleep(0.02)
    # Objects live per database: the role can only reach the application database (and
    # DROP OWNED there also revokes its grants on shared objects such as the database).
    current = str(_fetch_one(conn, "SELECT current_database()"))
    databases = [current]
    if current != APP_DATABASE and _fetch_one(
            conn, "SELECT 1 FROM pg_database WHERE datname = %s", (APP_DATABASE,)):
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
