"""The local cloud for real: namespaces on a bridge, PostgreSQL booted by the guest
bootstrap, streaming replication through a slot, the service port moved between
servers, fencing and deletion."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import pwd
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg2
import pytest

from broker.cloud.base import CloudError, Port, ServerSpec, ServerStatus
from broker.cloud.local import LocalCloud, LocalCloudUnavailable, boot
from broker.guest.bootstrap import GuestConfig
from broker.pg import connection, replication, tenants
from harness.machine import list_interfaces, list_namespaces, pg_bin_dir, world_traversable_tmpdir
from harness.waiting import at_once
from tests.support.pg import PG_USER

ADMIN_PW = "adm'in:pw\\1"  # quotes, colons, backslashes: every file format is exercised
REPL_PW = "re:pl\\pw'2"
INSTANCE = "inst1"


def guest(cloud: LocalCloud, node: str, role: str, peers: tuple[str, ...], *,
          primary: str | None = None, slot: str | None = None,
          service: Port | None = None, address: str = "") -> GuestConfig:
    """A node's config; with `service`, the service port's NIC as the broker gives it."""
    nic = cloud.port_nic(service.id) if service is not None else None
    return GuestConfig(
        instance_id=INSTANCE, node_id=node, role=role, admin_password=ADMIN_PW,
        replication_password=REPL_PW, replication="sync", application_name=f"node_{node}",
        primary_address=primary, slot_name=slot, admin_cidrs=(cloud.broker_address,),
        peer_addresses=peers, app_cidrs=(cloud.broker_address,),
        management_address=address, service_mac=nic.mac if nic else "",
        service_address=nic.address if nic else "",
        service_prefix_length=nic.prefix_length if nic else 0,
        service_gateway=nic.gateway if nic else "", service_mtu=nic.mtu if nic else 0)


def spec(name: str, zone: str, port_id: str, volume_id: str, config: GuestConfig) -> ServerSpec:
    return ServerSpec(name=name, availability_zone=zone, flavor="local", image="local",
                      management_port_id=port_id, volume_id=volume_id, guest=config,
                      tags={"pgha-instance": INSTANCE, "pgha-node": config.node_id,
                            "pgha-role": config.role})


def connect_refused(host: str) -> bool:
    try:
        connection.connect(host, ADMIN_PW, timeout=1).close()
    except psycopg2.OperationalError:
        return True
    return False


def test_refuses_clearly_without_postgresql_binaries(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    net = ipaddress.IPv4Network("10.214.0.0/24")
    with pytest.raises(LocalCloudUnavailable, match=r"make setup.*BROKER_PG_BIN"):
        LocalCloud(tmp_path, net, "pgtx", pg_bin="/nonexistent/bin")


def test_refuses_clearly_when_postgres_cannot_reach_the_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    closed = world_traversable_tmpdir("pgha-closed-")
    try:
        closed.chmod(0o700)
        with pytest.raises(LocalCloudUnavailable, match=r"cannot reach .*chmod o\+x"):
            LocalCloud(closed / "cloud", ipaddress.IPv4Network("10.214.0.0/24"), "pgtx",
                       pg_bin=pg_bin_dir())
    finally:
        subprocess.run(["rm", "-rf", str(closed)], check=True)


def test_refuses_clearly_when_not_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become someone else")
    user = pwd.getpwnam(PG_USER)
    os.seteuid(user.pw_uid)  # this process only, and back right after
    try:
        with pytest.raises(LocalCloudUnavailable,
                           match="the local cloud needs root: it creates network namespaces"):
            LocalCloud(tmp_path, ipaddress.IPv4Network("10.214.0.0/24"), "pgtx")
    finally:
        os.seteuid(0)


@pytest.mark.e2e
def test_primary_standby_service_port_fence_delete(local_cloud: LocalCloud) -> None:
    cloud = local_cloud
    tags = {"pgha-instance": INSTANCE}
    p1 = cloud.create_port("pgha-inst1-a", "management", tags)
    p2 = cloud.create_port("pgha-inst1-b", "management", tags)
    service = cloud.create_port("pgha-inst1-service", "service", tags)
    v1 = cloud.create_volume("pgha-inst1-a", 1, "az1", None, tags)
    v2 = cloud.create_volume("pgha-inst1-b", 1, "az2", None, tags)
    assert cloud.create_port("pgha-inst1-a", "management", tags) == p1  # adopted
    assert cloud.create_volume("pgha-inst1-a", 1, "az1", None, tags) == v1
    assert len({p1.address, p2.address, service.address, cloud.broker_address}) == 4
    peers = (p1.address, p2.address)

    # Primary: booted by the guest bootstrap inside its namespace.
    primary_spec = spec("pgha-inst1-a", "az1", p1.id, v1.id, guest(
        cloud, "a", "primary", peers, service=service, address=p1.address))
    primary = cloud.create_server(primary_spec)
    assert primary.status == ServerStatus.ACTIVE
    assert primary.management_address == p1.address
    assert primary.details["netns"] in list_namespaces()
    assert cloud.create_server(primary_spec).id == primary.id  # adopted, not booted twice
    connection.wait_ready(p1.address, ADMIN_PW, timeout=30)
    conn1 = connection.connect(p1.address, ADMIN_PW)
    tenants.ensure_cluster_objects(conn1, replication_password=REPL_PW)
    replication.ensure_slot(conn1, "slot_b")
    # ha-sync: set before the standby exists, so its base backup copies the setting
    # (postgresql.auto.conf) and the bootstrap must clear it there.
    replication.set_synchronous_standby(conn1, "node_b")

    # A failing bootstrap says why, without a secret.
    bad = spec("pgha-inst1-x", "az2", p2.id, v2.id,
               guest(cloud, "x", "standby", peers, primary=p1.address, slot="slot_missing"))
    with pytest.raises(CloudError, match="slot_missing") as failure:
        cloud.create_server(bad)
    assert ADMIN_PW not in str(failure.value) and REPL_PW not in str(failure.value)
    bad_server = next(r for r in cloud.find_resources(INSTANCE) if r.name == "pgha-inst1-x")
    assert cloud.get_server(bad_server.id).status == ServerStatus.ERROR  # type: ignore[union-attr]
    cloud.delete_server(bad_server.id)

    # Standby: base backup through its slot, then streaming.
    standby = cloud.create_server(spec("pgha-inst1-b", "az2", p2.id, v2.id, guest(
        cloud, "b", "standby", peers, primary=p1.address, slot="slot_b", service=service,
        address=p2.address)))
    replication.wait_streaming(conn1, "node_b", timeout=30)
    conn2 = connection.connect(p2.address, ADMIN_PW)
    assert replication.replication_status(conn2).in_recovery
    assert replication.replication_status(conn2).synchronous_standby_names == ""

    # Synchronous replication: commits return, and the row is on the standby.
    assert replication.replication_status(conn1).standbys[0].sync_state == "sync"
    with conn1.cursor() as cur:
        cur.execute("CREATE TABLE public.t (v text)")
        # remote_apply: the commit returns once the standby has applied it.
        cur.execute("SET synchronous_commit = remote_apply")
        cur.execute("INSERT INTO public.t VALUES ('written on the primary')")
    with conn2.cursor() as cur:
        cur.execute("SELECT v FROM public.t")
        assert cur.fetchall() == [("written on the primary",)]

    # The service address follows the port.
    cloud.attach_port(service.id, primary.id)
    cloud.attach_port(service.id, primary.id)  # idempotent
    assert in_recovery_via(service.address) is False
    with pytest.raises(CloudError, match="detach it first"):
        cloud.attach_port(service.id, standby.id)  # never stolen
    cloud.detach_port(service.id, primary.id)
    assert cloud.get_port(service.id).device_id is None  # type: ignore[union-attr]
    cloud.attach_port(service.id, standby.id)
    assert in_recovery_via(service.address) is True
    cloud.detach_port(service.id, standby.id)
    cloud.attach_port(service.id, primary.id)

    # Fence the primary: nothing runs in it any more, it answers nothing.
    cloud.stop_server(primary.id)
    assert cloud.get_server(primary.id).status == ServerStatus.SHUTOFF  # type: ignore[union-attr]
    assert cloud.server_pids(primary.id) == []
    assert connect_refused(p1.address)
    cloud.stop_server(primary.id)  # idempotent

    # Promote the standby (twice: idempotent) and move the service port to it.
    with conn2.cursor() as cur:  # as if inherited: promotion must clear it
        cur.execute("""ALTER SYSTEM SET synchronous_standby_names = '"node_a"'""")
    replication.promote(conn2)
    replication.promote(conn2)
    status = replication.replication_status(conn2)
    assert not status.in_recovery and status.synchronous_standby_names == ""
    cloud.detach_port(service.id, primary.id)
    cloud.attach_port(service.id, standby.id)
    via_service = connection.connect(service.address, ADMIN_PW)
    with via_service.cursor() as cur:
        cur.execute("INSERT INTO public.t VALUES ('after failover') RETURNING 1")
        assert cur.fetchone() == (1,)
    via_service.close()
    conn2.close()
    conn1.close()

    # A fenced server can be powered on again on its own data, even when the pid in its
    # stale postmaster.pid now belongs to another live process (pids are recycled).
    pid_file = Path(primary.details["data_dir"]) / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")
    cloud.start_server(primary.id)
    connection.wait_ready(p1.address, ADMIN_PW, timeout=30)

    # Deleting a server keeps its volume (data directory) and frees its ports.
    cloud.delete_server(primary.id)
    cloud.delete_server(primary.id)  # idempotent
    assert cloud.get_server(primary.id) is None
    assert primary.details["netns"] not in list_namespaces()
    kept = cloud.get_volume(v1.id)
    assert kept is not None and kept.status == "available"
    assert (Path(primary.details["data_dir"]) / "PG_VERSION").exists()
    assert cloud.get_port(p1.id).device_id is None  # type: ignore[union-attr]

    # Deleting the server holding the service port keeps the port (moved out, alive).
    cloud.delete_server(standby.id)
    port = cloud.get_port(service.id)
    assert port is not None and port.device_id is None
    assert f"pgv{service.id}" in list_interfaces()
    assert {r.kind for r in cloud.find_resources(INSTANCE)} == {"port", "volume"}
    for p in (p1, p2, service):
        cloud.delete_port(p.id)
    for v in (v1, v2):
        cloud.delete_volume(v.id)
    assert cloud.find_resources() == []
    assert f"pgv{service.id}" not in list_interfaces()


def in_recovery_via(address: str) -> bool:
    conn = connection.connect(address, ADMIN_PW)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return bool(row[0])


@pytest.mark.e2e
def test_a_volume_from_before_users_per_volume_boots_as_its_own_user(
        local_cloud: LocalCloud) -> None:
    """A server and volume made when every node ran as one shared user: its guest config
    names that user, everything on the volume is that user's, the volume has no user of
    its own. Powered on again, it runs as a new user of the volume's, which owns it all."""
    cloud = local_cloud
    tags = {"pgha-instance": INSTANCE}
    port = cloud.create_port("pgha-inst1-a", "management", tags)
    volume = cloud.create_volume("pgha-inst1-a", 1, "az1", None, tags)
    server = cloud.create_server(spec("pgha-inst1-a", "az1", port.id, volume.id,
                                      guest(cloud, "a", "primary", (port.address,))))
    cloud.stop_server(server.id)
    shared = pwd.getpwnam(PG_USER)
    volume_dir = Path(server.details["data_dir"]).parent
    config = cloud.root / "servers" / server.id / "guest.json"
    config.write_text(config.read_text().replace(cloud.volume_user(volume.id), PG_USER))
    subprocess.run(["chown", "-R", "--no-dereference", f"{shared.pw_uid}:{shared.pw_gid}",
                    str(volume_dir)], check=True)
    os.chown(volume_dir, 0, 0)
    volume_dir.chmod(0o711)
    # Powered off hard, its PostgreSQL left its socket lock behind, the shared user's
    # then (0600: no other user can read it).
    run_dir = cloud.root / "servers" / server.id / "run"
    assert list(run_dir.glob(".s.PGSQL.*.lock"))
    subprocess.run(["chown", "-R", "--no-dereference", f"{shared.pw_uid}:{shared.pw_gid}",
                    str(run_dir)], check=True)
    subprocess.run(["userdel", cloud.volume_user(volume.id)], check=True)

    cloud.start_server(server.id)
    connection.wait_ready(port.address, ADMIN_PW, timeout=30)
    owner = pwd.getpwnam(cloud.volume_user(volume.id))
    data = Path(server.details["data_dir"])
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{postmaster}").st_uid == owner.pw_uid
    for path in (volume_dir, data, data / "PG_VERSION", data / "pg_hba.conf"):
        assert os.lstat(path).st_uid == owner.pw_uid, path
    assert oct(volume_dir.stat().st_mode & 0o777) == oct(0o700)


def test_engines_starting_together_all_get_the_bridge(local_cloud: LocalCloud) -> None:
    """A worker's engines start their first operations at once, each making sure of the
    bridge: one makes it again (here: after it was removed), none fails on `File exists`."""
    cloud = local_cloud
    subprocess.run(["ip", "link", "del", cloud.bridge], check=True)
    results = at_once(cloud.plumbing.ensure_bridge, 8)
    assert results == [None] * 8  # none raised
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", cloud.bridge],
                           capture_output=True, text=True, check=True).stdout
    assert f" {cloud.broker_address}/" in shown


@pytest.mark.e2e
def test_a_service_port_moves_with_the_records_free(
        local_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead host's failovers move many service ports at once: the moves (`ip` runs)
    and the guest's NIC agent (a Python start and more `ip` runs) must not hold the
    cloud's records lock, or the ports move one at a time while every other call to
    the cloud waits."""
    cloud = local_cloud
    tags = {"pgha-instance": INSTANCE}
    mgmt = cloud.create_port("pgha-inst1-a", "management", tags)
    service = cloud.create_port("pgha-inst1-service", "service", tags)
    volume = cloud.create_volume("pgha-inst1-a", 1, "az1", None, tags)
    server = cloud.create_server(spec("pgha-inst1-a", "az1", mgmt.id, volume.id, guest(
        cloud, "a", "primary", (mgmt.address,), service=service, address=mgmt.address)))
    records_free: list[tuple[str, bool]] = []

    def seeing_the_records(what: str, real: Callable[..., None]) -> Callable[..., None]:
        def run(*args: object) -> None:
            fd = os.open(cloud.records.lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                records_free.append((what, True))
            except BlockingIOError:
                records_free.append((what, False))
            finally:
                os.close(fd)  # releases the flock, if taken
            real(*args)
        return run

    monkeypatch.setattr(boot, "run_nic_agent", seeing_the_records("agent", boot.run_nic_agent))
    for name in ("move_in", "move_out"):
        monkeypatch.setattr(cloud.plumbing, name,
                            seeing_the_records(name, getattr(cloud.plumbing, name)))
    cloud.attach_port(service.id, server.id)
    assert in_recovery_via(service.address) is False  # the agent did configure it
    cloud.detach_port(service.id, server.id)
    assert cloud.get_port(service.id).device_id is None  # type: ignore[union-attr]
    assert records_free == [("move_in", True), ("agent", True), ("move_out", True)]
