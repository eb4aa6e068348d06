"""Hypervisors of the local cloud: named hosts inside availability zones.

A server is placed on the host of its zone that carries the fewest servers (ties by
name), among the hosts that are up, as Nova's scheduler spreads by default. A zone
the host map does not name has one implicit host, `<zone>-host-a`. A host can be
powered off (every server on it: links down, processes killed) and on again; its
servers then stay off until someone starts or replaces them, as after a real
hypervisor's reboot. A zone with no host up takes no new server (`NoValidHost`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from broker.cloud.base import NoValidHost, ServerStatus
from broker.cloud.local.netns import kill_all, links_down, namespace, namespace_pids, ns_exists
from broker.cloud.local.records import Records, RecordStore

HostMap = Mapping[str, tuple[str, ...]]

# Two hosts in each of the catalog's zones: enough to spread the primaries.
DEFAULT_HOSTS: dict[str, tuple[str, ...]] = {
    "az1": ("az1-host-a", "az1-host-b"),
    "az2": ("az2-host-a", "az2-host-b"),
}


def hosts_in(hosts: HostMap, zone: str) -> tuple[str, ...]:
    return hosts.get(zone) or (f"{zone}-host-a",)


def zone_of(hosts: HostMap, host: str) -> str | None:
    return next((zone for zone, names in hosts.items() if host in names), None)


def hosts_up(st: Records, hosts: HostMap, zone: str) -> list[str]:
    return [h for h in hosts_in(hosts, zone) if h not in st.hosts_down]


def die_at_once(namespaces: list[str]) -> None:
    """Every server of a host stops in one instant, as the machine would: every process
    frozen first (one pass over all of them), then the links cut and the processes
    killed, the servers in parallel."""
    live = [ns for ns in namespaces if ns_exists(ns)]
    for ns in live:
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="host-down") as pool:
        list(pool.map(links_down, live))  # connects time out, as to a dead machine
        list(pool.map(kill_all, live))


def place(st: Records, hosts: HostMap, zone: str) -> str:
    """The live host of `zone` with the fewest servers; NoValidHost if none is up."""
    up = hosts_up(st, hosts, zone)
    if not up:
        raise NoValidHost(f"no valid host in availability zone {zone}: every host there "
                          f"({', '.join(hosts_in(hosts, zone))}) is down")
    load = Counter(server.host for server in st.servers.values())
    return min(up, key=lambda host: (load[host], host))


class Hypervisors:
    """The hosts of the LocalCloud (mixed into it)."""

    records: RecordStore
    host_map: HostMap

    def zone_available(self, availability_zone: str) -> bool:
        return bool(hosts_up(self.records.read(), self.host_map, availability_zone))

    def hosts(self) -> dict[str, list[str]]:
        """Every host by zone (those the records name too), for operators and tests."""
        found = {zone: list(names) for zone, names in self.host_map.items()}
        for rec in self.records.read().servers.values():
            names = found.setdefault(rec.availability_zone, [])
            if rec.host and rec.host not in names:
                names.append(rec.host)
        return found

    def hosts_down(self) -> list[str]:
        return list(self.records.read().hosts_down)

    def power_off_host(self, host: str) -> list[str]:
        """A dead hypervisor: every server on it loses its links and its processes (SIGKILL);
        nothing new is placed there. The servers' recorded status does not change, as
        Nova's does not when a compute host dies. Returns the servers it carried."""
        with self.records.locked() as st:
            if host not in st.hosts_down:
                st.hosts_down.append(host)
            carried = [rec.id for rec in st.servers_on(host)]
        die_at_once([namespace(server_id) for server_id in carried])
        return carried

    def power_on_host(self, host: str) -> None:
        """The hypervisor is back: it takes new servers again; the servers it carried
        stay off (SHUTOFF, links down) until the broker starts or replaces them."""
        with self.records.locked() as st:
            if host in st.hosts_down:
                st.hosts_down.remove(host)
            for rec in st.servers_on(host):
                if rec.status in (ServerStatus.ACTIVE, ServerStatus.BUILD):
                    rec.status = ServerStatus.SHUTOFF
