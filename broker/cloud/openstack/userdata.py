"""Cloud-init user-data that turns a plain image into a PostgreSQL node.

It writes `broker/guest/bootstrap.py` and `broker/guest/nic_agent.py` verbatim (the
same files the local cloud runs) and the node's GuestConfig, and runs the bootstrap
from a systemd unit at every boot (the bootstrap is idempotent; it runs the NIC agent
too). The service port's NIC, hot-plugged during a failover, is configured by the
guest itself: a udev rule matching the port's MAC runs the NIC agent when the NIC
appears (address, policy routing for both addresses, gratuitous ARP). Nothing depends
on cloud-init's hotplug (which a config drive does not get) or on the metadata
service and its cache: the config names the port's MAC and network. Sysctls keep ARP
right with two NICs that may share one subnet (without them the host learns the wrong
MAC and loses a node for ~20 s after a port move).

cloud-init writes these files once, at the first boot; the bootstrap reads the config
at every boot but takes from it only what cannot have changed since (pg_hba and the
TLS files are the broker's once the node exists).

The config file holds passwords: it is written 0600, and this text is never logged.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import asdict
from pathlib import Path

import yaml

from broker.guest import bootstrap, nic_agent
from broker.guest.bootstrap import GuestConfig

BOOTSTRAP_PATH = "/opt/pgha/bootstrap.py"
# Beside the bootstrap, which runs it from its own directory.
NIC_AGENT_PATH = f"/opt/pgha/{bootstrap.NIC_AGENT}"
CONFIG_PATH = "/etc/pgha/guest.json"
BOOTSTRAP_LOG = "/var/log/pgha-bootstrap.log"
NOVA_USER_DATA_LIMIT = 65535  # bytes of base64, Nova's limit


def bootstrap_source() -> bytes:
    return Path(bootstrap.__file__).read_bytes()


def nic_agent_source() -> bytes:
    return Path(nic_agent.__file__).read_bytes()


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


_SYSCTL = """# pgha: two NICs may share a subnet (management + service port)
net.ipv4.conf.all.arp_ignore = 1
net.ipv4.conf.all.arp_announce = 2
net.ipv4.conf.default.arp_ignore = 1
net.ipv4.conf.default.arp_announce = 2
net.ipv4.conf.all.rp_filter = 2
net.ipv4.conf.default.rp_filter = 2
"""


def _udev_rule(guest: GuestConfig) -> str:
    """The NIC agent when the service port's NIC appears (matched by its MAC), out of
    udev's way (udev kills long RUN programs)."""
    return (f'ACTION=="add", SUBSYSTEM=="net", ATTR{{address}}=="{guest.service_mac.lower()}", '
            f'RUN+="/usr/bin/systemd-run --no-block /usr/bin/python3 -I -S {NIC_AGENT_PATH} '
            f'{CONFIG_PATH}"\n')


def render_user_data(guest: GuestConfig) -> str:
    """The #cloud-config document (plain text; Nova wants it base64-encoded)."""
    config = json.dumps(asdict(guest), sort_keys=True, indent=1).encode()
    files: list[dict[str, str]] = [
        {"path": BOOTSTRAP_PATH, "owner": "root:root", "permissions": "0755",
         "encoding": "gz+b64", "content": _b64(gzip.compress(bootstrap_source(), mtime=0))},
        {"path": NIC_AGENT_PATH, "owner": "root:root", "permissions": "0755",
         "encoding": "gz+b64", "content": _b64(gzip.compress(nic_agent_source(), mtime=0))},
        {"path": CONFIG_PATH, "owner": "root:root", "permissions": "0600",
         "encoding": "b64", "content": _b64(config)},
        {"path": "/etc/systemd/system/pgha-bootstrap.service", "owner": "root:root",
         "permissions": "0644", "content": _unit(guest)},
        {"path": "/etc/sysctl.d/90-pgha.conf", "owner": "root:root",
         "permissions": "0644", "content": _SYSCTL},
    ]
    if guest.service_mac:
        files.append({"path": "/etc/udev/rules.d/90-pgha-service-nic.rules",
                      "owner": "root:root", "permissions": "0644",
                      "content": _udev_rule(guest)})
    document = {
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
