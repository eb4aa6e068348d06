"""Guest bootstrap: what every server runs once at boot to become a PostgreSQL node.

The SAME code runs in both clouds:
- `openstack`: cloud-init user-data writes this file and the node's JSON config and
  runs `python3 bootstrap.py /etc/pgha/guest.json` (as root, like cloud-init).
- `local`: the driver runs it inside the server's network namespace.

It uses only the standard library and PostgreSQL's own binaries, because a guest
image has python3 and PostgreSQL but none of the broker's packages.

What it does, every step idempotent (running it twice, or after a crash, is safe):
As root, only on paths root alone controls:
1. (OpenStack) format the data volume if it has no filesystem, mount it. Run the NIC
   agent (nic_agent.py beside this file): policy routing, and the service address
   when the service port is plugged here.
2. Give the volume's root (the mount point) and the socket directory to the
   unprivileged PostgreSQL user, mode 0700.
Then in a child that dropped every privilege (no groups, the user's uid and gid),
because PostgreSQL's user owns everything below, and a link it planted there would
make root write and chown any file:
3. primary: initdb; standby: pg_basebackup from the primary through its slot. Both
   build into `<data_dir>.partial`, pg_hba.conf included, and rename it when complete,
   so a crash never leaves a half-made cluster that looks whole.
4. Write the node's TLS files (only when newer than those on disk) and our settings
   (an included `pgha.conf`). pg_hba.conf is written only with a new cluster: later
   the broker keeps it current (the peers in this config are those of the first
   boot, and a reboot must not admit a node that left since).
5. Remove a postmaster.pid left by a killed server, start PostgreSQL. With a backup
   repository: pgBackRest's configuration beside the data directory and, on a
   primary, its stanza first (before the archiver pushes anything); a primary
   restored from another instance's backups (`restore_from`) is made by `pgbackrest
   restore` instead of initdb and waits here until its recovery reached the target.
6. A node of an HA instance (`backup_peers`) with TLS files runs pgBackRest's TLS server
   (`pgbackrest server`) on its management address, supervised (restarted when it
   exits), as the PostgreSQL user: the instance's other node takes backups from this
   one through it when this one is the standby. Peers authenticate with their node
   certificate (the instance's CA, their CN admitted for the instance's stanza only).
Every file is written whole beside its target and renamed over it, so a link in its
place is replaced, never followed.

It never prints a secret: passwords reach PostgreSQL through 0600 files only
(never a command line, which `ps` shows).

Usage: python3 bootstrap.py CONFIG.json
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import locale
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ADMIN_USER = "postgres"
REPLICATION_USER = "pgha_replicator"
APP_OWNER = "app_owner"
READ_ONLY_GROUP = "app_reader"
CONF_FILE = "pgha.conf"
INCLUDE_LINE = f"include_if_exists = '{CONF_FILE}'"
# Settings a base backup copies from the primary's postgresql.auto.conf that must not
# survive on a new standby (a copied synchronous_standby_names makes it wait for itself
# once promoted, and every write hangs).
STANDBY_UNSAFE_AUTO_SETTINGS = ("synchronous_standby_names", "primary_conninfo",
                                "primary_slot_name",
                                # TLS switched on by the broker on a node made before TLS:
                                # it names that node's own files.
                                "ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file",
                                "ssl_min_protocol_version")
# TLS files, in a directory beside the data directory (never in a base backup).
TLS_DIR = "tls"
TLS_CA_FILE = "ca.crt"
TLS_CERT_FILE = "server.crt"
TLS_KEY_FILE = "server.key"
TLS_ISSUED_FILE = "issued_at"  # the issue number of the files beside it
# A node bootstrapped before TLS has no such directory, and PostgreSQL (which writes
# the files when the broker rotates certificates) cannot make one: its files then
# live in the data directory under this prefix.
LEGACY_TLS_PREFIX = "pgha-tls-"
NIC_AGENT = "nic_agent.py"
NETWORK_FIELDS = ("management_address", "service_mac", "service_address",
                  "service_prefix_length", "service_gateway", "service_mtu")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


@dataclass(frozen=True)
class GuestConfig:
    """What one node must become. Produced by the broker, serialised to JSON."""

    instance_id: str
    node_id: str
    role: str                          # "primary" | "standby"
    admin_password: str                # superuser `postgres`, for the broker only
    replication_password: str          # role `pgha_replicator`
    replication: str = "none"          # none | async | sync (the plan's mode)
    application_name: str = ""         # this node's name as a standby
    primary_address: str | None = None  # standby: where to take the base backup
    slot_name: str | None = None       # standby: its slot on the primary
    port: int = 5432
    database: str = "appdb"
    # pg_hba inputs: who may connect as what.
    admin_cidrs: tuple[str, ...] = ()  # the broker's addresses
    peer_addresses: tuple[str, ...] = ()  # the instance's other nodes (replication)
    app_cidrs: tuple[str, ...] = ()    # where apps come from (the service address)
    settings: dict[str, str] = field(default_factory=dict)  # extra postgresql.conf lines
    # Placement, filled in by the cloud driver.
    data_dir: str = "/var/lib/pgha/data"
    volume_device: str | None = None   # openstack: format and mount this device
    # The broker created the volume for this node (provision, rebuild): only then may a
    # volume with no filesystem be formatted. A resurrected node's volume holds data.
    volume_is_new: bool = False
    mount_point: str = "/var/lib/pgha"
    socket_dir: str = "/var/run/postgresql"
    pg_bin: str = "/usr/lib/postgresql/15/bin"
    run_as: str = "postgres"
    log_file: str | None = None
    # TLS (PEM), empty on configs made before TLS; tls_issued_at orders the material.
    tls_ca_cert: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_issued_at: int = 0
    # The network, configured by the guest's NIC agent (nic_agent.py, shipped beside
    # this file): the service port's NIC is recognised by its MAC when it appears.
    management_address: str = ""
    service_mac: str = ""
    service_address: str = ""
    service_prefix_length: int = 0
    service_gateway: str = ""
    service_mtu: int = 0
    # Continuous archiving with pgBackRest (none without both): the instance's stanza,
    # and its repository's options (e.g. {"repo1-path": ...}) filled in by the cloud.
    backup_stanza: str = ""
    backup_repo: dict[str, str] = field(default_factory=dict)
    backup_repo_ca: str = ""           # PEM: the CA object storage's certificate is verified with
    archive_timeout_s: int = 60
    # A primary made from another instance's backups: {"stanza": ..., "target": a time
    # or "" for the end of its archive, "set": the backup to start from, and the
    # repository's options}.
    restore_from: dict[str, str] = field(default_factory=dict)
    # HA: the instance's other nodes (ids), whose node certificates may reach this
    # node's pgBackRest TLS server; the broker keeps the list current afterwards.
    backup_peers: tuple[str, ...] = ()
    backup_server: bool = False        # run that server (an instance with a standby)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GuestConfig:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("admin_cidrs", "peer_addresses", "app_cidrs", "backup_peers"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class BootstrapError(Exception):
    """A step failed; the message is plain and carries no secret."""


# --- pg_hba.conf: the ONE implementation (broker.pg.hba.render_hba calls it) -------------

def _cidr(address: str) -> str:
    """'10.0.0.5' → '10.0.0.5/32'; a CIDR is normalised; anything else is refused."""
    try:
        return str(ipaddress.ip_network(address.strip(), strict=False))
    except ValueError:
        raise BootstrapError(f"not an IP address or CIDR: {address!r}") from None


def render_hba(*, admin_cidrs: list[str] | tuple[str, ...],
               peer_addresses: list[str] | tuple[str, ...],
               app_cidrs: list[str] | tuple[str, ...], database: str = "appdb",
               tls: bool = True) -> list[str]:
    """pg_hba.conf lines. First match wins and nothing else is allowed; with `tls` every
    line is `hostssl` (a node made before TLS has no certificate: `host`):
    - `postgres` by password only from the broker's addresses, and through the unix
      socket (pgBackRest's backups: the socket directory is the PostgreSQL user's alone;
      `pg_ctl -w` checks readiness without logging in);
    - replication only as pgha_replicator, only from the instance's nodes;
    - application roles (members of app_owner or pg_read_all_data; superusers are never
      "members" for pg_hba) only to the application database, only from app_cidrs."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise BootstrapError(f"unsupported database name {database!r}")
    row = "{:<7} {:<12} {:<20} {:<20} {}"
    host = "hostssl" if tls else "host"
    lines = ["# Written by pgha (guest bootstrap / broker). Changes here are overwritten."]
    # pgBackRest reaches its own node's server only through the unix socket; the socket
    # directory is the PostgreSQL user's alone (0700), and the password is required.
    lines.append(f"{'local':<7} {'all':<12} {ADMIN_USER:<20} {'':<20} scram-sha-256")
    lines += [row.format(host, "all", ADMIN_USER, _cidr(c), "scram-sha-256")
              for c in _unique(admin_cidrs)]
    lines += [row.format(host, "replication", REPLICATION_USER, _cidr(p), "scram-sha-256")
              for p in _unique(peer_addresses)]
    for group in (APP_OWNER, READ_ONLY_GROUP):
        lines += [row.format(host, database, "+" + group, _cidr(c), "scram-sha-256")
                  for c in _unique(app_cidrs)]
    return lines


def _unique(items: list[str] | tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(_cidr(i) for i in items))


# --- postgresql.conf ---------------------------------------------------------------------

def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def tls_settings(directory: str, prefix: str = "") -> dict[str, str]:
    """PostgreSQL's TLS settings for the files in `directory` (names after `prefix`)."""
    return {
        "ssl": "on",
        "ssl_cert_file": f"{directory}/{prefix}{TLS_CERT_FILE}",
        "ssl_key_file": f"{directory}/{prefix}{TLS_KEY_FILE}",
        "ssl_ca_file": f"{directory}/{prefix}{TLS_CA_FILE}",
        "ssl_min_protocol_version": "TLSv1.2",
    }


def render_conf(config: GuestConfig, *, passfile: str, tls_dir: str | None = None) -> str:
    """Our settings, included from postgresql.conf (later lines win; the plan's last).
    With `tls_dir` the server speaks TLS and the standby verifies its primary by it."""
    values: dict[str, object] = {
        "listen_addresses": "*",
        "port": config.port,
        "unix_socket_directories": config.socket_dir,
        "password_encryption": "scram-sha-256",
        "wal_level": "replica",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "hot_standby": True,
        "wal_keep_size": "128MB",
        "wal_log_hints": True,  # lets pg_rewind bring an old primary back later
        "max_slot_wal_keep_size": "2GB",  # a dead standby's slot never fills the disk
        "wal_receiver_status_interval": "1s",  # the primary sees a standby's lag promptly
        # A standby that answers probes but stopped receiving still shows as streaming
        # until the walsender times out, and every synchronous commit waits that long
        # before the monitor sees it and switches synchronous replication off (default
        # 60 s). 5 s: above the monitor's 3 s to call a node dead (interval 1 s x 3
        # failures), so that a standby that died is caught by the probes, and five
        # status intervals, so that a standby slow for a moment is not cut off. The
        # receiver's timeout matches it: a standby notices a vanished primary as soon.
        "wal_sender_timeout": "5s",
        "wal_receiver_timeout": "5s",
        # PostgreSQL 15 sleeps out this interval (5 s) between WAL retries, and a
        # promotion that lands in that sleep waits for it: keep it short.
        "wal_retrieve_retry_interval": "100ms",
    }
    if tls_dir:
        values.update(tls_settings(tls_dir))
    values.update(archive_settings(config))
    if config.role == "standby" and config.primary_address:
        conninfo = " ".join([
            f"host={config.primary_address}", f"port={config.port}",
            f"user={REPLICATION_USER}", f"passfile={passfile}",
            f"application_name={config.application_name or 'node_' + config.node_id}",
            "connect_timeout=2",
            *([f"sslmode=verify-full sslrootcert={tls_dir}/{TLS_CA_FILE}"] if tls_dir else []),
        ])
        values["primary_conninfo"] = conninfo
        if config.slot_name:
            values["primary_slot_name"] = config.slot_name
    for name, value in config.settings.items():
        if not _SETTING_NAME.match(name):
            raise BootstrapError(f"unsupported setting name {name!r}")
        values[name] = value
    lines = ["# Written by the pgha guest bootstrap at every boot. Do not edit."]
    lines += [f"{name} = {_conf_value(value)}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


# --- continuous archiving (pgBackRest) ------------------------------------------------------

BACKUP_DIR = "pgbackrest"  # beside the data directory: config, spool, locks, logs
BACKUP_CONF = "pgbackrest.conf"
BACKUP_PASSFILE = "pgpass"  # the superuser's password, for pgBackRest's backups
BACKUP_REPO_CA = "repository-ca.pem"
PGBACKREST = "/usr/bin/pgbackrest"
_REPO_OPTION = re.compile(r"^repo1-[a-z0-9-]+$")


def archives(config: GuestConfig) -> bool:
    return bool(config.backup_stanza and config.backup_repo)


def backup_dir(config: GuestConfig) -> Path:
    return Path(config.data_dir).parent / BACKUP_DIR


def pgbackrest_command(config: GuestConfig, *args: str) -> list[str]:
    return [PGBACKREST, f"--config={backup_dir(config) / BACKUP_CONF}",
            f"--stanza={config.backup_stanza}", *args]


def archive_settings(config: GuestConfig) -> dict[str, object]:
    """Every node archives through pgBackRest (asynchronous push: a slow repository
    never holds a commit up) and can fetch WAL from the repository (a standby catches
    up from it when the primary no longer has what it needs). Standbys do not archive
    (`archive_mode = on`); once promoted they archive their new timeline."""
    if not archives(config):
        return {}
    return {
        "archive_mode": "on",
        "archive_command": shlex.join(pgbackrest_command(config, "archive-push")) + " %p",
        "restore_command": shlex.join(pgbackrest_command(config, "archive-get")) + ' %f "%p"',
        "archive_timeout": f"{int(config.archive_timeout_s)}s",
    }


def render_backup_conf(config: GuestConfig) -> str:
    """pgBackRest's configuration: the repository, and everything it writes locally kept
    on the node's volume (its own spool, locks and logs: /tmp is shared in the local
    cloud)."""
    base = backup_dir(config)
    lines = ["# Written by the pgha guest bootstrap at every boot. Do not edit.", "[global]"]
    for name, value in sorted(config.backup_repo.items()):
        if not _REPO_OPTION.match(name) or "\n" in value:
            raise BootstrapError(f"unsupported repository option {name!r}")
        lines.append(f"{name}={value}")
    if config.backup_repo_ca:
        lines.append(f"repo1-storage-ca-file={base / BACKUP_REPO_CA}")
    lines += [f"spool-path={base / 'spool'}", f"lock-path={base / 'lock'}",
              f"log-path={base / 'log'}", "log-level-console=warn", "log-level-file=info",
              "archive-async=y", "compress-type=lz4", "start-fast=y",
              # Object storage answers each request after a round trip: several at once.
              f"process-max={4 if config.backup_repo.get('repo1-type') == 's3' else 1}",
              f"[{config.backup_stanza}]", f"pg1-path={config.data_dir}",
              f"pg1-port={config.port}", f"pg1-socket-path={config.socket_dir}",
              f"pg1-user={ADMIN_USER}"]
    return "\n".join(lines) + "\n"


def write_backup_conf(config: GuestConfig) -> None:
    if not archives(config):
        return
    base = backup_dir(config)
    for directory in (base, base / "spool", base / "lock", base / "log"):
        directory.mkdir(mode=0o700, exist_ok=True)
    if config.backup_repo_ca:
        _replace_file(base / BACKUP_REPO_CA, config.backup_repo_ca)
    _replace_file(base / BACKUP_CONF, render_backup_conf(config))
    _replace_file(base / BACKUP_PASSFILE, ":".join(
        ["*", "*", "*", ADMIN_USER, _pgpass_escape(config.admin_password)]) + "\n")


# --- pgBackRest's TLS server: backups taken from this node while it is the standby ---------

BACKUP_SERVER_CONF = "server.conf"
BACKUP_SERVER_PID = "server.pid"          # the running `pgbackrest server`
BACKUP_SUPERVISOR_PID = "supervisor.pid"  # what restarts it
BACKUP_SERVER_PORT = 8432                 # pgBackRest's default
SERVER_RESTART_DELAY = 1.0


def node_common_name(node_id: str) -> str:
    """The CN of a node's certificate (broker/pg/tls.py issues it): what a peer's
    pgBackRest TLS server admits."""
    return f"pgha node {node_id}"[:64]


def render_server_conf(*, base: Path, tls: Path, address: str, stanza: str,
                       peers: list[str] | tuple[str, ...]) -> str:
    """pgBackRest's TLS server: on the management address only, the node's certificate,
    and only the peers' certificates (the instance's CA, their CN) for the stanza."""
    if not address or not re.fullmatch(r"[A-Za-z0-9._-]+", stanza):
        raise BootstrapError("pgBackRest's server needs the management address and a stanza")
    lines = ["# Written by pgha (guest bootstrap / broker). Changes here are overwritten.",
             "[global]", f"log-path={base / 'log'}", f"lock-path={base / 'lock'}",
             "log-level-console=off", "log-level-file=info",
             f"tls-server-address={_cidr(address).split('/')[0]}",
             f"tls-server-port={BACKUP_SERVER_PORT}",
             f"tls-server-ca-file={tls / TLS_CA_FILE}",
             f"tls-server-cert-file={tls / TLS_CERT_FILE}",
             f"tls-server-key-file={tls / TLS_KEY_FILE}"]
    for peer in dict.fromkeys(peers):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", peer):
            raise BootstrapError(f"unsupported node id {peer!r}")
        lines.append(f"tls-server-auth={node_common_name(peer)}={stanza}")
    if not peers:
        # pgBackRest requires the option; the broker's CA never issues this CN.
        lines.append(f"tls-server-auth=pgha no peer={stanza}")
    return "\n".join(lines) + "\n"


def _live_pid(path: Path, *, marker: str = "", cwd: Path | None = None) -> int | None:
    """The pid in `path` when that process runs, its command line holds `marker` and it
    works in `cwd` (pids are shared by every namespace of a host, and recycled)."""
    try:
        pid = int(_read_file(path).strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        where = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    if marker not in argv or (cwd is not None and where != str(cwd)):
        return None
    return pid


def start_backup_server(config: GuestConfig, tls: Path | None) -> None:
    """Write the server's configuration and make sure its supervisor runs (a reboot
    starts it again; a supervisor still running reloads the server's configuration)."""
    if not (config.backup_server and archives(config) and tls is not None):
        return
    base = backup_dir(config)
    _replace_file(base / BACKUP_SERVER_CONF, render_server_conf(
        base=base, tls=tls, address=config.management_address,
        stanza=config.backup_stanza, peers=config.backup_peers))
    if _live_pid(base / BACKUP_SUPERVISOR_PID, cwd=base) is not None:
        server = _live_pid(base / BACKUP_SERVER_PID, marker=str(base / BACKUP_SERVER_CONF))
        if server is not None:
            os.kill(server, signal.SIGHUP)  # pgBackRest reloads its configuration
        return
    say("starting pgBackRest's TLS server")
    daemonize(base, lambda: supervise_backup_server(base))


def daemonize(workdir: Path, work: Callable[[], int]) -> None:
    """Run `work` in a detached grandchild (its own session, working in `workdir`, no
    descriptor of ours: a boot's output pipe or lock held open would block whoever
    waits on it), its pid in `workdir`/supervisor.pid. Forked, not executed: the
    PostgreSQL user may not be able to read this script or its interpreter's path."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    code = 1  # pragma: no cover - both children leave through os._exit
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir(workdir)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        _replace_file(workdir / BACKUP_SUPERVISOR_PID, f"{os.getpid()}\n")
        code = work()
    finally:
        os._exit(code)


def supervise_backup_server(base: Path) -> int:
    """Run `pgbackrest server` and start it again whenever it exits, until SIGTERM.
    Its connections' remotes reach PostgreSQL through the socket with the superuser's
    password file."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSFILE": str(base / BACKUP_PASSFILE),
           "HOME": pwd.getpwuid(os.getuid()).pw_dir}
    while not stopping:
        child = subprocess.Popen([PGBACKREST, f"--config={base / BACKUP_SERVER_CONF}", "server"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd="/", env=env)
        _replace_file(base / BACKUP_SERVER_PID, f"{child.pid}\n")
        child.wait()
        if not stopping:
            time.sleep(SERVER_RESTART_DELAY)
    return 0


# Written by pgBackRest's restore into postgresql.auto.conf: they name the source's
# repository and the target, and must not outlive the recovery (a standby copied later
# would stop at the old target).
RECOVERY_SETTINGS = ("restore_command", "recovery_target", "recovery_target_time",
                     "recovery_target_action", "recovery_target_inclusive",
                     "recovery_target_timeline", "recovery_target_lsn",
                     "recovery_target_name", "recovery_target_xid")
RESTORE_TIMEOUT = 3600.0
STANZA_ATTEMPTS = 10


def restore_primary(config: GuestConfig, runner: Runner, tls: Path | None) -> None:
    """A new cluster from the source instance's backups: pgBackRest picks the backup
    before the target and PostgreSQL replays the source's archive up to the target
    (every commit at or before it), then promotes to a timeline of its own."""
    source = config.restore_from
    partial = _fresh_target(config)
    write_backup_conf(config)
    repo = [f"--{name}={value}" for name, value in sorted(source.items())
            if _REPO_OPTION.match(name)]
    base = [PGBACKREST, f"--config={backup_dir(config) / BACKUP_CONF}",
            f"--stanza={source['stanza']}", *repo]
    fetch = shlex.join([*base, f"--pg1-path={config.data_dir}", "archive-get"]) + ' %f "%p"'
    target = source.get("target", "")
    kind = (["--type=time", f"--target={target}", "--target-action=promote"] if target
            else ["--type=default"])
    if source.get("set"):
        kind.append(f"--set={source['set']}")
    say(f"restoring from stanza {source['stanza']} ({target or 'end of its archive'})")
    runner.run([*base, f"--pg1-path={partial}", *kind,
                f"--recovery-option=restore_command={fetch}", "restore"],
               what="pgbackrest restore", timeout=RESTORE_TIMEOUT)
    _clean_auto_conf(partial / "postgresql.auto.conf")
    for copied in partial.glob(f"{LEGACY_TLS_PREFIX}*"):
        copied.unlink()  # the source's own TLS files: this node has its own
    (partial / "standby.signal").unlink(missing_ok=True)
    _finish_target(partial, config, tls)


def finish_restore(config: GuestConfig, runner: Runner) -> None:
    """Wait until the recovery of a restored cluster reached its target and promoted,
    then drop the recovery settings that named the source."""
    data = Path(config.data_dir)
    deadline = time.monotonic() + RESTORE_TIMEOUT
    while (data / "recovery.signal").exists():
        status = runner.run([runner.bin("pg_ctl"), "-D", str(data), "status"],
                            what="pg_ctl status", check=False)
        if status.returncode != 0:
            raise BootstrapError("the restored cluster stopped during its recovery: "
                                 + " | ".join(_tail_lines(_log_file(config))))
        if time.monotonic() > deadline:
            raise BootstrapError(f"recovery not finished after {RESTORE_TIMEOUT:.0f} s")
        time.sleep(0.2)
    auto = data / "postgresql.auto.conf"
    before = _read_file(auto) if auto.exists() else ""
    _clean_auto_conf(auto, RECOVERY_SETTINGS)
    if auto.exists() and _read_file(auto) != before:
        say("recovery finished: dropping its settings")
        runner.run([runner.bin("pg_ctl"), "-D", str(data), "reload"], what="pg_ctl reload")


def _tail_lines(path: Path, lines: int = 3) -> list[str]:
    try:
        return _read_file(path).strip().splitlines()[-lines:]
    except OSError:
        return []


def create_stanza(config: GuestConfig, runner: Runner) -> None:
    """A primary makes its stanza in the repository (nothing to do when it exists for
    this cluster), before PostgreSQL starts: once it runs, its archiver pushes at once
    (a restored primary's new timeline) to a stanza that would not exist yet, and the
    pgBackRest process pushing holds the lock stanza-create needs. Not fatal: a
    repository out of reach must not keep the database down; archiving then fails
    visibly (pg_stat_archiver) until it is back."""
    if not archives(config) or (Path(config.data_dir) / "standby.signal").exists():
        return
    for attempt in range(STANZA_ATTEMPTS):
        result = runner.run(pgbackrest_command(config, "--no-online", "stanza-create"),
                            what="pgbackrest stanza-create", timeout=120, check=False)
        if result.returncode == 0:
            return
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        # [050]: another pgBackRest process (a push left by the previous boot) holds
        # the stanza's lock; it lets go within seconds.
        if "[050]" not in tail or attempt == STANZA_ATTEMPTS - 1:
            say(f"warning: no stanza in the backup repository yet ({tail})")
            return
        time.sleep(2.0)


# --- processes -----------------------------------------------------------------------------

class Runner:
    """Runs PostgreSQL's binaries as the current (unprivileged) user."""

    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.user = pwd.getpwnam(config.run_as)

    def run(self, args: list[str], *, what: str, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        full_env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": self.user.pw_dir,
                    "USER": self.user.pw_name, **(env or {})}
        try:
            result = subprocess.run(args, capture_output=True, text=True, env=full_env,
                                    cwd="/", timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BootstrapError(f"{what}: no answer after {timeout:.0f} s") from None
        if check and result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise BootstrapError(f"{what} failed (exit {result.returncode}): "
                                 + " | ".join(tail))
        return result

    def bin(self, name: str) -> str:
        return str(Path(self.config.pg_bin) / name)


def say(message: str) -> None:
    print(f"pgha-bootstrap: {message}", flush=True)


def _replace_file(path: Path, text: str) -> None:
    """A 0600 file written whole beside `path`, then renamed over it: whatever was at
    `path` (a link included) is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def process_is_live_postgres(pid: int, data_dir: str) -> bool:
    """True when `pid` is a running (not zombie) process working in `data_dir`.

    PostgreSQL itself only checks that the pid exists, which a zombie or a recycled pid
    (namespaces share one pid space) also satisfies; then a restart fails for good."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        state = stat_line.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, IndexError):
        return False
    return os.path.realpath(cwd) == os.path.realpath(data_dir)


def _remove_stale_lock(lock: Path, data_dir: str) -> None:
    try:
        first = _read_file(lock).splitlines()[0].strip()
        pid = int(first)
    except PermissionError:
        # Another user's lock (a node that ran as a different user before): this
        # server's PostgreSQL runs as us, so that postmaster is not ours or is gone.
        # We own the directory, so we may remove it.
        say(f"removing {lock.name} left by another user")
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        return
    except (OSError, IndexError, ValueError):
        return
    if not process_is_live_postgres(pid, data_dir):
        say(f"removing stale {lock.name} (pid {pid} is gone)")
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


# --- as root: only paths root alone controls -------------------------------------------------

def _below(path: str, top: str) -> bool:
    path, top = os.path.normpath(path), os.path.normpath(top)
    return path != top and path.startswith(top.rstrip("/") + "/")


def check_placement(config: GuestConfig) -> None:
    """Everything the PostgreSQL user writes lies on the volume, below the mount point."""
    for what, path in (("data_dir", config.data_dir), ("log_file", config.log_file)):
        if path is not None and not _below(path, config.mount_point):
            raise BootstrapError(f"{what} {path} is not below mount_point "
                                 f"{config.mount_point}")


def _check_root_controlled(path: Path) -> None:
    """Every directory above `path` is root's and writable by nobody else (a sticky
    one like /tmp excepted), so no one but root can swap what `path` names."""
    for ancestor in [*Path(os.path.realpath(path.parent)).parents,
                     Path(os.path.realpath(path.parent))]:
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            continue  # made below by root itself
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid != 0 or (writable and not st.st_mode & stat.S_ISVTX):
            raise BootstrapError(f"{ancestor} (above {path}) is not root's alone; "
                                 "refusing to work there as root")


def _give_dir(path: Path, user: pwd.struct_passwd) -> None:
    """Make `path` a 0700 directory of the PostgreSQL user, never through a link."""
    _check_root_controlled(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, user.pw_uid, user.pw_gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def mount_volume(config: GuestConfig) -> None:
    """OpenStack: format the data volume on first boot only, mount it (at every boot:
    the bootstrap runs at every boot, so no fstab entry is needed)."""
    device = config.volume_device
    if not device:
        return
    deadline = time.monotonic() + 120
    while not Path(device).exists():  # a hot-attached volume can show up late
        if time.monotonic() > deadline:
            raise BootstrapError(f"data volume {device} did not appear within 120 s")
        time.sleep(1)
    # blkid -p reads the device itself (no cache): exit 0 with a type, a filesystem;
    # exit 2, no signature at all; anything else (4 usage, 8 ambiguous) is no answer.
    probe = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                           capture_output=True, text=True, check=False)
    if probe.returncode == 2:
        if not config.volume_is_new:
            raise BootstrapError(f"data volume {device} has no filesystem, and the broker did "
                                 "not create it new for this node: refusing to format it "
                                 "(it may hold the instance's data)")
        say(f"formatting {device} (ext4)")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pgha-data", device], check=True,
                       capture_output=True)
    elif probe.returncode != 0 or not probe.stdout.strip():
        raise BootstrapError(f"blkid -p {device} gave no answer (exit {probe.returncode}): "
                             f"{probe.stderr.strip()}; refusing to format or mount it")
    mount_point = os.path.realpath(config.mount_point)
    _check_root_controlled(Path(mount_point))
    Path(mount_point).mkdir(parents=True, exist_ok=True)
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    if not any(len(m.split()) > 1 and m.split()[1] == mount_point for m in mounts):
        say(f"mounting {device} on {mount_point}")
        subprocess.run(["mount", "-t", "ext4", device, mount_point], check=True,
                       capture_output=True)


def configure_network(config: GuestConfig) -> None:
    """The NIC agent beside this file: policy routing, and the service address when
    the service port is plugged here (a reboot keeps the port, not its configuration)."""
    if not (config.management_address or config.service_mac):
        return
    agent = Path(__file__).resolve().with_name(NIC_AGENT)
    result = subprocess.run([sys.executable, "-I", "-S", str(agent), "-"],
                            input=json.dumps({f: getattr(config, f) for f in NETWORK_FIELDS}),
                            capture_output=True, text=True, check=False, timeout=60)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise BootstrapError(f"the NIC agent failed: {result.stderr.strip()}")


def prepare_dirs(config: GuestConfig, user: pwd.struct_passwd) -> None:
    _give_dir(Path(config.mount_point), user)
    _give_dir(Path(config.socket_dir), user)


def run_as_user(user: pwd.struct_passwd, work: Callable[[], None]) -> int:
    """Run `work` in a child with the user's uid and gid and no other group; its exit
    code (0, or 1 after it reported its failure)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        code = 1
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            code = guarded(work)
        except BaseException as exc:  # nothing may escape a forked child
            print(f"pgha-bootstrap: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- as the PostgreSQL user: everything on the volume ----------------------------------------

def _has_cluster(data: Path) -> bool:
    return (data / "PG_VERSION").exists()


def _fresh_target(config: GuestConfig) -> Path:
    """An empty `<data_dir>.partial` for initdb/pg_basebackup (a crash's leftovers removed)."""
    data = Path(config.data_dir)
    if data.exists():
        if any(data.iterdir()):
            raise BootstrapError(f"{data} holds files but no PostgreSQL cluster (no "
                                 "PG_VERSION); refusing to touch it")
        data.rmdir()
    partial = data.with_name(data.name + ".partial")
    if partial.is_symlink():
        partial.unlink()
    elif partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(mode=0o700)
    return partial


def _finish_target(partial: Path, config: GuestConfig, tls: Path | None) -> None:
    _write_hba(partial / "pg_hba.conf", config, tls=tls is not None)
    partial.chmod(0o700)
    os.rename(partial, config.data_dir)


def _utf8_locale() -> str:
    """C.UTF-8 where the image has it (character classes work), plain C otherwise."""
    # Put back what was there: as the unprivileged user, an interpreter installed where
    # only root may read could not load the codec a changed locale asks for.
    previous = locale.setlocale(locale.LC_CTYPE)
    for name in ("C.UTF-8", "C.utf8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        locale.setlocale(locale.LC_CTYPE, previous)
        return name
    return "C"


def init_primary(config: GuestConfig, runner: Runner, tls: Path | None) -> None:
    partial = _fresh_target(config)
    pwfile = partial.parent / f".{partial.name}.pw"
    _replace_file(pwfile, config.admin_password + "\n")
    try:
        say("initdb")
        runner.run([runner.bin("initdb"), "-D", str(partial), "-U", ADMIN_USER,
                    f"--pwfile={pwfile}", "-A", "scram-sha-256", "--auth-local=peer",
                    "-E", "UTF8", f"--locale={_utf8_locale()}", "-N"],
                   what="initdb", timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    _finish_target(partial, config, tls)


def _passfile(config: GuestConfig) -> Path:
    # Beside the data directory, on the same volume: outlives restarts, never in a backup.
    return Path(config.data_dir).parent / "replication.pgpass"


def write_passfile(config: GuestConfig) -> Path:
    path = _passfile(config)
    line = ":".join(["*", "*", "*", REPLICATION_USER,
                     _pgpass_escape(config.replication_password)])
    _replace_file(path, line + "\n")
    return path


def tls_dir(config: GuestConfig) -> Path:
    return Path(config.data_dir).parent / TLS_DIR


def _issued_on_disk(directory: Path) -> int:
    try:
        return int((directory / TLS_ISSUED_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_tls(config: GuestConfig) -> Path | None:
    """The node's CA, certificate and key as 0600 files of the PostgreSQL user, beside
    the data directory; returns that directory, None when the node has no TLS files.

    Written only when the config's material is newer than the files': a reboot
    replays the first-boot config, while the broker may have rotated them since."""
    directory = tls_dir(config)
    if config.tls_cert and config.tls_key and config.tls_ca_cert \
            and config.tls_issued_at > _issued_on_disk(directory):
        directory.mkdir(mode=0o700, exist_ok=True)
        say("writing the TLS certificate")
        _replace_file(directory / TLS_CA_FILE, config.tls_ca_cert)
        _replace_file(directory / TLS_CERT_FILE, config.tls_cert)
        _replace_file(directory / TLS_KEY_FILE, config.tls_key)
        # The issue number last: it vouches for the files beside it.
        _replace_file(directory / TLS_ISSUED_FILE, f"{config.tls_issued_at}\n")
    if (directory / TLS_CERT_FILE).exists() and (directory / TLS_KEY_FILE).exists():
        return directory
    return None


def _legacy_tls(data: Path) -> bool:
    """TLS switched on by the broker in the data directory of a node made before TLS."""
    return (data / f"{LEGACY_TLS_PREFIX}{TLS_CERT_FILE}").exists()


def _forget_legacy_tls(data: Path) -> None:
    """This node now has its own TLS files beside the data directory (e.g. a server
    resurrected on the volume of a node made before TLS): the settings the broker put
    in postgresql.auto.conf for the old files would override ours."""
    if not _legacy_tls(data):
        return
    _clean_auto_conf(data / "postgresql.auto.conf", tuple(tls_settings("")))
    for legacy in data.glob(f"{LEGACY_TLS_PREFIX}*"):
        legacy.unlink()


def init_standby(config: GuestConfig, runner: Runner, tls: Path | None) -> None:
    if not config.primary_address:
        raise BootstrapError("a standby needs primary_address")
    passfile = write_passfile(config)
    partial = _fresh_target(config)
    args = [runner.bin("pg_basebackup"), "-h", config.primary_address,
            "-p", str(config.port), "-U", REPLICATION_USER, "-D", str(partial),
            "-c", "fast", "-X", "stream", "-w"]
    if config.slot_name:
        args += ["-S", config.slot_name]
    say(f"base backup from {config.primary_address}")
    env = {"PGPASSFILE": str(passfile), "PGCONNECT_TIMEOUT": "5",
           "PGAPPNAME": f"pgha_basebackup_{config.node_id}"}
    if tls is not None:
        env.update(PGSSLMODE="verify-full", PGSSLROOTCERT=str(tls / TLS_CA_FILE))
    runner.run(args, what="pg_basebackup", timeout=3600, env=env)
    _clean_auto_conf(partial / "postgresql.auto.conf")
    for copied in partial.glob(f"{LEGACY_TLS_PREFIX}*"):
        copied.unlink()  # the primary's own TLS files: this node has its own
    _replace_file(partial / "standby.signal", "")
    _finish_target(partial, config, tls)


def _clean_auto_conf(path: Path, names: tuple[str, ...] = STANDBY_UNSAFE_AUTO_SETTINGS) -> None:
    """Drop settings a new standby must not inherit from the primary (a copied
    synchronous_standby_names makes it wait for itself once promoted), or, with
    `names`, settings that files written since replace."""
    if not path.exists():
        return
    keep = [line for line in _read_file(path).splitlines()
            if line.split("=", 1)[0].strip() not in names]
    _replace_file(path, "\n".join(keep) + "\n")


def _write_hba(path: Path, config: GuestConfig, *, tls: bool) -> None:
    _replace_file(path, "\n".join(render_hba(
        admin_cidrs=config.admin_cidrs, peer_addresses=config.peer_addresses,
        app_cidrs=config.app_cidrs, database=config.database, tls=tls)) + "\n")


def write_config(config: GuestConfig, tls: Path | None) -> None:
    data = Path(config.data_dir)
    main_conf = data / "postgresql.conf"
    text = _read_file(main_conf)
    if INCLUDE_LINE not in text.splitlines():
        _replace_file(main_conf, text.rstrip("\n") + "\n\n" + INCLUDE_LINE + "\n")
    if config.role == "standby":
        write_passfile(config)  # the password may have been rotated
    if tls is not None:
        _forget_legacy_tls(data)
    _replace_file(data / CONF_FILE, render_conf(
        config, passfile=str(_passfile(config)), tls_dir=str(tls) if tls is not None else None))
    hba = data / "pg_hba.conf"
    if not _is_regular_file(hba):  # lost or made a link: our rules back, not its target
        _write_hba(hba, config, tls=tls is not None or _legacy_tls(data))


def _log_file(config: GuestConfig) -> Path:
    return Path(config.log_file or Path(config.data_dir).parent / "postgresql.log")


def start(config: GuestConfig, runner: Runner) -> None:
    data = config.data_dir
    _remove_stale_lock(Path(data) / "postmaster.pid", data)
    _remove_stale_lock(Path(config.socket_dir) / f".s.PGSQL.{config.port}.lock", data)
    status = runner.run([runner.bin("pg_ctl"), "-D", data, "status"], what="pg_ctl status",
                        check=False)
    if status.returncode == 0:
        say("PostgreSQL already running: reloading its configuration")
        runner.run([runner.bin("pg_ctl"), "-D", data, "reload"], what="pg_ctl reload")
        return
    log = _log_file(config)
    if log.is_symlink():  # pg_ctl would append to its target
        log.unlink()
    say("starting PostgreSQL")
    runner.run([runner.bin("pg_ctl"), "-D", data, "-w", "-t", "300", "-l", str(log), "start"],
               what="pg_ctl start", timeout=330)


def node_steps(config: GuestConfig) -> None:
    """Everything on the volume, as the PostgreSQL user."""
    runner = Runner(config)
    Path(config.data_dir).parent.mkdir(parents=True, exist_ok=True)
    # First: a new cluster's pg_hba and a standby's base backup depend on it.
    tls = write_tls(config)
    if not _has_cluster(Path(config.data_dir)):
        if config.role == "primary" and config.restore_from:
            restore_primary(config, runner, tls)
        elif config.role == "primary":
            init_primary(config, runner, tls)
        else:
            init_standby(config, runner, tls)
    # An existing cluster keeps its own role (standby.signal or not): a promoted standby
    # that reboots with its old "standby" config must stay a primary.
    write_config(config, tls)
    write_backup_conf(config)
    create_stanza(config, runner)
    start(config, runner)
    if config.restore_from:
        finish_restore(config, runner)
    start_backup_server(config, tls)
    say("ready")


def bootstrap(config: GuestConfig) -> int:
    """The steps above; the exit code (a failure is reported on stderr)."""
    if config.role not in ("primary", "standby"):
        raise BootstrapError(f"role must be primary or standby, got {config.role!r}")
    try:
        user = pwd.getpwnam(config.run_as)
    except KeyError:
        raise BootstrapError(f"no system user {config.run_as!r} to run PostgreSQL as") from None
    if not Path(config.pg_bin, "pg_ctl").exists():
        raise BootstrapError(f"PostgreSQL binaries not found in {config.pg_bin}")
    if user.pw_uid == 0:
        raise BootstrapError("PostgreSQL refuses to run as root: run_as names root")
    check_placement(config)
    if os.geteuid() != 0:
        if os.geteuid() != user.pw_uid:
            raise BootstrapError(f"run this as root or as {config.run_as}")
        node_steps(config)
        return 0
    mount_volume(config)
    configure_network(config)
    prepare_dirs(config, user)
    return run_as_user(user, lambda: node_steps(config))


def guarded(work: Callable[[], object]) -> int:
    """Run `work`; a failure becomes one plain line on stderr and exit code 1."""
    try:
        result = work()
    except (BootstrapError, OSError, subprocess.CalledProcessError) as exc:
        message = str(exc) if isinstance(exc, BootstrapError) else f"{type(exc).__name__}: {exc}"
        print(f"pgha-bootstrap: failed: {message}", file=sys.stderr, flush=True)
        return 1
    return result if isinstance(result, int) else 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bootstrap.py CONFIG.json", file=sys.stderr)
        return 2
    try:
        config = GuestConfig.from_json(Path(argv[0]).read_text())
    except (OSError, ValueError, TypeError) as exc:
        print(f"pgha-bootstrap: cannot read config {argv[0]}: {type(exc).__name__}",
              file=sys.stderr)
        return 2
    os.umask(0o077)
    return guarded(lambda: bootstrap(config))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
