"""Backups: backup and restore time of a database of a given size, the archiving lag
under a sustained write load, and what archiving costs the writers.

On a local cloud of its own (like the tests; everything is removed afterwards), a
standalone instance with the repository on the host:
- backup: `{"backup": true}` (a full pgBackRest backup, through the workers) of a
  database filled to --size-mb; restore: provisioning with `restore_from` (the
  latest point) until the new instance is ready.
- lag: pgbench (-c 2) for --seconds; every 0.5 s the age of the newest archived WAL
  file (pg_stat_archiver.last_archived_time) and the WAL files waiting; p50 and p99.
- cost: pgbench TPS with pgBackRest archiving, then with `archive_command = ':'` (WAL
  discarded, archive_mode unchanged), same duration, same instance.

Run as root: .venv/bin/python benchmarks/backup.py [--size-mb 1024] [--seconds 60]
             [--json FILE] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markers, percentile, write_section  # benchmarks/report.py

from broker.backup import archiver
from broker.operations import requests
from broker.pg import connection
from broker.runtime import Runtime
from harness.env import failover_env
from harness.machine import pg_bin_dir
from harness.workflows import (
    app_tls,
    connect_as_admin,
    finish,
    instance,
    new_instance_id,
    provision,
)
from harness.writer import app_credentials

SAMPLE = 0.5


def _admin(runtime: Runtime, instance_id: str) -> Any:
    inst = instance(runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.management_address
    conn = connect_as_admin(runtime, inst, primary.management_address, dbname="postgres")
    conn.autocommit = True
    return conn


def _fill(credentials: dict[str, Any], size_mb: int) -> float:
    """A table of about size_mb MiB; the database's size in MiB."""
    conn = connection_for(credentials)
    rows = size_mb * 1024 * 1024 // 102  # ~102 bytes per row on disk (measured)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE filler AS SELECT i, md5(i::text) || md5((i * 7)::text) "
                    "AS pad FROM generate_series(1, %s) AS i", (rows,))
        cur.execute("SELECT pg_catalog.pg_database_size(pg_catalog.current_database())")
        size = cur.fetchone()[0] / 1024 / 1024
    conn.close()
    return float(size)


def connection_for(credentials: dict[str, Any]) -> Any:
    import psycopg2

    conn = psycopg2.connect(credentials["uri"], connect_timeout=5, **app_tls(credentials))
    conn.autocommit = True
    return conn


def _timed_backup(runtime: Runtime, engine: Any, instance_id: str) -> float:
    service_id = instance(runtime, instance_id).service_id
    started = time.monotonic()
    accepted = requests.update(runtime.store, runtime.catalog, requests.Change(
        instance_id=instance_id, service_id=service_id, parameters={"backup": True}),
        accepts_incomplete=True)
    assert accepted.operation_id
    finish(engine, accepted.operation_id)
    return time.monotonic() - started


def _timed_restore(runtime: Runtime, engine: Any, source: str) -> float:
    plan = runtime.catalog.plan_by_name("standalone")
    started = time.monotonic()
    accepted = requests.provision(runtime.store, runtime.vault, requests.NewInstance(
        id=new_instance_id(), service_id=plan.service_id, plan=plan, organization_guid="org",
        space_guid="space", parameters={"restore_from": source}), accepts_incomplete=True)
    assert accepted.operation_id
    finish(engine, accepted.operation_id)
    return time.monotonic() - started


def _pgbench(credentials: dict[str, Any], *args: str) -> str:
    env = {**os.environ, "PGSSLROOTCERT": app_tls(credentials).get("sslrootcert", "")}
    out = subprocess.run([str(Path(pg_bin_dir()) / "pgbench"), *args, credentials["uri"]],
                         capture_output=True, text=True, env=env, check=True, timeout=3600)
    return out.stdout


def _tps(output: str) -> float:
    found = re.search(r"tps = ([0-9.]+)", output)
    assert found, output
    return float(found.group(1))


def _lag_under_load(runtime: Runtime, instance_id: str, credentials: dict[str, Any],
                    seconds: int) -> dict[str, Any]:
    """pgbench for `seconds` while the archiver is sampled."""
    ages: list[float] = []
    waiting: list[int] = []
    done = threading.Event()
    result: dict[str, str] = {}

    def load() -> None:
        result["out"] = _pgbench(credentials, "-c", "2", "-j", "2", "-T", str(seconds), "-n")
        done.set()

    thread = threading.Thread(target=load)
    thread.start()
    conn = _admin(runtime, instance_id)
    try:
        while not done.wait(SAMPLE):
            state = archiver.archiving(conn)
            if state.age_seconds is not None:
                ages.append(state.age_seconds)
            waiting.append(state.waiting)
    finally:
        thread.join()
        conn.close()
    return {"tps": _tps(result["out"]), "samples": len(ages),
            "age_p50_s": percentile(ages, 0.5), "age_p99_s": percentile(ages, 0.99),
            "age_max_s": max(ages), "waiting_p99": percentile([float(w) for w in waiting], 0.99)}


def run(size_mb: int, seconds: int) -> dict[str, Any]:
    with failover_env() as env:
        runtime, engine = env.runtime, env.engine
        source = provision(runtime, engine, "standalone")
        creds = app_credentials(env, source)
        size = _fill(creds, size_mb)
        backup_s = _timed_backup(runtime, engine, source)
        restore_s = _timed_restore(runtime, engine, source)
        _pgbench(creds, "-i", "-s", "10", "-q")
        with_archiving = _lag_under_load(runtime, source, creds, seconds)
        conn = _admin(runtime, source)
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET archive_command = ':'")
            cur.execute("SELECT pg_catalog.pg_reload_conf()")
        connection.wait_setting(conn, "archive_command", ":")
        conn.close()
        without = _tps(_pgbench(creds, "-c", "2", "-j", "2", "-T", str(seconds), "-n"))
    return {
        "date": datetime.date.today().isoformat(),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
        "database_mib": round(size), "backup_s": round(backup_s, 1),
        "restore_s": round(restore_s, 1), "load_seconds": seconds,
        "archiving": with_archiving, "tps_without_archiving": without,
    }


def markdown(f: dict[str, Any]) -> str:
    start, end = markers("backup.py")
    a = f["archiving"]
    cost = 100.0 * (1 - a["tps"] / f["tps_without_archiving"])
    lines = [start, "## Backups (pgBackRest)", "",
             "| measure | value |", "|---|---|",
             f"| full backup of a {f['database_mib']} MiB database (`{{\"backup\": true}}` "
             f"through the workers) | {f['backup_s']} s |",
             f"| restore of it as a new standalone instance (`restore_from`, latest) | "
             f"{f['restore_s']} s |",
             f"| age of the newest archived WAL under pgbench -c 2 ({f['load_seconds']} s, "
             f"{a['samples']} samples): p50 / p99 / max | {a['age_p50_s']:.1f} / "
             f"{a['age_p99_s']:.1f} / {a['age_max_s']:.1f} s |",
             f"| WAL files waiting to be archived, p99 | {a['waiting_p99']:.0f} |",
             f"| pgbench TPS with archiving / with WAL discarded (`archive_command = ':'`) | "
             f"{a['tps']:.0f} / {f['tps_without_archiving']:.0f} ({cost:+.1f} % cost) |",
             "", f"{f['when']}; {f['machine']}; standalone plan of the local cloud, the "
             "repository on the same disk; `benchmarks/backup.py`.", end, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--write", type=Path, help="rewrite this script's section of the file")
    parser.add_argument("--from-json", type=Path, help="only render a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
    else:
        figures = run(args.size_mb, args.seconds)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
    if args.write:
        write_section(args.write, markdown(figures), "backup.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
