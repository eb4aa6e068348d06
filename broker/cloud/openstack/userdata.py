"""Cloud-init user-data that turns a plain image into a PostgreSQL node.

It writes `broker/guest/bootstrap.py` verbatim (the same file the local cloud runs)
and the node's GuestConfig, and runs the bootstrap from a systemd unit at every boot
(the bootstrap is idempotent). It also makes the service port usable when it is
hot-plugged during a failover:
- cloud-init `updates: network: when: [boot, hotplug]` brings the new NIC up;
- a udev hook adds source routing for the service address, so that replies leave
  through the service NIC (Neutron's anti-spoofing drops them on any other port);
- ARP sysctls for two NICs that may share one subnet (without them the host
  learns the wrong MAC and loses a node for ~20 s after a port move).

The config file holds passwords: it is written 0600, and this text is never logged.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from broker.guest import bootstrap
from broker.guest.bootstrap import GuestConfig

BOOTSTRAP_PATH = "/opt/pgha/bootstrap.py"
CONFIG_PATH = "/etc/pgha/guest.json"
BOOTSTRAP_LOG = "/var/log/pgha-bootstrap.log"
SERVICE_NIC_SCRIPT = "/usr/local/sbin/pgha-service-nic"
NOVA_USER_DATA_LIMIT = 65535  # bytes of base64, Nova's limit
ROUTE_TABLE = 105


@dataclass(frozen=True)
class ServiceRouting:
    """Where the service address lives, for the source-routing hook."""

    subnet_cidr: str
    gateway: str | None
    management_address: str | None


def bootstrap_source() -> bytes:
    return Path(bootstrap.__file__).read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unit(guest: GuestConfig) -> str:
    wait = ""
    volume_device = guest.volume_device
    if volume_device:
        # Nova attaches the data volume during the build; give a slow backend time.
        wait = ("ExecStartPre=/bin/sh -c 'for i in $(seq 1 300); do "
                f"[ -b {volume_device} ] && exit 0; sleep 1; done; "
                f"echo data volume {volume_device} never appeared >&2; exit 1'\n")
    return (
        "[Unit]\n"
        "Description=pgha: make this server a PostgreSQL node (idempotent, every boot)\n"
        "Wants=network-online.target\n"
        "After=network-online.target local-fs.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "TimeoutStartSec=infinity\n"
        f"{wait}"
        f"ExecStart=/usr/bin/python3 {BOOTSTRAP_PATH} {CONFIG_PATH}\n"
        # A clean, fast shutdown on reboot (the default SIGTERM is a "smart" one).
        f"ExecStop=/usr/sbin/runuser -u {guest.run_as} -- {guest.pg_bin}/pg_ctl "
        f"-D {guest.data_dir} -m fast -w stop\n"
        f"StandardOutput=append:{BOOTSTRAP_LOG}\n"
        f"StandardError=append:{BOOTSTRAP_LOG}\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _service_nic_script(routing: ServiceRouting) -> str:
    gateway = routing.gateway or ""
    management = routing.management_address or ""
    return f"""#!/bin/sh
# pgha: replies from the service address must leave through the service NIC, or
# Neutron's port security drops them. Run by udev for every new NIC (hotplug).
SUBNET="{routing.subnet_cidr}"
GATEWAY="{gateway}"
MANAGEMENT="{management}"
TABLE={ROUTE_TABLE}
in_subnet() {{
  python3 -c 'import ipaddress, sys
sys.exit(ipaddress.ip_address(sys.argv[1]) not in ipaddress.ip_network(sys.argv[2]))' \
    "$1" "$SUBNET"
}}
for attempt in $(seq 1 60); do
  for dev in $(ls /sys/class/net); do
    [ "$dev" = lo ] && continue
    for addr in $(ip -4 -o addr show dev "$dev" | awk '{{print $4}}' | cut -d/ -f1); do
      [ "$addr" = "$MANAGEMENT" ] && continue
      in_subnet "$addr" || continue
      ip route replace "$SUBNET" dev "$dev" src "$addr" table $TABLE
      [ -n "$GATEWAY" ] && ip route replace default via "$GATEWAY" dev "$dev" table $TABLE
      ip rule show | grep -q "from $addr lookup $TABLE" || \\
        ip rule add from "$addr" lookup $TABLE priority 1000
      exit 0
    done
  done
  sleep 1
done
exit 0
"""


_SYSCTL = """# pgha: two NICs may share a subnet (management + service port)
net.ipv4.conf.all.arp_ignore = 1
net.ipv4.conf.all.arp_announce = 2
net.ipv4.conf.default.arp_ignore = 1
net.ipv4.conf.default.arp_announce = 2
net.ipv4.conf.all.rp_filter = 2
net.ipv4.conf.default.rp_filter = 2
"""

_UDEV = (f'ACTION=="add", SUBSYSTEM=="net", KERNEL!="lo", '
         f'RUN+="/usr/bin/systemd-run --no-block {SERVICE_NIC_SCRIPT}"\n')


def render_user_data(guest: GuestConfig, routing: ServiceRouting | None) -> str:
    """The #cloud-config document (plain text; Nova wants it base64-encoded)."""
    config = json.dumps(asdict(guest), sort_keys=True, indent=1).encode()
    files: list[dict[str, str]] = [
        {"path": BOOTSTRAP_PATH, "owner": "root:root", "permissions": "0755",
         "encoding": "gz+b64", "content": _b64(gzip.compress(bootstrap_source(), mtime=0))},
        {"path": CONFIG_PATH, "owner": "root:root", "permissions": "0600",
         "encoding": "b64", "content": _b64(config)},
        {"path": "/etc/systemd/system/pgha-bootstrap.service", "owner": "root:root",
         "permissions": "0644", "content": _unit(guest)},
        {"path": "/etc/sysctl.d/90-pgha.conf", "owner": "root:root",
         "permissions": "0644", "content": _SYSCTL},
    ]
    if routing is not None:
        files += [
            {"path": SERVICE_NIC_SCRIPT, "owner": "root:root", "permissions": "0755",
             "content": _service_nic_script(routing)},
            {"path": "/etc/udev/rules.d/90-pgha-service-nic.rules", "owner": "root:root",
             "permissions": "0644", "content": _UDEV},
        ]
    document = {
        # The service port's NIC arrives while the server runs (failover).
        "updates": {"network": {"when": ["boot", "hotplug"]}},
        "write_files": files,
        "runcmd": [
            ["sysctl", "--system"],
            ["udevadm", "control", "--reload"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "pgha-bootstrap.service"],
        ],
    }
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=10_000)


def encode_user_data(text: str) -> str:
    return _b64(text.encode())
