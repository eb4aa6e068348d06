"""A tiny workflow for engine tests: each step appends its name to a journal file.

Run as a script it drives one engine pass (used to SIGKILL a worker mid-operation).
"""

from __future__ import annotations

import sys
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
from broker.store import Store


@dataclass(frozen=True)
class ToyParams(Params):
    journal: str


def _journal(ctx: Context, entry: str) -> None:
    with Path(ctx.params_of(ToyParams).journal).open("a") as handle:
        handle.write(entry + "\n")


def _step(name: str) -> Step:
    return Step(name, f"doing {name}", lambda ctx: _journal(ctx, name))


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


def make_engine(url: str, key: str, **options: Any) -> Engine:
    register(TOY)
    register(TOY_FAILING)
    settings = load_settings({"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p",
                              "BROKER_STATE_DIR": "/nonexistent", "DATABASE_URL": url})
    # The toy steps never touch the cloud: a local cloud that is never used.
    cloud = LocalCloud(Path("/nonexistent/pgha-toy"), IPv4Network("10.214.255.0/28"), "pghatoy")
    return Engine(Store(url), cloud, Vault(key), load_catalog(DEFAULT_CATALOG),
                  settings, poll_interval=0.05, **options)


if __name__ == "__main__":
    make_engine(sys.argv[1], sys.argv[2]).run_pending()
