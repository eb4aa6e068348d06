"""Settings from the environment: one frozen object built once at start.

Every variable is documented in the README; a bad value stops the broker with a
message that names the variable (never a stack trace). The process entry points
(`serve`, `web`, `worker`) read nothing from the environment but these settings;
the cloud drivers validate their own variables the same way when they are built.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CATALOG = ROOT / "catalog.yml"
DEFAULT_STATE_DIR = Path("/var/lib/pgha-broker")


@dataclass(frozen=True)
class MonitorSettings:
    """How the monitor decides that a node is dead."""

    check_interval: float = 1.0
    connect_timeout: float = 1.0
    failures_before_acting: int = 3
    min_seconds_between_failovers: float = 60.0
    maximum_lag_on_failover: int = 1024 * 1024
    lease_seconds: float = 5.0


@dataclass(frozen=True)
class TlsSettings:
    """Node certificates: how long they last, and how early they are renewed."""

    cert_days: float = 365.0
    renew_days: float = 30.0


@dataclass(frozen=True)
class ObservabilitySettings:
    """Where metrics and status pages are served."""

    metrics_port: int | None = None       # a worker's own /metrics endpoint; None: none
    metrics_listen: str = "127.0.0.1"
    external_url: str | None = None       # the broker's URL as browsers reach it


@dataclass(frozen=True)
class ServerSettings:
    """How `serve` and `web` listen and how many requests they handle at once."""

    listen: str | None = None      # None: 127.0.0.1 for `serve`, every address for `web`
    web_workers: int = 2           # gunicorn worker processes (WEB_CONCURRENCY)
    web_threads: int = 4           # threads per gunicorn worker
    serve_threads: int = 8
    serve_timeout: float = 10.0    # seconds a `serve` client has to send its request


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOCAL_HOSTS = "az1:az1-host-a,az1-host-b;az2:az2-host-a,az2-host-b"
HostMap = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class OperationSettings:
    """How many operations of each class one worker process runs at once: a host loss
    with many primaries queues many failovers; the rest wait for a free slot."""

    max_failovers: int = 16        # failover, switchover, resurrect (default_max_failovers)
    max_rebuilds: int = 2          # standby rebuilds (a base backup each)


def default_max_failovers(cloud: str) -> int:
    """How many failovers one worker runs at once unless BROKER_MAX_FAILOVERS says.

    - OpenStack: 16. A hypervisor often carries more than 8 primaries, and there a
      failover mostly waits for the cloud's API (a server stop, a port move: seconds
      each), so running them side by side costs little; with 8, a dead host's 9th and
      10th waited a whole failover for a slot. 16 still bounds the burst.
    - local: 4. Every step runs on this machine's CPU, beside the servers themselves,
      and many at once were slower than a few at a time. Measured 2026-12-02 on 2 cores, 20
      instances with 10 primaries on a dead host, first write p50 / p95: 16 at once
      6.27 / 8.23 s, 4 at once 3.68 / 5.29 s and 4.54 / 6.22 s, 2 at once 3.77 / 5.25 s."""
    return 16 if cloud == "openstack" else 4


@dataclass(frozen=True)
class S3Settings:
    """Backup repositories in S3-compatible object storage (Swift's S3 API, Ceph RGW)."""

    endpoint: str                # host name or address, TLS verified
    port: int
    bucket: str
    region: str
    uri_style: str               # "host" or "path"
    key: str = field(repr=False)
    secret: str = field(repr=False)
    ca_pem: str = ""             # the CA the endpoint's certificate is verified with
    prefix: str = "/pgha"        # each instance's repository is <prefix>/<stanza>


@dataclass(frozen=True)
class S3Access:
    """Object storage credentials and CA (BROKER_BACKUP_S3_KEY, _SECRET, _CA_FILE): from
    the environment only, for every plan's repositories."""

    key: str = field(repr=False)
    secret: str = field(repr=False)
    ca_pem: str = ""


@dataclass(frozen=True)
class Settings:
    username: str
    password: str
    port: int
    state_dir: Path
    database_url: str
    cloud: str
    catalog_path: Path
    encryption_key: str | None
    local_network: ipaddress.IPv4Network
    local_bridge: str
    local_pg_bin: str | None
    local_hosts: HostMap
    admin_cidr: str | None
    app_cidr: str | None
    log_level: str
    host_identity: str = ""       # the host this process names in its owner ids
    ca_cache_dir: Path = Path()   # where CA files for libpq are kept (private)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    operations: OperationSettings = field(default_factory=OperationSettings)
    backup_s3: S3Settings | None = None   # the environment's object storage, if any
    backup_s3_access: S3Access | None = None  # credentials, also for plans' own storage

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _database_url_from_vcap(vcap: str) -> str | None:
    """Find the broker's own database in VCAP_SERVICES: the service named or tagged
    `broker-state` first, else the only PostgreSQL one (by tag or label)."""
    try:
        services = json.loads(vcap)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"VCAP_SERVICES is not valid JSON: {exc.msg}") from None
    if not isinstance(services, dict) or not all(isinstance(v, list)
                                                 for v in services.values()):
        raise ConfigError("VCAP_SERVICES must map each offering to a list of services")
    entries = [e for es in services.values() for e in es if isinstance(e, dict)]
    named = [e for e in entries
             if e.get("name") == "broker-state" or "broker-state" in (e.get("tags") or [])]
    postgres = [e for e in entries if "postgresql" in (e.get("tags") or [])
                or "postgres" in str(e.get("label", ""))]
    if len(named) > 1 or (not named and len(postgres) > 1):
        raise ConfigError("VCAP_SERVICES holds several PostgreSQL services: name the "
                          "broker's own `broker-state` (or tag it so)")
    if not named and not postgres:
        return None
    chosen = (named or postgres)[0]
    uri = (chosen.get("credentials") or {}).get("uri")
    if not uri:
        raise ConfigError(f"VCAP_SERVICES: the service {chosen.get('name')!r} has no "
                          "credentials.uri to reach the state store")
    return _normalise_pg_url(str(uri))


def _normalise_pg_url(url: str) -> str:
    # SQLAlchemy does not accept the postgres:// scheme that many platforms hand out.
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://"):]
    return url


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _count(env: dict[str, str], name: str, default: int, maximum: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ConfigError(f"{name} must be a whole number from 1 to {maximum}, got {raw!r}")
    return int(raw)


def _listen(env: dict[str, str]) -> str | None:
    raw = (env.get("BROKER_LISTEN") or "").strip()
    if not raw:
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ConfigError(f"BROKER_LISTEN must be an IP address to listen on (e.g. 127.0.0.1, "
                          f"0.0.0.0 or ::), got {raw!r}") from None


def _port(env: dict[str, str]) -> int:
    raw = (env.get("PORT") or "8080").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"PORT must be a TCP port number (1 to 65535), got {raw!r}")
    return int(raw)


def host_identity(env: Mapping[str, str]) -> str:
    """BROKER_HOST_IDENTITY, else the host name: what owner ids name as their host.
    The one rule for it; broker.operations.queue makes owner ids with it."""
    raw = env.get("BROKER_HOST_IDENTITY") or socket.gethostname()
    if ":" in raw or raw.split() != [raw] or not raw.isprintable():
        raise ConfigError(f"BROKER_HOST_IDENTITY must be a host name (no ':' or spaces), "
                          f"got {raw!r}")
    return raw


def ca_cache_dir(env: Mapping[str, str]) -> Path:
    """Where the CA files libpq reads are kept: XDG_CACHE_HOME (absolute, as the XDG
    spec wants it), else ~/.cache."""
    raw = env.get("XDG_CACHE_HOME") or ""
    if raw and not raw.startswith("/"):
        raise ConfigError(f"XDG_CACHE_HOME must be an absolute path, got {raw!r}")
    base = Path(raw) if raw else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "pgha-broker" / "ca"


def _local_hosts(env: dict[str, str]) -> HostMap:
    """`az1:host-a,host-b;az2:host-c`: the local cloud's hypervisors by zone."""
    raw = (env.get("BROKER_LOCAL_HOSTS") or DEFAULT_LOCAL_HOSTS).strip()
    example = f"(e.g. {DEFAULT_LOCAL_HOSTS})"
    zones: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for part in raw.split(";"):
        zone, colon, names = part.strip().partition(":")
        hosts = tuple(h.strip() for h in names.split(","))
        if not colon or not _is_name(zone.strip()) or not all(_is_name(h) for h in hosts):
            raise ConfigError(f"BROKER_LOCAL_HOSTS must be zone:host,host;zone:host {example}, "
                              f"names of letters, digits, '-' and '_', got {raw!r}")
        for name in (zone.strip(), *hosts):
            if name in seen:
                raise ConfigError(f"BROKER_LOCAL_HOSTS names {name!r} twice, got {raw!r}")
            seen.add(name)
        zones.append((zone.strip(), hosts))
    return tuple(zones)


def _is_name(text: str) -> bool:
    return 1 <= len(text) <= 63 and text.replace("-", "").replace("_", "").isalnum() \
        and text.isascii()


def _log_level(env: dict[str, str]) -> str:
    level = (env.get("BROKER_LOG_LEVEL") or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"BROKER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
                          f"got {env.get('BROKER_LOG_LEVEL')!r}")
    return level


def _backup_s3_access(env: dict[str, str]) -> S3Access | None:
    """BROKER_BACKUP_S3_KEY and _SECRET (both or neither), and the CA file."""
    key, secret = env.get("BROKER_BACKUP_S3_KEY", ""), env.get("BROKER_BACKUP_S3_SECRET", "")
    if bool(key) != bool(secret):
        raise ConfigError("BROKER_BACKUP_S3_KEY and BROKER_BACKUP_S3_SECRET are set together")
    if not key:
        return None
    ca_pem = ""
    if env.get("BROKER_BACKUP_S3_CA_FILE"):
        try:
            ca_pem = Path(env["BROKER_BACKUP_S3_CA_FILE"]).read_text()
        except OSError as exc:
            raise ConfigError(f"BROKER_BACKUP_S3_CA_FILE cannot be read: {exc.strerror}") from None
    return S3Access(key=key, secret=secret, ca_pem=ca_pem)


def _backup_s3(env: dict[str, str]) -> S3Settings | None:
    """BROKER_BACKUP_S3_*: no endpoint, no S3 by default (plans may name their own); the
    endpoint set, every required one too."""
    def get(name: str, default: str = "") -> str:
        return env.get(f"BROKER_BACKUP_S3_{name}", default)

    if not get("ENDPOINT"):
        return None
    missing = [f"BROKER_BACKUP_S3_{n}" for n in ("BUCKET", "KEY", "SECRET") if not get(n)]
    if missing:
        raise ConfigError(f"BROKER_BACKUP_S3_ENDPOINT is set: {', '.join(missing)} must be too")
    endpoint = get("ENDPOINT")
    host, _, port_raw = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "443")
    if not port_raw.isdigit() or not 0 < int(port_raw) < 65536 or not host:
        raise ConfigError(f"BROKER_BACKUP_S3_ENDPOINT must be HOST or HOST:PORT, "
                          f"got {get('ENDPOINT')!r}")
    uri_style = get("URI_STYLE", "host")
    if uri_style not in ("host", "path"):
        raise ConfigError(f"BROKER_BACKUP_S3_URI_STYLE must be 'host' or 'path', got {uri_style!r}")
    access = _backup_s3_access(env)
    ca_pem = access.ca_pem if access is not None else ""
    prefix = "/" + get("PREFIX", "pgha").strip("/")
    return S3Settings(endpoint=host, port=int(port_raw), bucket=get("BUCKET"),
                      region=get("REGION", "us-east-1"), uri_style=uri_style, key=get("KEY"),
                      secret=get("SECRET"), ca_pem=ca_pem, prefix=prefix)


def load_settings(env: dict[str, str] | None = None, *, require_auth: bool = True) -> Settings:
    env = dict(os.environ if env is None else env)
    username = env.get("BROKER_USERNAME", "")
    password = env.get("BROKER_PASSWORD", "")
    if require_auth and (not username or not password):
        raise ConfigError(
            "BROKER_USERNAME and BROKER_PASSWORD must be set: the broker never runs "
            "without basic authentication. Example: BROKER_USERNAME=broker "
            "BROKER_PASSWORD=$(openssl rand -hex 16) python -m broker serve"
        )

    port = _port(env)

    state_dir = Path(env.get("BROKER_STATE_DIR") or DEFAULT_STATE_DIR)

    database_url = env.get("DATABASE_URL") or ""
    if not database_url and env.get("VCAP_SERVICES"):
        database_url = _database_url_from_vcap(env["VCAP_SERVICES"]) or ""
    store_configured = bool(database_url)
    database_url = _normalise_pg_url(database_url) if database_url else (
        f"sqlite:///{state_dir / 'broker.sqlite3'}"
    )

    cloud = env.get("BROKER_CLOUD", "local")
    if cloud not in ("local", "openstack"):
        raise ConfigError(f"BROKER_CLOUD must be 'local' or 'openstack', got {cloud!r}")

    net_raw = env.get("BROKER_LOCAL_NETWORK", "10.213.7.0/24")
    try:
        network = ipaddress.IPv4Network(net_raw, strict=True)
    except ValueError as exc:
        raise ConfigError(f"BROKER_LOCAL_NETWORK must be an IPv4 CIDR: {exc}") from None
    if not network.is_private or network.prefixlen > 28:
        raise ConfigError(
            "BROKER_LOCAL_NETWORK must be a private network of at least 16 addresses "
            f"(e.g. 10.213.7.0/24), got {net_raw}"
        )

    bridge = env.get("BROKER_LOCAL_BRIDGE", "pgha0")
    if not 1 <= len(bridge) <= 15:
        raise ConfigError("BROKER_LOCAL_BRIDGE must be 1 to 15 characters (a Linux interface name)")

    monitor = MonitorSettings(
        check_interval=_float(env, "BROKER_MONITOR_INTERVAL", 1.0),
        connect_timeout=_float(env, "BROKER_MONITOR_CONNECT_TIMEOUT", 1.0),
        failures_before_acting=_count(env, "BROKER_MONITOR_FAILURES", 3, 100),
        min_seconds_between_failovers=_float(env, "BROKER_MONITOR_MIN_FAILOVER_GAP", 60.0),
        maximum_lag_on_failover=_count(env, "BROKER_MAXIMUM_LAG_ON_FAILOVER", 1024 * 1024,
                                       2 ** 40),
        lease_seconds=_float(env, "BROKER_MONITOR_LEASE_SECONDS", 5.0),
    )

    observability = _observability(env)
    if env.get("VCAP_APPLICATION"):
        _cloud_foundry(env, store_configured)
    return Settings(
        username=username,
        password=password,
        port=port,
        state_dir=state_dir,
        database_url=database_url,
        cloud=cloud,
        catalog_path=Path(env.get("BROKER_CATALOG") or DEFAULT_CATALOG),
        encryption_key=env.get("BROKER_ENCRYPTION_KEY") or None,
        local_network=network,
        local_bridge=bridge,
        local_pg_bin=env.get("BROKER_PG_BIN") or None,
        local_hosts=_local_hosts(env),
        admin_cidr=env.get("BROKER_ADMIN_CIDR") or None,
        app_cidr=env.get("BROKER_APP_CIDR") or None,
        log_level=_log_level(env),
        host_identity=host_identity(env),
        ca_cache_dir=ca_cache_dir(env),
        monitor=monitor,
        tls=TlsSettings(cert_days=_float(env, "BROKER_TLS_CERT_DAYS", 365.0),
                        renew_days=_float(env, "BROKER_TLS_RENEW_DAYS", 30.0)),
        observability=observability,
        server=ServerSettings(
            listen=_listen(env),
            web_workers=_count(env, "WEB_CONCURRENCY", 2, 64),
            web_threads=_count(env, "BROKER_WEB_THREADS", 4, 256),
            serve_threads=_count(env, "BROKER_SERVE_THREADS", 8, 256),
            serve_timeout=_float(env, "BROKER_SERVE_TIMEOUT", 10.0),
        ),
        operations=OperationSettings(
            max_failovers=_count(env, "BROKER_MAX_FAILOVERS", default_max_failovers(cloud),
                                 256),
            max_rebuilds=_count(env, "BROKER_MAX_REBUILDS", 2, 256),
        ),
        backup_s3=_backup_s3(env),
        backup_s3_access=_backup_s3_access(env),
    )


def _cloud_foundry(env: dict[str, str], store_configured: bool) -> None:
    # Every container has its own disk: a SQLite store or a key made on first start
    # would give each process a broker of its own.
    if not store_configured:
        raise ConfigError("VCAP_SERVICES has no state store: bind a PostgreSQL service "
                          "named broker-state (or set DATABASE_URL)")
    if not env.get("BROKER_ENCRYPTION_KEY"):
        raise ConfigError("BROKER_ENCRYPTION_KEY must be set on Cloud Foundry: every "
                          "process must decrypt what the others stored")


def _observability(env: dict[str, str]) -> ObservabilitySettings:
    port_raw = env.get("BROKER_METRICS_PORT") or ""
    port = None
    if port_raw:
        if not port_raw.isdigit() or not 1 <= int(port_raw) <= 65535:
            raise ConfigError(f"BROKER_METRICS_PORT must be a port number, got {port_raw!r}")
        port = int(port_raw)
    listen = env.get("BROKER_METRICS_LISTEN") or "127.0.0.1"
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        raise ConfigError("BROKER_METRICS_LISTEN must be an IP address (e.g. 127.0.0.1), "
                          f"got {listen!r}") from None
    if port is not None and not (env.get("BROKER_USERNAME") and env.get("BROKER_PASSWORD")):
        raise ConfigError("BROKER_METRICS_PORT needs BROKER_USERNAME and BROKER_PASSWORD: the "
                          "metrics endpoint asks for the broker's basic auth")
    external = _external_url(env)
    return ObservabilitySettings(metrics_port=port, metrics_listen=listen, external_url=external)


def _external_url(env: dict[str, str]) -> str | None:
    """BROKER_EXTERNAL_URL, else the first route Cloud Foundry gave the app, else None."""
    raw = env.get("BROKER_EXTERNAL_URL") or ""
    if raw:
        parsed = urlsplit(raw)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query \
                or parsed.fragment:
            raise ConfigError("BROKER_EXTERNAL_URL must be an http(s) URL without query "
                              f"(e.g. https://pgha-broker.example.com), got {raw!r}")
        return raw.rstrip("/")
    vcap = env.get("VCAP_APPLICATION") or ""
    if not vcap:
        return None
    try:
        uris = json.loads(vcap).get("application_uris") or []
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError("VCAP_APPLICATION is not a JSON object") from None
    return f"https://{uris[0]}" if uris and isinstance(uris[0], str) else None
