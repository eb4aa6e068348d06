"""The fake behaves like an upstream deployment with default policies, and the driver
copes with what such a cloud really does.

Each behaviour below was read in the upstream source (nova: policies/servers.py,
api/openstack/common.py, compute/api.py, api/metadata/handler.py, conf/quota.py;
neutron and cinder quota defaults):
- host_status is shown to admins only, from microversion 2.16; a server's status comes
  from vm_state and task_state alone; forced_down wins over disabled;
- a dead host accepts stop and interface detach and never does them, makes interface
  attach wait for the RPC timeout, and makes volume detach answer 409;
- deferred delete leaves servers SOFT_DELETED until forceDelete;
- default quotas answer with the real status codes and bodies;
- the metadata service caches an instance's documents.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.catalog import Catalog
from broker.cloud.openstack import OpenStackCloud
from tests.fakes.openstack import FakeOpenStack
from tests.fakes.openstack.metadata import sign
from tests.support.openstack import build_node, make_cloud
from tests.test_openstack_driver import INSTANCE, cleanup, instance_tags, leftovers


def nova(conn: Any, method: str, path: str, version: str = "2.90", **kw: Any) -> Any:
    """A raw Nova request at a chosen microversion, errors included."""
    return conn.compute.request(path, method, microversion=version, raise_exc=False, **kw)


@pytest.fixture
def admin_cloud(openstack_env: Path, catalog: Catalog) -> Any:
    cloud = make_cloud(catalog, admin=True)
    try:
        yield cloud
    finally:
        cloud.close()


def test_host_status_is_admin_only_and_never_changes_a_servers_status(
        admin_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud, state = admin_cloud, fake_openstack.state
    server, *_ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
    host = state.hosts[state.host_of(server.id) or ""]

    def shown(conn: Any, version: str = "2.90") -> tuple[str, str | None]:
        body = nova(conn, "GET", f"/servers/{server.id}", version).json()["server"]
        return body["status"], body.get("host_status")

    assert shown(cloud.conn) == ("ACTIVE", None)          # member: no host_status
    assert shown(cloud.admin_conn) == ("ACTIVE", "UP")
    assert shown(cloud.admin_conn, "2.15") == ("ACTIVE", None)   # added in 2.16
    host.disabled = True
    assert shown(cloud.admin_conn) == ("ACTIVE", "MAINTENANCE")
    host.forced_down = True                                # forced_down before disabled
    assert shown(cloud.admin_conn) == ("ACTIVE", "DOWN")
    host.disabled = host.forced_down = False

    state.service_down_time = 0.2
    state.kill_host(host.name)
    time.sleep(0.3)
    assert shown(cloud.conn) == ("ACTIVE", None)          # a dead host: still ACTIVE
    assert shown(cloud.admin_conn) == ("ACTIVE", "UNKNOWN")
    state.host_status_policy = "unknown-only"              # a cloud that relaxed it
    assert shown(cloud.conn) == ("ACTIVE", "UNKNOWN")
    state.revive_host(host.name)
    assert shown(cloud.conn) == ("ACTIVE", None)
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_a_dead_host_accepts_stop_and_detach_waits_on_attach_and_refuses_volume_detach(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    server, _, volume, _ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
    spare = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    cloud.attach_port(spare.id, server.id)
    state.rpc_response_timeout = 0.5
    state.kill_host(state.host_of(server.id) or "")

    assert nova(cloud.conn, "DELETE",
                f"/servers/{server.id}/os-interface/{spare.id}").status_code == 202
    assert nova(cloud.conn, "POST", f"/servers/{server.id}/action",
                json={"os-stop": None}).status_code == 202
    # The stop holds the task_state lock: Nova refuses other actions meanwhile.
    assert nova(cloud.conn, "POST", f"/servers/{server.id}/action",
                json={"os-stop": None}).status_code == 409
    time.sleep(0.3)
    with state.lock:
        assert state.servers[server.id].vm_state == "active"       # never stopped
        assert state.ports[spare.id].device_id == server.id        # never detached
        state.servers[server.id].task_state = None
    other = cloud.create_port(f"pgha-{INSTANCE}-other", "service", instance_tags())
    started = time.monotonic()
    answer = nova(cloud.conn, "POST", f"/servers/{server.id}/os-interface",
                  json={"interfaceAttachment": {"port_id": other.id}})
    assert answer.status_code == 500 and "MessagingTimeout" in answer.text
    assert time.monotonic() - started >= 0.5                     # it waited first

    state.service_down_time = 0.1
    time.sleep(0.2)
    answer = nova(cloud.conn, "DELETE",
                  f"/servers/{server.id}/os-volume_attachments/{volume.id}")
    assert answer.status_code == 409
    assert answer.json() == {"conflictingRequest": {
        "code": 409, "message": "Service is unavailable at this time."}}
    with state.lock:
        state.servers[server.id].vm_state = "error"
    answer = nova(cloud.conn, "DELETE",
                  f"/servers/{server.id}/os-volume_attachments/{volume.id}")
    assert answer.status_code == 409
    assert "while it is in vm_state error" in answer.json()["conflictingRequest"]["message"]
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


@pytest.mark.parametrize("how", ["stopped-on-a-dead-host", "error"])
def test_nova_409_for_a_server_confirmed_off_releases_the_volume_through_cinder(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack, how: str) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    server, _, volume, _ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
    if how == "error":
        with state.lock:
            state.servers[server.id].vm_state = "error"
    else:
        cloud.stop_server(server.id)
        state.service_down_time = 0.1
        state.kill_host(state.host_of(server.id) or "")
        time.sleep(0.2)
    cloud.detach_volume(volume.id, server.id)     # member-only, no force needed
    assert state.volumes[volume.id].status == "available"
    assert [r.status for r in fake_openstack.requests("DELETE", r"/os-volume_attachments/")
            ][-1] == 409
    assert fake_openstack.requests("DELETE", r"/attachments/")[-1].status == 200
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_a_soft_deleted_server_is_force_deleted_and_frees_its_port_and_volume(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    state.reclaim_instance_interval = 3600.0
    server, port, volume, _ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
    assert nova(cloud.conn, "DELETE", f"/servers/{server.id}").status_code == 204
    time.sleep(0.2)
    soft = nova(cloud.conn, "GET", f"/servers/{server.id}").json()["server"]
    assert soft["status"] == "SOFT_DELETED"
    assert state.ports[port.id].device_id == server.id        # still held
    cloud.delete_server(server.id)
    assert server.id not in state.servers
    assert state.ports[port.id].device_id == ""
    assert state.volumes[volume.id].status == "available"
    actions = [r.body for r in fake_openstack.requests("POST", r"/servers/[^/]+/action$")]
    assert {"forceDelete": None} in actions
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_default_quotas_answer_with_the_upstream_bodies(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    conn, state = openstack_cloud.conn, fake_openstack.state
    flavor = state.by_name(state.flavors, "m1.small").id
    image = state.by_name(state.images, "pgha-postgresql-15").id
    for i in range(10):
        assert nova(conn, "POST", "/servers", json={"server": {
            "name": f"q{i}", "flavorRef": flavor, "imageRef": image}}).status_code == 202
    answer = nova(conn, "POST", "/servers", json={"server": {
        "name": "q10", "flavorRef": flavor, "imageRef": image}})
    assert (answer.status_code, answer.json()) == (403, {"forbidden": {
        "code": 403, "message": "Quota exceeded for instances: Requested 1, but already "
                                "used 10 of 10 instances"}})
    for i in range(10):
        assert nova(conn, "POST", "/os-server-groups", json={"server_group": {
            "name": f"g{i}", "policy": "anti-affinity"}}).status_code == 200
    answer = nova(conn, "POST", "/os-server-groups", json={"server_group": {
        "name": "g10", "policy": "anti-affinity"}})
    assert (answer.status_code, answer.json()) == (403, {"forbidden": {
        "code": 403, "message": "Quota exceeded, too many server groups."}})
    have = len(state.security_groups)
    for i in range(10 - have):
        assert conn.network.post("/security-groups", json={"security_group": {
            "name": f"s{i}"}}, raise_exc=False).status_code == 201
    answer = conn.network.post("/security-groups", json={"security_group": {"name": "s"}},
                               raise_exc=False)
    assert answer.status_code == 409
    assert answer.json()["NeutronError"]["type"] == "OverQuota"
    assert answer.json()["NeutronError"]["message"] == \
        "Quota exceeded for resources: ['security_group']."


def test_server_group_bodies_follow_the_microversion(
        openstack_cloud: OpenStackCloud) -> None:
    conn = openstack_cloud.conn
    old = nova(conn, "POST", "/os-server-groups", "2.1", json={"server_group": {
        "name": "a", "policies": ["anti-affinity"]}})
    assert old.status_code == 200 and old.json()["server_group"]["policies"] == \
        ["anti-affinity"]
    assert nova(conn, "POST", "/os-server-groups", "2.1", json={"server_group": {
        "name": "b", "policy": "anti-affinity"}}).status_code == 400
    assert nova(conn, "POST", "/os-server-groups", "2.14", json={"server_group": {
        "name": "c", "policies": ["soft-anti-affinity"]}}).status_code == 400
    new = nova(conn, "POST", "/os-server-groups", "2.64", json={"server_group": {
        "name": "d", "policy": "soft-anti-affinity"}})
    assert new.status_code == 200 and new.json()["server_group"]["policy"] == \
        "soft-anti-affinity"


CREATES = [r"/ports$", r"/volumes$", r"/servers$", r"/os-server-groups$",
           r"/security-groups$", r"/security-group-rules$"]


@pytest.mark.parametrize(("path", "answer"), [*((p, "500") for p in CREATES),
                                              *((p, "timeout") for p in CREATES)])
def test_a_create_applied_then_failed_leaves_one_resource_and_no_leak(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack, path: str,
        answer: str) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    if answer == "500":
        rule = fake_openstack.fail("POST", path, status=500, applied=True)
    else:  # made, but the answer comes after the client's timeout (1 s here)
        rule = fake_openstack.fail("POST", path, status=None, delay=1.5, applied=True)
    group = cloud.ensure_server_group(f"pgha-{INSTANCE}", instance_tags())
    server, port, *_ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1", group_id=group)
    cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    assert rule.hits == 1                       # the fault fired: made, then a 500
    with state.lock:                            # adopted, never made twice
        for table in (state.servers, state.ports, state.volumes, state.server_groups,
                      state.security_groups):
            names = [x.name for x in table.values()]
            assert len(names) == len(set(names))
    assert state.servers[server.id].port_ids == [port.id]
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_the_metadata_service_shows_a_new_port_only_after_its_cache_expires(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    state.metadata_cache_expiration = 1.0
    server, *_ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
    url = f"{fake_openstack.url}/openstack/latest/network_data.json"
    headers = {"X-Instance-ID": server.id,
               "X-Instance-ID-Signature": sign(state.metadata_secret, server.id)}

    def links() -> int:
        answer = requests.get(url, headers=headers, timeout=5)
        answer.raise_for_status()
        return len(answer.json()["links"])

    assert links() == 1
    service = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
    cloud.attach_port(service.id, server.id)
    assert links() == 1                          # Nova's cache still answers
    time.sleep(1.1)
    assert links() == 2
    forged = {"X-Instance-ID": server.id, "X-Instance-ID-Signature": "0" * 64}
    assert requests.get(url, headers=forged, timeout=5).status_code == 403
    cleanup(cloud)
    assert leftovers(fake_openstack) == []


def test_a_config_drive_is_written_once_at_boot(
        openstack_env: Path, catalog: Catalog, fake_openstack: FakeOpenStack) -> None:
    cloud = make_cloud(catalog, config_drive=True)
    try:
        state = fake_openstack.state
        server, port, *_ = build_node(cloud, INSTANCE, "aaaaaaaa", "az1")
        sent = fake_openstack.requests("POST", r"/servers$")[-1].body["server"]
        assert sent["config_drive"] is True
        shown = nova(cloud.conn, "GET", f"/servers/{server.id}").json()["server"]
        assert shown["config_drive"] == "True"
        drive = state.servers[server.id].config_drive
        assert drive is not None and drive["user_data"] == sent["user_data"]
        macs = [link["ethernet_mac_address"]
                for link in drive["network_data.json"]["links"]]
        assert macs == [state.ports[port.id].mac_address]
        # A port attached later never shows up there: the guest must not wait for it.
        service = cloud.create_port(f"pgha-{INSTANCE}-service", "service", instance_tags())
        cloud.attach_port(service.id, server.id)
        after = state.servers[server.id].config_drive
        assert after is not None and len(after["network_data.json"]["links"]) == 1
        cleanup(cloud)
        assert leftovers(fake_openstack) == []
    finally:
        cloud.close()
