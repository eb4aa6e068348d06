"""The guest brings the service address up itself: the cloud only delivers a bare NIC
(the port's MAC, no address, down), and the NIC agent in the guest (udev in a VM; run by
the cloud in a namespace) finds it by MAC, adds the address, installs policy routing for
both addresses and announces the address with a gratuitous ARP. Inspected inside the
namespaces with `ip -n`, as one would inside a VM."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.cloud.base import CloudError, Port, ServerSpec
from broker.cloud.local import LocalCloud
from broker.guest.bootstrap import NETWORK_FIELDS, GuestConfig
from broker.guest.nic_agent import MANAGEMENT_TABLE, SERVICE_TABLE, network_of
from broker.operations.failover import start_switchover
from broker.pg import connection, replication
from harness.env import HasEngine, failover_env
from harness.waiting import eventually, standby_streaming, unfinished
from harness.workflows import (
    connect_with,
    deprovision,
    finish,
    instance,
    provision,
)
from harness.writer import app_credentials
from tests.fakes.openstack.on_namespaces import openstack_on_namespaces

pytestmark = pytest.mark.e2e

ADMIN_PW = "nic-agent-admin"
DECOY_MAC = "02:00:00:00:00:42"
WRONG_MAC = "02:00:00:00:00:99"


def ip_out(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


def nic_of(ns: str, mac: str) -> str:
    for line in ip_out("-o", "link", "show", ns=ns).splitlines():
        if f"link/ether {mac}" in line:
            return line.split(":", 2)[1].strip().split("@", 1)[0]
    raise AssertionError(f"no NIC with MAC {mac} in {ns}")


def addresses(ns: str, dev: str) -> list[str]:
    return [line.split()[3] for line in
            ip_out("-4", "-o", "addr", "show", "dev", dev, ns=ns).splitlines()]


def node_config(cloud: LocalCloud, node: str, address: str, service: Port) -> GuestConfig:
    """What the broker's node_create gives a guest: its own address and the service
    port's NIC."""
    nic = cloud.port_nic(service.id)
    return GuestConfig(
        instance_id="netinst", node_id=node, role="primary", admin_password=ADMIN_PW,
        replication_password="unused-here", admin_cidrs=(cloud.broker_address,),
        app_cidrs=(cloud.broker_address,), management_address=address,
        service_mac=nic.mac, service_address=nic.address,
        service_prefix_length=nic.prefix_length, service_gateway=nic.gateway,
        service_mtu=nic.mtu)


def boot(cloud: LocalCloud, node: str, service: Port) -> tuple[str, Port, str]:
    """(server id, management port, volume id) of a booted primary."""
    tags = {"pgha-instance": "netinst"}
    port = cloud.create_port(f"pgha-netinst-{node}", "management", tags)
    volume = cloud.create_volume(f"pgha-netinst-{node}", 1, "az1", None, tags)
    server = cloud.create_server(ServerSpec(
        name=f"pgha-netinst-{node}", availability_zone="az1", flavor="local", image="local",
        management_port_id=port.id, volume_id=volume.id,
        guest=node_config(cloud, node, port.address, service), tags=tags))
    connection.wait_ready(port.address, ADMIN_PW, timeout=60)
    return server.id, port, volume.id


def neighbour_mac(cloud: LocalCloud, address: str) -> str:
    """The MAC the host (the bridge side) has learnt for `address`."""
    words = ip_out("neigh", "show", address, "dev", cloud.bridge).split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else ""


def plug_announced(cloud: LocalCloud, service: Port, server_id: str) -> None:
    """The host holds a wrong MAC for the service address; the plug alone (no traffic
    from the host to the address) must correct it: a gratuitous ARP from the guest."""
    ip_out("neigh", "replace", service.address, "lladdr", WRONG_MAC, "dev", cloud.bridge,
           "nud", "stale")
    cloud.plug_port(service.id, server_id)
    mac = cloud.port_nic(service.id).mac
    eventually(lambda: neighbour_mac(cloud, service.address) == mac,
               "the host learnt the service address's MAC from a gratuitous ARP", 2)


def system_identifier(address: str) -> int:
    conn = connection.connect(address, ADMIN_PW, timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT system_identifier FROM pg_catalog.pg_control_system()")
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    return int(row[0])


def assert_configured(cloud: LocalCloud, server_id: str, mgmt: Port, service: Port) -> str:
    """The guest's network as the agent leaves it; returns the service NIC's name."""
    ns = cloud.namespace(server_id)
    nic = cloud.port_nic(service.id)
    dev = nic_of(ns, nic.mac)
    assert addresses(ns, dev) == [f"{service.address}/{nic.prefix_length}"]
    assert "state UP" in ip_out("link", "show", "dev", dev, ns=ns)
    rules = ip_out("-4", "rule", "show", ns=ns)
    assert f"from {service.address} lookup {SERVICE_TABLE}" in rules
    assert f"from {mgmt.address} lookup {MANAGEMENT_TABLE}" in rules
    subnet = str(cloud.network)
    service_table = ip_out("-4", "route", "show", "table", str(SERVICE_TABLE), ns=ns)
    assert f"{subnet} dev {dev} scope link src {service.address}" in service_table
    assert f"default via {nic.gateway} dev {dev}" in service_table
    management_table = ip_out("-4", "route", "show", "table", str(MANAGEMENT_TABLE), ns=ns)
    assert f"{subnet} dev eth0 scope link src {mgmt.address}" in management_table
    # Nothing in the main table goes through the service NIC: no default, no subnet.
    main = ip_out("-4", "route", "show", "table", "main", ns=ns)
    assert f"dev {dev}" not in main, main
    # Replies leave by the interface their address lives on.
    for source, out in ((service.address, dev), (mgmt.address, "eth0")):
        route = ip_out("-4", "route", "get", cloud.broker_address, "from", source, ns=ns)
        assert f"dev {out} " in route, route
    arp_notify = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/proc/sys/net/ipv4/conf/{dev}/arp_notify"],
        capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    assert arp_notify == "1"
    return dev


def forget_service_nic(cloud: LocalCloud, server_id: str) -> None:
    """Make the server's saved config one from before the guest configured the NIC."""
    path = cloud.root / "servers" / server_id / "guest.json"
    config = json.loads(path.read_text())
    for name in NETWORK_FIELDS:
        config.pop(name)
    path.write_text(json.dumps(config))


def test_the_guest_configures_the_service_nic_it_finds_by_mac(local_cloud: LocalCloud) -> None:
    cloud = local_cloud
    service = cloud.create_port("pgha-netinst-service", "service", {"pgha-instance": "netinst"})
    first, mgmt1, vol1 = boot(cloud, "a", service)
    second, mgmt2, vol2 = boot(cloud, "b", service)
    ns1 = cloud.namespace(first)
    # Booted without the service port: the management address has its own table.
    assert f"from {mgmt1.address} lookup {MANAGEMENT_TABLE}" in ip_out("-4", "rule", ns=ns1)
    # A second NIC with another MAC, which the agent must leave alone.
    ip_out("link", "add", "decoy0", "address", DECOY_MAC, "type", "veth", "peer", "name",
           "decoy1", ns=ns1)

    plug_announced(cloud, service, first)
    cloud.attach_port(service.id, first)  # idempotent; returns once PostgreSQL answers
    dev = assert_configured(cloud, first, mgmt1, service)
    # Another tool (a DHCP client) routes through the service NIC: the agent, run again
    # (another add event), takes those routes out of the main table.
    gateway = cloud.port_nic(service.id).gateway
    ip_out("route", "add", "default", "via", gateway, "dev", dev, "onlink", ns=ns1)
    ip_out("route", "add", str(cloud.network), "dev", dev, "metric", "50", ns=ns1)
    cloud.plug_port(service.id, first)
    assert_configured(cloud, first, mgmt1, service)
    assert addresses(ns1, "decoy0") == [] and "state DOWN" in ip_out(
        "link", "show", "dev", "decoy0", ns=ns1)
    assert system_identifier(service.address) == system_identifier(mgmt1.address)

    # The port moves (a failover): the other guest configures it, apps find it there.
    cloud.detach_port(service.id, first)
    plug_announced(cloud, service, second)
    cloud.attach_port(service.id, second)
    assert_configured(cloud, second, mgmt2, service)
    assert system_identifier(service.address) == system_identifier(mgmt2.address)

    # A reboot loses the NIC's configuration; the bootstrap's agent puts it back, also
    # on a server booted before guests configured the NIC (its config names none).
    forget_service_nic(cloud, second)
    cloud.stop_server(second)
    cloud.start_server(second)
    connection.wait_ready(service.address, ADMIN_PW, timeout=60)
    assert_configured(cloud, second, mgmt2, service)
    forget_service_nic(cloud, first)
    cloud.detach_port(service.id, second)
    cloud.attach_port(service.id, first)
    assert_configured(cloud, first, mgmt1, service)

    for server_id in (first, second):
        cloud.delete_server(server_id)
    for port_id in (mgmt1.id, mgmt2.id, service.id):
        cloud.delete_port(port_id)
    for volume_id in (vol1, vol2):
        cloud.delete_volume(volume_id)


def test_an_attach_whose_guest_never_answers_fails_clearly(
        local_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cloud plugged the NIC, but PostgreSQL never answers on the address (here:
    the guest was told another MAC, so its agent finds no NIC to configure)."""
    cloud = local_cloud
    service = cloud.create_port("pgha-netinst-service", "service", {"pgha-instance": "netinst"})
    decoy = cloud.create_port("pgha-netinst-decoy", "service", {"pgha-instance": "netinst"})
    server, mgmt, volume = boot(cloud, "a", decoy)
    monkeypatch.setattr("broker.cloud.reach.REACH_TIMEOUT", 2.0)
    with pytest.raises(CloudError, match=rf"the guest did not bring up {service.address}: "
                       r"PostgreSQL there did not answer within 2 s"):
        cloud.attach_port(service.id, server)
    assert addresses(cloud.namespace(server), nic_of(
        cloud.namespace(server), cloud.port_nic(service.id).mac)) == []
    cloud.delete_server(server)
    for port_id in (mgmt.id, service.id, decoy.id):
        cloud.delete_port(port_id)
    cloud.delete_volume(volume)


def rebuilt_primary_rebooted(env: HasEngine, reboot: Callable[[str], None]) -> None:
    """ha-sync: a switchover makes the standby primary and rebuilds a new standby, whose
    replication line the broker added to the primary's pg_hba over SQL. The primary is
    then powered off and on: its bootstrap replays its first-boot config (where it was
    a standby of a node that is gone), yet keeps the broker's pg_hba; its NIC agent puts
    the service address back. The standby streams again and commits do not hang."""
    instance_id = provision(env.runtime, env.engine, "ha-sync")
    creds = app_credentials(env, instance_id)
    old_standby = instance(env.runtime, instance_id).standby()
    assert old_standby is not None
    finish(env.engine, start_switchover(env.runtime.store, instance_id))
    for op in unfinished(env, instance_id):  # the rebuild of a new standby
        finish(env.engine, op.id)
    rebuilt = instance(env.runtime, instance_id)
    primary, standby = rebuilt.primary(), rebuilt.standby()
    assert primary is not None and standby is not None and primary.id == old_standby.id
    assert primary.server_id and primary.management_address
    assert standby_streaming(env, rebuilt) is not None

    reboot(primary.server_id)
    eventually(lambda: standby_streaming(env, instance(env.runtime, instance_id))
               is not None, "the new standby streams from the rebooted primary", 60)
    conn = connect_with(creds, timeout=10)  # through the service address
    try:
        with conn.cursor() as cur:
            # ha-sync: this commit returns only once the standby has it. A wait cut
            # short by the timeout would return with a warning instead.
            cur.execute("SET statement_timeout = '30s'")
            cur.execute("CREATE TABLE IF NOT EXISTS after_reboot (v int)")
            cur.execute("INSERT INTO after_reboot VALUES (1)")
        assert not [n for n in conn.notices if "synchronous replication" in n]
    finally:
        conn.close()
    admin = connection.connect(primary.management_address,
                               env.runtime.vault.decrypt(rebuilt.admin_password_enc))
    try:
        status = replication.replication_status(admin)
    finally:
        admin.close()
    assert status.synchronous_standby_names and [
        s.sync_state for s in status.standbys] == ["sync"]
    deprovision(env.runtime, env.engine, instance_id)


def test_a_rebuilt_primary_rebooted_streams_again_and_commits_go_on() -> None:
    with failover_env() as env:
        def reboot(server_id: str) -> None:
            env.cloud.stop_server(server_id)
            env.cloud.start_server(server_id)

        rebuilt_primary_rebooted(env, reboot)


def test_through_openstack_a_rebuilt_primary_rebooted_streams_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the OpenStack driver and Nova's stop and start: the guest runs
    the bootstrap and the NIC agent the broker's user-data carries."""
    with openstack_on_namespaces(tmp_path, monkeypatch.setenv) as env:
        compute = env.cloud.conn.compute

        def status_is(server_id: str, wanted: str) -> bool:
            return bool(compute.get_server(server_id).status == wanted)

        def reboot(server_id: str) -> None:
            compute.stop_server(server_id)
            eventually(lambda: status_is(server_id, "SHUTOFF"), "the primary stopped", 60)
            compute.start_server(server_id)
            eventually(lambda: status_is(server_id, "ACTIVE"), "the primary started", 60)

        rebuilt_primary_rebooted(env, reboot)


@pytest.mark.parametrize("interface", ["10.1.2.3/24", "192.168.77.130/25", "172.16.5.4/12",
                                       "10.0.0.1/32", "100.64.9.9/10"])
def test_the_agent_routes_the_network_its_address_is_in(interface: str) -> None:
    # The agent computes the network itself (`ipaddress` costs more to import than the
    # rest of it, on the failover's path): the same answer as `ipaddress`.
    address, prefix_length = interface.split("/")
    assert network_of(address, int(prefix_length)) == str(
        ipaddress.ip_interface(interface).network)
