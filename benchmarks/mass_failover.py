"""A dead hypervisor carrying many primaries, on real PostgreSQL in network namespaces.

Run as root:  .venv/bin/python benchmarks/mass_failover.py --instances N [--json]
              [--write BENCHMARKS.md] [--log FILE]

N `ha-sync` instances on the local cloud (two hosts per zone: the primaries spread
over az1's two hosts, so half of them share one), each with a client writing through
its service address the whole time (harness/writer.py: connect 0.5 s, statement 1 s;
a write every 50 ms, a retry 5 ms after a failure; the clients run in a process of
their own, harness/apps.py, as apps do).
One worker's engine and monitor run in this process with their defaults (interval
1 s, connect_timeout 1 s, 3 failures; at most BROKER_MAX_FAILOVERS failovers and
BROKER_MAX_REBUILDS rebuilds at once). Once every client writes, the host carrying
the most primaries dies (every server on it: links down, processes killed) at a
random phase of the monitor's tick. Measured:

- first write after the fault of each instance whose primary was there (p50, p95);
- `failed_over`: those whose standby was promoted;
- `lost`: acknowledged writes missing afterwards, over every instance;
- `standbys_back_s`: from the fault until every instance is ready again with a
  streaming synchronous standby (rebuilt on the zone's live host);
- `check_interval_p99_s`: time between two checks of one instance, p99, over the
  instances the fault did not touch, from the fault until the standbys are back;
  whether the failovers starve the monitor;
- `phases`: for each hit instance, seconds from the fault to the monitor's decision
  (the failover queued), the fence, the service port's move, the promotion and the
  first write, from its Failover row; and the client's last error before that write.
  Their p50 and p95 are `phases_p50_s` and `phases_p95_s`;
- the load average when the host dies and when the standbys are back.

Prints one JSON object; `--write` puts a section in BENCHMARKS.md, `--json-file` keeps
it (default benchmarks/results/mass_failover.json when --write is given).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover import machine  # benchmarks/failover.py, beside this script
from report import markers, percentile, write_section  # benchmarks/report.py

from broker.config import OperationSettings, default_max_failovers
from broker.metrics import instruments
from broker.store.models import READY, Failover, aware
from harness.apps import Apps
from harness.env import FailoverEnv, background, failover_env
from harness.faults import host_of, kill_host
from harness.state_server import StateServer
from harness.waiting import eventually, failovers, settled
from harness.workflows import deprovision, finish, instance, make_engine, queue_provision
from harness.writer import WriteLog, app_credentials, stored_ids

MARK_START, MARK_END = markers("mass_failover.py")
# Each client writes every 50 ms while its writes succeed and retries 5 ms after a
# failure: the return of writes is timed to 5 ms, as with the single-instance
# benchmark's client, without twenty clients writing flat out on the two cores that
# also run the forty servers and the broker (at 5 ms they kept the load average at 4-7
# before the fault).
WRITE_PAUSE, RETRY_PAUSE = 0.05, 0.005
RESULTS = Path(__file__).resolve().parent / "results" / "mass_failover.json"
log = logging.getLogger("bench")


class CheckTimes:
    """When the monitor checked each instance (wraps the check clock it reports to)."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = defaultdict(list)
        self._clock = instruments.check_clock
        self._checked = self._clock.checked

    def __enter__(self) -> CheckTimes:
        def checked(instance_id: str) -> None:
            self.at[instance_id].append(time.monotonic())
            self._checked(instance_id)
        self._clock.checked = checked  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._clock.checked = self._checked  # type: ignore[method-assign]

    def intervals(self, instance_ids: list[str], start: float, end: float) -> list[float]:
        gaps = []
        for instance_id in instance_ids:
            times = [t for t in self.at[instance_id] if start <= t <= end]
            gaps += [b - a for a, b in itertools.pairwise(times)]
        return gaps


def provision_all(env: FailoverEnv, count: int, parallel: int) -> list[str]:
    """Queue every provision, run them on `parallel` engines of this process."""
    queued = [queue_provision(env.runtime, "ha-sync") for _ in range(count)]
    stop = threading.Event()
    engines = [make_engine(env.runtime) for _ in range(parallel)]
    threads = [threading.Thread(target=e.loop, args=(stop,), daemon=True) for e in engines]
    for t in threads:
        t.start()
    try:
        for _instance_id, op_id in queued:
            finish(env.engine, op_id)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return [instance_id for instance_id, _ in queued]


def ready_and_sync(env: FailoverEnv, instance_id: str) -> bool:
    inst = instance(env.runtime, instance_id)
    standby = inst.standby()
    return settled(env, instance_id) and standby is not None and \
        inst.sync_standby_node_id == standby.id


def run(count: int, parallel: int, operations: OperationSettings | None,
        state: str) -> dict[str, Any]:
    server = StateServer() if state == "postgresql" else None
    try:
        result = _run(count, parallel, operations,
                      server.create_database() if server is not None else None)
    finally:
        if server is not None:
            server.stop()
    return {**result, "state_store": state}


def _run(count: int, parallel: int, operations: OperationSettings | None,
         state_url: str | None) -> dict[str, Any]:
    with failover_env(state_url) as env, contextlib.ExitStack() as stack:
        if operations is not None:
            env.runtime.settings = dataclasses.replace(env.runtime.settings,
                                                       operations=operations)
        ids = provision_all(env, count, parallel)
        log.info("%d instances provisioned", len(ids))
        creds = {i: app_credentials(env, i, f"app-{i}") for i in ids}
        apps = Apps(creds, pause=WRITE_PAUSE, retry_pause=RETRY_PAUSE)
        stack.callback(apps.close)
        checks = stack.enter_context(CheckTimes())
        stack.enter_context(background(env))
        eventually(lambda: all(ready_and_sync(env, i) for i in ids),
                   "every instance ready with a synchronous standby", 300)
        apps.wait_acks(20, after=time.monotonic(), timeout=120)
        primaries = {i: instance(env.runtime, i).primary() for i in ids}
        on_host: dict[str, list[str]] = defaultdict(list)
        for i, node in primaries.items():
            assert node is not None and node.server_id is not None
            on_host[host_of(env.cloud, node.server_id)].append(i)
        host, hit = max(on_host.items(), key=lambda item: len(item[1]))
        spared = [i for i in ids if i not in hit]
        time.sleep(random.uniform(0.0, env.runtime.settings.monitor.check_interval))
        load_at_kill = os.getloadavg()[0]
        kill_at, kill_wall = time.monotonic(), time.time()
        kill_host(env.cloud, host)
        killed_in = time.monotonic() - kill_at
        log.info("host %s killed with %d primaries in %.2f s", host, len(hit), killed_in)
        first = {i: t - kill_at for i, t in apps.wait_recovery(hit, kill_at).items()}

        def back(i: str) -> bool:
            inst, old = instance(env.runtime, i), primaries[i]
            primary = inst.primary()
            return inst.state == READY and primary is not None and old is not None \
                and primary.id != old.id and ready_and_sync(env, i)
        # Polled every 0.5 s: each look connects to the nodes, in the broker's process.
        eventually(lambda: all(back(i) for i in hit), "every standby back", 600,
                   interval=0.5)
        back_at = time.monotonic()
        load_back = os.getloadavg()[0]
        apps.wait_acks(5, after=back_at, timeout=120)
        logs = apps.stop()
        stack.close()  # the monitor and the check clock stop
        gaps = checks.intervals(spared, kill_at, back_at)
        old_ids = {i: node.id for i, node in primaries.items() if node is not None}
        events = {i: next((e for e in failovers(env, i) if e.outcome == "succeeded"
                           and e.old_primary_node_id == old_ids[i]), None) for i in hit}
        failed_over = sum(1 for e in events.values() if e is not None)
        phases = [_phases(events[i], kill_wall, first[i], logs[i], kill_at) for i in hit]
        lost = sum(len({n for n, _ in logs[i].acked} - stored_ids(creds[i])) for i in ids)
        acked = sum(len(w.acked) for w in logs.values())
        for i in ids:
            deprovision(env.runtime, env.engine, i)
        settings = env.runtime.settings
    values = sorted(first.values())
    return {
        "instances": count, "host_primaries": len(hit), "failed_over": failed_over,
        "host_kill_s": round(killed_in, 3),
        "first_write_p50_s": round(statistics.median(values), 3),
        "first_write_p95_s": round(percentile(values, 0.95), 3),
        "first_write_max_s": round(values[-1], 3),
        "lost": lost, "acked": acked,
        "standbys_back_s": round(back_at - kill_at, 3),
        "check_interval_p99_s": round(percentile(gaps, 0.99), 3) if gaps else None,
        "check_interval_max_s": round(max(gaps), 3) if gaps else None,
        "max_failovers": settings.operations.max_failovers,
        "max_rebuilds": settings.operations.max_rebuilds,
        "load_at_kill": round(load_at_kill, 2), "load_when_back": round(load_back, 2),
        "phases_p50_s": _summary(phases, 0.5), "phases_p95_s": _summary(phases, 0.95),
        "phases": phases,
    }


PHASES = ("decided", "fenced", "port_moved", "promoted", "first_write")


def _phases(event: Failover | None, kill_wall: float, first: float, writer: WriteLog,
            kill_at: float) -> dict[str, Any]:
    """Seconds from the fault to each step of one instance's failover (its row)."""
    def since(moment: dt.datetime | None) -> float | None:
        moment = aware(moment)
        return None if moment is None else round(moment.timestamp() - kill_wall, 3)
    errors = [e for t, e in writer.errors if kill_at <= t <= kill_at + first]
    return {
        "decided": since(event.detected_at) if event else None,
        "fenced": since(event.fenced_at) if event else None,
        "port_moved": since(event.port_attached_at) if event else None,
        "promoted": since(event.promoted_at) if event else None,
        "first_write": round(first, 3),
        "last_error": errors[-1] if errors else None,
    }


def _summary(phases: list[dict[str, Any]], q: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in PHASES:
        values = [p[name] for p in phases if p[name] is not None]
        out[name] = round(percentile(values, q), 3) if values else None
    return out


def single_instance_p50(scenario: str) -> float | None:
    """The one-instance first-write p50 of `scenario` that failover.py last recorded."""
    path = RESULTS.parent / "failover.json"
    if not path.exists():
        return None
    rounds = [r["first_write"] for r in json.loads(path.read_text()) if r["scenario"] == scenario]
    return round(statistics.median(rounds), 3) if rounds else None


def with_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The target compares with a single black-holed instance: a dead host's servers
    time out, as `blackholed` does there; they do not refuse like `crashed`."""
    blackholed = single_instance_p50("blackholed")
    return {**result, "single_crashed_p50_s": single_instance_p50("crashed"),
            "single_blackholed_p50_s": blackholed,
            "target_met": blackholed is not None and result["failed_over"]
            == result["host_primaries"] and result["lost"] == 0
            and result["first_write_p95_s"] <= 2 * blackholed}


def markdown(result: dict[str, Any], when: str) -> str:
    r = result
    return "\n".join([
        MARK_START,
        "## A dead host with many primaries (benchmarks/mass_failover.py)",
        "",
        f"{when}; {machine()}. {r['instances']} `ha-sync` instances ({2 * r['instances']} "
        "PostgreSQL servers) on the local cloud, two hosts per zone, a client writing "
        "through each service address (every 50 ms, a retry 5 ms after a failure; the "
        "clients in a process of their own, as apps run apart from the broker); one worker "
        "(engine and monitor in one process, monitor defaults; at most "
        f"{r['max_failovers']} failovers and {r['max_rebuilds']} rebuilds at once), its "
        f"state store {_store(r)}. The host carrying the most primaries "
        "dies (links down, processes killed) at a random phase of the monitor's tick.",
        "",
        "| primaries on the dead host | failed over | first write p50 / p95 / max "
        "| acknowledged writes lost | every standby back | check interval p99 / max "
        "(untouched instances) |",
        "|---|---|---|---|---|---|",
        f"| {r['host_primaries']} of {r['instances']} | {r['failed_over']} | "
        f"{r['first_write_p50_s']:.2f} / {r['first_write_p95_s']:.2f} / "
        f"{r['first_write_max_s']:.2f} s | {r['lost']} of {r['acked']} | "
        f"{r['standbys_back_s']:.1f} s | {_s(r['check_interval_p99_s'])} / "
        f"{_s(r['check_interval_max_s'])} |",
        "",
        "Per hit instance, p50 / p95 seconds from the fault: failover decided "
        f"{_pair(r, 'decided')}, old primary fenced {_pair(r, 'fenced')}, service port "
        f"moved {_pair(r, 'port_moved')}, standby promoted {_pair(r, 'promoted')}, first "
        f"write {_pair(r, 'first_write')} (each instance's Failover row; `phases` in the "
        "raw figures). Load average (1 min) when the host died: "
        f"{r.get('load_at_kill', 'n/a')}, when the standbys were back: "
        f"{r.get('load_when_back', 'n/a')}.",
        "",
        "Target: every instance failed over, 0 lost, first write p95 at most twice the "
        "single-instance black-holed p50 (benchmarks/failover.py: "
        f"{_s(r['single_blackholed_p50_s'])}): {'met' if r['target_met'] else 'not met'}. "
        "A dead host's servers time out rather than refuse, like `blackholed` there, not "
        f"like `crashed` (p50 {_s(r['single_crashed_p50_s'])}): detection alone takes the "
        f"monitor's three probes of 1 s. The host was killed in {r['host_kill_s']:.2f} s "
        "(every process frozen in one pass, then links cut and processes killed). The "
        "machine is shared with other work while it runs. Raw figures: "
        "benchmarks/results/mass_failover.json.",
        MARK_END,
    ]) + "\n"


def _store(r: dict[str, Any]) -> str:
    if r.get("state_store", "sqlite") == "postgresql":
        return "PostgreSQL on loopback (as a production deployment keeps it)"
    return "the embedded default's SQLite"


def _pair(r: dict[str, Any], phase: str) -> str:
    low, high = r.get("phases_p50_s", {}).get(phase), r.get("phases_p95_s", {}).get(phase)
    return "n/a" if low is None or high is None else f"{low:.2f} / {high:.2f}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=3,
                        help="provisions run at once while setting up")
    parser.add_argument("--max-failovers", type=int, help="BROKER_MAX_FAILOVERS for the run")
    parser.add_argument("--max-rebuilds", type=int, help="BROKER_MAX_REBUILDS for the run")
    parser.add_argument("--state", choices=("postgresql", "sqlite"), default="postgresql",
                        help="the broker's state store: PostgreSQL on loopback (as a "
                        "production deployment keeps it), or the embedded default's SQLite")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--write", type=Path, help="put the figures into this markdown file")
    parser.add_argument("--json-file", type=Path, help="keep the JSON object there "
                        "(default with --write: benchmarks/results/mass_failover.json)")
    parser.add_argument("--log", type=Path, help="the broker's log (INFO) goes to this file")
    parser.add_argument("--from-json", type=Path, help="only render the section of a run "
                        "saved with --json-file (or --write)")
    args = parser.parse_args()
    if args.from_json:
        saved = with_targets(json.loads(args.from_json.read_text()))
        print(json.dumps(saved, indent=None if args.json else 1))
        if args.write:
            write_section(args.write, markdown(saved, saved["when"]), "mass_failover.py")
        return 0
    if args.instances < 2:
        parser.error("--instances must be at least 2")
    if args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s.%(msecs)03d %(threadName)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    bounds = None
    if args.max_failovers or args.max_rebuilds:
        # What the worker would run without the flags: the local cloud's defaults.
        default = OperationSettings(max_failovers=default_max_failovers("local"))
        bounds = OperationSettings(max_failovers=args.max_failovers or default.max_failovers,
                                   max_rebuilds=args.max_rebuilds or default.max_rebuilds)
    result = with_targets(run(args.instances, args.parallel, bounds, args.state))
    result["when"] = when
    print(json.dumps(result, indent=None if args.json else 1))
    if args.write:
        write_section(args.write, markdown(result, when), "mass_failover.py")
    target = args.json_file or (RESULTS if args.write else None)
    if target is not None:
        target.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
