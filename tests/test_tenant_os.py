"""A tenant who got a node's OS account (a superuser's `COPY … TO PROGRAM` runs as it)
attacks the machine through what the cloud and the guest bootstrap do as root:

- links planted in its data directory, then a restart and a resurrect: root follows
  none of them (a root-owned canary outside is left as it was);
- another instance's socket, data directory and processes: out of its reach;
- the address of a node that left (resurrect, failover, removal of a standby), which
  the cloud hands out again: no live node lets it replicate;
- the local cloud's own files: root's alone.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import pwd
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.cloud.local import LocalCloud
from broker.pg import connection
from broker.store.models import READY, Instance, Node
from harness.env import FailoverEnv, background, failover_env
from harness.faults import kill_server
from harness.machine import pg_bin_dir
from harness.scenarios import fail_primary, under_write_load
from harness.waiting import eventually, failovers, unfinished
from harness.workflows import deprovision, instance, provision, update

pytestmark = pytest.mark.e2e

CANARY = "# a file of root's: no node may change it\n"
# Every file the bootstrap writes, reads or appends to below a volume, as a primary.
# (A primary has no standby.signal: one planted there would make it a standby, which
# is the tenant's own node and its own loss; the bootstrap only ever makes that file
# in a new, empty directory of its own.)
PLANTED = ("data/pg_hba.conf", "data/pgha.conf", "data/postgresql.auto.conf",
           "postgresql.log", "replication.pgpass")


# --- helpers -------------------------------------------------------------------------------
def node_user(cloud: LocalCloud, node: Node) -> pwd.struct_passwd:
    assert node.volume_id
    return pwd.getpwnam(cloud.volume_user(node.volume_id))


def volume_dir(cloud: LocalCloud, node: Node) -> Path:
    assert node.server_id
    server = cloud.get_server(node.server_id)
    assert server is not None
    return Path(server.details["data_dir"]).parent


def make_canaries(base: Path) -> dict[str, Path]:
    """One root-owned 0644 file per planted link, in a directory of root's."""
    home = base / "canaries"
    home.mkdir(mode=0o755)
    canaries = {}
    for name in PLANTED:
        path = home / name.replace("/", "_")
        path.write_text(CANARY)
        path.chmod(0o644)
        canaries[name] = path
    return canaries


def assert_untouched(canaries: dict[str, Path]) -> None:
    for name, path in canaries.items():
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode), f"the canary of {name} was replaced"
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644), \
            f"root changed the owner or mode of the canary behind {name}"
        assert path.read_text() == CANARY, f"root wrote through the link at {name}"


def as_user(user: pwd.struct_passwd, work: Any) -> Any:
    """Run `work()` in a child with exactly the user's identity (no other group), as
    the tenant's shell would; returns what it returned (JSON-able)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - leaves through os._exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return json.loads(data)


def plant_links(user: pwd.struct_passwd, volume: Path, canaries: dict[str, Path]) -> None:
    def plant() -> list[str]:
        for name, target in canaries.items():
            link = volume / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target)
        return sorted(os.listdir(volume))
    as_user(user, plant)
    for name in canaries:
        assert (volume / name).is_symlink() and os.lstat(volume / name).st_uid == user.pw_uid


def errno_of(action: Any) -> int:
    try:
        action()
    except OSError as exc:
        return int(exc.errno or 0)
    return 0


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


@contextlib.contextmanager
def address_taken(cloud: LocalCloud, address: str) -> Iterator[str]:
    """A namespace on the cloud's bridge holding `address` (as a new port that the
    cloud gave the freed address would); yields its name."""
    tag = uuid.uuid4().hex[:8]
    ns, host, guest = f"pgt-{tag}", f"pgt{tag}h", f"pgt{tag}g"
    run = ["ip", "netns", "exec", ns, "ip"]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", guest,
                        "netns", ns], check=True)
        subprocess.run(["ip", "link", "set", host, "master", cloud.bridge, "up"], check=True)
        subprocess.run([*run, "addr", "add", f"{address}/{cloud.network.prefixlen}", "dev",
                        guest], check=True)
        subprocess.run([*run, "link", "set", guest, "up"], check=True)
        subprocess.run([*run, "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def replicate_from(ns: str, host: str, password: str) -> subprocess.CompletedProcess[str]:
    """A replication connection as pgha_replicator, made from inside `ns`."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, f"{pg_bin_dir()}/psql", "-X", "-w", "-At",
         f"host={host} user=pgha_replicator dbname=replication replication=true "
         "connect_timeout=5", "-c", "IDENTIFY_SYSTEM"],
        capture_output=True, text=True, check=False, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PGPASSWORD": password})


def replication_rules(env: FailoverEnv, inst: Instance, node: Node) -> list[tuple[str, ...]]:
    """(user, address, netmask) of every pg_hba line of the node that admits
    replication connections, as PostgreSQL itself parsed its pg_hba.conf."""
    assert node.management_address
    conn = connection.connect(node.management_address,
                              env.runtime.vault.decrypt(inst.admin_password_enc), timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT user_name::text, address, netmask FROM pg_hba_file_rules "
                        "WHERE 'replication' = ANY(database) OR 'all' = ANY(database)")
            return [tuple(str(v) for v in row) for row in cur.fetchall()]
    finally:
        conn.close()


def assert_no_replication_from(env: FailoverEnv, instance_id: str, address: str) -> None:
    """No live node's pg_hba admits `address` for replication, and a replication
    connection from that address with the right password is refused by pg_hba."""
    inst = instance(env.runtime, instance_id)
    live = [n for n in inst.live_nodes() if n.management_address]
    assert live
    password = env.runtime.vault.decrypt(inst.replication_password_enc)
    for node in live:
        for user, net, mask in replication_rules(env, inst, node):
            if net != "None":
                network = ipaddress.ip_network(f"{net}/{mask}", strict=False)
                assert ipaddress.ip_address(address) not in network, \
                    f"node {node.id} admits {address} for replication ({user} {network})"
    with address_taken(env.cloud, address) as ns:
        for node in live:
            assert node.management_address
            result = replicate_from(ns, node.management_address, password)
            assert result.returncode != 0, f"node {node.id} let {address} replicate"
            assert f'no pg_hba.conf entry for replication connection from host "{address}"' \
                in result.stderr, result.stderr


# --- tests -----------------------------------------------------------------------------------
def test_links_planted_in_a_data_directory_never_make_root_write() -> None:
    """Links from the volume to root's canaries; the server powered off and on (a VM
    reboot re-runs the bootstrap), then killed and resurrected by the broker on a new
    server: every canary keeps its content, owner and mode, and the node serves."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        old = instance(env.runtime, instance_id).primary()
        assert old is not None and old.server_id and old.management_address
        user, volume = node_user(env.cloud, old), volume_dir(env.cloud, old)
        canaries = make_canaries(env.base)

        plant_links(user, volume, canaries)
        env.cloud.stop_server(old.server_id)
        env.cloud.start_server(old.server_id)
        inst = instance(env.runtime, instance_id)
        password = env.runtime.vault.decrypt(inst.admin_password_enc)
        connection.wait_ready(old.management_address, password, timeout=30)
        assert_untouched(canaries)

        plant_links(user, volume, canaries)
        with background(env):
            kill_server(env.cloud, old.server_id, links_down=True)
            eventually(lambda: not unfinished(env, instance_id)
                       and instance(env.runtime, instance_id).state == READY
                       and instance(env.runtime, instance_id).primary().id != old.id,  # type: ignore[union-attr]
                       "the instance resurrected", 120)
        assert [(e.kind, e.outcome) for e in failovers(env, instance_id)] == [
            ("resurrect", "succeeded")]
        assert_untouched(canaries)
        new = instance(env.runtime, instance_id).primary()
        assert new is not None and new.volume_id == old.volume_id
        assert node_user(env.cloud, new).pw_uid == user.pw_uid  # the identity is the volume's

        # The address of the lost server went back to the cloud: it replicates nowhere.
        assert_no_replication_from(env, instance_id, old.management_address)
        deprovision(env.runtime, env.engine, instance_id)


def test_a_node_account_reaches_no_other_instance() -> None:
    """Instance A's OS account against instance B's node: the socket directory, the data
    directory and the processes are refused by the kernel (and reachable for B's own
    account, so the probe is sound)."""
    with failover_env() as env:
        a_id = provision(env.runtime, env.engine, "standalone")
        b_id = provision(env.runtime, env.engine, "standalone")
        a = instance(env.runtime, a_id).primary()
        b = instance(env.runtime, b_id).primary()
        assert a is not None and b is not None and b.server_id
        user_a, user_b = node_user(env.cloud, a), node_user(env.cloud, b)
        assert user_a.pw_uid != user_b.pw_uid
        server_b = env.cloud.get_server(b.server_id)
        assert server_b is not None
        data_b = Path(server_b.details["data_dir"])
        socket_b = str(env.cloud.root / "servers" / b.server_id / "run" / ".s.PGSQL.5432")
        pid_b = postmaster_pid(data_b)

        def probe() -> dict[str, int]:
            def connect() -> None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(socket_b)
            return {
                "socket": errno_of(connect),
                "data": errno_of(lambda: os.listdir(data_b)),
                "conf": errno_of(lambda: (data_b / "postgresql.conf").read_bytes()),
                "volume": errno_of(lambda: os.listdir(data_b.parent)),
                "signal": errno_of(lambda: os.kill(pid_b, 0)),
            }

        assert as_user(user_a, probe) == {"socket": errno.EACCES, "data": errno.EACCES,
                                          "conf": errno.EACCES, "volume": errno.EACCES,
                                          "signal": errno.EPERM}
        assert as_user(user_b, probe) == dict.fromkeys(
            ("socket", "data", "conf", "volume", "signal"), 0)
        deprovision(env.runtime, env.engine, a_id)
        deprovision(env.runtime, env.engine, b_id)


def test_a_former_peer_address_replicates_nowhere() -> None:
    """ha: the primary dies (failover, then a standby rebuilt); then an update to
    standalone removes the standby. The address of each node that left is admitted by
    no live node's pg_hba, and a replication connection from it is refused."""
    # Under write load: the monitor promotes a standby it has seen streaming.
    with failover_env() as env, under_write_load(env, "ha") as load:
        instance_id = load.instance_id
        old = instance(env.runtime, instance_id).primary()
        assert old is not None and old.server_id and old.management_address
        fail_primary(env, instance_id, load.credentials, load.writer,
                     lambda cloud, server_id: kill_server(cloud, server_id, links_down=True))
        load.stop()
        assert [(e.kind, e.outcome) for e in failovers(env, instance_id)] == [
            ("failover", "succeeded")]
        assert_no_replication_from(env, instance_id, old.management_address)

        standby = instance(env.runtime, instance_id).standby()
        assert standby is not None and standby.management_address
        update(env.runtime, env.engine, instance_id, "standalone")
        assert instance(env.runtime, instance_id).standby() is None
        assert_no_replication_from(env, instance_id, standby.management_address)
        deprovision(env.runtime, env.engine, instance_id)


def test_local_cloud_files_are_roots_alone() -> None:
    """The cloud's records, locks, guest configs (passwords) and boot logs: 0600 root,
    in directories nobody else may list; a volume and a socket directory: 0700, the
    volume's own user."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        node = instance(env.runtime, instance_id).primary()
        assert node is not None and node.server_id
        root = env.cloud.root
        server_dir = root / "servers" / node.server_id
        files = [root / "state.json", root / "state.lock", server_dir / "guest.json",
                 server_dir / "bootstrap.log", server_dir / "boot.lock"]
        for path in files:
            st = os.lstat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), path
        for path in (root, root / "servers", root / "volumes", server_dir):
            st = os.lstat(path)
            assert st.st_uid == 0 and not st.st_mode & (stat.S_IROTH | stat.S_IWOTH), path
        user = node_user(env.cloud, node)
        for path in (volume_dir(env.cloud, node), server_dir / "run"):
            st = os.lstat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o700), path
        assert user.pw_shell == "/usr/sbin/nologin"
        deprovision(env.runtime, env.engine, instance_id)
        assert env.cloud.users() == []  # the volume's user went with the volume
