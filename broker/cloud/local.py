"""The `local` cloud: every server is a Linux network namespace on one bridge.

- server  = network namespace `pgha-<server id>` holding a real PostgreSQL (started by
  the same guest bootstrap an OpenStack VM runs), reached through its management port;
- management port = a veth pair: host side on the bridge, `eth0` in the namespace;
- service port = a veth pair whose host side stays on the bridge while the other end
  (carrying the instance's fixed service address) is moved between namespaces: moving
  it takes milliseconds and keeps its MAC, so the host's ARP cache stays right;
- volume = a directory under `<root>/volumes/<id>` that outlives its server, with its
  own OS user `pgha-<volume id>` (0700, that user's): PostgreSQL runs as the volume's
  user, so one node's OS account reaches no other node's data, socket or processes,
  and a resurrected server carries the identity on with the volume;
- availability zones are labels.

The cloud's own records (what the OpenStack API keeps in its database) live in
`<root>/state.json`, guarded by flock, because the web and worker processes share them.
Root's files (records, locks, guest configs, boot logs) are 0600 in directories others
may traverse but not list; root never follows a link below a volume (its user's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    Cloud,
    CloudError,
    CloudResource,
    FenceError,
    Port,
    Server,
    ServerSpec,
    ServerStatus,
    Volume,
)
from broker.config import ConfigError
from broker.guest import bootstrap

if TYPE_CHECKING:
    from broker.config import Settings

log = logging.getLogger(__name__)

BOOTSTRAP_SCRIPT = Path(bootstrap.__file__).resolve()
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "pgha-"
PG_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
# useradd and userdel lock /etc/passwd and fail at once when another holds it: ours
# wait for each other on this lock, and retry for a while against anyone else.
USERS_LOCK = Path("/run/pgha-broker-users.lock")
USERS_LOCK_WAIT = 30.0
BOOT_TIMEOUT = 3600.0  # a base backup of a large database takes its time
FENCE_TIMEOUT = 10.0


class LocalCloudUnavailable(ConfigError, CloudError):
    """The machine cannot run the local cloud; the message says how to fix it."""


def default_pg_bin() -> str | None:
    """The newest /usr/lib/postgresql/<major>/bin that has initdb."""
    base = Path("/usr/lib/postgresql")
    found = [p for p in base.glob("*/bin") if (p / "initdb").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    return str(found[-1]) if found else None


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
            if (st.st_ino, st.st_dev) != (ns_stat.st_ino, ns_stat.st_dev):
                continue
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or a zombie (whose namespaces are already released)
        if state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _open_private(path: Path, flags: int) -> int:
    """Open (creating) a 0600 file of root's; an older file keeps no wider mode."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


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


def _run_user_tool(args: list[str]) -> subprocess.CompletedProcess[str]:
    """useradd/userdel, one at a time among ours, retried while /etc/passwd is locked."""
    deadline = time.monotonic() + USERS_LOCK_WAIT
    fd = os.open(USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while True:
            result = subprocess.run(args, capture_output=True, text=True, check=False,
                                    timeout=60)
            if "cannot lock" not in result.stderr or time.monotonic() > deadline:
                return result
            time.sleep(0.05)
    finally:
        os.close(fd)  # releases the flock


def _kill_uid(uid: int, timeout: float = FENCE_TIMEOUT) -> None:
    """SIGKILL every process of `uid` (before its user goes: a later user given the
    same uid must not inherit them)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == uid:
                        pids.append(int(entry.name))
        if not pids:
            return
        if time.monotonic() > deadline:
            raise CloudError(f"processes of uid {uid} still alive after SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise CloudError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")
    return result


def _ip_batch(commands: list[str], *, ns: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Several `ip` commands in one process (each spawn costs milliseconds)."""
    cmd = ["ip", *(("-n", ns) if ns else ()), "-batch", "-"]
    result = subprocess.run(cmd, input="\n".join(commands) + "\n", capture_output=True,
                            text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise CloudError(f"`ip{' -n ' + ns if ns else ''}` failed on {commands}: "
                         f"{result.stderr.strip()}")
    return result


def _link_exists(name: str, ns: str | None = None) -> bool:
    if ns is None:
        return Path("/sys/class/net", name).exists()
    return _ip("link", "show", "dev", name, ns=ns, check=False).returncode == 0


def _ns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


class _State:
    """The cloud's records, read and written under an exclusive flock."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path

    @property
    def servers(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("servers", {})  # type: ignore[no-any-return]

    @property
    def volumes(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("volumes", {})  # type: ignore[no-any-return]

    @property
    def ports(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("ports", {})  # type: ignore[no-any-return]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with os.fdopen(_open_private(tmp, os.O_WRONLY | os.O_EXCL), "w") as f:
            f.write(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _by_name(records: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in records.values() if r["name"] == name), None)


class LocalCloud(Cloud):
    """Servers are network namespaces on a bridge; see the module docstring."""

    name = "local"

    def __init__(self, root: Path, network: ipaddress.IPv4Network, bridge: str, *,
                 pg_bin: str | None = None) -> None:
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
        self.pg_bin = pg_bin or default_pg_bin() or "/usr/lib/postgresql/15/bin"
        missing = [b for b in PG_BINARIES if not os.access(Path(self.pg_bin, b), os.X_OK)]
        if missing:
            raise LocalCloudUnavailable(
                f"PostgreSQL binaries not found in {self.pg_bin} (missing: "
                f"{', '.join(missing)}): run `make setup`, or set BROKER_PG_BIN to the "
                "directory that holds initdb and pg_ctl")
        self.root = Path(root).absolute()
        # Marks the OS users this cloud made (destroy_everything finds them by it).
        self.user_comment = "pgha local cloud " + hashlib.sha256(
            str(self.root).encode()).hexdigest()[:16]
        self.network = network
        self.bridge = bridge
        for sub in (self.root, self.root / "volumes", self.root / "servers"):
            sub.mkdir(parents=True, exist_ok=True)
            sub.chmod(0o711)  # traversable (not listable) by the nodes' users
        self._check_traversable()
        self._state_path = self.root / "state.json"
        self._lock_path = self.root / "state.lock"
        self._bridge_ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalCloud:
        state_dir = settings.state_dir.absolute()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = state_dir.stat().st_mode
        if os.geteuid() == 0 and state_dir.stat().st_uid == 0 and not mode & stat.S_IXOTH:
            # Traverse only (no listing): each node's PostgreSQL must reach its data
            # directory below it; the broker's own files there keep their 0600 modes.
            state_dir.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        return cls(state_dir / "local-cloud", settings.local_network, settings.local_bridge,
                   pg_bin=settings.local_pg_bin)

    # --- facts -------------------------------------------------------------------------
    @property
    def broker_address(self) -> str:
        """The bridge's address: where the broker's connections to nodes come from."""
        return str(next(self.network.hosts()))

    @staticmethod
    def namespace(server_id: str) -> str:
        return f"{NS_PREFIX}{server_id}"

    def server_pids(self, server_id: str) -> list[int]:
        """Live processes inside the server (its PostgreSQL)."""
        return namespace_pids(self.namespace(server_id))

    def _check_traversable(self) -> None:
        """The nodes' users (made per volume, in no group) pass as "others"."""
        for path in [*reversed(self.root.parents), self.root]:
            st = path.stat()
            if not st.st_mode & stat.S_IXOTH:
                raise LocalCloudUnavailable(
                    f"the nodes' PostgreSQL users cannot reach {self.root}: "
                    f"{path} (mode {stat.S_IMODE(st.st_mode):04o}) does not let them pass. "
                    f"Allow traversal with `chmod o+x {path}`, or put BROKER_STATE_DIR "
                    "somewhere they can reach")

    # --- state ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _state(self, *, write: bool = True) -> Iterator[_State]:
        """The records under the lock; saved on a normal exit (not after an exception)."""
        with os.fdopen(_open_private(self._lock_path, os.O_RDWR), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                data = (json.loads(self._state_path.read_text())
                        if self._state_path.exists() else {})
                state = _State(data, self._state_path)
                yield state
                if write:
                    state.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> _State:
        with self._state(write=False) as st:
            return st

    # --- network plumbing ------------------------------------------------------------------
    def ensure_network(self) -> None:
        """Make the bridge with the broker's address now (otherwise done on first use)."""
        self._ensure_bridge()

    def _ensure_bridge(self) -> None:
        if self._bridge_ready and _link_exists(self.bridge):
            return
        prefix = self.network.prefixlen
        if not _link_exists(self.bridge):
            self._check_network_free()
            _ip("link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0",
                "forward_delay", "0")
            # A bridge takes the lowest MAC of its ports unless given one, so the
            # host's MAC would change whenever a new server joins (a rebuild right
            # after a failover) and nodes' replies would go to the old MAC for 1-3 s.
            mac = Path(f"/sys/class/net/{self.bridge}/address").read_text().strip()
            _ip("link", "set", "dev", self.bridge, "address", mac)
        _ip("addr", "replace", f"{self.broker_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._bridge_ready = True

    def _check_network_free(self) -> None:
        out = _ip("-4", "-o", "addr", "show").stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 4 or parts[1] == self.bridge:
                continue
            iface = ipaddress.ip_interface(parts[3])
            if iface.network.overlaps(self.network):
                raise LocalCloudUnavailable(
                    f"network {self.network} is already used by interface {parts[1]} "
                    f"({parts[3]}): choose another BROKER_LOCAL_NETWORK")

    def _allocate_address(self, state: _State) -> str:
        used = {p["address"] for p in state.ports.values()}
        hosts = self.network.hosts()
        next(hosts)  # the broker's (bridge) address
        for host in hosts:
            if str(host) not in used:
                return str(host)
        raise CloudError(f"no free address left in {self.network}")

    def _prefixed(self, address: str) -> str:
        return f"{address}/{self.network.prefixlen}"

    @staticmethod
    def _veth_names(port: dict[str, Any]) -> tuple[str, str]:
        """(host side on the bridge, guest side) interface names, <= 15 characters."""
        if port["purpose"] == "management":
            return f"pgm{port['id']}", "eth0"
        return f"pgs{port['id']}", f"pgv{port['id']}"

    def _ensure_service_veth(self, port: dict[str, Any]) -> None:
        host, guest = self._veth_names(port)
        if not _link_exists(host):
            # The pair died with a namespace (or the machine rebooted): make it anew.
            if _link_exists(guest):
                _ip("link", "del", guest)
            # A fixed MAC per port: a re-made pair looks the same to the host's ARP cache.
            mac = "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(
                port["id"].encode()).digest()[:5])
            _ip("link", "add", host, "type", "veth", "peer", "name", guest, "address", mac)
            _ip("link", "set", guest, "down")
        sys_host = Path("/sys/class/net", host)
        with contextlib.suppress(OSError):
            if (os.path.basename(os.readlink(sys_host / "master")) == self.bridge
                    and int((sys_host / "flags").read_text(), 16) & 1):
                return  # already on the bridge and up
        _ip("link", "set", host, "master", self.bridge, "up")

    def _setup_namespace(self, server: dict[str, Any], port: dict[str, Any]) -> None:
        ns = self.namespace(server["id"])
        if not _ns_exists(ns):
            _ip("netns", "add", ns)
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
        host, guest = self._veth_names(port)
        if not _link_exists(guest, ns):
            if _link_exists(host):
                _ip("link", "del", host)
            _ip("link", "add", host, "type", "veth", "peer", "name", guest, "netns", ns)
        _ip("link", "set", host, "master", self.bridge, "up")
        _ip("addr", "replace", self._prefixed(port["address"]), "dev", guest, ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "set", guest, "up", ns=ns)

    # --- ports -----------------------------------------------------------------------------
    def _port(self, rec: dict[str, Any]) -> Port:
        return Port(id=rec["id"], name=rec["name"], address=rec["address"],
                    device_id=rec.get("device_id"), tags=dict(rec.get("tags", {})))

    def create_port(self, name: str, purpose: Literal["management", "service"],
                    tags: dict[str, str]) -> Port:
        self._ensure_bridge()
        with self._state() as st:
            rec = _by_name(st.ports, name)
            if rec is None:
                rec = {"id": uuid.uuid4().hex[:10], "name": name, "purpose": purpose,
                       "address": self._allocate_address(st), "device_id": None,
                       "tags": dict(tags)}
                st.ports[rec["id"]] = rec
                st.save()
            if rec["purpose"] == "service" and rec.get("device_id") is None:
                self._ensure_service_veth(rec)
            return self._port(rec)

    def get_port(self, port_id: str) -> Port | None:
        rec = self._read().ports.get(port_id)
        return None if rec is None else self._port(rec)

    def attach_port(self, port_id: str, server_id: str) -> None:
        with self._state() as st:
            port = st.ports.get(port_id)
            server = st.servers.get(server_id)
            if port is None:
                raise CloudError(f"port {port_id} does not exist")
            if server is None:
                raise CloudError(f"server {server_id} does not exist")
            bound = port.get("device_id")
            if bound not in (None, server_id):
                raise CloudError(f"port {port['name']} is attached to server {bound}; "
                                 "detach it first")
            if port["purpose"] == "management":
                if bound == server_id:
                    return
                raise CloudError("management ports are attached when their server boots")
            ns = self.namespace(server_id)
            if not _ns_exists(ns):
                raise CloudError(f"server {server['name']} has no namespace (deleted?)")
            # Record the binding first: a crash mid-move is then finished by a retry.
            port["device_id"] = server_id
            st.save()
            _host, guest = self._veth_names(port)
            # Few `ip` runs on the usual path: the move is the failover's critical path.
            if _link_exists(guest) or not _link_exists(guest, ns):
                self._ensure_service_veth(port)  # parked in the root namespace (or lost)
                _ip("link", "set", "dev", guest, "netns", ns)
            up = self._status(server) == ServerStatus.ACTIVE
            _ip_batch([f"addr replace {self._prefixed(port['address'])} dev {guest}",
                       *([f"link set {guest} up"] if up else [])], ns=ns)

    def detach_port(self, port_id: str, server_id: str) -> None:
        with self._state() as st:
            port = st.ports.get(port_id)
            if port is None or port.get("device_id") not in (None, server_id):
                return
            if port["purpose"] == "management":
                raise CloudError("a management port stays with its server until deleted")
            self._move_out(port, server_id)
            port["device_id"] = None

    def _move_out(self, port: dict[str, Any], server_id: str) -> None:
        """Bring the service veth's guest end back to the root namespace, down, no address."""
        _host, guest = self._veth_names(port)
        ns = self.namespace(server_id)
        if _ns_exists(ns) and _ip_batch(
                [f"link set {guest} down", f"addr flush dev {guest}",
                 f"link set dev {guest} netns {os.getpid()}"], ns=ns, check=False
        ).returncode == 0:
            return  # back in the root namespace: down, no address
        if _link_exists(guest):
            _ip_batch([f"link set {guest} down", f"addr flush dev {guest}"])

    def delete_port(self, port_id: str) -> None:
        with self._state() as st:
            port = st.ports.get(port_id)
            if port is None:
                return
            bound = port.get("device_id")
            if bound is not None and bound in st.servers:
                if port["purpose"] == "management":
                    raise CloudError(f"port {port['name']} belongs to server "
                                     f"{st.servers[bound]['name']}: delete the server first")
                self._move_out(port, bound)
            host, _guest = self._veth_names(port)
            if _link_exists(host):
                _ip("link", "del", host)  # takes its peer with it, wherever it is
            del st.ports[port_id]

    # --- volumes ---------------------------------------------------------------------------
    def _volume_dir(self, volume_id: str) -> Path:
        return self.root / "volumes" / volume_id

    @staticmethod
    def volume_user(volume_id: str) -> str:
        """The OS user PostgreSQL runs as on this volume, whichever server carries it."""
        return f"pgha-{volume_id}"

    def _ensure_user(self, name: str) -> pwd.struct_passwd:
        with contextlib.suppress(KeyError):
            return self._own_user(name)
        result = _run_user_tool(["useradd", "--system", "--user-group", "--no-create-home",
                                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                                 "--comment", self.user_comment, name])
        if result.returncode != 0:
            with contextlib.suppress(KeyError):  # made meanwhile by another process
                return self._own_user(name)
            raise CloudError(f"could not create the OS user {name}: {result.stderr.strip()}")
        return self._own_user(name)

    def _own_volume(self, volume_id: str) -> pwd.struct_passwd:
        """The volume's user (made if missing: a volume from before users per volume),
        and the volume its own, 0700. Its name is root's (volumes/ is), so the chown
        reaches the volume itself; below it, fwalk and lchown follow no link, and a
        file of root's or one with a second name (a hard link) keeps its owner."""
        user = self._ensure_user(self.volume_user(volume_id))
        path = self._volume_dir(volume_id)
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            for _top, subdirs, files, dir_fd in os.fwalk(path):
                for name in (*subdirs, *files):
                    entry = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if entry.st_uid == 0 or (entry.st_nlink > 1 and name in files):
                        continue
                    os.chown(name, user.pw_uid, user.pw_gid, dir_fd=dir_fd,
                             follow_symlinks=False)
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        path.chmod(0o700)
        return user

    def _own_user(self, name: str) -> pwd.struct_passwd:
        user = pwd.getpwnam(name)
        if user.pw_gecos != self.user_comment or user.pw_uid == 0:
            raise CloudError(f"the OS user {name} exists but was not made by this cloud")
        return user

    def _delete_user(self, name: str) -> None:
        try:
            user = self._own_user(name)
        except KeyError:
            return
        _kill_uid(user.pw_uid)
        result = _run_user_tool(["userdel", name])
        if result.returncode not in (0, 6):  # 6: no such user (gone meanwhile)
            raise CloudError(f"could not delete the OS user {name}: {result.stderr.strip()}")

    def users(self) -> list[str]:
        """The OS users this cloud made (for cleanup checks)."""
        return sorted(p.pw_name for p in pwd.getpwall() if p.pw_gecos == self.user_comment)

    def _volume(self, rec: dict[str, Any]) -> Volume:
        attached = rec.get("attached_to")
        return Volume(id=rec["id"], name=rec["name"],
                      availability_zone=rec["availability_zone"], size_gb=rec["size_gb"],
                      status="in-use" if attached else "available", attached_to=attached,
                      tags=dict(rec.get("tags", {})))

    def create_volume(self, name: str, size_gb: int, availability_zone: str,
                      volume_type: str | None, tags: dict[str, str]) -> Volume:
        with self._state() as st:
            rec = _by_name(st.volumes, name)
            if rec is None:
                rec = {"id": uuid.uuid4().hex[:12], "name": name, "size_gb": size_gb,
                       "availability_zone": availability_zone, "volume_type": volume_type,
                       "attached_to": None, "tags": dict(tags)}
                st.volumes[rec["id"]] = rec
            st.save()  # recorded before its user exists: a crash leaves nothing unknown
            self._own_volume(rec["id"])
            return self._volume(rec)

    def get_volume(self, volume_id: str) -> Volume | None:
        rec = self._read().volumes.get(volume_id)
        return None if rec is None else self._volume(rec)

    def detach_volume(self, volume_id: str, server_id: str, *, force: bool = False) -> None:
        with self._state() as st:
            rec = st.volumes.get(volume_id)
            if rec is None or rec.get("attached_to") != server_id:
                return
            server = st.servers.get(server_id)
            if server is not None and not force and namespace_pids(self.namespace(server_id)):
                raise CloudError(f"volume {rec['name']} is in use by running server "
                                 f"{server['name']}: stop it first (or force)")
            rec["attached_to"] = None

    def delete_volume(self, volume_id: str) -> None:
        with self._state() as st:
            rec = st.volumes.get(volume_id)
            if rec is None:
                return
            attached = rec.get("attached_to")
            if attached is not None and attached in st.servers:
                raise CloudError(f"volume {rec['name']} is attached to server "
                                 f"{st.servers[attached]['name']}: delete the server first")
            # rmtree never follows the links its user may have planted below.
            shutil.rmtree(self._volume_dir(volume_id), ignore_errors=True)
            self._delete_user(self.volume_user(volume_id))
            del st.volumes[volume_id]

    # --- servers ---------------------------------------------------------------------------
    def ensure_server_group(self, name: str, tags: dict[str, str]) -> str | None:
        return None  # one machine: anti-affinity means nothing here

    def delete_server_group(self, group_id: str) -> None:
        return None

    def _status(self, rec: dict[str, Any]) -> ServerStatus:
        status = ServerStatus(rec["status"])
        if status == ServerStatus.ACTIVE and not _ns_exists(self.namespace(rec["id"])):
            return ServerStatus.SHUTOFF  # the machine rebooted: the "VM" is off
        return status

    def _server(self, rec: dict[str, Any], st: _State) -> Server:
        port = st.ports.get(rec["management_port_id"])
        volume_dir = self._volume_dir(rec["volume_id"])
        return Server(
            id=rec["id"], name=rec["name"], availability_zone=rec["availability_zone"],
            status=self._status(rec),
            management_address=port["address"] if port else None,
            tags=dict(rec.get("tags", {})),
            details={"netns": self.namespace(rec["id"]), "data_dir": str(volume_dir / "data"),
                     "log_file": str(volume_dir / "postgresql.log")})

    def _server_dir(self, server_id: str) -> Path:
        return self.root / "servers" / server_id

    def create_server(self, spec: ServerSpec) -> Server:
        self._ensure_bridge()
        with self._state() as st:
            rec = _by_name(st.servers, spec.name)
            if rec is not None and rec["status"] in (ServerStatus.ACTIVE, ServerStatus.SHUTOFF):
                return self._server(rec, st)  # adopt; a fenced server stays off
            port = st.ports.get(spec.management_port_id)
            volume = st.volumes.get(spec.volume_id)
            if port is None or port["purpose"] != "management":
                raise CloudError(f"management port {spec.management_port_id} does not exist")
            if volume is None:
                raise CloudError(f"volume {spec.volume_id} does not exist")
            if rec is None:
                rec = {"id": uuid.uuid4().hex[:12], "name": spec.name,
                       "availability_zone": spec.availability_zone, "flavor": spec.flavor,
                       "image": spec.image, "management_port_id": port["id"],
                       "volume_id": volume["id"], "tags": dict(spec.tags)}
            for what, holder in (("port", port.get("device_id")),
                                 ("volume", volume.get("attached_to"))):
                if holder not in (None, rec["id"]):
                    raise CloudError(f"{what} for {spec.name} is in use by server {holder}")
            rec["status"] = ServerStatus.BUILD.value
            port["device_id"] = rec["id"]
            volume["attached_to"] = rec["id"]
            st.servers[rec["id"]] = rec
            port_rec = dict(port)
        server_id = rec["id"]
        try:
            self._setup_namespace(rec, port_rec)
            self._boot(server_id, self._guest_config(server_id, rec["volume_id"], spec))
        except (CloudError, OSError, subprocess.SubprocessError) as exc:
            with self._state() as st:
                if server_id in st.servers:
                    st.servers[server_id]["status"] = ServerStatus.ERROR.value
            if isinstance(exc, CloudError):
                raise
            raise CloudError(f"server {spec.name} could not be built: {exc}") from None
        with self._state() as st:
            st.servers[server_id]["status"] = ServerStatus.ACTIVE.value
            return self._server(st.servers[server_id], st)

    def _guest_config(self, server_id: str, volume_id: str,
                      spec: ServerSpec) -> bootstrap.GuestConfig:
        volume_dir = self._volume_dir(volume_id)
        self._own_volume(volume_id)
        return dataclasses.replace(
            spec.guest, data_dir=str(volume_dir / "data"), volume_device=None,
            mount_point=str(volume_dir), socket_dir=str(self._server_dir(server_id) / "run"),
            pg_bin=self.pg_bin, run_as=self.volume_user(volume_id),
            log_file=str(volume_dir / "postgresql.log"))

    def _boot(self, server_id: str, guest: bootstrap.GuestConfig) -> None:
        """Run the guest bootstrap inside the namespace, as a VM runs its user-data."""
        sdir = self._server_dir(server_id)
        sdir.mkdir(exist_ok=True)
        sdir.chmod(0o711)
        config_path = sdir / "guest.json"
        with os.fdopen(_open_private(config_path, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(guest.to_json())
        boot_log = sdir / "bootstrap.log"
        # One boot at a time per server, whichever process asks. The bootstrap holds
        # the lock too (inherited): a worker killed mid-boot leaves its bootstrap
        # running, as a VM would, and the next boot waits for it to finish.
        with os.fdopen(_open_private(sdir / "boot.lock", os.O_RDWR), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                result = subprocess.run(
                    ["ip", "netns", "exec", self.namespace(server_id), sys.executable, "-I",
                     str(BOOTSTRAP_SCRIPT), str(config_path)],
                    capture_output=True, text=True, timeout=BOOT_TIMEOUT, check=False,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, pass_fds=(lock.fileno(),))
            except subprocess.TimeoutExpired:
                raise CloudError(f"server {server_id}: guest bootstrap did not finish within "
                                 f"{BOOT_TIMEOUT:.0f} s") from None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        output = (result.stdout or "") + (result.stderr or "")
        with os.fdopen(_open_private(boot_log, os.O_WRONLY | os.O_APPEND), "w") as f:
            f.write(output)
        if result.returncode != 0:
            tail = " | ".join(output.strip().splitlines()[-3:])
            pg_tail = _tail(Path(guest.log_file)) if guest.log_file else []
            if pg_tail:
                tail += " | postgresql.log: " + " | ".join(pg_tail)
            raise CloudError(f"server {server_id}: guest bootstrap failed: {tail}")

    def get_server(self, server_id: str) -> Server | None:
        st = self._read()
        rec = st.servers.get(server_id)
        return None if rec is None else self._server(rec, st)

    def start_server(self, server_id: str) -> Server:
        """Power a stopped server on again: links up, the guest bootstrap starts PostgreSQL
        on its existing data (local cloud only; like a VM reboot). The guest config is the
        first boot's, as a VM's user-data is: its peers may have left since, which is why
        the bootstrap leaves an existing cluster's pg_hba (the broker's) as it is."""
        with self._state() as st:
            rec = st.servers.get(server_id)
            if rec is None:
                raise CloudError(f"server {server_id} does not exist")
            port_rec = dict(st.ports[rec["management_port_id"]])
            config_path = self._server_dir(server_id) / "guest.json"
            guest = bootstrap.GuestConfig.from_json(config_path.read_text())
            rec["status"] = ServerStatus.BUILD.value
        try:
            # A server from before users per volume ran as another user: now the volume's.
            guest = dataclasses.replace(guest,
                                        run_as=self._own_volume(rec["volume_id"]).pw_name)
            self._setup_namespace(rec, port_rec)
            for port in self._read().ports.values():
                if port.get("device_id") == server_id and port["purpose"] == "service":
                    _ip("link", "set", self._veth_names(port)[1], "up",
                        ns=self.namespace(server_id))
            self._boot(server_id, guest)
        except CloudError:
            with self._state() as st:
                st.servers[server_id]["status"] = ServerStatus.ERROR.value
            raise
        with self._state() as st:
            st.servers[server_id]["status"] = ServerStatus.ACTIVE.value
            return self._server(st.servers[server_id], st)

    def _kill_all(self, ns: str, timeout: float = FENCE_TIMEOUT) -> bool:
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

    def _links_down(self, ns: str) -> None:
        out = _ip("-o", "link", "show", ns=ns, check=False).stdout
        for line in out.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0]
            if name != "lo":
                _ip("link", "set", name, "down", ns=ns, check=False)

    def stop_server(self, server_id: str) -> None:
        """Fence: cut the links (no more acknowledged commits), SIGKILL every process in
        the namespace, confirm none is left, mark SHUTOFF."""
        rec = self._read().servers.get(server_id)
        if rec is None:
            return  # a server that does not exist runs nothing
        ns = self.namespace(server_id)
        if _ns_exists(ns):
            self._links_down(ns)
            if not self._kill_all(ns):
                raise FenceError(f"server {rec['name']}: processes still alive after SIGKILL "
                                 f"for {FENCE_TIMEOUT:.0f} s")
        with self._state() as st:
            if server_id in st.servers:
                st.servers[server_id]["status"] = ServerStatus.SHUTOFF.value

    def delete_server(self, server_id: str) -> None:
        with self._state() as st:
            rec = st.servers.get(server_id)
            if rec is None:
                return
            ns = self.namespace(server_id)
            # The service veth would die with the namespace: move it out first.
            for port in st.ports.values():
                if port.get("device_id") == server_id and port["purpose"] == "service":
                    self._move_out(port, server_id)
                    port["device_id"] = None
            st.save()
            if _ns_exists(ns) and not self._kill_all(ns):
                raise FenceError(f"server {rec['name']}: processes still alive, not deleted")
            mgmt = st.ports.get(rec["management_port_id"])
            if mgmt is not None:
                host, _guest = self._veth_names(mgmt)
                if _link_exists(host):
                    _ip("link", "del", host)  # synchronous, unlike namespace teardown
                mgmt["device_id"] = None
            if _ns_exists(ns):
                _ip("netns", "del", ns)
            volume = st.volumes.get(rec["volume_id"])
            if volume is not None and volume.get("attached_to") == server_id:
                volume["attached_to"] = None
            shutil.rmtree(self._server_dir(server_id), ignore_errors=True)  # guest.json
            del st.servers[server_id]

    # --- housekeeping ----------------------------------------------------------------------
    def find_resources(self, instance_id: str | None = None) -> list[CloudResource]:
        st = self._read()
        found: list[CloudResource] = []
        kinds: tuple[tuple[Literal["server", "volume", "port"], dict[str, dict[str, Any]]],
                     ...] = (("server", st.servers), ("volume", st.volumes), ("port", st.ports))
        for kind, records in kinds:
            for rec in records.values():
                tags = rec.get("tags", {})
                ours = TAG_INSTANCE in tags or tags.get(TAG_MANAGED) == "true"
                if ours and (instance_id is None or tags.get(TAG_INSTANCE) == instance_id):
                    found.append(CloudResource(kind=kind, id=rec["id"], name=rec["name"],
                                               tags=dict(tags)))
        return found

    def check(self) -> list[str]:
        problems = []
        if self.network.overlaps(ipaddress.IPv4Network("127.0.0.0/8")):
            problems.append(f"network {self.network} overlaps loopback")
        return problems

    def interface_names(self) -> list[str]:
        """Every root-namespace interface this cloud made (for cleanup checks)."""
        st = self._read()
        names = [self.bridge]
        for port in st.ports.values():
            host, guest = self._veth_names(port)
            names += [host] if port["purpose"] == "management" else [host, guest]
        return names

    def namespaces(self) -> list[str]:
        return [self.namespace(sid) for sid in self._read().servers]

    def destroy_everything(self) -> None:
        """Remove every namespace, interface, data directory, OS user and record of this
        cloud."""
        if not self.root.exists():
            if _link_exists(self.bridge):
                _ip("link", "del", self.bridge, check=False)
            for name in self.users():
                self._delete_user(name)
            return
        with self._state() as st:
            for server_id in list(st.servers):
                ns = self.namespace(server_id)
                if _ns_exists(ns):
                    self._links_down(ns)
                    self._kill_all(ns)
            for port in st.ports.values():
                host, guest = self._veth_names(port)
                for name in (host, guest if port["purpose"] == "service" else ""):
                    if name and _link_exists(name):
                        _ip("link", "del", name, check=False)
            for server_id in list(st.servers):
                ns = self.namespace(server_id)
                if _ns_exists(ns):
                    _ip("netns", "del", ns, check=False)
            if _link_exists(self.bridge):
                _ip("link", "del", self.bridge, check=False)
            st.data.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        for name in self.users():
            self._delete_user(name)
