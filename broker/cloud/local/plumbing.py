"""The local cloud's network: one bridge with the broker's address, a namespace per
server, veth pairs for ports.

- management port = a veth pair: host side on the bridge, `eth0` in the namespace;
- service port = a veth pair whose host side stays on the bridge while the other end
  (the port's NIC, with the port's fixed MAC) is moved between namespaces, bare: down
  and without an address, as a hot-plugged NIC reaches a VM. The guest's NIC agent
  configures it (broker/guest/nic_agent.py), as in a real VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import subprocess
import threading
from pathlib import Path

from broker.cloud.base import CloudError
from broker.cloud.local.netns import ip, ip_batch, link_exists, namespace, ns_exists
from broker.cloud.local.records import PortRecord, Records
from broker.config import ConfigError


class LocalCloudUnavailable(ConfigError, CloudError):
    """The machine cannot run the local cloud; the message says how to fix it."""


def veth_names(port: PortRecord) -> tuple[str, str]:
    """(host side on the bridge, guest side) interface names, <= 15 characters."""
    if port.purpose == "management":
        return f"pgm{port.id}", "eth0"
    return f"pgs{port.id}", f"pgv{port.id}"


def service_mac(port: PortRecord) -> str:
    """A fixed MAC per service port: a re-made pair looks the same to the guest's agent
    and to the host's ARP cache."""
    return "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(port.id.encode()).digest()[:5])


class Plumbing:
    """The bridge on `network` and what hangs on it."""

    def __init__(self, network: ipaddress.IPv4Network, bridge: str) -> None:
        self.network = network
        self.bridge = bridge
        self._bridge_ready = False
        self._bridge_lock = threading.Lock()

    @property
    def broker_address(self) -> str:
        """The bridge's address: where the broker's connections to nodes come from."""
        return str(next(self.network.hosts()))

    def prefixed(self, address: str) -> str:
        return f"{address}/{self.network.prefixlen}"

    def ensure_bridge(self) -> None:
        """The bridge, made once. Engines start their first operations together (a
        worker's threads, or another process): one makes it, the others find it."""
        with self._bridge_lock:
            if self._bridge_ready and link_exists(self.bridge):
                return
            if not link_exists(self.bridge):
                self._check_network_free()
                made = ip("link", "add", "name", self.bridge, "type", "bridge", "stp_state",
                          "0", "forward_delay", "0", check=False)
                if made.returncode != 0 and not link_exists(self.bridge):
                    raise CloudError(f"the bridge {self.bridge} could not be made: "
                                     f"{made.stderr.strip()}")
                # A bridge takes the lowest MAC of its ports unless given one, so the
                # host's MAC would change whenever a new server joins (a rebuild right
                # after a failover) and nodes' replies would go to the old MAC for 1-3 s.
                mac = Path(f"/sys/class/net/{self.bridge}/address").read_text().strip()
                ip("link", "set", "dev", self.bridge, "address", mac)
            ip("addr", "replace", self.prefixed(self.broker_address), "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            self._bridge_ready = True

    def _check_network_free(self) -> None:
        out = ip("-4", "-o", "addr", "show").stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4 or parts[1] == self.bridge:
                continue
            iface = ipaddress.ip_interface(parts[3])
            if iface.network.overlaps(self.network):
                raise LocalCloudUnavailable(
                    f"network {self.network} is already used by interface {parts[1]} "
                    f"({parts[3]}): choose another BROKER_LOCAL_NETWORK")

    def allocate_address(self, records: Records) -> str:
        used = {p.address for p in records.ports.values()}
        hosts = self.network.hosts()
        next(hosts)  # the broker's (bridge) address
        for host in hosts:
            if str(host) not in used:
                return str(host)
        raise CloudError(f"no free address left in {self.network}")

    def ensure_service_veth(self, port: PortRecord) -> None:
        host, guest = veth_names(port)
        if not link_exists(host):
            # The pair died with a namespace (or the machine rebooted): make it anew.
            if link_exists(guest):
                ip("link", "del", guest)
            ip("link", "add", host, "type", "veth", "peer", "name", guest,
               "address", service_mac(port))
            ip("link", "set", guest, "down")
        sys_host = Path("/sys/class/net", host)
        with contextlib.suppress(OSError):
            if (os.path.basename(os.readlink(sys_host / "master")) == self.bridge
                    and int((sys_host / "flags").read_text(), 16) & 1):
                return  # already on the bridge and up
        ip("link", "set", host, "master", self.bridge, "up")

    def setup_namespace(self, server_id: str, port: PortRecord) -> None:
        """The server's namespace with its management port up (made or repaired)."""
        ns = namespace(server_id)
        if not ns_exists(ns):
            ip("netns", "add", ns)
        # Two interfaces in one subnet (eth0 + service port): answer ARP only for the
        # interface's own address, or the host learns wrong MACs (and loses the node
        # for ~20 s after a port move).
        script = " ".join(
            f"echo {value} > /proc/sys/net/{key};" for key, value in (
                ("ipv4/conf/all/arp_ignore", 1), ("ipv4/conf/default/arp_ignore", 1),
                ("ipv4/conf/all/arp_announce", 2), ("ipv4/conf/default/arp_announce", 2),
                # Both interfaces route the same subnet: strict reverse-path checks would
                # drop traffic arriving on the "other" one (hosts may make it the default).
                ("ipv4/conf/all/rp_filter", 0), ("ipv4/conf/default/rp_filter", 0),
                ("ipv6/conf/all/disable_ipv6", 1), ("ipv6/conf/default/disable_ipv6", 1)))
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], check=True,
                       capture_output=True, timeout=30)
        host, guest = veth_names(port)
        if not link_exists(guest, ns):
            if link_exists(host):
                ip("link", "del", host)
            ip("link", "add", host, "type", "veth", "peer", "name", guest, "netns", ns)
        ip("link", "set", host, "master", self.bridge, "up")
        ip("addr", "replace", self.prefixed(port.address), "dev", guest, ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        ip("link", "set", guest, "up", ns=ns)

    def move_in(self, port: PortRecord, server_id: str) -> None:
        """Deliver the service veth's guest end into the server: a bare link (down, no
        address), as a NIC hot-plug does; the guest's agent configures it."""
        _host, guest = veth_names(port)
        ns = namespace(server_id)
        # Few `ip` runs on the usual path: the move is the failover's critical path.
        if link_exists(guest) or not link_exists(guest, ns):
            self.ensure_service_veth(port)  # parked in the root namespace (or lost)
            ip("link", "set", "dev", guest, "netns", ns)

    @staticmethod
    def reset_service_links(ports: list[PortRecord], server_id: str) -> None:
        """A powered-off server's NICs lose what its guest configured (a reboot)."""
        ns = namespace(server_id)
        for port in ports:
            _host, guest = veth_names(port)
            ip_batch([f"link set {guest} down", f"addr flush dev {guest}"], ns=ns,
                     check=False)

    @staticmethod
    def move_out(port: PortRecord, server_id: str) -> None:
        """Bring the service veth's guest end back to the root namespace, down, no address."""
        _host, guest = veth_names(port)
        ns = namespace(server_id)
        if ns_exists(ns) and ip_batch(
                [f"link set {guest} down", f"addr flush dev {guest}",
                 f"link set dev {guest} netns {os.getpid()}"], ns=ns, check=False
        ).returncode == 0:
            return  # back in the root namespace: down, no address
        if link_exists(guest):
            ip_batch([f"link set {guest} down", f"addr flush dev {guest}"])

    @staticmethod
    def delete_port_links(port: PortRecord) -> None:
        """Every interface of the port, wherever it is (the peer goes with its pair)."""
        host, guest = veth_names(port)
        for name in (host, guest if port.purpose == "service" else ""):
            if name and link_exists(name):
                ip("link", "del", name, check=False)
