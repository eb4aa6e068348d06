"""Observability end to end, as Cloud Foundry runs the broker: a real `web` (gunicorn,
two processes) and a real `worker` with its own metrics endpoint, an ha-sync instance
provisioned through the API on the local cloud, its primary killed. What an operator
scrapes and what a user's status page shows must follow: the instance ready with a
synchronous standby, the monitor probing it, then one failover succeeded with its
phases observed, the probes that saw the primary down, and the page's new nodes and
failover timings in a real headless Chromium; once the worker is killed, the instance
counts as unwatched."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import requests

from harness.env import failover_env
from harness.faults import kill_server
from harness.machine import free_port
from harness.waiting import eventually, settled
from harness.workflows import instance
from tests.support.api import PASSWORD, USERNAME, osb_headers
from tests.support.browser import dump_dom, screenshot
from tests.support.scrape import Samples, scrape, value
from tests.support.web import run_web

pytestmark = pytest.mark.e2e


def _provisioned(base: str, instance_id: str, service_id: str, plan_id: str) -> str:
    """PUT the instance, poll last_operation like Cloud Controller; its dashboard_url."""
    answer = requests.put(
        f"{base}/v2/service_instances/{instance_id}?accepts_incomplete=true",
        headers=osb_headers(), timeout=30,
        json={"service_id": service_id, "plan_id": plan_id, "organization_guid": "org",
              "space_guid": "space",
              "context": {"platform": "cloudfoundry", "instance_name": "orders-db"}})
    assert answer.status_code == 202, answer.text
    operation = answer.json()["operation"]

    def succeeded() -> bool:
        state = requests.get(f"{base}/v2/service_instances/{instance_id}/last_operation",
                             params={"operation": operation}, headers=osb_headers(),
                             timeout=30).json()["state"]
        assert state != "failed"
        return bool(state == "succeeded")

    eventually(succeeded, "the provision succeeded", timeout=240, interval=0.5)
    url: str = answer.json()["dashboard_url"]
    return url


def test_provision_and_failover_show_in_metrics_and_status_page(tmp_path: Path) -> None:
    with failover_env() as env:
        plan = env.runtime.catalog.plan_by_name("ha-sync")
        worker_port = free_port()
        env.start_worker("worker", BROKER_USERNAME=USERNAME, BROKER_PASSWORD=PASSWORD,
                         BROKER_METRICS_PORT=str(worker_port))
        web_env = env.worker_env(BROKER_USERNAME=USERNAME, BROKER_PASSWORD=PASSWORD)
        with run_web(web_env, env.base / "web.log") as base:
            web_metrics = f"{base}/metrics"
            worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
            eventually(lambda: requests.get(worker_metrics, timeout=10).status_code == 401,
                       "the worker's metrics endpoint up", timeout=60, interval=0.2)
            for url in (web_metrics, worker_metrics):
                assert requests.get(url, timeout=10).status_code == 401
                assert requests.get(url, auth=(USERNAME, "wrong"), timeout=10).status_code == 401
            before = scrape(web_metrics)
            assert value(before, "pgha_instances", plan="ha-sync", state="ready") == 0

            instance_id = "orders-db-1"
            dashboard = _provisioned(base, instance_id, plan.service_id, plan.id)
            assert dashboard.startswith(f"{base}/dashboard/{instance_id}/")
            ids = {"instance_id": instance_id, "plan": "ha-sync"}

            def healthy(samples: Samples) -> bool:
                return (value(samples, "pgha_instances", plan="ha-sync", state="ready") == 1
                        and value(samples, "pgha_instance_sync_standby", **ids) == 1
                        and value(samples, "pgha_instance_standbys_running", **ids) == 1
                        and value(samples, "pgha_instance_replication_lag_bytes", **ids)
                        is not None
                        and value(samples, "pgha_instances_unwatched") == 0
                        and value(samples, "pgha_workers_live") == 1)

            eventually(lambda: healthy(scrape(web_metrics)),
                       "web's metrics: ready, a synchronous standby, its lag", timeout=60)
            eventually(lambda: (value(scrape(worker_metrics), "pgha_monitor_probe_duration_"
                                      "seconds_count", role="primary", outcome="ok") or 0) > 0,
                       "the worker's monitor probing the primary", timeout=60)
            worker = scrape(worker_metrics)
            assert value(worker, "pgha_monitor_instances_held") == 1
            # (a probe may time out on a loaded machine: present, not necessarily 0)
            assert value(worker, "pgha_monitor_primary_failed_probes",
                         instance_id=instance_id) is not None
            assert value(scrape(web_metrics), "pgha_failovers_total", kind="failover",
                         outcome="succeeded") is None

            old = instance(env.runtime, instance_id).primary()
            assert old is not None and old.server_id is not None
            kill_server(env.cloud, old.server_id)
            eventually(lambda: settled(env, instance_id) and
                       instance(env.runtime, instance_id).primary().id != old.id,  # type: ignore[union-attr]
                       "the instance failed over, ready with a streaming standby", 180)

            after = scrape(web_metrics)
            assert value(after, "pgha_failovers_total", kind="failover",
                         outcome="succeeded") == 1
            for phase in ("fence", "port", "promote", "standby", "total"):
                assert value(after, "pgha_failover_phase_seconds_count", kind="failover",
                             phase=phase) == 1, phase
            total = value(after, "pgha_failover_phase_seconds_sum", kind="failover",
                          phase="total")
            assert total is not None and 0 < total < 60
            assert value(after, "pgha_failover_phase_seconds_bucket", kind="failover",
                         phase="total", le="+Inf") == 1
            assert value(after, "pgha_operations_in_flight", kind="failover",
                         state="running") is None
            eventually(lambda: healthy(scrape(web_metrics)), "web's metrics healthy again",
                       timeout=60)
            worker = scrape(worker_metrics)
            assert (value(worker, "pgha_monitor_probe_duration_seconds_count", role="primary",
                          outcome="down") or 0) >= 1
            # Detection: from the first failed probe to the failover queued, seen once.
            assert value(worker, "pgha_failover_detect_seconds_count") == 1
            detect = value(worker, "pgha_failover_detect_seconds_sum")
            assert detect is not None and 0 < detect < 30

            new = instance(env.runtime, instance_id)
            primary, standby = new.primary(), new.standby()
            assert primary is not None and standby is not None
            dom = dump_dom(dashboard)
            assert dom.count('class="node"') == 2
            assert f'data-role="primary">\n<td>{primary.id}</td>' in dom
            assert f'data-role="standby">\n<td>{standby.id}</td>' in dom
            assert dom.count('class="failover"') == 1
            assert f"{old.id} → {primary.id}" in dom
            for phase in ("fence", "port", "promote", "standby", "total"):
                assert f'data-phase="{phase}"' in dom
            screenshot(dashboard, tmp_path / "status-after-failover.png")
            token = dashboard.rsplit("/", 1)[1]
            time.sleep(0.5)  # gunicorn writes its access log line after the answer
            assert token not in (env.base / "web.log").read_text(errors="replace")

            # The only worker dies: once its leases expire, nobody watches the instance.
            env.workers[0].send_signal(signal.SIGKILL)
            env.workers[0].wait()

            def unwatched(samples: Samples) -> bool:
                return (value(samples, "pgha_instances_unwatched") == 1
                        and value(samples, "pgha_workers_live") == 0)

            eventually(lambda: unwatched(scrape(web_metrics)),
                       "the instance unwatched, no live worker", timeout=60)
