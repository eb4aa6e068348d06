"""What TLS costs: provisioning and the first write after a failover, before and after.

Run as root:  .venv/bin/python benchmarks/tls_cost.py --base REV [--pairs 2]
              [--provision-runs 4] [--failover-rounds 6] [--write BENCHMARKS.md]

REV is a commit without TLS (the last one before it landed). The script checks it out
into a temporary git worktree and runs the same two benchmarks of each tree
(`benchmarks/provision.py` for `ha-sync`, `benchmarks/failover.py` with the `crashed`
scenario) alternately, base then current, `--pairs` times, so both see the same
machine load. Each tree runs its own code with this virtualenv (a benchmark puts its
own tree first on `sys.path`). Raw data of every run goes to
`benchmarks/results/tls_cost.json`; the section between the markers in BENCHMARKS.md
is rewritten with medians, p95 and ratios from this one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from report import markers, percentile, write_section  # benchmarks/report.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARK_START, MARK_END = markers("tls_cost.py")




def run_tree(tree: Path, args: argparse.Namespace, scratch: Path, label: str) -> dict[str, Any]:
    """One provisioning run and one failover run of the benchmarks in `tree`."""
    prov_json = scratch / f"{label}-provision.json"
    fail_json = scratch / f"{label}-failover.json"
    py = sys.executable
    subprocess.run([py, str(tree / "benchmarks" / "provision.py"), "--plans", "ha-sync",
                    "--runs", str(args.provision_runs), "--json", str(prov_json)],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([py, str(tree / "benchmarks" / "failover.py"), "--scenarios", "crashed",
                    "--rounds", str(args.failover_rounds), "--json", str(fail_json)],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL)
    provision = json.loads(prov_json.read_text())
    rounds = json.loads(fail_json.read_text())
    return {
        "provision_median_s": provision["plans"]["ha-sync"]["provision_median_s"],
        "failover_rounds": rounds,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    provision = [r["provision_median_s"] for r in runs]
    first = [x["first_write"] for r in runs for x in r["failover_rounds"]]
    lost = sum(x["lost"] for r in runs for x in r["failover_rounds"])
    return {
        "provision_median_of_medians_s": statistics.median(provision),
        "first_write_p50_s": statistics.median(first),
        "first_write_p95_s": percentile(first, 0.95),
        "failover_rounds": len(first),
        "lost": lost,
    }


def markdown(base: str, when: str, pairs: int, plain: dict[str, float],
             tls: dict[str, float]) -> str:
    def ratio(key: str) -> str:
        return f"{tls[key] / plain[key]:.2f}x" if plain[key] else "n/a"

    rows = [
        ("`ha-sync` provisioning, PUT → succeeded (median of the runs' medians)",
         "provision_median_of_medians_s"),
        ("first write after a crashed primary, p50", "first_write_p50_s"),
        ("first write after a crashed primary, p95", "first_write_p95_s"),
    ]
    lines = [
        MARK_START,
        "## The cost of TLS (benchmarks/tls_cost.py)",
        "",
        f"{when}; {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}. The same benchmarks of commit `{base}` (no "
        f"TLS) and of this tree (TLS everywhere: apps, replication, the broker's sessions, "
        f"`verify-full` against the instance CA), run alternately {pairs} times in one run: "
        "`provision.py --plans ha-sync` and `failover.py --scenarios crashed` (the client "
        "of this tree verifies the server certificate on every reconnect).",
        "",
        "| figure | without TLS | with TLS | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {plain[key]:.2f} s | {tls[key]:.2f} s | {ratio(key)} |")
    lines += [
        "",
        f"Failover rounds: {plain['failover_rounds']:.0f} without TLS, "
        f"{tls['failover_rounds']:.0f} with; acknowledged writes lost: "
        f"{plain['lost']:.0f} and {tls['lost']:.0f}. Raw data: "
        "`benchmarks/results/tls_cost.json`.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a commit without TLS")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--provision-runs", type=int, default=4)
    parser.add_argument("--failover-rounds", type=int, default=6)
    parser.add_argument("--write", type=Path, help="put the figures into this markdown file")
    args = parser.parse_args()
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    scratch = Path(tempfile.mkdtemp(prefix="pgha-tls-cost-"))
    base_tree = scratch / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), base],
                   cwd=ROOT, check=True)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    try:
        for i in range(args.pairs):
            runs["plain"].append(run_tree(base_tree, args, scratch, f"plain{i}"))
            runs["tls"].append(run_tree(ROOT, args, scratch, f"tls{i}"))
            print(f"pair {i + 1}/{args.pairs} done", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT,
                       check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    plain, tls = summarise(runs["plain"]), summarise(runs["tls"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tls_cost.json").write_text(json.dumps(
        {"when": when, "base": base, "pairs": args.pairs, "runs": runs,
         "summary": {"plain": plain, "tls": tls}}, indent=1) + "\n")
    section = markdown(base, when, args.pairs, plain, tls)
    print(section)
    if args.write:
        write_section(args.write, section, "tls_cost.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
