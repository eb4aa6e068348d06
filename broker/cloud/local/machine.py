"""What the machine needs to run the local cloud, checked before anything is made."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
from pathlib import Path

from broker.cloud.local.plumbing import LocalCloudUnavailable

PG_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def default_pg_bin() -> str | None:
    """The newest /usr/lib/postgresql/<major>/bin that has initdb."""
    base = Path("/usr/lib/postgresql")
    found = [p for p in base.glob("*/bin") if (p / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    return str(found[-1]) if found else None


def check_machine(network: ipaddress.IPv4Network, bridge: str, pg_bin: str | None) -> str:
    """Raise LocalCloudUnavailable saying how to fix what is missing; the PostgreSQL
    binaries' directory otherwise."""
    if os.geteuid() != 0:
        raise LocalCloudUnavailable(
            "the local cloud needs root: it creates network namespaces. Run the broker "
            "as root (e.g. `sudo make serve`), or use BROKER_CLOUD=openstack")
    for tool, package in (("ip", "iproute2"), ("useradd", "passwd"), ("userdel", "passwd")):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise LocalCloudUnavailable(
                f"the local cloud needs the `{tool}` command ({package}): run `make setup`")
    if not 1 <= len(bridge) <= 15:
        raise LocalCloudUnavailable(f"bridge name {bridge!r} must be 1 to 15 characters")
    if network.num_addresses < 16:
        raise LocalCloudUnavailable(f"network {network} is too small (need >= 16 addresses)")
    pg_bin = pg_bin or default_pg_bin() or "/usr/lib/postgresql/15/bin"
    missing = [b for b in PG_BINARIES if not os.access(Path(pg_bin, b), os.X_OK)]
    if missing:
        raise LocalCloudUnavailable(
            f"PostgreSQL binaries not found in {pg_bin} (missing: "
            f"{', '.join(missing)}): run `make setup`, or set BROKER_PG_BIN to the "
            "directory that holds initdb and pg_ctl")
    return pg_bin


def prepare_root(root: Path) -> None:
    """The cloud's directories, traversable (not listable) by the nodes' users, who
    (made per volume, in no group) pass as "others" on every parent too."""
    for sub in (root, root / "volumes", root / "servers"):
        sub.mkdir(parents=True, exist_ok=True)
        sub.chmod(0o711)
    for path in [*reversed(root.parents), root]:
        st = path.stat()
        if not st.st_mode & stat.S_IXOTH:
            raise LocalCloudUnavailable(
                f"the nodes' PostgreSQL users cannot reach {root}: "
                f"{path} (mode {stat.S_IMODE(st.st_mode):04o}) does not let them pass. "
                f"Allow traversal with `chmod o+x {path}`, or put BROKER_STATE_DIR "
                "somewhere they can reach")


def prepare_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = state_dir.stat().st_mode
    if os.geteuid() == 0 and state_dir.stat().st_uid == 0 and not mode & stat.S_IXOTH:
        # Traverse only (no listing): each node's PostgreSQL must reach its data
        # directory below it; the broker's own files there keep their 0600 modes.
        state_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
