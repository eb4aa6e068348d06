"""OpenStack failover in the fake: first acknowledged write after a dead hypervisor.

The broker runs with its OpenStack driver against the HTTP-level fake, whose servers
are local-cloud namespaces running real PostgreSQL (tests/fakes/openstack/). An
`ha-sync` instance serves a writer; the primary's hypervisor dies (no heartbeat, no
work done, its guests gone). Measured: from that moment to the writer's first
acknowledged write through the service address.

Two ways to fence, each with Nova's `service_down_time` at its upstream default (60 s)
and at 6 s:
- member-only credentials (Nova's default policy hides host status): stop, wait
  `stop_timeout`, delete, repeated until Nova counts the host down and local-deletes;
- an admin connection and an operator's fencing hook (here a script that confirms at
  once): the hook runs once the host's heartbeat has been frozen for
  `fence_hook_after`, then the service is forced down and the delete is local.
The driver's fencing settings are its defaults (stop_timeout 30 s, fence_hook_after
30 s, polls backing off to 5 s). These are the fake's figures, not a real cloud's.

Run as root: .venv/bin/python benchmarks/openstack_failover.py [--runs 3]
             [--json FILE] [--write BENCHMARKS.md] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markers, write_section  # benchmarks/report.py, beside this script

from broker.cloud.openstack import OpenStackOptions
from harness.scenarios import under_write_load
from harness.workflows import deprovision, instance
from tests.fakes.openstack.on_namespaces import openstack_on_namespaces

SCRIPT = "openstack_failover.py"
DEFAULTS = OpenStackOptions()
# The fencing ladder as shipped; only the boot and API waits stay the tests' short ones.
LADDER: dict[str, Any] = {
    "stop_timeout": DEFAULTS.stop_timeout, "detach_timeout": DEFAULTS.detach_timeout,
    "host_down_timeout": DEFAULTS.host_down_timeout,
    "fence_hook_after": DEFAULTS.fence_hook_after,
    "poll_interval": DEFAULTS.poll_interval, "poll_max_interval": DEFAULTS.poll_max_interval,
}
CASES = [("member-only", 60.0), ("member-only", 6.0), ("fencing hook", 60.0),
         ("fencing hook", 6.0)]


def one_run(how: str, service_down_time: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        options = dict(LADDER)
        admin = how == "fencing hook"
        if admin:
            hook = tmp_path / "fence-hook"
            hook.write_text("#!/bin/sh\nexit 0\n")  # IPMI says: powered off
            hook.chmod(0o755)
            options["fence_hook"] = str(hook)
        with openstack_on_namespaces(tmp_path, os.environ.__setitem__, admin=admin,
                                     service_down_time=service_down_time, **options) as env, \
                under_write_load(env, "ha-sync") as load:
            primary = instance(env.runtime, load.instance_id).primary()
            assert primary is not None and primary.server_id is not None
            load.writer.wait_acks(20)
            host = env.fake.state.host_of(primary.server_id)
            assert host is not None
            env.fake.state.kill_host(host)
            killed = time.monotonic()
            first = load.writer.wait_acks(5, after=killed, timeout=300)
            load.stop()
            deprovision(env.runtime, env.engine, load.instance_id)
            return first - killed


def run(runs: int) -> dict[str, Any]:
    cases = []
    for how, down in CASES:
        seconds = []
        for _ in range(runs):
            seconds.append(round(one_run(how, down), 2))
            print(f"{how}, service_down_time {down:.0f} s: first write after "
                  f"{seconds[-1]:.2f} s", flush=True)
        cases.append({"fencing": how, "service_down_time_s": down, "runs": runs,
                      "first_write_s": seconds,
                      "median_s": round(statistics.median(seconds), 2)})
    return {
        "benchmark": "first acknowledged write after a dead hypervisor, in the OpenStack fake",
        "date": datetime.date.today().isoformat(),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}",
        "driver_settings": {k: v for k, v in LADDER.items()},
        "cases": cases,
    }


def markdown(figures: dict[str, Any]) -> str:
    start, end = markers(SCRIPT)
    ladder = figures["driver_settings"]
    lines = [
        start,
        "## OpenStack failover: the fake's figures (benchmarks/openstack_failover.py)",
        "",
        "First acknowledged write after the primary's hypervisor dies, `ha-sync`, the "
        "broker's OpenStack driver against the HTTP-level fake (Nova's default policies; "
        "servers are namespaces with real PostgreSQL). **These are the fake's figures, "
        "not a real cloud's**: they show how the fencing ladder's waits add up. Driver "
        f"settings: stop_timeout {ladder['stop_timeout']:.0f} s, fence_hook_after "
        f"{ladder['fence_hook_after']:.0f} s, polls backing off to "
        f"{ladder['poll_max_interval']:.0f} s (the defaults).",
        "",
        "| fencing | Nova `service_down_time` | first write, median | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for case in figures["cases"]:
        runs = ", ".join(f"{s:.1f}" for s in case["first_write_s"])
        lines.append(f"| {case['fencing']} | {case['service_down_time_s']:.0f} s | "
                     f"{case['median_s']:.1f} s | {runs} |")
    lines += ["", "Member-only: the broker cannot see host status; it stops, waits "
              "`stop_timeout`, then deletes until Nova counts the host down "
              "(`service_down_time`) and deletes without it. Fencing hook: an admin "
              "connection, the hook confirms the host off once its heartbeat has been "
              "frozen for `fence_hook_after`, the service is forced down, and the delete "
              "is local at once (or Nova counts the host down first).",
              "", f"{figures.get('when') or figures['date']}; {figures['machine']}."]
    return "\n".join([*lines, end]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--from-json", type=Path, help="only render a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
    else:
        logging.basicConfig(level=logging.WARNING)
        figures = run(args.runs)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
    section = markdown(figures)
    print(section)
    if args.write:
        write_section(args.write, section, SCRIPT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
