"""Guest NIC agent: brings up the service address on the NIC that carries the service
port, and keeps replies on the interface they came in on.

The SAME script runs in both clouds, beside the bootstrap (stdlib only):
- `openstack`: a udev rule runs it when a NIC with the service port's MAC appears
  (hot-plugged during a failover), and the bootstrap runs it at every boot. It
  needs neither cloud-init's hotplug nor the metadata service: the guest config
  already names the port's MAC, address, prefix, gateway and MTU (the port exists
  before the first server boots), so a config drive is enough.
- `local`: namespaces get no udev events, so the cloud runs it in the namespace right
  after it delivers the bare link, and the bootstrap at every boot.

What it does, idempotently:
1. The NIC whose MAC is the service port's (any other NIC is left alone): MTU, the
   address without a prefix route (no route in the main table goes through it, so no
   default or connected route sends the management address's replies out of the
   service port, where port security drops them), link up.
2. Policy routing for both addresses: `from <address> lookup <its table>`, each table
   holding its subnet (and its gateway) through its own NIC.
3. Gratuitous ARP from the service NIC once its link is up (and `arp_notify`, so that
   the kernel repeats it at every later link up): switches and peers learn at once
   where the address lives now.

Usage: python3 -I -S nic_agent.py CONFIG.json   (or `-`: the config on stdin)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

MANAGEMENT_TABLE = 104
SERVICE_TABLE = 105
MANAGEMENT_RULE_PRIORITY = 1000
SERVICE_RULE_PRIORITY = 1001
LINK_UP_TIMEOUT = 2.0  # a link's queue is live a moment after `ip link set up`
SYS_NET = "/sys/class/net"


class AgentError(Exception):
    """The NIC could not be configured; the message is plain."""


class NicPlan:
    """The network part of the guest config (the bootstrap's GuestConfig fields).

    A plain class, not a dataclass: `dataclasses` imports `inspect`, and the agent's
    start is on the failover's path (it runs with `-I -S` for the same reason)."""

    __slots__ = (
        "management_address",
        "service_address",
        "service_gateway",
        "service_mac",
        "service_mtu",
        "service_prefix_length",
    )

    def __init__(self, *, service_mac: str = "", service_address: str = "",
                 service_prefix_length: int = 0, service_gateway: str = "",
                 service_mtu: int = 0, management_address: str = "") -> None:
        self.service_mac = service_mac
        self.service_address = service_address
        self.service_prefix_length = service_prefix_length
        self.service_gateway = service_gateway
        self.service_mtu = service_mtu
        self.management_address = management_address

    @classmethod
    def from_json(cls, text: str) -> NicPlan:
        raw = json.loads(text)
        return cls(service_mac=str(raw.get("service_mac") or "").lower(),
                   service_address=str(raw.get("service_address") or ""),
                   service_prefix_length=int(raw.get("service_prefix_length") or 0),
                   service_gateway=str(raw.get("service_gateway") or ""),
                   service_mtu=int(raw.get("service_mtu") or 0),
                   management_address=str(raw.get("management_address") or ""))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def network_of(address: str, prefix_length: int) -> str:
    """`10.1.2.0/24` for 10.1.2.3 and 24 (IPv4; not `ipaddress`, whose import costs
    more than the rest of this)."""
    mask = (0xFFFFFFFF << (32 - prefix_length)) & 0xFFFFFFFF
    bits = int.from_bytes(socket.inet_aton(address), "big") & mask
    return f"{socket.inet_ntoa(bits.to_bytes(4, 'big'))}/{prefix_length}"


def say(message: str) -> None:
    print(f"pgha-nic-agent: {message}", flush=True)


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                            timeout=30)
    if result.returncode != 0:
        raise AgentError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def ip_batch(commands: list[str]) -> None:
    """Several `ip` commands in one process (the move is on the failover's path)."""
    result = subprocess.run(["ip", "-batch", "-"], input="\n".join(commands) + "\n",
                            capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise AgentError(f"`ip -batch` failed: {result.stderr.strip()}")


def nic_with_mac(mac: str) -> str | None:
    for dev in sorted(os.listdir(SYS_NET)):
        try:
            if read(f"{SYS_NET}/{dev}/address").strip().lower() == mac:
                return dev
        except OSError:
            continue  # gone meanwhile
    return None


def nic_with_address(address: str) -> tuple[str, int] | None:
    """(interface, prefix length) of the interface holding `address`."""
    for line in ip("-4", "-o", "addr", "show").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].split("/")[0] == address:
            return parts[1], int(parts[3].split("/")[1])
    return None


def missing_rule(rules: str, address: str, table: int, priority: int) -> list[str]:
    """The `ip rule` command that sends `address`'s packets to `table`, unless present."""
    wanted = f"from {address} lookup {table}"
    present = any(line.endswith(wanted) for line in rules.splitlines())
    return [] if present else [f"rule add {wanted} priority {priority}"]


def configure_service(plan: NicPlan, dev: str, rules: str) -> None:
    network = network_of(plan.service_address, plan.service_prefix_length)
    # Before the link goes up: the kernel then announces the address itself too.
    with open(f"/proc/sys/net/ipv4/conf/{dev}/arp_notify", "w") as f:
        f.write("1\n")
    commands = [*([f"link set dev {dev} mtu {plan.service_mtu}"] if plan.service_mtu else []),
                f"addr replace {plan.service_address}/{plan.service_prefix_length} "
                f"dev {dev} noprefixroute",
                f"link set dev {dev} up",
                f"route replace {network} dev {dev} src {plan.service_address} "
                f"table {SERVICE_TABLE}"]
    if plan.service_gateway:
        commands.append(f"route replace default via {plan.service_gateway} dev {dev} "
                        f"table {SERVICE_TABLE}")
    commands += missing_rule(rules, plan.service_address, SERVICE_TABLE,
                             SERVICE_RULE_PRIORITY)
    ip_batch(commands)
    # Whatever else configured the NIC (a DHCP client, cloud-init) may have put routes
    # through it into the main table: the service NIC carries only its own replies.
    if ip("-4", "route", "show", "table", "main", "dev", dev).strip():
        ip("-4", "route", "flush", "table", "main", "dev", dev)
    announce(dev, plan.service_address)
    say(f"service address {plan.service_address}/{plan.service_prefix_length} on {dev}")


def configure_management(plan: NicPlan, rules: str) -> None:
    found = nic_with_address(plan.management_address)
    if found is None:
        raise AgentError(f"no interface holds the management address "
                         f"{plan.management_address}")
    dev, prefix_length = found
    network = network_of(plan.management_address, prefix_length)
    commands = [f"route replace {network} dev {dev} src {plan.management_address} "
                f"table {MANAGEMENT_TABLE}"]
    for route in ip("-4", "route", "show", "default", "dev", dev).splitlines():
        words = route.split()
        if "via" in words:
            commands.append(f"route replace default via {words[words.index('via') + 1]} "
                            f"dev {dev} table {MANAGEMENT_TABLE}")
            break
    commands += missing_rule(rules, plan.management_address, MANAGEMENT_TABLE,
                             MANAGEMENT_RULE_PRIORITY)
    ip_batch(commands)


def announce(dev: str, address: str) -> None:
    """One gratuitous ARP request (like `arping -U`), sent once the link's queue is
    live (a frame sent before that is dropped)."""
    deadline = time.monotonic() + LINK_UP_TIMEOUT
    while read(f"{SYS_NET}/{dev}/operstate").strip() not in ("up", "unknown"):
        if time.monotonic() > deadline:
            say(f"{dev} is not up after {LINK_UP_TIMEOUT:.0f} s: no gratuitous ARP")
            return
        time.sleep(0.005)
    mac = bytes.fromhex(read(f"{SYS_NET}/{dev}/address").strip().replace(":", ""))
    ipv4 = socket.inet_aton(address)
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01"  # Ethernet, IPv4, request
           + mac + ipv4 + b"\x00" * 6 + ipv4)
    frame = b"\xff" * 6 + mac + b"\x08\x06" + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((dev, 0))
        sock.send(frame.ljust(60, b"\x00"))


def run(plan: NicPlan) -> None:
    rules = ip("-4", "rule", "show")
    # The service NIC first: it is the failover's path, and does not depend on the other.
    if plan.service_mac and plan.service_address:
        dev = nic_with_mac(plan.service_mac)
        if dev is not None:  # not plugged here (yet): its add event runs us again
            configure_service(plan, dev, rules)
    if plan.management_address:
        configure_management(plan, rules)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: nic_agent.py CONFIG.json", file=sys.stderr)
        return 2
    try:
        plan = NicPlan.from_json(sys.stdin.read() if argv[0] == "-"
                                 else read(argv[0]))
    except (OSError, ValueError, TypeError) as exc:
        print(f"pgha-nic-agent: cannot read config {argv[0]}: {type(exc).__name__}",
              file=sys.stderr)
        return 2
    try:
        run(plan)
    except (AgentError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"pgha-nic-agent: failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
