"""Backups taken from the standby: pgBackRest on the primary (which owns the
repository) copies the standby's files through the standby's pgBackRest TLS server
(`backup-standby`), and only asks the primary for pg_backup_start/stop.

Each node of an HA instance runs that server (the guest bootstrap starts it); the
broker keeps the peers it admits current, on the same occasions as pg_hba (a node came
or went, a promotion, a certificate rotation), by rewriting its configuration through
PostgreSQL and having it reload (SIGHUP)."""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from pathlib import Path

from psycopg2.extensions import connection as Connection

from broker.guest import bootstrap
from broker.pg.connection import fetch_one, run_program
from broker.pg.tls_files import write_private_server_file


def _beside_data(conn: Connection, *names: str) -> str:
    data = str(fetch_one(conn, "SELECT pg_catalog.current_setting('data_directory')"))
    return posixpath.join(posixpath.dirname(data), *names)


def refresh_server(conn: Connection, *, address: str, stanza: str,
                   peers: list[str]) -> bool:
    """Admit exactly `peers` (node ids) on the node of `conn`; False when the node runs
    no such server (a standalone instance, a node made before it)."""
    base = _beside_data(conn, bootstrap.BACKUP_DIR)
    path = posixpath.join(base, bootstrap.BACKUP_SERVER_CONF)
    if fetch_one(conn, "SELECT (pg_catalog.pg_stat_file(%s, true)).size", (path,)) is None:
        return False
    wanted = bootstrap.render_server_conf(
        base=Path(base), tls=Path(_beside_data(conn, bootstrap.TLS_DIR)), address=address,
        stanza=stanza, peers=peers)
    if fetch_one(conn, "SELECT pg_catalog.pg_read_file(%s)", (path,)) == wanted:
        return True
    write_private_server_file(conn, path, wanted.rstrip("\n").split("\n"))
    pidfile = posixpath.join(base, bootstrap.BACKUP_SERVER_PID)
    # The pid must still be this node's server (pids are recycled).
    reload = (f"pid=$(cat {shlex.quote(pidfile)}) && "
              f"grep -qF {shlex.quote(path)} /proc/$pid/cmdline && kill -HUP $pid || true")
    run_program(conn, reload)
    return True


@dataclass(frozen=True)
class StandbySource:
    """Where pgBackRest on the primary finds the standby."""

    address: str
    data_dir: str
    socket_dir: str
    port: int


def locate(conn: Connection, address: str) -> StandbySource:
    """The standby's paths, asked of the standby itself (`conn`)."""
    sockets = str(fetch_one(conn, "SELECT pg_catalog.current_setting('unix_socket_directories')"))
    return StandbySource(
        address=address,
        data_dir=str(fetch_one(conn, "SELECT pg_catalog.current_setting('data_directory')")),
        socket_dir=sockets.split(",")[0].strip(),
        port=int(str(fetch_one(conn, "SELECT pg_catalog.current_setting('port')"))))


def backup_options(primary: Connection, standby: StandbySource) -> list[str]:
    """pgBackRest's options for a backup run on the primary from `standby`: the primary
    authenticates with its own node certificate and verifies the standby's by the
    instance's CA and the standby's address."""
    tls = _beside_data(primary, bootstrap.TLS_DIR)
    config = posixpath.join(posixpath.dirname(standby.data_dir), bootstrap.BACKUP_DIR,
                            bootstrap.BACKUP_CONF)
    return ["--backup-standby", f"--pg2-host={standby.address}", "--pg2-host-type=tls",
            f"--pg2-host-port={bootstrap.BACKUP_SERVER_PORT}",
            f"--pg2-host-ca-file={posixpath.join(tls, bootstrap.TLS_CA_FILE)}",
            f"--pg2-host-cert-file={posixpath.join(tls, bootstrap.TLS_CERT_FILE)}",
            f"--pg2-host-key-file={posixpath.join(tls, bootstrap.TLS_KEY_FILE)}",
            # The standby's own configuration, for its remote (logs, locks, its PGPASSFILE
            # comes from the server's environment).
            f"--pg2-host-config={config}", f"--pg2-path={standby.data_dir}",
            f"--pg2-port={standby.port}", f"--pg2-socket-path={standby.socket_dir}",
            f"--pg2-user={bootstrap.ADMIN_USER}"]
