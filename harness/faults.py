"""Faults a test or benchmark applies to a server of the local cloud: kill -9 everything
in its namespace (and take its links down: a dead host), SIGSTOP it, cut it off from
the broker alone, or freeze only its walreceiver (the server keeps running and
answering the monitor's probes, but receives nothing more). Or to a whole hypervisor
or zone: every server on it dies with its links down, and it takes no new server
until it is powered on again (its servers stay off then, as after a reboot).
`failover_env`'s teardown heals partitions and sends SIGCONT to every process a test
froze."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from broker.cloud.local import LocalCloud, namespace_pids


def crash_namespace(ns: str, *, links_down: bool = False) -> None:
    """kill -9 every process of a server's namespace; with `links_down`, also cut
    its links first, as a dead host would (connects then time out, not refuse)."""
    if links_down:
        out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                             text=True, check=False).stdout
        for line in out.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            if name != "lo":
                subprocess.run(["ip", "-n", ns, "link", "set", name, "down"], check=True)
    for pid in namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def netns(cloud: LocalCloud, server_id: str) -> str:
    return cloud.namespace(server_id)


def kill_server(cloud: LocalCloud, server_id: str, *, links_down: bool = False) -> None:
    """kill -9 every process in the server's namespace (and cut its links: a dead host)."""
    crash_namespace(netns(cloud, server_id), links_down=links_down)


def kill_host(cloud: LocalCloud, host: str) -> list[str]:
    """A dead hypervisor: every server on it loses its links and its processes; returns
    the servers it carried."""
    return cloud.power_off_host(host)


def kill_zone(cloud: LocalCloud, zone: str) -> list[str]:
    """Every host of the zone dies; returns the servers they carried."""
    return [sid for host in cloud.hosts().get(zone, []) for sid in kill_host(cloud, host)]


def revive_host(cloud: LocalCloud, host: str) -> None:
    cloud.power_on_host(host)


def revive_zone(cloud: LocalCloud, zone: str) -> None:
    for host in cloud.hosts().get(zone, []):
        revive_host(cloud, host)


def host_of(cloud: LocalCloud, server_id: str) -> str:
    server = cloud.get_server(server_id)
    assert server is not None, f"no server {server_id}"
    return server.details["host"]


def freeze_server(cloud: LocalCloud, server_id: str) -> list[int]:
    """SIGSTOP the postmaster and all its children (the server hangs, TCP still answers)."""
    pids = namespace_pids(netns(cloud, server_id))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


_BLACKHOLES: set[str] = set()


def partition_from_broker(cloud: LocalCloud, server_id: str) -> None:
    """The broker (this host) can no longer reach the server's management address; apps
    still reach the service address and the standby still streams: a partition."""
    server = cloud.get_server(server_id)
    assert server is not None and server.management_address
    subprocess.run(["ip", "route", "add", "blackhole", f"{server.management_address}/32"],
                   check=True)
    _BLACKHOLES.add(server.management_address)


def heal_partitions() -> None:
    for address in list(_BLACKHOLES):
        subprocess.run(["ip", "route", "del", "blackhole", f"{address}/32"], check=False,
                       capture_output=True)
        _BLACKHOLES.discard(address)


def thaw_everything(cloud: LocalCloud) -> None:
    """SIGCONT whatever a test froze, so that teardown can stop it."""
    for ns in cloud.namespaces():
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


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
