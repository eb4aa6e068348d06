"""API throughput: catalog and last_operation requests/s, ours vs the bare library.

Two apps run side by side under gunicorn with the same settings (the production
ones of `broker web`: gthread, 2 workers x 4 threads, access log on):
- ours: `broker.api.create_app` on a SQLite state store (the embedded default),
  with the production logging setup, i.e. one log line per request;
- bare: a minimal in-memory openbrokerapi broker defined here, with the same
  catalog and the library's own basic auth.
They are measured one at a time (never both at once: the machine has 2 cores),
alternating, for several rounds; the table shows medians and the ratio.
last_operation is polled the way Cloud Controller polls: with `operation`,
`service_id` and `plan_id`, on an operation still in progress.

The load generator is `wrk` when installed (apt-get install wrk), else a small
keep-alive HTTP client in several processes (slower: it competes for the CPU).

    .venv/bin/python benchmarks/api_throughput.py [--rounds 9] [--duration 3]
        [--connections 8] [--database-url URL] [--json FILE] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import markers, write_section  # benchmarks/report.py, beside this script  # noqa: E402

USER, PASSWORD = "bench", "bench-password"
VERSION = "2.15"
# `broker web`'s gunicorn settings (broker/cli/serve.py), for both apps.
GUNICORN = ["--workers", "2", "--worker-class", "gthread", "--threads", "4", "--timeout", "60",
            "--access-logfile", "-", "--access-logformat", '%(h)s "%(r)s" %(s)s %(b)s %(L)ss']


# --- the two WSGI apps (gunicorn imports this module and calls one of these) --------
def ours() -> Flask:
    from broker.api import create_app
    from broker.config import load_settings
    from broker.logs import setup_logging
    from broker.runtime import build_runtime

    settings = load_settings()
    setup_logging(settings.log_level)
    return create_app(build_runtime(settings, upgrade=False))


def bare() -> Flask:
    """The library alone: in-memory state, its own auth, the same catalog."""
    from openbrokerapi import api
    from openbrokerapi.auth import BrokerCredentials
    from openbrokerapi.catalog import ServicePlan
    from openbrokerapi.service_broker import (
        LastOperation,
        OperationState,
        ProvisionedServiceSpec,
        ProvisionState,
        Service,
        ServiceBroker,
    )

    from broker.catalog import load_catalog
    from broker.config import DEFAULT_CATALOG

    document = load_catalog(DEFAULT_CATALOG).osb()
    services = [Service(**{**s, "plans": [ServicePlan(**p) for p in s["plans"]]})
                for s in document["services"]]

    class InMemoryBroker(ServiceBroker):  # type: ignore[misc]
        # No state at all: the operation id is derived from the instance id, so
        # that every gunicorn worker answers for an instance another one created.
        def catalog(self) -> list[Service]:
            return services

        def provision(self, instance_id: str, details: Any, async_allowed: bool,
                      **kwargs: Any) -> ProvisionedServiceSpec:
            return ProvisionedServiceSpec(ProvisionState.IS_ASYNC, operation=f"op-{instance_id}")

        def last_operation(self, instance_id: str, operation_data: str | None,
                           service_id: str | None, plan_id: str | None,
                           **kwargs: Any) -> LastOperation:
            if operation_data != f"op-{instance_id}":
                return LastOperation(OperationState.FAILED, "unknown operation")
            return LastOperation(OperationState.IN_PROGRESS, "creating primary in az1")

    app = Flask("bare")
    app.register_blueprint(api.get_blueprint(
        InMemoryBroker(), BrokerCredentials(USER, PASSWORD), logging.getLogger("bare")))
    return app


# --- load generation ---------------------------------------------------------------------
# Cloud Controller sends who asked with every request: "cloudfoundry" and a base64 JSON.
ORIGINATING_IDENTITY = "cloudfoundry " + base64.b64encode(
    json.dumps({"user_id": "683ea748-3092-4ff4-b656-39cacc4d5360"}).encode()).decode()


def _headers() -> dict[str, str]:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}", "X-Broker-API-Version": VERSION,
            "X-Broker-API-Originating-Identity": ORIGINATING_IDENTITY}


def _wrk(url: str, duration: float, connections: int) -> tuple[float, int]:
    """(requests/s, requests) for `duration` seconds of load."""
    cmd = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration:.0f}s"]
    for name, value in _headers().items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    count = re.search(r"([0-9]+) requests in", out)
    if rate is None or count is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(rate.group(1)), int(count.group(1))


def _client_loop(args: tuple[str, int, str, float]) -> int:
    host, port, path, until = args
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = _headers()
    done = 0
    while time.monotonic() < until:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")
        done += 1
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.close()
    return done


def _python_client(url: str, duration: float, connections: int) -> tuple[float, int]:
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert match is not None
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    with multiprocessing.get_context("fork").Pool(connections) as pool:
        start = time.monotonic()
        until = start + duration
        counts = pool.map(_client_loop, [(host, port, path, until)] * connections)
        elapsed = time.monotonic() - start
    return sum(counts) / elapsed, sum(counts)


# --- servers -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, factory: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", *GUNICORN,
             "--pythonpath", str(Path(__file__).resolve().parent), f"api_throughput:{factory}"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))

    def cpu_seconds(self) -> float:
        """CPU time used so far by the gunicorn master and its workers."""
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {**_headers(), "Content-Type": "application/json"}
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _ = self.request("GET", "/v2/catalog")
                if status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start (see its log)")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return children


def _last_operation_path(server: Server, service_id: str, plan_id: str) -> str:
    instance_id = str(uuid.uuid4())
    status, body = server.request(
        "PUT", f"/v2/service_instances/{instance_id}?accepts_incomplete=true",
        {"service_id": service_id, "plan_id": plan_id, "organization_guid": "org",
         "space_guid": "space"})
    if status != 202:
        raise RuntimeError(f"{server.name}: provision answered {status} {body}")
    path = (f"/v2/service_instances/{instance_id}/last_operation?operation={body['operation']}"
            f"&service_id={service_id}&plan_id={plan_id}")
    status, polled = server.request("GET", path)
    if status != 200 or polled.get("state") != "in progress":
        raise RuntimeError(f"{server.name}: last_operation answered {status} {polled}")
    return path


def run(rounds: int, duration: float, connections: int, log_level: str = "INFO",
        database_url: str | None = None) -> dict[str, Any]:
    from cryptography.fernet import Fernet

    from broker.config import load_settings
    from broker.runtime import build_runtime

    load = _wrk if shutil.which("wrk") else _python_client
    workdir = Path(tempfile.mkdtemp(prefix="pgha-bench-api-"))
    env = {"BROKER_USERNAME": USER, "BROKER_PASSWORD": PASSWORD,
           "BROKER_STATE_DIR": str(workdir / "state"),
           "DATABASE_URL": database_url or f"sqlite:///{workdir / 'state' / 'broker.sqlite3'}",
           "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode(), "BROKER_LOG_LEVEL": log_level}
    runtime = build_runtime(load_settings(env))  # upgrade the schema before the workers start
    service = runtime.catalog.services[0]
    plan = runtime.catalog.plan_by_name("ha-sync")
    runtime.store.dispose()
    servers = {"ours": Server("ours", "ours()", env, workdir / "ours.log"),
               "bare": Server("bare", "bare()", {}, workdir / "bare.log")}
    endpoints = ("catalog", "last_operation")
    results: dict[str, dict[str, list[float]]] = {
        endpoint: {name: [] for name in servers} for endpoint in endpoints}
    # Server CPU per request: much less disturbed by other load on the machine
    # than requests/s, which depends on the CPU share the servers get.
    cpu: dict[str, dict[str, list[float]]] = {
        endpoint: {name: [] for name in servers} for endpoint in endpoints}
    try:
        for server in servers.values():
            server.wait_ready()
        paths = {name: {"catalog": "/v2/catalog",
                        "last_operation": _last_operation_path(server, service.id, plan.id)}
                 for name, server in servers.items()}
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for endpoint in results:
                for name in order:
                    server = servers[name]
                    url = server.base + paths[name][endpoint]
                    load(url, 1.0, connections)  # warm up (imports, pools, caches)
                    before = server.cpu_seconds()
                    rate, count = load(url, duration, connections)
                    results[endpoint][name].append(rate)
                    cpu[endpoint][name].append((server.cpu_seconds() - before) / count * 1e6)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "client": f"{'wrk -t2' if load is _wrk else 'python keep-alive clients'}, "
                  f"{connections} connections, {duration:.0f} s per run, {rounds} rounds",
        "gunicorn": " ".join(GUNICORN[:6]),
        "log_level": log_level,
        "state_store": "postgresql" if database_url else "sqlite",
        "endpoints": {},
    }
    for endpoint, by_app in results.items():
        ours_rps = statistics.median(by_app["ours"])
        bare_rps = statistics.median(by_app["bare"])
        # Each round measures both apps back to back: the per-round ratio cancels
        # most of the drift a busy machine adds.
        paired = statistics.median(o / b for o, b in zip(by_app["ours"], by_app["bare"],
                                                           strict=True))
        ours_cpu = statistics.median(cpu[endpoint]["ours"])
        bare_cpu = statistics.median(cpu[endpoint]["bare"])
        summary["endpoints"][endpoint] = {
            "ours": ours_rps, "bare": bare_rps, "ratio": ours_rps / bare_rps,
            "paired_ratio": paired, "runs": by_app,
            "ours_cpu_us": ours_cpu, "bare_cpu_us": bare_cpu,
            "cpu_ratio": bare_cpu / ours_cpu, "cpu_runs": cpu[endpoint]}
    return summary


def markdown(summary: dict[str, Any]) -> str:
    start, end = markers("api_throughput.py")
    lines = [start, "## API throughput (benchmarks/api_throughput.py)", "",
             f"{summary['date']}; {summary['machine']}; gunicorn "
             f"{summary['gunicorn']}; {summary['client']}; our state store "
             f"{summary['state_store']}, log level {summary['log_level']}. Our app "
             "(`broker.api.create_app`) against a minimal in-memory openbrokerapi broker "
             "defined by the script, with the same settings, measured alternately. Every "
             "request carries basic auth, `X-Broker-API-Version` and the "
             "`X-Broker-API-Originating-Identity` header that Cloud Controller always "
             "sends.", "",
             "| endpoint | ours req/s | bare req/s | ratio | per-round ratio "
             "| ours CPU/req | bare CPU/req | CPU ratio (bare/ours) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for endpoint, row in summary["endpoints"].items():
        lines.append(f"| {endpoint} | {row['ours']:.0f} | {row['bare']:.0f} | "
                     f"{row['ratio']:.2f}x | {row['paired_ratio']:.2f}x | "
                     f"{row['ours_cpu_us']:.0f} us | {row['bare_cpu_us']:.0f} us | "
                     f"{row['cpu_ratio']:.2f}x |")
    lines += ["", "req/s and CPU/req are medians over the rounds; per-round ratio is the "
              "median of ours/bare within each round; CPU/req is the servers' (master and "
              "workers) user+system CPU per request, the figure least disturbed by other "
              "load on the machine. Target: ours ≥ 0.8x the bare library (per-round ratio). "
              "Raw data: `benchmarks/results/api_throughput.json`.", end]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--log-level", default="INFO",
                        help="our app's BROKER_LOG_LEVEL (INFO logs one line per request)")
    parser.add_argument("--database-url", help="our state store (default: SQLite in a temp "
                        "dir); an empty PostgreSQL database works too")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--write", type=Path, help="put the figures into this markdown file")
    args = parser.parse_args()
    summary = run(args.rounds, args.duration, args.connections, args.log_level,
                  args.database_url)
    print(markdown(summary))
    if args.write:
        write_section(args.write, markdown(summary), "api_throughput.py")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
