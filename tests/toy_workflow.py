"""Tiny workflows for engine and queue tests: each step appends its name to a journal.

Run as a script it is a worker on a state store (used to SIGKILL one mid-operation):

    python -m tests.toy_workflow URL KEY                 run what is queued, then exit
    python -m tests.toy_workflow URL KEY --lease S       the same with an S-second lease
    python -m tests.toy_workflow URL KEY --claim OP --at T
        at wall-clock time T (epoch seconds) race for OP; print "won" or "lost"

BROKER_HOST_IDENTITY gives the worker the host it says it runs on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from broker.catalog import load_catalog
from broker.cloud.local import LocalCloud
from broker.config import DEFAULT_CATALOG, load_settings
from broker.crypto import Vault
from broker.operations.engine import Context, Engine, Step, StepFailed, Workflow, register
from broker.operations.params import Params
from broker.operations.queue import LEASE_SECONDS
from broker.store import Store
from broker.store.models import Operation


@dataclass(frozen=True)
class ToyParams(Params):
    journal: str
    gate: str | None = None   # toy-hold's middle step waits until this file exists


def _journal(ctx: Context, entry: str) -> None:
    with Path(ctx.params_of(ToyParams).journal).open("a") as handle:
        handle.write(entry + "\n")


def _step(name: str) -> Step:
    return Step(name, f"doing {name}", lambda ctx: _journal(ctx, name))


def _hold(ctx: Context) -> None:
    gate = ctx.params_of(ToyParams).gate
    assert gate is not None
    while not Path(gate).exists():
        time.sleep(0.05)
    _journal(ctx, "hold")


def _fail(ctx: Context) -> None:
    raise StepFailed("the quota for volumes is exhausted")


TOY = Workflow(
    kind="toy",
    steps=lambda ctx: [_step("first"), _step("second"), _step("third")],
    done="toy done",
    params=ToyParams,
)
TOY_FAILING = Workflow(
    kind="toy-failing",
    steps=lambda ctx: [_step("first"), Step("boom", "making a volume", _fail), _step("never")],
    cleanup=lambda ctx, reason: _journal(ctx, f"cleanup: {reason}"),
    params=ToyParams,
)
TOY_HOLD = Workflow(
    kind="toy-hold",
    steps=lambda ctx: [_step("first"), Step("hold", "holding", _hold), _step("third")],
    params=ToyParams,
)


def make_engine(url: str, key: str, **options: Any) -> Engine:
    for workflow in (TOY, TOY_FAILING, TOY_HOLD):
        register(workflow)
    settings = load_settings({"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p",
                              "BROKER_STATE_DIR": "/nonexistent", "DATABASE_URL": url})
    # The toy steps never touch the cloud: a local cloud that is never used.
    cloud = LocalCloud(Path("/nonexistent/pgha-toy"), IPv4Network("10.214.255.0/28"), "pghatoy")
    return Engine(Store(url), cloud, Vault(key), load_catalog(DEFAULT_CATALOG),
                  settings, poll_interval=0.05, **options)


def _race(engine: Engine, op_id: str, start: float) -> str:
    time.sleep(max(0.0, start - time.time()))
    while True:
        if engine.claim(op_id) == op_id:
            return "won"
        with engine.store.session() as s:
            op = s.get(Operation, op_id)
            if op is not None and op.owner is not None:
                return "lost"


KEY_ENV = "TOY_WORKFLOW_KEY"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--lease", type=float, default=LEASE_SECONDS)
    parser.add_argument("--claim")
    parser.add_argument("--at", type=float, default=0.0)
    args = parser.parse_args(argv)
    # The key comes from the environment: a Fernet key may start with "-", which
    # argparse would take for an option (and argv is visible to every local user).
    engine = make_engine(args.url, os.environ[KEY_ENV], lease_seconds=args.lease)
    if args.claim:
        print(_race(engine, args.claim, args.at), flush=True)
    else:
        engine.run_pending()


if __name__ == "__main__":
    main(sys.argv[1:])
