"""The monitor's runner: the engine its watchers run what they queued with."""

from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud
from broker.monitor.drive import Driver
from broker.operations.engine import Engine
from harness.waiting import at_once
from harness.workflows import make_runtime


def test_watchers_queueing_together_share_one_runner(tmp_path: Path,
                                                     local_cloud: LocalCloud) -> None:
    """A dead host's watchers queue their failovers at once, each pre-claimed by the
    runner's owner: were two runners made, one watcher's failover would belong to the
    other's and wait for its claim's lease to run out (15 s) before anyone ran it."""
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}",
                           Fernet.generate_key().decode(), local_cloud)
    try:
        driver = Driver(runtime, None)
        runners = at_once(driver.runner, 16)
        assert len(runners) == 16 and all(isinstance(r, Engine) for r in runners)
        assert len({r.owner for r in runners}) == 1
    finally:
        runtime.store.dispose()
