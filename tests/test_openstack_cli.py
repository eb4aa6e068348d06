"""`python -m broker cloud check | orphans` against the fake cloud and a real state store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.cli import cloud as cloud_cli
from broker.cloud.base import TAG_INSTANCE
from broker.cloud.openstack import OpenStackCloud
from broker.runtime import Runtime
from broker.store.models import Instance
from tests.fakes.openstack import FakeOpenStack
from tests.support.openstack import build_node

LIVE = "11111111-aaaa-4bbb-8ccc-000000000001"
GONE = "22222222-aaaa-4bbb-8ccc-000000000002"      # deprovisioned: deleted_at set
UNKNOWN = "33333333-aaaa-4bbb-8ccc-000000000003"   # never in this store


@pytest.fixture
def runtime(openstack_runtime: Runtime) -> Runtime:
    return openstack_runtime


def add_instance(rt: Runtime, instance_id: str, *, deleted: bool) -> None:
    plan = rt.catalog.plan_by_name("ha")
    with rt.store.session() as s:
        s.add(Instance(id=instance_id, service_id=plan.service_id, plan_id=plan.id,
                       organization_guid="org", space_guid="space", replication="async",
                       admin_password_enc=rt.vault.encrypt("x"),
                       replication_password_enc=rt.vault.encrypt("y"),
                       deleted_at=datetime.now(UTC) if deleted else None))


def make_resources(cloud: OpenStackCloud, instance_id: str) -> None:
    tags = {TAG_INSTANCE: instance_id, "pgha-managed": "true"}
    group = cloud.ensure_server_group(f"pgha-{instance_id}", tags)
    cloud.create_port(f"pgha-{instance_id}-service", "service", tags)
    build_node(cloud, instance_id, "abcdef01", "az1", group_id=group)


def names(fake: FakeOpenStack, instance_id: str) -> list[str]:
    s = fake.state
    with s.lock:
        found = [x.name for table in (s.servers, s.ports, s.server_groups, s.security_groups)
                 for x in table.values()]
        found += [v.name for v in s.volumes.values() if v.status != "deleting"]
    return sorted(n for n in found if instance_id in n)


def test_orphans_lists_and_deletes_only_what_no_live_instance_owns(
        runtime: Runtime, fake_openstack: FakeOpenStack, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cloud = runtime.cloud
    assert isinstance(cloud, OpenStackCloud)
    add_instance(runtime, LIVE, deleted=False)
    add_instance(runtime, GONE, deleted=True)
    for instance_id in (LIVE, GONE, UNKNOWN):
        make_resources(cloud, instance_id)
    live_before = names(fake_openstack, LIVE)
    assert len(live_before) == 7  # group, 2 ports, server, volume, 2 security groups

    assert cloud_cli.orphans(runtime, delete=False, assume_yes=False) == 0
    out = capsys.readouterr().out
    assert f"pgha-{GONE}-abcdef01" in out and f"pgha-{UNKNOWN}-service" in out
    assert f"pgha-{GONE}-nodes" in out  # the per-instance security group too
    assert LIVE not in out
    assert "14 orphan(s)" in out

    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cloud_cli.orphans(runtime, delete=True, assume_yes=False) == 1
    assert "nothing deleted" in capsys.readouterr().out
    assert len(names(fake_openstack, GONE)) == 7

    assert cloud_cli.orphans(runtime, delete=True, assume_yes=True) == 0
    out = capsys.readouterr().out
    assert out.index("deleted server") < out.index("deleted volume")  # servers first
    assert names(fake_openstack, GONE) == []
    assert names(fake_openstack, UNKNOWN) == []
    assert names(fake_openstack, LIVE) == live_before

    assert cloud_cli.orphans(runtime, delete=False, assume_yes=False) == 0
    assert "no orphans" in capsys.readouterr().out


def test_cloud_check_prints_problems_and_sets_the_exit_code(
        runtime: Runtime, fake_openstack: FakeOpenStack,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cloud_cli.check(runtime) == 0
    assert "every plan fits the cloud" in capsys.readouterr().out
    with fake_openstack.state.lock:
        fake_openstack.state.volume_zones = ["nova"]
    assert cloud_cli.check(runtime) == 1
    out = capsys.readouterr().out
    assert "plan 'standalone': availability zone 'az1' is not a volume zone" in out
    assert "problem(s)" in out


def test_orphans_finds_a_security_group_whose_ports_are_gone(
        runtime: Runtime, fake_openstack: FakeOpenStack,
        capsys: pytest.CaptureFixture[str]) -> None:
    cloud = runtime.cloud
    assert isinstance(cloud, OpenStackCloud)
    add_instance(runtime, GONE, deleted=True)
    tags = {TAG_INSTANCE: GONE, "pgha-managed": "true"}
    port = cloud.create_port(f"pgha-{GONE}-service", "service", tags)
    cloud.conn.network.delete_port(port.id)  # deleted by hand: its group stays
    assert names(fake_openstack, GONE) == [f"pgha-{GONE}-service"]

    assert cloud_cli.orphans(runtime, delete=False, assume_yes=False) == 0
    out = capsys.readouterr().out
    assert f"security_group  {fake_security_group_id(fake_openstack, GONE)}" in out
    assert "1 orphan(s)" in out
    assert cloud_cli.orphans(runtime, delete=True, assume_yes=True) == 0
    assert f"deleted security_group pgha-{GONE}-service" in capsys.readouterr().out
    assert names(fake_openstack, GONE) == []


def fake_security_group_id(fake: FakeOpenStack, instance_id: str) -> str:
    with fake.state.lock:
        return next(g.id for g in fake.state.security_groups.values()
                    if instance_id in g.name)
