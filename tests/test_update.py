"""Plan and parameter updates on real PostgreSQL, while an app keeps writing.

ha → ha-sync → ha switches the replication mode in place; standalone → ha-sync adds
a standby in another zone and ha-sync → standalone removes it. No write fails at any
time and every acknowledged row is still there afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud
from broker.operations import bindings
from broker.operations.engine import Engine
from broker.operations.update import start_update
from broker.pg import replication
from broker.runtime import Runtime
from broker.store.models import NODE_DELETED, OP_FAILED, READY, Operation
from harness.workflows import (
    connect_as_admin,
    connect_with,
    deprovision,
    instance,
    make_engine,
    make_runtime,
    provision,
    resource_counts,
    update,
)

pytestmark = pytest.mark.e2e
KEY = Fernet.generate_key().decode()


class Writer:
    """An app inserting one row after another through the service address."""

    def __init__(self, credentials: dict[str, Any]) -> None:
        self.credentials = credentials
        self.acknowledged: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = connect_with(self.credentials)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO ticks VALUES (%s)", (n,))
                self.acknowledged.append(n)
            except psycopg2.Error as exc:
                self.errors.append(str(exc).strip())
                conn.close()
                conn = connect_with(self.credentials)
            time.sleep(0.005)
        conn.close()

    @contextmanager
    def running(self) -> Iterator[Writer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def _setup(local_cloud: LocalCloud, tmp_path: Path, plan: str) -> tuple[Runtime, Engine, str,
                                                                        dict[str, Any]]:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", KEY, local_cloud)
    engine = make_engine(runtime)
    instance_id = provision(runtime, engine, plan)
    creds = bindings.create_binding(runtime, instance_id, "app", app_guid="app-guid",
                                    bind_resource={"app_guid": "app-guid"},
                                    parameters={}).credentials
    conn = connect_with(creds)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE ticks (n int PRIMARY KEY)")
        cur.execute("CREATE TABLE kept (note text)")
        cur.execute("INSERT INTO kept VALUES ('from before the update')")
    conn.close()
    return runtime, engine, instance_id, creds


def _replication(runtime: Runtime, instance_id: str) -> list[tuple[str, str]]:
    inst = instance(runtime, instance_id)
    primary = inst.primary()
    assert primary is not None
    conn = connect_as_admin(runtime, inst, primary.management_address or "", "postgres")
    try:
        status = replication.replication_status(conn)
    finally:
        conn.close()
    return [(s.application_name, s.sync_state) for s in status.standbys]


def _check_data(runtime: Runtime, instance_id: str, creds: dict[str, Any],
                writer: Writer) -> None:
    assert writer.errors == []
    assert len(writer.acknowledged) > 10
    conn = connect_with(creds)
    with conn.cursor() as cur:
        cur.execute("SELECT n FROM ticks")
        stored = {row[0] for row in cur.fetchall()}
        cur.execute("SELECT note FROM kept")
        assert cur.fetchall() == [("from before the update",)]
        cur.execute("INSERT INTO kept VALUES ('after')")  # still writable
    conn.close()
    assert set(writer.acknowledged) <= stored


def test_ha_to_ha_sync_and_back_without_downtime(local_cloud: LocalCloud,
                                                 tmp_path: Path) -> None:
    runtime, engine, instance_id, creds = _setup(local_cloud, tmp_path, "ha")
    standby = instance(runtime, instance_id).standby()
    assert standby is not None
    assert _replication(runtime, instance_id) == [(standby.application_name, "async")]

    with Writer(creds).running() as writer:
        update(runtime, engine, instance_id, "ha-sync")
        inst = instance(runtime, instance_id)
        assert (inst.state, inst.replication, inst.sync_standby_node_id) == (
            READY, "sync", standby.id)
        assert inst.plan_id == runtime.catalog.plan_by_name("ha-sync").id
        assert _replication(runtime, instance_id) == [(standby.application_name, "sync")]

        update(runtime, engine, instance_id, "ha",
               parameters={"statement_timeout_ms": 7000, "extensions": ["pg_trgm"]})
        inst = instance(runtime, instance_id)
        assert (inst.state, inst.replication, inst.sync_standby_node_id) == (
            READY, "async", None)
        assert inst.parameters == {"statement_timeout_ms": 7000, "extensions": ["pg_trgm"]}
        assert _replication(runtime, instance_id) == [(standby.application_name, "async")]
        time.sleep(0.2)  # a few more writes after the last switch
    _check_data(runtime, instance_id, creds, writer)
    # Same nodes all along: a mode switch never rebuilds anything.
    assert [n.id for n in instance(runtime, instance_id).live_nodes()] == [
        n.id for n in inst.live_nodes()]
    conn = connect_with(creds)
    with conn.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone() == ("7s",)
        cur.execute("SELECT similarity('postgres', 'postgresql') > 0")
        assert cur.fetchone() == (True,)
    conn.close()
    deprovision(runtime, engine, instance_id)
    runtime.store.dispose()


def test_standalone_to_ha_sync_and_back(local_cloud: LocalCloud, tmp_path: Path) -> None:
    runtime, engine, instance_id, creds = _setup(local_cloud, tmp_path, "standalone")
    primary = instance(runtime, instance_id).primary()
    assert primary is not None
    assert resource_counts(local_cloud, instance_id) == {"server": 1, "volume": 1, "port": 2}

    with Writer(creds).running() as writer:
        update(runtime, engine, instance_id, "ha-sync")
        inst = instance(runtime, instance_id)
        standby = inst.standby()
        assert standby is not None and inst.state == READY
        assert standby.availability_zone != primary.availability_zone
        assert inst.sync_standby_node_id == standby.id
        assert _replication(runtime, instance_id) == [(standby.application_name, "sync")]
        assert resource_counts(local_cloud, instance_id) == {
            "server": 2, "volume": 2, "port": 3}
        # The new standby holds the data from before it existed.
        conn = connect_as_admin(runtime, inst, standby.management_address or "")
        with conn.cursor() as cur:
            cur.execute("SELECT note FROM public.kept")
            assert cur.fetchall() == [("from before the update",)]
        conn.close()

        update(runtime, engine, instance_id, "standalone")
        inst = instance(runtime, instance_id)
        assert (inst.state, inst.replication, inst.sync_standby_node_id) == (
            READY, "none", None)
        assert [n.id for n in inst.live_nodes()] == [primary.id]
        assert next(n for n in inst.nodes if n.id == standby.id).state == NODE_DELETED
        assert _replication(runtime, instance_id) == []
        assert resource_counts(local_cloud, instance_id) == {
            "server": 1, "volume": 1, "port": 2}
        time.sleep(0.2)
    _check_data(runtime, instance_id, creds, writer)
    conn = connect_as_admin(runtime, inst, primary.management_address or "", "postgres")
    with conn.cursor() as cur:
        cur.execute("SELECT slot_name FROM pg_replication_slots")
        assert cur.fetchall() == []  # the removed standby's slot keeps no WAL
    conn.close()
    deprovision(runtime, engine, instance_id)
    runtime.store.dispose()


def test_failed_update_says_why_and_keeps_the_instance(local_cloud: LocalCloud,
                                                       tmp_path: Path) -> None:
    runtime, engine, instance_id, creds = _setup(local_cloud, tmp_path, "standalone")
    op_id = start_update(runtime.store, instance_id,
                         plan_id=runtime.catalog.plan_by_name("ha").id,
                         parameters={"statement_timeout_ms": -5})
    assert engine.run_until_finished(op_id, timeout=120) == OP_FAILED
    with runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.error is not None
        assert "statement_timeout_ms" in op.error
    inst = instance(runtime, instance_id)
    # The standby it had added is gone again; the instance serves on its old plan.
    assert (inst.state, inst.plan_id) == (READY, runtime.catalog.plan_by_name("standalone").id)
    assert len(inst.live_nodes()) == 1
    assert resource_counts(local_cloud, instance_id) == {"server": 1, "volume": 1, "port": 2}
    conn = connect_with(creds)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO kept VALUES ('still writable')")
    conn.close()
    deprovision(runtime, engine, instance_id)
    runtime.store.dispose()
