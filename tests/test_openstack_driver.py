"""The OpenStack driver against the HTTP-level fake: what it asks the cloud for.

Each test reads the requests the real openstacksdk sent (zones, anti-affinity,
fixed IPs, security groups, tags, user-data) and the fake cloud's resulting state.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.catalog import Catalog
from broker.cloud.base import (
    TAG_INSTANCE,
    CloudError,
    NoValidHost,
    ServerSpec,
    ServerStatus,
    TransientCloudError,
)
from broker.cloud.openstack import OpenStackCloud
from broker.cloud.openstack.userdata import (
    NOVA_USER_DATA_LIMIT,
    bootstrap_source,
    nic_agent_source,
)
from broker.config import ConfigError
from tests.fakes.openstack import FakeOpenStack
from tests.fakes.openstack.state import SecurityGroup
from tests.support.openstack import (
    ADMIN_CIDR,
    ADMIN_PASSWORD,
    REPLICATION_PASSWORD,
    build_node,
    guest,
    make_cloud,
    node_tags,
    with_tls,
)

INSTANCE = "6f1c2a4e-0b9d-4c1e-8f7a-3d2b1c0e9f8a"


def instance_tags() -> dict[str, str]:
    return {TAG_INSTANCE: INSTANCE, "pgha-managed": "true"}


def leftovers(fake: FakeOpenStack) -> list[str]:
    """Everything of the test instance that still exists in the fake cloud."""
    s = fake.state
    with s.lock:
        names = [x.name for x in s.servers.values()]
        names += [x.name for x in s.volumes.values() if x.status != "deleting"]
        names += [x.name for x in s.ports.values()]
        names += [x.name for x in s.server_groups.values()]
        names += [x.name for x in s.security_groups.values()]
    return sorted(n for n in names if INSTANCE in n)


def cleanup(cloud: OpenStackCloud, instance_id: str = INSTANCE) -> None:
    """What deprovisioning does: everything tagged, servers first."""
    order = {"server": 0, "port": 1, "volume": 2, "server_group": 3, "security_group": 4}
    for res in sorted(cloud.find_resources(instance_id), key=lambda r: order[r.kind]):
        cloud.delete_resource(res)


def decoded_user_data(fake: FakeOpenStack) -> tuple[str, dict[str, Any]]:
    body = fake.requests("POST", r"/servers$")[-1].body
    text = base64.b64decode(body["server"]["user_data"]).decode()
    assert text.startswith("#cloud-config\n")
    return text, yaml.safe_load(text)


# --- connecting ---------------------------------------------------------------------------
def test_from_settings_connects_with_os_cloud_and_accepts_a_fitting_catalog(
        openstack_env: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_OPENSTACK_API_TIMEOUT", "5")
    settings = type("S", (), {"admin_cidr": ADMIN_CIDR, "app_cidr": None})()
    cloud = OpenStackCloud.from_settings(settings, catalog)
    try:
        assert cloud.check() == []
        assert cloud.options.api_timeout == 5
    finally:
        cloud.close()


def test_unreachable_or_refused_cloud_fails_at_start_with_a_plain_sentence(
        openstack_env: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch,
        fake_openstack: FakeOpenStack, tmp_path: Path) -> None:
    settings = type("S", (), {"admin_cidr": ADMIN_CIDR, "app_cidr": None})()
    doc = yaml.safe_load(openstack_env.read_text())
    doc["clouds"]["fake"]["auth"]["password"] = "wrong-password-123"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(bad))
    with pytest.raises(ConfigError) as refused:
        OpenStackCloud.from_settings(settings, catalog)
    assert "refused the credentials" in str(refused.value)
    assert "wrong-password-123" not in str(refused.value)

    doc["clouds"]["fake"]["auth"]["auth_url"] = "http://127.0.0.1:9/identity/v3"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as unreachable:
        OpenStackCloud.from_settings(settings, catalog)
    assert "cannot reach OpenStack identity at http://127.0.0.1:9" in str(unreachable.value)


def test_a_plan_naming_missing_things_stops_the_start(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    with fake_openstack.state.lock:
        fake_openstack.state.images.clear()
        fake_openstack.state.zones.remove("az2")
    settings = type("S", (), {"admin_cidr": ADMIN_CIDR, "app_cidr": None})()
    with pytest.raises(ConfigError) as exc:
        OpenStackCloud.from_settings(settings, catalog)
    text = str(exc.value)
    assert "image 'pgha-postgresql-15' does not exist" in text
    assert "availability zone 'az2' is not a compute zone" in text


def test_check_lists_every_problem(openstack_cloud: OpenStackCloud,
                                   fake_openstack: FakeOpenStack) -> None:
    from broker.catalog import parse_catalog

    doc = yaml.safe_load(Path("catalog.yml").read_text())
    plan = doc["services"][0]["plans"][1]["cloud"]
    plan.update(flavor="m9.huge", volume_type="gold", availability_zones=["az1", "az9"])
    plan["network"] = {"management_network": "nope-net", "service_subnet": "nope-subnet",
                       "security_groups": ["nope-sg"], "app_cidrs": ["10.0.0.0/33"]}
    openstack_cloud.catalog = parse_catalog(doc)
    with fake_openstack.state.lock:
        for image in fake_openstack.state.images.values():
            image.properties.clear()
    problems = openstack_cloud.check()
    expected = [
        "plan 'ha': flavor 'm9.huge' does not exist",
        "plan 'ha': availability zone 'az9' is not a compute zone (there are: az1, az2, az3)",
        "plan 'ha': availability zone 'az9' is not a volume zone (there are: az1, az2, az3)",
        "plan 'ha': volume type 'gold' does not exist",
        "plan 'ha': network 'nope-net' does not exist",
        "plan 'ha': subnet 'nope-subnet' does not exist",
        "plan 'ha': security group 'nope-sg' does not exist",
        "plan 'ha': app CIDR '10.0.0.0/33' is not a network address",
    ]
    for line in expected:
        assert line in problems
    assert any(p.startswith("warning: plan 'standalone': image") for p in problems)
    openstack_cloud.admin_cidr = None
    assert any(p.startswith("BROKER_ADMIN_CIDR is not set") for p in openstack_cloud.check())


# --- what the driver asks for ------------------------------------------------------------
def test_a_node_is_built_with_zone_anti_affinity_fixed_ip_security_groups_and_tags(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    group_id = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    service = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    server, mgmt, volume, _ = build_node(cloud, INSTANCE, "a1b2c3d4", "az2", group_id=group_id)
    s = fake_openstack.state

    group_req = fake_openstack.requests("POST", r"/os-server-groups$")[-1].body
    assert group_req == {"server_group": {"name": f"pgha-{INSTANCE}",
                                          "policy": "soft-anti-affinity"}}

    # The service port: a fixed address from the plan's service subnet, tagged.
    svc_subnet = s.by_name(s.subnets, "pgha-service-subnet")
    port_req = fake_openstack.requests("POST", r"/ports$")[0].body["port"]
    assert port_req["fixed_ips"] == [{"subnet_id": svc_subnet.id}]
    assert port_req["network_id"] == svc_subnet.network_id
    assert service.address.startswith("10.80.0.")
    assert service.device_id is None
    assert service.tags[TAG_INSTANCE] == INSTANCE
    assert f"pgha-instance={INSTANCE}" in s.ports[service.id].tags

    # Security groups: PostgreSQL from the app CIDRs (and the broker) on the service
    # port; replication and pgBackRest only between the instance's own nodes on
    # management ports.
    svc_sg = s.by_name(s.security_groups, f"pgha-{INSTANCE}-service")
    nodes_sg = s.by_name(s.security_groups, f"pgha-{INSTANCE}-nodes")
    assert s.ports[service.id].security_groups == [svc_sg.id]
    assert s.ports[mgmt.id].security_groups == [nodes_sg.id]
    def ingress(sg: SecurityGroup) -> list[tuple[int, str, str]]:
        return sorted((r["port_range_min"], r["remote_ip_prefix"] or "", r["remote_group_id"] or "")
                      for r in sg.rules if r["direction"] == "ingress")

    assert ingress(svc_sg) == [(5432, "10.0.0.0/8", ""), (5432, ADMIN_CIDR, "")]
    # pgBackRest's TLS server (backups from the standby): only from the peer nodes.
    assert ingress(nodes_sg) == sorted([(5432, "", nodes_sg.id), (5432, ADMIN_CIDR, ""),
                                        (8432, "", nodes_sg.id)])

    # The volume in the node's zone, tagged; the server in that zone, in the group.
    vol_req = fake_openstack.requests("POST", r"/volumes$")[-1].body["volume"]
    assert vol_req["availability_zone"] == "az2"
    assert vol_req["metadata"][TAG_INSTANCE] == INSTANCE
    body = fake_openstack.requests("POST", r"/servers$")[-1].body
    req = body["server"]
    assert req["availability_zone"] == "az2"
    assert req["networks"] == [{"port": mgmt.id}]
    assert body["OS-SCH-HNT:scheduler_hints"] == {"group": group_id}
    assert {"boot_index": -1, "uuid": volume.id, "source_type": "volume",
            "destination_type": "volume", "delete_on_termination": False} \
        in req["block_device_mapping_v2"]
    assert req["metadata"] == {**node_tags(INSTANCE, "a1b2c3d4", "primary"),
                               "pgha-management-address": mgmt.address}

    assert server.status == ServerStatus.ACTIVE
    assert server.availability_zone == "az2"
    assert server.management_address == mgmt.address
    assert server.tags == node_tags(INSTANCE, "a1b2c3d4", "primary")
    assert (s.servers[server.id].host or "").startswith("cmp-az2-")
    assert s.volumes[volume.id].status == "in-use"

    kinds = sorted((r.kind, r.name) for r in cloud.find_resources(INSTANCE))
    assert kinds == sorted([
        ("server", f"pgha-{INSTANCE}-a1b2c3d4"), ("volume", f"pgha-{INSTANCE}-a1b2c3d4"),
        ("port", f"pgha-{INSTANCE}-a1b2c3d4"), ("port", f"pgha-{INSTANCE}-service"),
        ("server_group", f"pgha-{INSTANCE}"),
        ("security_group", f"pgha-{INSTANCE}-nodes"),
        ("security_group", f"pgha-{INSTANCE}-service")])
    assert cloud.find_resources("another-instance") == []

    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_user_data_runs_the_real_bootstrap_and_nic_agent_with_the_data_volume(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    service = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    nic = cloud.port_nic(service.id)
    raw = fake_openstack.state.ports[service.id]
    assert (nic.mac, nic.address, nic.prefix_length, nic.gateway, nic.mtu) == (
        raw.mac_address, service.address, 24, "10.80.0.1", 1450)
    name, tags = f"pgha-{INSTANCE}-0badcafe", node_tags(INSTANCE, "0badcafe", "primary")
    port = cloud.create_port(name, "management", tags)
    volume = cloud.create_volume(name, 10, "az1", None, tags)
    node = replace(with_tls(guest(INSTANCE, "0badcafe"), port.address),
                   management_address=port.address, service_mac=nic.mac,
                   service_address=nic.address, service_prefix_length=nic.prefix_length,
                   service_gateway=nic.gateway, service_mtu=nic.mtu)
    cloud.create_server(ServerSpec(name=name, availability_zone="az1", flavor="m1.small",
                                   image="pgha-postgresql-15", management_port_id=port.id,
                                   volume_id=volume.id, guest=node, tags=tags))
    text, doc = decoded_user_data(fake_openstack)
    # Nothing from cloud-init's hotplug, which a config drive does not get.
    assert "updates" not in doc
    files = {f["path"]: f for f in doc["write_files"]}

    for path, source in (("/opt/pgha/bootstrap.py", bootstrap_source()),
                         ("/opt/pgha/nic_agent.py", nic_agent_source())):
        script = files[path]
        assert script["encoding"] == "gz+b64" and script["permissions"] == "0755"
        assert gzip.decompress(base64.b64decode(script["content"])) == source

    config = files["/etc/pgha/guest.json"]
    assert config["permissions"] == "0600"
    written = json.loads(base64.b64decode(config["content"]))
    assert written["volume_device"] == f"/dev/disk/by-id/virtio-{volume.id[:20]}"
    assert written["role"] == "primary" and written["node_id"] == "0badcafe"
    assert written["admin_password"] == ADMIN_PASSWORD  # the guest needs it ...
    assert ADMIN_PASSWORD not in text                     # ... never in clear text
    # The service port's NIC, known before it is ever plugged.
    assert (written["service_mac"], written["service_address"], written["service_gateway"],
            written["management_address"]) == (nic.mac, nic.address, "10.80.0.1", port.address)
    # The node's TLS key travels the same way, and it all fits Nova's user-data limit.
    assert written["tls_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert written["tls_key"] not in text and written["tls_issued_at"] > 0
    body = fake_openstack.requests("POST", r"/servers$")[-1].body
    assert len(body["server"]["user_data"]) < NOVA_USER_DATA_LIMIT

    unit = files["/etc/systemd/system/pgha-bootstrap.service"]["content"]
    assert "ExecStart=/usr/bin/python3 /opt/pgha/bootstrap.py /etc/pgha/guest.json" in unit
    assert f"[ -b /dev/disk/by-id/virtio-{volume.id[:20]} ]" in unit
    assert ["systemctl", "enable", "--now", "pgha-bootstrap.service"] in doc["runcmd"]

    # udev runs the agent when the NIC with the service port's MAC appears.
    rule = files["/etc/udev/rules.d/90-pgha-service-nic.rules"]["content"]
    assert f'ATTR{{address}}=="{nic.mac}"' in rule
    assert "/usr/bin/python3 -I -S /opt/pgha/nic_agent.py /etc/pgha/guest.json" in rule
    assert "arp_ignore = 1" in files["/etc/sysctl.d/90-pgha.conf"]["content"]
    cleanup(cloud)


def test_creating_twice_or_after_a_crash_adopts_instead_of_duplicating(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    # A crashed operation left a port made by hand-ish means (no tags yet) and a volume.
    s = fake_openstack.state
    with s.lock:
        mgmt_net = s.by_name(s.networks, "pgha-management")
    conn = cloud.conn
    orphan_port = conn.network.create_port(name=f"pgha-{INSTANCE}-feedf00d",
                                           network_id=mgmt_net.id)
    assert [r.id for r in cloud.find_resources(INSTANCE)] == [orphan_port.id]  # by name

    first = build_node(cloud, INSTANCE, "feedf00d", "az1")
    second = build_node(cloud, INSTANCE, "feedf00d", "az1")
    assert [x.id for x in first[:3]] == [x.id for x in second[:3]]
    assert first[1].id == orphan_port.id
    assert first[1].tags[TAG_INSTANCE] == INSTANCE                   # tagged on adoption
    assert len(fake_openstack.requests("POST", r"/servers$")) == 1
    assert len(fake_openstack.requests("POST", r"/volumes$")) == 1
    assert len(fake_openstack.requests("POST", r"/ports$")) == 1      # only the orphan's
    g1 = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    g2 = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    assert g1 == g2 and len(fake_openstack.requests("POST", r"/os-server-groups$")) == 1
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


# --- retries and failures -------------------------------------------------------------------
def test_500s_409s_and_timeouts_are_retried(openstack_cloud: OpenStackCloud,
                                            fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    fake_openstack.fail("POST", r"/servers$", status=500, times=2)
    fake_openstack.fail("POST", r"/volumes$", status=503, times=1)
    fake_openstack.fail("POST", r"/ports$", status=409, times=1,
                        body={"NeutronError": {"type": "Conflict", "message": "busy"}})
    fake_openstack.fail("GET", r"/ports/[^/]+$", status=None, delay=1.5, times=1)  # timeout
    server, *_ = build_node(cloud, INSTANCE, "c0ffee00", "az1")
    assert server.status == ServerStatus.ACTIVE
    assert [r.status for r in fake_openstack.requests("POST", r"/servers$")] == [500, 500, 202]
    assert [r.status for r in fake_openstack.requests("POST", r"/volumes$")] == [503, 202]
    assert len(fake_openstack.state.servers) == 1
    # Still failing after the retry budget: transient, for the engine to retry later.
    fake_openstack.fail("POST", r"/os-server-groups$", status=500, times=None)
    with pytest.raises(TransientCloudError, match="still failing after"):
        cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    fake_openstack.clear_faults()
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_quota_error_is_plain_not_retried_and_cleanup_leaves_nothing(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    fake_openstack.state.quotas["volumes"] = 1
    cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    build_node(cloud, INSTANCE, "11111111", "az1")
    tags = node_tags(INSTANCE, "22222222", "standby")
    cloud.create_port(f"pgha-{INSTANCE}-22222222", "management", tags)
    with pytest.raises(CloudError) as exc:
        cloud.create_volume(f"pgha-{INSTANCE}-22222222", 10, "az2", None, tags)
    assert not isinstance(exc.value, TransientCloudError)
    assert "quota exceeded: VolumeLimitExceeded" in str(exc.value)
    assert len(fake_openstack.requests("POST", r"/volumes$")) == 2   # no retry

    fake_openstack.state.quotas["ports"] = len(fake_openstack.state.ports)
    with pytest.raises(CloudError, match=r"quota exceeded: Quota exceeded for resources"):
        cloud.create_port(f"pgha-{INSTANCE}-33333333", "management",
                          node_tags(INSTANCE, "33333333", "standby"))
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_no_valid_host_fails_plainly_and_leaves_no_server(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    group_id = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    for host in fake_openstack.state.hosts.values():
        host.forced_down = host.zone == "az3"  # no live compute host in az3
    with pytest.raises(NoValidHost) as exc:  # a rebuild waits for the zone on this
        build_node(cloud, INSTANCE, "cccccccc", "az3", group_id=group_id)
    assert "No valid host was found" in str(exc.value)
    assert "capacity" in str(exc.value)
    assert fake_openstack.state.servers == {}
    # Every compute service of the zone disabled: Nova refuses the zone itself.
    for host in fake_openstack.state.hosts.values():
        host.forced_down, host.disabled = False, host.zone == "az3"
    with pytest.raises(NoValidHost, match="availability zone is not available"):
        build_node(cloud, INSTANCE, "dddddddd", "az3", group_id=group_id)
    assert fake_openstack.state.servers == {}
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_a_zone_with_one_eligible_host_rebuilds_beside_its_fenced_node(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    """Hard anti-affinity would keep the stopped (fenced) node's host for itself and
    answer "No valid host"; the broker's groups are soft, so the replacement boots."""
    cloud = openstack_cloud
    state = fake_openstack.state
    state.hosts["cmp-az1-2"].disabled = True  # az1 has one eligible host left
    group_id = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    old, *_ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1", group_id=group_id)
    cloud.stop_server(old.id)                 # fenced, still a member of the group
    assert state.servers[old.id].vm_state == "stopped"
    new, *_ = build_node(cloud, INSTANCE, "bbbbbbbb", "az1", group_id=group_id)
    assert state.servers[new.id].host == state.servers[old.id].host == "cmp-az1-1"
    assert set(state.server_groups[group_id or ""].members) == {old.id, new.id}
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_no_secret_in_errors_or_logs(openstack_cloud: OpenStackCloud,
                                     fake_openstack: FakeOpenStack,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = openstack_cloud
    name = f"pgha-{INSTANCE}-5ec2e7aa"
    tags = node_tags(INSTANCE, "5ec2e7aa", "primary")
    port = cloud.create_port(name, "management", tags)
    volume = cloud.create_volume(name, 10, "az1", None, tags)
    # Nova echoes invalid input back, user-data (passwords inside) included.
    echo = (f"Invalid input for field/attribute user_data. Value: {ADMIN_PASSWORD} "
            f"{REPLICATION_PASSWORD}")
    fake_openstack.fail("POST", r"/servers$", status=400,
                        body={"badRequest": {"code": 400, "message": echo}})
    fake_openstack.fail("POST", r"/servers$", status=500, times=1,
                        body={"computeFault": {"code": 500, "message": ADMIN_PASSWORD}})
    spec = ServerSpec(name=name, availability_zone="az1", flavor="m1.small",
                      image="pgha-postgresql-15", management_port_id=port.id,
                      volume_id=volume.id, guest=guest(INSTANCE, "5ec2e7aa"), tags=tags)
    with pytest.raises(CloudError) as exc:
        cloud.create_server(spec)
    message = str(exc.value)
    assert "OpenStack refused the request (400)" in message
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    logged = caplog.text + message
    for secret in (ADMIN_PASSWORD, REPLICATION_PASSWORD):
        assert secret not in logged
    assert "user_data" not in logged.replace("field/attribute user_data", "")
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_an_untagged_port_left_by_a_crash_is_found_and_healed(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    fake_openstack.fail("PUT", r"/ports/.*/tags$", status=500, times=None)
    with pytest.raises(TransientCloudError):
        cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    assert sorted((r.kind, r.name) for r in cloud.find_resources(INSTANCE)) == [
        ("port", f"pgha-{INSTANCE}-service"), ("security_group", f"pgha-{INSTANCE}-service")]
    fake_openstack.clear_faults()
    port = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    assert port.tags[TAG_INSTANCE] == INSTANCE
    assert len(fake_openstack.state.ports) == 1
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_catalog_with_several_networks_needs_the_plan_tag(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    from broker.catalog import parse_catalog
    from broker.cloud.openstack import TAG_PLAN

    doc = yaml.safe_load(Path("catalog.yml").read_text())
    other = doc["services"][0]["plans"][0]["cloud"]
    other["network"] = {**other["network"], "app_cidrs": ["172.16.0.0/12"]}
    cloud = make_cloud(parse_catalog(doc))
    try:
        with pytest.raises(CloudError, match="pgha-plan"):
            cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
        plan_id = doc["services"][0]["plans"][0]["id"]
        cloud.create_port(f"pgha-{INSTANCE}-service", "service",
                          {**instance_tags(), TAG_PLAN: plan_id})
        s = fake_openstack.state
        sg = s.by_name(s.security_groups, f"pgha-plan-{plan_id}-apps")  # one per plan
        assert "172.16.0.0/12" in [r["remote_ip_prefix"] for r in sg.rules]
        cleanup(cloud)
        assert leftovers(fake_openstack) == []
        assert sg.id not in s.security_groups    # went with the plan's last service port
    finally:
        cloud.close()


def test_driver_settings_are_validated_with_the_variable_named() -> None:
    from broker.cloud.openstack import OpenStackOptions

    options = OpenStackOptions.from_env({"BROKER_OPENSTACK_FENCE_HOOK": "/usr/local/bin/off",
                                         "BROKER_OPENSTACK_ADMIN_CLOUD": "ops-admin",
                                         "BROKER_OPENSTACK_STOP_TIMEOUT": "12.5"})
    assert (options.fence_hook, options.admin_cloud, options.stop_timeout) == (
        "/usr/local/bin/off", "ops-admin", 12.5)
    with pytest.raises(ConfigError, match="BROKER_OPENSTACK_CONFIG_DRIVE must be true or false"):
        OpenStackOptions.from_env({"BROKER_OPENSTACK_CONFIG_DRIVE": "maybe"})
    with pytest.raises(ConfigError, match="BROKER_OPENSTACK_DETACH_TIMEOUT must be a number"):
        OpenStackOptions.from_env({"BROKER_OPENSTACK_DETACH_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="FENCE_HOOK_AFTER must be at least 20 s"):
        OpenStackOptions.from_env({"BROKER_OPENSTACK_FENCE_HOOK": "/bin/true",
                                   "BROKER_OPENSTACK_ADMIN_CLOUD": "ops-admin",
                                   "BROKER_OPENSTACK_FENCE_HOOK_AFTER": "5"})
    # The hook needs the admin connection: host names and services are admin-only.
    with pytest.raises(ConfigError, match="FENCE_HOOK needs BROKER_OPENSTACK_ADMIN_CLOUD"):
        OpenStackOptions.from_env({"BROKER_OPENSTACK_FENCE_HOOK": "/bin/true"})
    # Forcing a service down on a frozen heartbeat alone is no longer offered.
    with pytest.raises(ConfigError, match="FORCE_DOWN is gone"):
        OpenStackOptions.from_env({"BROKER_OPENSTACK_FORCE_DOWN": "true"})


def test_what_the_driver_waits_for_reaches_the_operation(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    """The engine runs every step inside `cloud.reporting(ctx.progress)`: the waits on
    Nova and Cinder are what last_operation's description then says."""
    cloud = openstack_cloud
    said: list[str] = []
    with cloud.reporting(said.append):
        cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
        build_node(cloud, INSTANCE, "44444444", "az1")
    assert said, "no progress reported while building a node"
    assert any(line.startswith("waiting") and "to become ACTIVE" in line for line in said), said
    cleanup(cloud)
    assert leftovers(fake_openstack) == []
