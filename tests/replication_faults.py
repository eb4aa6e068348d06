"""Faults of replication alone: the standby's server keeps running and answering the
monitor's probes, but its walreceiver is frozen (SIGSTOP), so it receives nothing more.
`failover_env`'s teardown sends SIGCONT to every process it froze."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from broker.cloud.local import LocalCloud, namespace_pids


def walreceiver_pid(cloud: LocalCloud, server_id: str) -> int | None:
    """The walreceiver process of the PostgreSQL running in the server's namespace."""
    for pid in namespace_pids(cloud.namespace(server_id)):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"walreceiver" in title:
            return pid
    return None


def freeze_walreceiver(cloud: LocalCloud, server_id: str) -> int:
    """SIGSTOP the standby's walreceiver; returns its pid (for `thaw`)."""
    pid = walreceiver_pid(cloud, server_id)
    assert pid is not None, f"no walreceiver on server {server_id}"
    os.kill(pid, signal.SIGSTOP)
    return pid


def thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
