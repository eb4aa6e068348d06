"""Every plan end to end on real PostgreSQL in network namespaces: provision, bind,
write through the service address, read the row back on the standby, unbind,
deprovision, and nothing left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud
from broker.operations import bindings
from broker.operations.engine import Engine
from broker.operations.naming import node_tags
from broker.pg import replication
from broker.runtime import Runtime
from broker.store.models import (
    BINDING_DELETED,
    DEPROVISIONED,
    FAILED,
    NODE_DELETED,
    OP_FAILED,
    PRIMARY,
    READY,
    STANDBY,
    Binding,
    Operation,
)
from harness.machine import list_interfaces, list_namespaces
from harness.workflows import (
    connect_as_admin,
    connect_with,
    deprovision,
    instance,
    make_engine,
    make_runtime,
    provision,
    queue_provision,
    resource_counts,
)

pytestmark = pytest.mark.e2e
KEY = Fernet.generate_key().decode()


def _runtime(store: str, tmp_path: Path, request: pytest.FixtureRequest,
             cloud: LocalCloud) -> tuple[Runtime, Engine]:
    url = (request.getfixturevalue("pg_state_url") if store == "postgresql"
           else f"sqlite:///{tmp_path / 'state.sqlite3'}")
    runtime = make_runtime(url, KEY, cloud)
    return runtime, make_engine(runtime)


def _eventually(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except psycopg2.Error:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.05)


def _rows_on(runtime: Runtime, inst: Any, host: str) -> list[tuple[Any, ...]]:
    conn = connect_as_admin(runtime, inst, host)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, note FROM public.notes ORDER BY id")
            return list(cur.fetchall())
    finally:
        conn.close()


@pytest.mark.parametrize(("plan_name", "store"), [
    ("standalone", "sqlite"), ("ha", "sqlite"), ("ha-sync", "postgresql")])
def test_provision_bind_write_replicate_unbind_deprovision(
        plan_name: str, store: str, local_cloud: LocalCloud, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    runtime, engine = _runtime(store, tmp_path, request, local_cloud)
    plan = runtime.catalog.plan_by_name(plan_name)
    instance_id = provision(runtime, engine, plan_name,
                            parameters={"extensions": ["citext"], "statement_timeout_ms": 5000})

    inst = instance(runtime, instance_id)
    assert inst.state == READY and inst.service_address
    live = inst.live_nodes()
    assert len(live) == plan.cloud.nodes
    primary = inst.primary()
    assert primary is not None and primary.availability_zone == "az1"
    standby = inst.standby()
    if plan.cloud.is_ha:
        assert standby is not None
        assert standby.availability_zone != primary.availability_zone
    expected = {"server": plan.cloud.nodes, "volume": plan.cloud.nodes,
                "port": plan.cloud.nodes + 1}
    assert resource_counts(local_cloud, instance_id) == expected

    # Bind: a service key (no app guid) like `cf create-service-key`.
    result = bindings.create_binding(runtime, instance_id, "bind-1", app_guid=None,
                                     bind_resource={}, parameters={})
    creds = result.credentials
    assert result.created
    assert creds["host"] == creds["hostname"] == inst.service_address
    assert creds["port"] == 5432 and creds["name"] == "appdb"
    assert creds["uri"].startswith(f"postgresql://{creds['username']}:")
    assert creds["jdbcUrl"].startswith(f"jdbc:postgresql://{inst.service_address}:5432/appdb?")
    again = bindings.create_binding(runtime, instance_id, "bind-1", app_guid=None,
                                    bind_resource={}, parameters={})
    assert (again.created, again.credentials) == (False, creds)
    with pytest.raises(bindings.BindingConflict):
        bindings.create_binding(runtime, instance_id, "bind-1", app_guid="other-app",
                                bind_resource={}, parameters={})
    assert bindings.get_credentials(runtime, instance_id, "bind-1") == creds
    with runtime.store.session() as s:
        row = s.get(Binding, "bind-1")
        assert row is not None and creds["password"] not in row.password_enc

    # Write through the service address, as the app would.
    app = connect_with(creds)
    with app.cursor() as cur:
        cur.execute("CREATE TABLE notes (id int PRIMARY KEY, note citext)")
        cur.execute("INSERT INTO notes VALUES (1, 'written through the service address')")
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone() == ("5s",)
        cur.execute("SELECT current_user, host(inet_server_addr())")
        user, server_addr = cur.fetchone()
        assert user == "app_owner" and server_addr == inst.service_address
    if plan.cloud.is_ha:
        assert standby is not None and standby.management_address
        rows = _eventually(lambda: _rows_on(runtime, inst, standby.management_address),
                           "the row on the standby")
        assert rows == [(1, "written through the service address")]
        conn = connect_as_admin(runtime, inst, primary.management_address or "", "postgres")
        status = replication.replication_status(conn)
        conn.close()
        (info,) = status.standbys
        assert info.application_name == f"node_{standby.id}"
        assert info.sync_state == ("sync" if plan.cloud.replication == "sync" else "async")

    # Unbind: the session ends, the password stops working, the table stays.
    assert bindings.delete_binding(runtime, instance_id, "bind-1")
    with pytest.raises(psycopg2.Error), app.cursor() as cur:
        cur.execute("SELECT 1")
    app.close()
    with pytest.raises(psycopg2.OperationalError,
                       match=r"no pg_hba\.conf entry|authentication failed"):
        connect_with(creds)
    assert _rows_on(runtime, inst, primary.management_address or "") == [
        (1, "written through the service address")]
    # Safe to repeat: nothing left to drop, which the API answers with 410 Gone.
    assert not bindings.delete_binding(runtime, instance_id, "bind-1")
    assert bindings.get_credentials(runtime, instance_id, "bind-1") is None
    assert not bindings.delete_binding(runtime, instance_id, "never-bound")

    # Deprovision: namespaces, interfaces and data directories are gone.
    servers = [local_cloud.get_server(n.server_id or "") for n in live]
    namespaces = {s.details["netns"] for s in servers if s is not None}
    data_dirs = [Path(s.details["data_dir"]) for s in servers if s is not None]
    interfaces = set(local_cloud.interface_names()) - {local_cloud.bridge}
    assert len(namespaces) == plan.cloud.nodes and all(d.exists() for d in data_dirs)
    assert interfaces & list_interfaces()  # host ends (the service end is in the primary)
    bindings.create_binding(runtime, instance_id, "bind-2", app_guid="app",
                            bind_resource={"app_guid": "app"}, parameters={"read_only": True})
    deprovision(runtime, engine, instance_id)
    assert not namespaces & list_namespaces()
    assert not interfaces & list_interfaces()
    assert not any(os.path.exists(d) for d in data_dirs)
    assert resource_counts(local_cloud, instance_id) == {}
    inst = instance(runtime, instance_id)
    assert inst.state == DEPROVISIONED and inst.deleted_at is not None
    assert all(n.state == NODE_DELETED for n in inst.nodes)
    with runtime.store.session() as s:
        assert s.get(Binding, "bind-2").state == BINDING_DELETED  # type: ignore[union-attr]
    with pytest.raises(bindings.InstanceUnknown):
        bindings.create_binding(runtime, instance_id, "bind-3", app_guid=None,
                                bind_resource={}, parameters={})
    deprovision(runtime, engine, instance_id)  # a repeated DELETE is harmless
    runtime.store.dispose()


def test_failed_provision_says_why_and_leaves_nothing(local_cloud: LocalCloud,
                                                      tmp_path: Path) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", KEY, local_cloud)
    engine = make_engine(runtime)
    # A value the API's schema would refuse: PostgreSQL refuses it for good mid-provision.
    instance_id, op_id = queue_provision(runtime, "ha", parameters={
        "statement_timeout_ms": "soon"})
    assert engine.run_until_finished(op_id, timeout=120) == OP_FAILED
    with runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        assert op.error is not None and "statement_timeout" in op.error
        assert op.description == f"failed: {op.error}"
    inst = instance(runtime, instance_id)
    assert inst.state == FAILED and inst.state_reason == op.error
    assert resource_counts(local_cloud, instance_id) == {}
    assert all(n.state == NODE_DELETED for n in inst.nodes)
    assert {n.role for n in inst.nodes} == {PRIMARY, STANDBY}
    with pytest.raises(bindings.InstanceNotReady):
        bindings.create_binding(runtime, instance_id, "b", app_guid=None, bind_resource={},
                                parameters={})
    # Something a crashed cleanup could have left, known only by its tags.
    tags = node_tags(instance_id, "0rphan00", STANDBY)
    local_cloud.create_volume(f"pgha-{instance_id}-0rphan00", 1, "az2", None, tags)
    local_cloud.create_port(f"pgha-{instance_id}-0rphan00", "management", tags)
    assert resource_counts(local_cloud, instance_id) == {"volume": 1, "port": 1}
    # The platform's orphan-mitigation DELETE finishes at once and finds it.
    deprovision(runtime, engine, instance_id)
    assert resource_counts(local_cloud, instance_id) == {}
    assert instance(runtime, instance_id).state == DEPROVISIONED
    runtime.store.dispose()
