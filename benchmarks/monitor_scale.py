"""How many instances one monitor process watches at the 1 s interval, at what cost.

Run:  .venv/bin/python benchmarks/monitor_scale.py [--instances 1000] [--seconds 60]
      [--servers 4] [--crashed 20] [--frozen 20] [--json [FILE]] [--write BENCHMARKS.md]

How it is built: `--servers` real PostgreSQL 15 servers, plus one that carries
`--crashed` and one that carries `--frozen` of the `--instances` instances, listen on
127.0.1.k:5432 (one loopback address each, the port the monitor probes). A PostgreSQL
state store on its own loopback server holds `--instances` ready `standalone`
instances (one node each) spread over them, every node's management address naming
its server, so each server answers for many instances over one probe session each.
The broker's `Monitor` runs in this process (the benchmark's own threads only sleep
and sample), with the default settings (1 s interval, 1 s probe deadline, 3
failures), takes every instance's lease and watches them; the failovers it decides
are queued and left queued (no cloud behind the rows).

Measured after a warm-up (every instance checked twice): `cpu_cores`, this process's
CPU seconds over wall seconds for `--seconds`, and the same per second of the window
(`cpu_cores_p50`, `cpu_cores_p95`); `check_interval_p99_s`, between two checks of the
same instance. Then the crash server is killed (kill -9 of every process) at a random
phase of the sweep and `crash_detect_p95_s` is from the kill to each of its
instances' failover (here: resurrect, the standalone plan's failover) being queued,
read from the queued operations' created_at; then the frozen server's processes are
all stopped (SIGSTOP: the kernel still accepts connections, nothing answers) at a
random phase, and `freeze_detect_p95_s` is measured the same way. Prints one JSON
object; with --json also keeps it (with the raw intervals) in FILE
(benchmarks/results/monitor_scale.json), with --write rewrites its section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib
import itertools

from report import markers, percentile, write_section  # benchmarks/report.py, beside this script

from broker.config import load_settings
from broker.logs import setup_logging
from broker.metrics import instruments
from broker.monitor.loop import Monitor
from broker.operations.resurrect import KIND as RESURRECT
from broker.runtime import build_runtime
from broker.store.models import NODE_RUNNING, PRIMARY, READY, Instance, Node, Operation, utcnow
from harness.machine import pg_bin_dir, release_interlock, world_traversable_tmpdir

PG_USER = "postgres"
RESULTS = Path(__file__).resolve().parent / "results" / "monitor_scale.json"


class Server:
    """A PostgreSQL server on 127.0.1.k:5432, run as the postgres OS user."""

    def __init__(self, address: str, password: str, max_connections: int) -> None:
        self.address = address
        self.bin = pg_bin_dir()
        self.root = world_traversable_tmpdir("pgha-monscale-")
        self.data = self.root / "data"
        user = pwd.getpwnam(PG_USER)
        os.chown(self.root, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(password)  # read by initdb, never on a command line
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._run(f"{self.bin}/initdb", "-D", str(self.data), "-U", "postgres", "-N",
                      "-A", "scram-sha-256", f"--pwfile={pwfile}")
            pwfile.unlink()
            self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-w", "-l",
                      str(self.root / "log"), "-o",
                      f"-c listen_addresses={address} -c port=5432 "
                      f"-c unix_socket_directories={self.root} -c fsync=off "
                      f"-c max_connections={max_connections}", "start")
        except subprocess.CalledProcessError as exc:
            # Say why (the address taken by another run, most often), leave nothing.
            log = self.root / "log"
            why = log.read_text()[-800:] if log.exists() else exc.stderr.decode()[-800:]
            shutil.rmtree(self.root, ignore_errors=True)
            raise SystemExit(f"PostgreSQL on {address}:5432 did not start:\n{why}") from exc

    def _run(self, *cmd: str) -> None:
        user = pwd.getpwnam(PG_USER)

        def demote() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        subprocess.run(cmd, check=True, capture_output=True, preexec_fn=demote)

    def signal_all(self, signum: int) -> float:
        """Send `signum` to the postmaster and every backend at once; its wall time."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                  text=True).stdout.split()
        at = time.time()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return at

    def kill(self) -> float:
        """kill -9 the postmaster and every backend at once; the wall time of the kill."""
        return self.signal_all(signal.SIGKILL)

    def freeze(self) -> float:
        self.frozen = True
        return self.signal_all(signal.SIGSTOP)

    def stop(self) -> None:
        if getattr(self, "frozen", False):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.signal_all(signal.SIGCONT)  # else the stop below would wait
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # killed already
        finally:
            release_interlock(self.data)
            shutil.rmtree(self.root, ignore_errors=True)


def fill(runtime: Any, addresses: list[str], instances: int,
         victims: dict[str, int], password: str) -> tuple[list[str], dict[str, list[str]]]:
    """The instances: `victims` (address → count) on their servers, the others spread
    over `addresses`; the healthy ids and the victims' ids by address."""
    plan = runtime.catalog.plan_by_name("standalone")
    secret = runtime.vault.encrypt(password)
    now = utcnow()
    ids: list[str] = []
    doomed = [a for a, count in victims.items() for _ in range(count)]
    by_victim: dict[str, list[str]] = {a: [] for a in victims}
    with runtime.store.session() as s:
        for i in range(instances):
            iid = str(uuid.uuid4())
            if i < len(doomed):
                address = doomed[i]
                by_victim[address].append(iid)
            else:
                address = addresses[i % len(addresses)]
                ids.append(iid)
            s.add(Instance(id=iid, service_id=plan.service_id, plan_id=plan.id,
                           organization_guid="org", space_guid="space", state=READY,
                           replication="async", service_address=address,
                           admin_password_enc=secret, replication_password_enc=secret,
                           last_checked_at=now, context={"instance_name": f"db-{i}"}))
            s.add(Node(id=uuid.uuid4().hex[:8], instance_id=iid, role=PRIMARY,
                       state=NODE_RUNNING, availability_zone="az1",
                       management_address=address))
    return ids, by_victim


class CpuSamples:
    """This process's CPU seconds over wall seconds, sampled every second."""

    def __init__(self) -> None:
        self.cores: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        while not self._stop.wait(1.0):
            wall1, cpu1 = time.monotonic(), time.process_time()
            self.cores.append((cpu1 - cpu) / (wall1 - wall))
            wall, cpu = wall1, cpu1

    def __enter__(self) -> CpuSamples:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class CheckTimes:
    """When each instance was checked (wraps the monitor's metrics hook)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._original = instruments.checked

    def __enter__(self) -> CheckTimes:
        def checked(instance_id: str, primary_failures: int) -> None:
            with self._lock:
                self.times.setdefault(instance_id, []).append(time.monotonic())
            self._original(instance_id, primary_failures)

        instruments.checked = checked
        return self

    def __exit__(self, *exc: object) -> None:
        instruments.checked = self._original

    def checked_at_least(self, ids: list[str], count: int) -> bool:
        with self._lock:
            return all(len(self.times.get(i, ())) >= count for i in ids)

    def intervals(self, ids: list[str], start: float, end: float) -> list[float]:
        with self._lock:
            out: list[float] = []
            for i in ids:
                stamps = [t for t in self.times.get(i, ()) if start <= t <= end]
                out.extend(b - a for a, b in itertools.pairwise(stamps))
            return out


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"monitor_scale: {what} not within {timeout:.0f} s")
        time.sleep(0.2)


def queued_failovers(runtime: Any, ids: list[str] | None = None) -> dict[str, dt.datetime]:
    """instance id → when its failover (resurrect) operation was queued."""
    query = select(Operation.instance_id, Operation.created_at).where(
        Operation.kind == RESURRECT)
    if ids is not None:
        query = query.where(Operation.instance_id.in_(ids))
    with runtime.store.session() as s:
        rows = s.execute(query).all()
    return {str(instance_id): created for instance_id, created in rows}


def fault(runtime: Any, inflict: Any, victims: list[str], interval: float) -> list[float]:
    """Inflict a fault at a random phase of the sweep; seconds from it to each victim's
    failover being queued."""
    time.sleep(random.uniform(0.0, interval))
    at = inflict()
    wait_for(lambda: len(queued_failovers(runtime, victims)) == len(victims), 60,
             "a failover queued for every instance of the server")
    return [(d.replace(tzinfo=dt.UTC) if d.tzinfo is None else d).timestamp() - at
            for d in queued_failovers(runtime, victims).values()]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    password = uuid.uuid4().hex
    per_server = args.instances // args.servers + 20
    servers: list[Server] = []
    scratch = Path(tempfile.mkdtemp(prefix="pgha-monscale-state-"))
    stop = threading.Event()
    thread = None
    runtime = None
    try:
        store = Server("127.0.1.250", password, 100)
        servers.append(store)
        for k in range(args.servers):
            servers.append(Server(f"127.0.1.{k + 1}", password, per_server))
        crash = Server("127.0.1.200", password, args.crashed + 20)
        servers.append(crash)
        frozen = Server("127.0.1.201", password, 3 * args.frozen + 20)
        servers.append(frozen)
        url = f"postgresql://postgres:{password}@{store.address}:5432/postgres"
        settings = load_settings({"BROKER_USERNAME": "bench", "BROKER_PASSWORD": "bench",
                                  "BROKER_STATE_DIR": str(scratch), "DATABASE_URL": url,
                                  "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode()})
        runtime = build_runtime(settings)
        watched, by_victim = fill(runtime, [s.address for s in servers[1:-2]],
                                  args.instances,
                                  {crash.address: args.crashed, frozen.address: args.frozen},
                                  password)
        everyone = watched + by_victim[crash.address] + by_victim[frozen.address]
        monitor = Monitor(runtime, None, drive_queued=False)
        with CheckTimes() as checks:
            thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
            thread.start()
            wait_for(lambda: checks.checked_at_least(everyone, 2), 180,
                     "every instance checked twice")
            wall0, cpu0 = time.monotonic(), time.process_time()
            load0 = os.getloadavg()[0]
            with CpuSamples() as cpu:
                time.sleep(args.seconds)
            wall1, cpu1 = time.monotonic(), time.process_time()
            load1 = os.getloadavg()[0]
            intervals = checks.intervals(watched, wall0, wall1)
            interval = settings.monitor.check_interval
            detect = fault(runtime, crash.kill, by_victim[crash.address], interval)
            freeze_detect = fault(runtime, frozen.freeze, by_victim[frozen.address], interval)
            wrong = len(queued_failovers(runtime)) - len(detect) - len(freeze_detect)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        if runtime is not None:
            runtime.store.dispose()
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(),
        "load_average_1m": [round(load0, 1), round(load1, 1)],
        "instances": args.instances, "servers": args.servers, "seconds": args.seconds,
        "crashed_instances": args.crashed,
        "frozen_instances": args.frozen,
        "cpu_cores": round((cpu1 - cpu0) / (wall1 - wall0), 3),
        "cpu_cores_p50": round(percentile(cpu.cores, 0.5), 3),
        "cpu_cores_p95": round(percentile(cpu.cores, 0.95), 3),
        "check_interval_p50_s": round(percentile(intervals, 0.5), 3),
        "check_interval_p99_s": round(percentile(intervals, 0.99), 3),
        "check_interval_max_s": round(max(intervals), 3),
        "crash_detect_p50_s": round(percentile(detect, 0.5), 3),
        "crash_detect_p95_s": round(percentile(detect, 0.95), 3),
        "freeze_detect_p50_s": round(percentile(freeze_detect, 0.5), 3),
        "freeze_detect_p95_s": round(percentile(freeze_detect, 0.95), 3),
        "false_failovers": wrong,
        "raw": {"crash_detect_s": sorted(round(d, 3) for d in detect),
                "freeze_detect_s": sorted(round(d, 3) for d in freeze_detect),
                "cpu_cores_per_second": [round(c, 3) for c in cpu.cores],
                "check_intervals": len(intervals)},
    }


def section(result: dict[str, Any]) -> str:
    start, end = markers("monitor_scale.py")
    return "\n".join([
        start, "## Monitor at scale (benchmarks/monitor_scale.py)", "",
        f"One monitor process (the broker's `Monitor`, default settings: 1 s interval, 1 s "
        f"probe deadline, 3 failures) watches {result['instances']} `standalone` instances "
        "(one node each). All but "
        f"{result['crashed_instances']} have their node on one of {result['servers']} real "
        "PostgreSQL 15 servers on loopback addresses (each answers for many instances, one "
        "persistent probe session per instance, without TLS here); "
        f"{result['crashed_instances']} on one more server, killed (kill -9 of every "
        "process) after the measured window at a random phase of the sweep, then "
        f"{result['frozen_instances']} on another, frozen (SIGSTOP of every process: "
        "connections still accepted by the kernel, nothing answers). The state "
        "store is PostgreSQL on loopback. The failovers queued (resurrects, the standalone "
        "plan's) are left queued: only detection is measured. An ha instance has two nodes, "
        "so two probe sessions.",
        "",
        "| instances | cpu_cores (window) | per second p50 | p95 | check interval p50 | p99 "
        "| max | crash detect p50 | p95 | freeze detect p50 | p95 | false failovers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['instances']} | {result['cpu_cores']} | {result['cpu_cores_p50']} | "
        f"{result['cpu_cores_p95']} | "
        f"{result['check_interval_p50_s']} s | {result['check_interval_p99_s']} s | "
        f"{result['check_interval_max_s']} s | {result['crash_detect_p50_s']} s | "
        f"{result['crash_detect_p95_s']} s | {result['freeze_detect_p50_s']} s | "
        f"{result['freeze_detect_p95_s']} s | {result['false_failovers']} |", "",
        "Detection is from the fault to the failover queued (the first write after it "
        "needs the failover's own steps on top: benchmarks/failover.py). Ratios: "
        f"cpu_cores {result['cpu_cores']} is {result['cpu_cores'] / 1.0:.0%} of the "
        "one-core target; crash detect p95 "
        f"{result['crash_detect_p95_s']} s against the 1.5 s crashed p95 target for the "
        f"first write; freeze detect p95 {result['freeze_detect_p95_s']} s against 3.5 s.",
        "",
        f"{result['when']}; vm: 2 cores shared with the PostgreSQL servers, "
        f"{result['machine']}; load average {result['load_average_1m'][0]} at the start "
        f"of the {result['seconds']} s window and {result['load_average_1m'][1]} at its "
        "end. `cpu_cores`: the process's CPU seconds over wall seconds (per second: "
        "each second of the window). Target: 1,000 "
        "instances with cpu_cores < 1. Raw data: `benchmarks/results/monitor_scale.json`.",
        end, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--crashed", type=int, default=20)
    parser.add_argument("--frozen", type=int, default=20)
    parser.add_argument("--json", type=Path, nargs="?", const=RESULTS)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("monitor_scale: run as root (servers run as the postgres user)")
    setup_logging(os.environ.get("BROKER_LOG_LEVEL", "WARNING"))
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        write_section(args.write, section(result), "monitor_scale.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
