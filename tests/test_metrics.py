"""Metrics without a cloud behind them: the worker's own endpoint and its auth, cloud API
errors counted by call (real openstacksdk against the OpenStack fake), the example
alert rules (promtool) naming only metrics the broker exposes, and their settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from broker.cloud.openstack import OpenStackCloud
from broker.config import ConfigError, load_settings
from broker.metrics import instruments
from broker.metrics.endpoint import serve_metrics
from harness.machine import free_port
from tests.fakes.openstack import FakeOpenStack
from tests.support.api import PASSWORD, USERNAME, broker_env, make_runtime
from tests.support.scrape import parse, scrape, value

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"


@pytest.fixture
def worker_metrics() -> Iterator[str]:
    stop = threading.Event()
    port = free_port()
    serve_metrics("127.0.0.1", port, USERNAME, PASSWORD, stop)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()


def test_worker_endpoint_needs_the_broker_credentials(worker_metrics: str) -> None:
    url = f"{worker_metrics}/metrics"
    assert requests.get(url, timeout=5).status_code == 401
    refused = requests.get(url, auth=(USERNAME, "wrong"), timeout=5)
    assert refused.status_code == 401 and "pgha_" not in refused.text
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, headers={"Authorization": "Basic !!"}, timeout=5).status_code == 401
    assert requests.get(f"{worker_metrics}/other", auth=(USERNAME, PASSWORD),
                        timeout=5).status_code == 404
    samples = scrape(url)
    assert value(samples, "pgha_monitor_instances_held") is not None
    assert value(samples, "pgha_monitor_oldest_check_age_seconds") is not None


def test_cloud_api_errors_are_counted_by_call(worker_metrics: str,
                                              fake_openstack: FakeOpenStack,
                                              openstack_cloud: OpenStackCloud) -> None:
    before = value(scrape(f"{worker_metrics}/metrics"), "pgha_cloud_api_errors_total",
                   call="reading server") or 0.0
    # Two 503s (retried), then the real answer: the server does not exist.
    fake_openstack.fail("GET", r"/servers/0c6f1b43-no-such-server", status=503, times=2)
    assert openstack_cloud.get_server("0c6f1b43-no-such-server") is None
    samples = scrape(f"{worker_metrics}/metrics")
    assert value(samples, "pgha_cloud_api_errors_total", call="reading server") == before + 2
    # Server ids never become label values: one series per kind of call.
    assert not any("0c6f1b43" in str(labels) for _, labels in samples)


def test_cloud_call_names_leave_resource_names_out() -> None:
    assert instruments.call_name("deleting server pgha-1f2e-3") == "deleting server"
    assert instruments.call_name("detaching port pgha-x from server 9b1c") == "detaching port"
    assert instruments.call_name("listing servers") == "listing servers"
    assert instruments.call_name("creating service port pgha-a-svc") == "creating service port"


def _exposed_names(tmp_path: Path) -> set[str]:
    """Every sample name the broker's endpoints can expose (web's and a worker's)."""
    from broker.api.app import create_app

    runtime = make_runtime(broker_env(f"sqlite:///{tmp_path / 's.db'}", tmp_path))
    app = create_app(runtime, process_metrics=True)
    response = app.test_client().get("/metrics", auth=(USERNAME, PASSWORD))
    runtime.store.dispose()
    assert response.status_code == 200
    names: set[str] = set()
    for kind_name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", response.text, re.M):
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        names.update(kind_name + suffix for suffix in suffixes)
    return names


def test_alert_rules_pass_promtool_and_name_only_exposed_metrics(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs it (apt package prometheus)"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"PgHaPrimaryDown", "PgHaFailoverFailed",
                                           "PgHaStandbyMissing", "PgHaReplicationLagHigh",
                                           "PgHaMonitorBehind"}
    used = {name for r in rules for name in re.findall(r"\bpgha_\w+", r["expr"])}
    assert used <= _exposed_names(tmp_path), used - _exposed_names(tmp_path)


@pytest.mark.parametrize(("variable", "raw"), [
    ("BROKER_METRICS_PORT", "http"), ("BROKER_METRICS_PORT", "70000"),
    ("BROKER_METRICS_LISTEN", "localhost:9"), ("BROKER_EXTERNAL_URL", "ftp://x"),
    ("BROKER_EXTERNAL_URL", "https://broker.example.com/?a=1"),
    ("VCAP_APPLICATION", "[not an object"),
])
def test_bad_observability_settings_stop_with_their_name(variable: str, raw: str) -> None:
    env = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", variable: raw}
    with pytest.raises(ConfigError, match=variable):
        load_settings(env)


def test_worker_metrics_never_served_without_credentials() -> None:
    with pytest.raises(ConfigError, match="BROKER_METRICS_PORT needs BROKER_USERNAME"):
        load_settings({"BROKER_METRICS_PORT": "9187"}, require_auth=False)


def test_dashboard_base_defaults_to_the_apps_cloud_foundry_route() -> None:
    env = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p",
           "DATABASE_URL": "postgresql://u:p@db.example/state", "BROKER_ENCRYPTION_KEY": "k",
           "VCAP_APPLICATION": '{"application_uris": ["pgha-broker.apps.example.com"]}'}
    assert load_settings(env).observability.external_url == \
        "https://pgha-broker.apps.example.com"
    env["BROKER_EXTERNAL_URL"] = "https://status.example.com/"
    assert load_settings(env).observability.external_url == "https://status.example.com"


def test_a_scrape_without_the_state_store_says_so(tmp_path: Path) -> None:
    from broker.api.app import create_app

    home = tmp_path / "store"
    runtime = make_runtime(broker_env(f"sqlite:///{home / 's.db'}", home))
    client = create_app(runtime).test_client()
    up = parse(client.get("/metrics", auth=(USERNAME, PASSWORD)).get_data(as_text=True))
    assert value(up, "pgha_state_store_up") == 1
    runtime.store.dispose()
    home.rename(tmp_path / "gone")  # the database file can no longer be opened
    answer = client.get("/metrics", auth=(USERNAME, PASSWORD))
    assert answer.status_code == 200
    down = parse(answer.get_data(as_text=True))
    assert value(down, "pgha_state_store_up") == 0
    assert value(down, "pgha_instances", plan="ha-sync", state="ready") is None
    runtime.store.dispose()
