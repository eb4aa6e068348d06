"""What a scrape of `web`'s /metrics and a status page cost with many instances.

Run:  .venv/bin/python benchmarks/metrics_scrape.py [--instances 1000] [--failovers 500]
      [--scrapes 30] [--database-url postgresql://...] [--json FILE] [--write BENCHMARKS.md]

The state store (SQLite in a temporary directory unless --database-url names an empty
PostgreSQL database) is filled with `--instances` ha-sync instances as a finished
provision leaves them (two node rows, a monitor lease, replication facts) and
`--failovers` finished failover rows; no server runs behind them: the scrape reads
the store only. Each scrape is a real HTTP GET with basic auth to the broker's Flask
app in `serve`'s bounded server. Prints one JSON object; with --write, rewrites its
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markers, percentile, write_section  # benchmarks/report.py, beside this script

from broker.api.app import create_app
from broker.api.server import ApiServer
from broker.config import load_settings
from broker.logs import setup_logging
from broker.monitor.leases import monitor_lease_name
from broker.runtime import build_runtime
from broker.store.models import (
    NODE_RUNNING,
    PRIMARY,
    READY,
    STANDBY,
    Failover,
    Instance,
    Lease,
    Node,
    utcnow,
)
from broker.web.dashboard import token_for

USER, PASSWORD = "bench", "bench-password"


def fill(runtime: Any, instances: int, failovers: int) -> list[str]:
    plan = runtime.catalog.plan_by_name("ha-sync")
    secret = runtime.vault.encrypt("x")
    now = utcnow()
    ids = []
    with runtime.store.session() as s:
        for i in range(instances):
            iid = str(uuid.uuid4())
            ids.append(iid)
            s.add(Instance(id=iid, service_id=plan.service_id, plan_id=plan.id,
                           organization_guid="org", space_guid="space", state=READY,
                           replication="sync", service_address=f"10.0.{i // 250}.{i % 250}",
                           admin_password_enc=secret, replication_password_enc=secret,
                           last_lag_bytes=0, last_checked_at=now,
                           context={"instance_name": f"db-{i}"}))
            standby = uuid.uuid4().hex[:8]
            for role, node_id, zone in ((PRIMARY, uuid.uuid4().hex[:8], "az1"),
                                        (STANDBY, standby, "az2")):
                s.add(Node(id=node_id, instance_id=iid, role=role, state=NODE_RUNNING,
                           availability_zone=zone, tls_expires_at=now + timedelta(days=365)))
            s.add(Lease(name=monitor_lease_name(iid), owner="bench",
                        expires_at=now + timedelta(days=1)))
        s.flush()
        for i in range(failovers):
            at = now - timedelta(minutes=i)
            s.add(Failover(id=uuid.uuid4().hex, instance_id=ids[i % len(ids)], kind="failover",
                           cause="primary unreachable", detected_at=at,
                           fenced_at=at + timedelta(seconds=0.7),
                           port_attached_at=at + timedelta(seconds=0.77),
                           promoted_at=at + timedelta(seconds=1.3),
                           standby_streaming_at=at + timedelta(seconds=8), outcome="succeeded"))
    return ids


def timed_gets(url: str, count: int, auth: tuple[str, str] | None) -> tuple[list[float], int]:
    times, size = [], 0
    with requests.Session() as session:
        for _ in range(count):
            started = time.perf_counter()
            response = session.get(url, auth=auth, timeout=120)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
            size = len(response.content)
    return times, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--failovers", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--database-url")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    setup_logging("WARNING")
    scratch = Path(tempfile.mkdtemp(prefix="pgha-metrics-bench-"))
    url = args.database_url or f"sqlite:///{scratch / 'state.sqlite3'}"
    settings = load_settings({"BROKER_USERNAME": USER, "BROKER_PASSWORD": PASSWORD,
                              "BROKER_STATE_DIR": str(scratch), "DATABASE_URL": url,
                              "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    runtime = build_runtime(settings)
    server = None
    try:
        ids = fill(runtime, args.instances, args.failovers)
        server = ApiServer("127.0.0.1", 0, create_app(runtime), threads=4, timeout=60)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        timed_gets(f"{base}/metrics", 2, (USER, PASSWORD))  # warm up
        scrape, size = timed_gets(f"{base}/metrics", args.scrapes, (USER, PASSWORD))
        page = f"{base}/dashboard/{ids[0]}/{token_for(runtime, ids[0])}"
        pages, _ = timed_gets(page, args.scrapes, None)
    finally:
        if server is not None:
            server.shutdown()
        runtime.store.dispose()
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(), "load_average_1m": round(os.getloadavg()[0], 1),
        "store": "postgresql" if args.database_url else "sqlite",
        "instances": args.instances, "failovers": args.failovers, "scrapes": args.scrapes,
        "scrape_p50_s": round(percentile(scrape, 0.5), 4),
        "scrape_p95_s": round(percentile(scrape, 0.95), 4), "scrape_bytes": size,
        "status_page_p50_s": round(percentile(pages, 0.5), 4),
        "status_page_p95_s": round(percentile(pages, 0.95), 4),
        "raw": {"scrape_s": [round(t, 4) for t in scrape],
                "status_page_s": [round(t, 4) for t in pages]},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        start, end = markers("metrics_scrape.py")
        section = "\n".join([
            start, "## Metrics scrape and status page (benchmarks/metrics_scrape.py)", "",
            f"`GET /metrics` (basic auth) and one instance's status page over real HTTP, "
            f"the state store ({result['store']}) holding {args.instances} ha-sync "
            f"instances as a finished provision leaves them and {args.failovers} finished "
            "failovers; the store-derived metrics are computed at each scrape.", "",
            "| request | p50 | p95 | body |", "|---|---:|---:|---:|",
            f"| /metrics | {result['scrape_p50_s'] * 1000:.0f} ms | "
            f"{result['scrape_p95_s'] * 1000:.0f} ms | {size / 1024:.0f} KiB |",
            f"| status page | {result['status_page_p50_s'] * 1000:.1f} ms | "
            f"{result['status_page_p95_s'] * 1000:.1f} ms | |", "",
            f"{result['when']}; vm: 2 cores, {result['machine']}; load average "
            f"{result['load_average_1m']} at the end; {args.scrapes} requests each, one at a "
            "time. Raw data: `benchmarks/results/metrics_scrape.json`.",
            end, ""])
        write_section(args.write, section, "metrics_scrape.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
