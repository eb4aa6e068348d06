"""Booting a local server: the guest bootstrap an OpenStack VM runs from its user-data,
run inside the server's namespace. Root's files here (guest config, boot log, lock)
are 0600 in a directory others may traverse but not list."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

from broker.cloud.base import CloudError, PortNic
from broker.cloud.local.netns import namespace
from broker.cloud.local.records import open_private
from broker.guest import bootstrap, nic_agent

BOOTSTRAP_SCRIPT = Path(bootstrap.__file__).resolve()
NIC_AGENT_SCRIPT = Path(nic_agent.__file__).resolve()
NIC_AGENT_TIMEOUT = 60.0
BOOT_TIMEOUT = 3600.0  # a base backup of a large database takes its time
GUEST_CONFIG = "guest.json"


def _tail(path: Path, lines: int = 3, limit: int = 65536) -> list[str]:
    """The last lines of a file root does not own: never through a link, never
    blocking on a FIFO, never more than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return []
        f.seek(max(0, st.st_size - limit))
        return f.read(limit).decode(errors="replace").strip().splitlines()[-lines:]


def server_dir(root: Path, server_id: str) -> Path:
    """Where root keeps a server's guest config, boot log and lock."""
    return root / "servers" / server_id


def saved_guest_config(server_dir: Path) -> bootstrap.GuestConfig:
    """The first boot's guest config, as a VM keeps its user-data."""
    return bootstrap.GuestConfig.from_json((server_dir / GUEST_CONFIG).read_text())


def save_guest_config(server_dir: Path, guest: bootstrap.GuestConfig) -> None:
    server_dir.mkdir(exist_ok=True)
    server_dir.chmod(0o711)
    with os.fdopen(open_private(server_dir / GUEST_CONFIG, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(guest.to_json())


def with_service_nic(server_dir: Path, nic: PortNic, management_address: str) -> None:
    """A server booted before guests configured the service NIC themselves (the host
    did) learns the port's NIC, as an updated image would bring it."""
    guest = saved_guest_config(server_dir)
    if not guest.service_mac:
        save_guest_config(server_dir, dataclasses.replace(
            guest, management_address=guest.management_address or management_address,
            service_mac=nic.mac, service_address=nic.address,
            service_prefix_length=nic.prefix_length, service_gateway=nic.gateway,
            service_mtu=nic.mtu))


def boot(server_dir: Path, server_id: str, guest: bootstrap.GuestConfig) -> None:
    """Run the guest bootstrap inside the namespace, as a VM runs its user-data."""
    save_guest_config(server_dir, guest)
    config_path = server_dir / GUEST_CONFIG
    boot_log = server_dir / "bootstrap.log"
    # One boot at a time per server, whichever process asks. The bootstrap holds
    # the lock too (inherited): a worker killed mid-boot leaves its bootstrap
    # running, as a VM would, and the next boot waits for it to finish.
    with os.fdopen(open_private(server_dir / "boot.lock", os.O_RDWR), "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run(
                ["ip", "netns", "exec", namespace(server_id), sys.executable, "-I",
                 str(BOOTSTRAP_SCRIPT), str(config_path)],
                capture_output=True, text=True, timeout=BOOT_TIMEOUT, check=False,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, pass_fds=(lock.fileno(),))
        except subprocess.TimeoutExpired:
            raise CloudError(f"server {server_id}: guest bootstrap did not finish within "
                             f"{BOOT_TIMEOUT:.0f} s") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    output = (result.stdout or "") + (result.stderr or "")
    with os.fdopen(open_private(boot_log, os.O_WRONLY | os.O_APPEND), "w") as f:
        f.write(output)
    if result.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        pg_tail = _tail(Path(guest.log_file)) if guest.log_file else []
        if pg_tail:
            tail += " | postgresql.log: " + " | ".join(pg_tail)
        raise CloudError(f"server {server_id}: guest bootstrap failed: {tail}")


def run_nic_agent(server_dir: Path, server_id: str) -> None:
    """What udev does in a VM when a NIC appears: run the guest's NIC agent (namespaces
    get no udev events). It reads the server's guest config, as in a VM."""
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", namespace(server_id), sys.executable, "-I", "-S",
             str(NIC_AGENT_SCRIPT), str(server_dir / GUEST_CONFIG)],
            capture_output=True, text=True, timeout=NIC_AGENT_TIMEOUT, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except subprocess.TimeoutExpired:
        raise CloudError(f"server {server_id}: the NIC agent did not finish within "
                         f"{NIC_AGENT_TIMEOUT:.0f} s") from None
    with os.fdopen(open_private(server_dir / "bootstrap.log", os.O_WRONLY | os.O_APPEND),
                   "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise CloudError(f"server {server_id}: the NIC agent failed: "
                         f"{result.stderr.strip()}")
