"""Network namespace and `ip` primitives the local cloud is built from."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from broker.cloud.base import CloudError, ServerStatus
from broker.cloud.local.records import ServerRecord

NETNS_DIR = Path("/run/netns")
NS_PREFIX = "pgha-"
FENCE_TIMEOUT = 10.0


def namespace(server_id: str) -> str:
    """The network namespace of a local server."""
    return f"{NS_PREFIX}{server_id}"


def namespace_pids(ns: str) -> list[int]:
    """Live (non-zombie) processes in network namespace `ns` (like `ip netns pids`)."""
    try:
        ns_stat = (NETNS_DIR / ns).stat()
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # gone, or a zombie (whose namespaces are already released)
        if (st.st_ino, st.st_dev) == (ns_stat.st_ino, ns_stat.st_dev) and is_alive(
                int(entry.name)):
            pids.append(int(entry.name))
    return pids


def is_alive(pid: int) -> bool:
    """Running, not a zombie: a killed process's entry stays until its parent (often
    init, which may take a second) reaps it, and holds nothing any more."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise CloudError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")
    return result


def ip_batch(commands: list[str], *, ns: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Several `ip` commands in one process (each spawn costs milliseconds)."""
    cmd = ["ip", *(("-n", ns) if ns else ()), "-batch", "-"]
    result = subprocess.run(cmd, input="\n".join(commands) + "\n", capture_output=True,
                            text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise CloudError(f"`ip{' -n ' + ns if ns else ''}` failed on {commands}: "
                         f"{result.stderr.strip()}")
    return result


def link_exists(name: str, ns: str | None = None) -> bool:
    if ns is None:
        return Path("/sys/class/net", name).exists()
    return ip("link", "show", "dev", name, ns=ns, check=False).returncode == 0


def ns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def kill_all(ns: str, timeout: float = FENCE_TIMEOUT) -> bool:
    """SIGKILL everything in the namespace until nothing live is left; True if so."""
    deadline = time.monotonic() + timeout
    while True:
        pids = namespace_pids(ns)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def links_down(ns: str) -> None:
    out = ip("-o", "link", "show", ns=ns, check=False).stdout
    for line in out.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name != "lo":
            ip("link", "set", name, "down", ns=ns, check=False)


def live_status(server: ServerRecord) -> ServerStatus:
    """The recorded status, except that a server whose namespace is gone is off."""
    if server.status == ServerStatus.ACTIVE and not ns_exists(namespace(server.id)):
        return ServerStatus.SHUTOFF  # the machine rebooted: the "VM" is off
    return server.status
