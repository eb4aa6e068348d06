"""Provisioning latency: PUT /v2/service_instances/:id → last_operation `succeeded`.

Through the real HTTP API (the broker's Flask app in the server `broker serve` uses, in a thread)
with the operation worker running in another thread, on a local cloud with its own
bridge and /24 (like the tests); everything is removed afterwards. last_operation
is polled every 50 ms so that the figure is the broker's time, not the platform's
polling interval (Cloud Controller polls far less often).

Run as root: .venv/bin/python benchmarks/provision.py [--runs 5] [--plans ha-sync,...]
             [--json FILE] [--write BENCHMARKS.md]
With --write the script puts its table into its own section of that file; --from-json
renders the table of a run saved with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markers, write_section  # benchmarks/report.py, beside this script

from broker.api.app import create_app
from broker.api.server import ApiServer
from broker.operations import workflows
from broker.operations.engine import Engine
from harness.machine import free_port, make_local_cloud
from harness.workflows import make_runtime

USER, PASSWORD = "bench", "bench-password"
HEADERS = {"X-Broker-API-Version": "2.15"}
POLL = 0.05


def _wait_succeeded(session: requests.Session, base: str, instance_id: str, operation: str,
                    timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = session.get(f"{base}/v2/service_instances/{instance_id}/last_operation",
                        params={"operation": operation})
        r.raise_for_status()
        state = r.json()["state"]
        if state == "succeeded":
            return
        if state == "failed":
            raise RuntimeError(f"operation failed: {r.json().get('description')}")
        if time.monotonic() > deadline:
            raise RuntimeError("operation did not finish in time")
        time.sleep(POLL)


def run(plans: list[str], runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with make_local_cloud() as cloud, tempfile.TemporaryDirectory() as state_dir:
        runtime = make_runtime(f"sqlite:///{state_dir}/state.sqlite3",
                               Fernet.generate_key().decode(), cloud)
        runtime.settings = dataclasses.replace(runtime.settings, username=USER,
                                               password=PASSWORD)
        workflows.install()
        engine = Engine(runtime.store, cloud, runtime.vault, runtime.catalog, runtime.settings)
        stop = threading.Event()
        worker = threading.Thread(target=engine.loop, args=(stop,), daemon=True)
        worker.start()
        app = create_app(runtime, on_enqueue=engine.wake)
        port = free_port()
        server = ApiServer("127.0.0.1", port, app, threads=8, timeout=10.0)  # as `serve`
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        session = requests.Session()
        session.auth = (USER, PASSWORD)
        session.headers.update(HEADERS)
        service_id = runtime.catalog.services[0].id
        try:
            for plan_name in plans:
                plan = runtime.catalog.plan_by_name(plan_name)
                latencies, deprovision = [], []
                for _ in range(runs):
                    instance_id = str(uuid.uuid4())
                    body = {"service_id": service_id, "plan_id": plan.id,
                            "organization_guid": "org", "space_guid": "space"}
                    t0 = time.monotonic()
                    r = session.put(f"{base}/v2/service_instances/{instance_id}",
                                    params={"accepts_incomplete": "true"}, json=body)
                    assert r.status_code == 202, r.text
                    _wait_succeeded(session, base, instance_id, r.json()["operation"])
                    latencies.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    r = session.delete(f"{base}/v2/service_instances/{instance_id}",
                                       params={"accepts_incomplete": "true",
                                               "service_id": service_id, "plan_id": plan.id})
                    assert r.status_code == 202, r.text
                    _wait_succeeded(session, base, instance_id, r.json()["operation"])
                    deprovision.append(time.monotonic() - t0)
                results[plan_name] = {
                    "runs": runs,
                    "provision_median_s": round(statistics.median(latencies), 2),
                    "provision_min_s": round(min(latencies), 2),
                    "provision_max_s": round(max(latencies), 2),
                    "deprovision_median_s": round(statistics.median(deprovision), 2),
                }
                print(f"{plan_name:<11} PUT→succeeded median {statistics.median(latencies):.2f} s"
                      f" (min {min(latencies):.2f}, max {max(latencies):.2f}, n={runs}); "
                      f"DELETE→succeeded median {statistics.median(deprovision):.2f} s",
                      flush=True)
        finally:
            server.shutdown()
            stop.set()
            engine.wake()
            worker.join(10)
            runtime.store.dispose()
    return {
        "benchmark": "provisioning latency (PUT → last_operation succeeded) through the HTTP API",
        "date": datetime.date.today().isoformat(),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
        "poll_interval_s": POLL,
        "plans": results,
    }


def markdown(figures: dict[str, Any]) -> str:
    """The section of BENCHMARKS.md, from what `run` returned (or its saved JSON)."""
    start, end = markers("provision.py")
    plans = figures["plans"]
    lines = [
        start,
        "## Provisioning latency (benchmarks/provision.py)",
        "",
        "PUT `/v2/service_instances/:id?accepts_incomplete=true` → `last_operation` "
        "`succeeded`, through the real HTTP API (the broker's Flask app in `serve`'s own "
        "bounded server, the operation worker in another thread, as `broker serve` runs "
        "them), on the local cloud with real PostgreSQL. `last_operation` polled every "
        f"{figures['poll_interval_s'] * 1000:.0f} ms so the figure is the broker's, not the "
        "platform's polling interval.",
        "",
        "| plan | PUT → succeeded median | min | max | DELETE → succeeded median |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in plans.items():
        lines.append(f"| {name} | {f['provision_median_s']:.2f} s | {f['provision_min_s']:.2f} s "
                     f"| {f['provision_max_s']:.2f} s | {f['deprovision_median_s']:.2f} s |")
    runs = sorted({f["runs"] for f in plans.values()})
    lines += ["", f"{figures.get('when') or figures['date']}; {figures['machine']}; "
              f"{'/'.join(map(str, runs))} runs per plan."]
    if "ha-sync" in plans:
        median = plans["ha-sync"]["provision_median_s"]
        verdict = "met" if median <= 5.0 else "NOT met"
        lines.append(f"Target: an `ha-sync` pair ready in ≤ 5 s median: {verdict} "
                     f"({median:.2f} s).")
    return "\n".join([*lines, end]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--plans", default="standalone,ha,ha-sync")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--from-json", type=Path, help="only render a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
    else:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        figures = run([p.strip() for p in args.plans.split(",") if p.strip()], args.runs)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
    section = markdown(figures)
    print(section)
    if args.write:
        write_section(args.write, section, "provision.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
