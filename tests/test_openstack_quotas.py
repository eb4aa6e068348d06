"""Quotas: what an instance costs, what `broker cloud check` says fits, and the
per-plan security group that keeps the broker past its 4th instance under Neutron's
default quota of 10 security groups."""

from __future__ import annotations

import pytest

from broker.cli import cloud as cloud_cli
from broker.cloud.base import TAG_INSTANCE, TAG_MANAGED, TAG_PLAN, CloudError
from broker.cloud.openstack import OpenStackCloud
from broker.runtime import Runtime
from broker.store.models import OP_FAILED, Operation
from harness.workflows import make_engine, queue_provision
from tests.fakes.openstack import FakeOpenStack


@pytest.fixture
def runtime(openstack_runtime: Runtime) -> Runtime:
    return openstack_runtime


def test_cloud_check_says_how_many_instances_of_each_plan_fit(
        runtime: Runtime, fake_openstack: FakeOpenStack,
        capsys: pytest.CaptureFixture[str]) -> None:
    plans = {p.name: p for s in runtime.catalog.services for p in s.plans}
    ha = plans["ha"]
    state = fake_openstack.state
    flavor = state.by_name(state.flavors, ha.cloud.flavor)
    assert cloud_cli.check(runtime) == 0
    out = capsys.readouterr().out
    # Upstream defaults: 10 instances, one kept free for a replacement node, 2 per
    # HA instance: 4 fit (or fewer if cores or RAM run out first).
    by_cores = (20 - flavor.vcpus) // (2 * flavor.vcpus)
    by_ram = (51200 - flavor.ram) // (2 * flavor.ram)
    expected = min(4, by_cores, by_ram)
    assert f"plan ha: {expected} more instance(s) fit" in out
    assert "each instance: 2 instances" in out

    state.quotas["security_groups"] = 3       # 2 used already: room for one more
    state.quotas["instances"] = 100
    state.quotas["cores"] = state.quotas["ram"] = -1
    assert cloud_cli.check(runtime) == 0
    out = capsys.readouterr().out
    assert "plan ha: 1 more instance(s) fit, limited by security_groups 2/3" in out


def test_the_service_ports_group_is_one_per_plan(
        openstack_cloud: OpenStackCloud, fake_openstack: FakeOpenStack) -> None:
    cloud, state = openstack_cloud, fake_openstack.state
    plan = next(p for s in cloud.catalog.services for p in s.plans if p.name == "ha")
    instances = [f"{i:08d}-aaaa-4bbb-8ccc-00000000000{i}" for i in range(1, 8)]
    ports = []
    for instance_id in instances:   # Neutron's default quota: 10 groups, 2 used already
        tags = {TAG_INSTANCE: instance_id, TAG_MANAGED: "true", TAG_PLAN: plan.id}
        ports.append(cloud.create_port(f"pgha-{instance_id}-service", "service", tags))
        ports.append(cloud.create_port(f"pgha-{instance_id}-abcdef01", "management", tags))
    with state.lock:
        assert len(state.security_groups) == 10
        shared = state.by_name(state.security_groups, f"pgha-plan-{plan.id}-apps")
        assert all(shared.id in state.ports[p.id].security_groups for p in ports[::2])
    eighth = "00000008-aaaa-4bbb-8ccc-000000000008"
    with pytest.raises(CloudError, match="quota exceeded"):
        cloud.create_port(f"pgha-{eighth}-abcdef01", "management",
                          {TAG_INSTANCE: eighth, TAG_MANAGED: "true", TAG_PLAN: plan.id})

    for port in ports[:2]:          # the first instance goes; the plan's group stays
        cloud.delete_port(port.id)
    with state.lock:
        assert shared.id in state.security_groups
        assert not any(instances[0] in g.name for g in state.security_groups.values())
    for port in ports[2:]:
        cloud.delete_port(port.id)
    with state.lock:             # the last service port took the plan's group with it
        assert sorted(g.name for g in state.security_groups.values()) == \
            ["default", "ops-ssh"]


@pytest.mark.parametrize("resource", ["instances", "volumes", "security_groups"])
def test_quota_exhausted_during_provision_fails_plainly_and_leaves_nothing(
        runtime: Runtime, fake_openstack: FakeOpenStack, resource: str) -> None:
    state = fake_openstack.state
    # Exhausted before the first node boots: nothing here answers as a guest would.
    state.quotas[resource] = {"instances": 0, "volumes": 0,
                              "security_groups": len(state.security_groups)}[resource]
    engine = make_engine(runtime)
    instance_id, op_id = queue_provision(runtime, "ha")
    assert engine.run_until_finished(op_id, timeout=120) == OP_FAILED
    with runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        description = op.description
    assert "quota" in description.lower(), description
    assert resource.rstrip("s").split("_")[0] in description.lower(), description
    with state.lock:
        left = [x.name for table in (state.servers, state.ports, state.server_groups,
                                     state.security_groups) for x in table.values()
                if instance_id in x.name]
        left += [v.name for v in state.volumes.values()
                 if instance_id in v.name and v.status != "deleting"]
    assert left == []
