"""Settings from the environment: one frozen object built once at start.

Every variable is documented in the README; a bad value stops the broker with a
message that names the variable (never a stack trace).
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


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
    admin_cidr: str | None
    app_cidr: str | None
    log_level: str
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    backup_s3: S3Settings | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _database_url_from_vcap(vcap: str) -> str | None:
    """Find the broker's own database in VCAP_SERVICES (by tag, label or name)."""
    try:
        services = json.loads(vcap)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"VCAP_SERVICES is not valid JSON: {exc.msg}") from None
    for entries in services.values():
        for entry in entries:
            tags = set(entry.get("tags") or [])
            label = str(entry.get("label", ""))
            name = str(entry.get("name", ""))
            if "broker-state" in tags or name == "broker-state" or (
                "postgresql" in tags or "postgres" in label
            ):
                uri = (entry.get("credentials") or {}).get("uri")
                if uri:
                    return _normalise_pg_url(str(uri))
    return None


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


def _backup_s3(env: dict[str, str]) -> S3Settings | None:
    """BROKER_BACKUP_S3_*: none set, no S3; the endpoint set, every required one too."""
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
    ca_pem = ""
    if get("CA_FILE"):
        try:
            ca_pem = Path(get("CA_FILE")).read_text()
        except OSError as exc:
            raise ConfigError(f"BROKER_BACKUP_S3_CA_FILE cannot be read: {exc.strerror}") from None
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

    port_raw = env.get("PORT", "8080")
    try:
        port = int(port_raw)
    except ValueError:
        raise ConfigError(f"PORT must be an integer, got {port_raw!r}") from None

    state_dir = Path(env.get("BROKER_STATE_DIR") or DEFAULT_STATE_DIR)

    database_url = env.get("DATABASE_URL") or ""
    if not database_url and env.get("VCAP_SERVICES"):
        database_url = _database_url_from_vcap(env["VCAP_SERVICES"]) or ""
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
        failures_before_acting=int(_float(env, "BROKER_MONITOR_FAILURES", 3)),
        min_seconds_between_failovers=_float(env, "BROKER_MONITOR_MIN_FAILOVER_GAP", 60.0),
        maximum_lag_on_failover=int(_float(env, "BROKER_MAXIMUM_LAG_ON_FAILOVER", 1024 * 1024)),
        lease_seconds=_float(env, "BROKER_MONITOR_LEASE_SECONDS", 5.0),
    )

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
        admin_cidr=env.get("BROKER_ADMIN_CIDR") or None,
        app_cidr=env.get("BROKER_APP_CIDR") or None,
        log_level=env.get("BROKER_LOG_LEVEL", "INFO").upper(),
        monitor=monitor,
        tls=TlsSettings(cert_days=_float(env, "BROKER_TLS_CERT_DAYS", 365.0),
                        renew_days=_float(env, "BROKER_TLS_RENEW_DAYS", 30.0)),
        backup_s3=_backup_s3(env),
    )
