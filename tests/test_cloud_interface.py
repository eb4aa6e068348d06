"""What callers get from the Cloud interface alone: the broker's and the apps' CIDRs
per cloud and plan, and security groups as one more kind of resource."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
from pathlib import Path

from broker.catalog import Catalog, Plan
from broker.cloud.base import TAG_INSTANCE, CloudResource
from broker.cloud.local import LocalCloud
from broker.cloud.openstack import OpenStackCloud
from broker.config import load_settings
from tests.fakes.openstack import FakeOpenStack
from tests.support.openstack import make_cloud

INSTANCE = "0c7e5d2a-4b1f-4e8a-9d3c-6a5b4c3d2e1f"
TAGS = {TAG_INSTANCE: INSTANCE, "pgha-managed": "true"}


def without_app_cidrs(plan: Plan) -> Plan:
    cloud = dataclasses.replace(plan.cloud, network=dataclasses.replace(
        plan.cloud.network, app_cidrs=()))
    return dataclasses.replace(plan, cloud=cloud)


def all_plans(catalog: Catalog) -> list[Plan]:
    return [p for s in catalog.services for p in s.plans]


def test_the_local_cloud_names_its_bridge_address_and_its_network(
        local_cloud: LocalCloud, catalog: Catalog) -> None:
    address = local_cloud.broker_address
    assert local_cloud.admin_cidrs() == (f"{address}/32",)
    # The broker's connections really leave from there: the bridge carries it.
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", local_cloud.bridge],
                           capture_output=True, text=True, check=True).stdout
    assert f" {address}/{local_cloud.network.prefixlen} " in shown
    # Apps come from the bridge's network, whatever the plan says (it names OpenStack's).
    for plan in all_plans(catalog):
        assert local_cloud.app_cidrs(plan) == (str(local_cloud.network),)
        assert ipaddress.ip_address(address) in ipaddress.ip_network(
            local_cloud.app_cidrs(plan)[0])


def test_openstack_takes_the_cidrs_from_the_plan_then_the_settings(
        openstack_env: Path, catalog: Catalog, tmp_path: Path) -> None:
    settings = load_settings({
        "BROKER_CLOUD": "openstack", "BROKER_STATE_DIR": str(tmp_path),
        "BROKER_ADMIN_CIDR": "192.0.2.7/32", "BROKER_APP_CIDR": "198.51.100.0/24",
    }, require_auth=False)
    plan = catalog.plan_by_name("ha-sync")
    assert plan.cloud.network.app_cidrs == ("10.0.0.0/8",)
    cloud = OpenStackCloud.from_settings(settings, catalog, validate=False)
    try:
        assert cloud.admin_cidrs() == ("192.0.2.7/32",)
        assert cloud.app_cidrs(plan) == ("10.0.0.0/8",)                      # the plan's
        assert cloud.app_cidrs(without_app_cidrs(plan)) == ("198.51.100.0/24",)  # BROKER_APP_CIDR
    finally:
        cloud.close()

    bare = make_cloud(catalog, admin_cidr="", app_cidr=None)
    try:
        # Nobody said: empty, and provisioning refuses with a sentence naming the setting.
        assert bare.admin_cidrs() == ()
        assert bare.app_cidrs(without_app_cidrs(plan)) == ()
        assert bare.app_cidrs(plan) == ("10.0.0.0/8",)
    finally:
        bare.close()


def security_groups(fake: FakeOpenStack) -> list[str]:
    with fake.state.lock:
        return sorted(g.name for g in fake.state.security_groups.values() if INSTANCE in g.name)


def test_security_groups_are_found_and_deleted_as_resources(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud = openstack_cloud
    port = cloud.create_port(f"pgha-{INSTANCE}-service", "service", TAGS)
    found = cloud.find_resources(INSTANCE)
    assert sorted((r.kind, r.name) for r in found) == [
        ("port", f"pgha-{INSTANCE}-service"), ("security_group", f"pgha-{INSTANCE}-service")]
    group = next(r for r in found if r.kind == "security_group")
    assert group.tags[TAG_INSTANCE] == INSTANCE

    # Still used by the port: kept (deleting the port takes it along).
    cloud.delete_resource(group)
    assert security_groups(fake_openstack) == [f"pgha-{INSTANCE}-service"]

    # Leaked: its port went by another way than the driver's delete_port.
    cloud.conn.network.delete_port(port.id)
    assert [(r.kind, r.id) for r in cloud.find_resources(INSTANCE)] == [
        ("security_group", group.id)]
    cloud.delete_resource(group)
    assert security_groups(fake_openstack) == []
    assert cloud.find_resources(INSTANCE) == []
    cloud.delete_resource(CloudResource("security_group", group.id, group.name, group.tags))


def test_the_local_cloud_has_no_security_groups(local_cloud: LocalCloud) -> None:
    local_cloud.create_port(f"pgha-{INSTANCE}-service", "service", TAGS)
    assert [r.kind for r in local_cloud.find_resources(INSTANCE)] == ["port"]
    for resource in local_cloud.find_resources(INSTANCE):
        local_cloud.delete_resource(resource)
    assert local_cloud.find_resources() == []
