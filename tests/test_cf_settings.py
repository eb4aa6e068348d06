"""Settings as Cloud Foundry hands them over, and the last variables that were read
outside the validated settings: the broker's own database found in VCAP_SERVICES (the
shapes Cloud Controller gives), a container refusing to start with a store or a key
of its own, whole numbers refused when given as fractions, the host identity and the
CA cache directory taken by the same rule at start and where they are used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, load_settings
from broker.operations.queue import OwnerId, new_owner_id
from broker.pg import tls

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": "/tmp/x"}
CF = {**AUTH, "VCAP_APPLICATION": json.dumps({"application_uris": ["broker.apps.test"]}),
      "BROKER_ENCRYPTION_KEY": "k"}


def _service(name: str, uri: str | None, tags: list[str], label: str) -> dict[str, Any]:
    credentials = {"uri": uri, "hostname": "db.test"} if uri else {"hostname": "db.test"}
    return {"name": name, "instance_name": name, "label": label, "tags": tags,
            "plan": "small", "credentials": credentials, "volume_mounts": []}


def _vcap(*services: dict[str, Any]) -> str:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for service in services:
        grouped.setdefault(service["label"], []).append(service)
    return json.dumps(grouped)


def test_the_state_store_bound_as_cloud_controller_renders_it() -> None:
    vcap = _vcap(_service("broker-state", "postgres://u:p@db.test:5432/state",
                          ["postgresql", "relational"], "postgresql"))
    settings = load_settings({**CF, "VCAP_SERVICES": vcap})
    assert settings.database_url == "postgresql://u:p@db.test:5432/state"


def test_the_service_named_broker_state_wins_over_other_postgresql_services() -> None:
    vcap = _vcap(_service("reporting", "postgres://r:r@other.test/reports", ["postgresql"],
                          "postgresql"),
                 _service("broker-state", "postgres://u:p@db.test/state", [], "user-provided"))
    assert load_settings({**CF, "VCAP_SERVICES": vcap}).database_url == \
        "postgresql://u:p@db.test/state"


@pytest.mark.parametrize(("services", "message"), [
    ([_service("a", "postgres://a@x/a", ["postgresql"], "postgresql"),
      _service("b", "postgres://b@x/b", ["postgresql"], "postgresql")],
     "several PostgreSQL services"),
    ([_service("broker-state", None, ["postgresql"], "postgresql")],
     "'broker-state' has no credentials.uri"),
    ([_service("logs", "syslog://x", [], "syslog")], "VCAP_SERVICES has no state store"),
])
def test_an_ambiguous_or_missing_state_store_is_refused(services: list[dict[str, Any]],
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings({**CF, "VCAP_SERVICES": _vcap(*services)})
    assert "VCAP_SERVICES" in str(caught.value)


def test_a_container_never_makes_its_own_store_or_key() -> None:
    vcap = _vcap(_service("broker-state", "postgres://u:p@db.test/state", [], "postgresql"))
    with pytest.raises(ConfigError, match="VCAP_SERVICES has no state store"):
        load_settings(CF)
    without_key = {k: v for k, v in CF.items() if k != "BROKER_ENCRYPTION_KEY"}
    with pytest.raises(ConfigError, match="BROKER_ENCRYPTION_KEY must be set"):
        load_settings({**without_key, "VCAP_SERVICES": vcap})
    # DATABASE_URL still overrides a binding; off Cloud Foundry SQLite stays the default.
    assert load_settings({**CF, "DATABASE_URL": "postgresql://d@db.test/d"}).database_url \
        == "postgresql://d@db.test/d"
    assert load_settings(AUTH).database_url.startswith("sqlite:///")


@pytest.mark.parametrize(("command", "name", "value"), [
    ("worker", "BROKER_MONITOR_FAILURES", "2.5"),
    ("worker", "BROKER_MONITOR_FAILURES", "0"),
    ("worker", "BROKER_MAXIMUM_LAG_ON_FAILOVER", "1.5"),
    ("worker", "XDG_CACHE_HOME", "relative/cache"),
    ("web", "XDG_CACHE_HOME", "~/.cache"),
    ("worker", "VCAP_SERVICES", "[]"),
])
def test_a_bad_value_stops_the_process_naming_the_variable(tmp_path: Path, command: str,
                                                           name: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", **AUTH, "BROKER_STATE_DIR": str(tmp_path),
           "BROKER_CLOUD": "openstack", name: value}
    out = subprocess.run([sys.executable, "-m", "broker", command], capture_output=True,
                         text=True, cwd=ROOT, check=False, timeout=60, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert name in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_whole_numbers_reach_the_monitor_settings() -> None:
    monitor = load_settings({**AUTH, "BROKER_MONITOR_FAILURES": "2",
                             "BROKER_MAXIMUM_LAG_ON_FAILOVER": "65536"}).monitor
    assert (monitor.failures_before_acting, monitor.maximum_lag_on_failover) == (2, 65536)


def test_owner_ids_name_the_host_the_settings_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_HOST_IDENTITY", "az2-host-9")
    settings = load_settings({**AUTH, "BROKER_HOST_IDENTITY": "az2-host-9"})
    assert settings.host_identity == "az2-host-9"
    owner = OwnerId.parse(new_owner_id("engine"))
    assert owner is not None and owner.host == settings.host_identity
    monkeypatch.delenv("BROKER_HOST_IDENTITY")
    assert load_settings(AUTH).host_identity == os.uname().nodename


def test_the_ca_files_go_where_the_settings_say(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    settings = load_settings({**AUTH, "XDG_CACHE_HOME": str(cache)})
    assert settings.ca_cache_dir == cache / "pgha-broker" / "ca"
    ca_pem = tls.new_ca("settings-test").cert_pem
    path = Path(tls.ca_file(ca_pem))
    assert path.parent == settings.ca_cache_dir and path.read_text() == ca_pem
    assert settings.ca_cache_dir.stat().st_mode & 0o077 == 0
    assert load_settings({**AUTH, "HOME": str(tmp_path)}).ca_cache_dir == \
        tmp_path / ".cache" / "pgha-broker" / "ca"
