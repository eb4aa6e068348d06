"""A worker SIGKILLed after any step of an ha-sync provision (and of a deprovision)
resumes in another process and finishes, with no cloud resource duplicated or leaked.

Each case runs a worker process with BROKER_CRASH_AFTER_STEP=<kind>:<step>, which
kills itself right after that step ran and before the step was recorded, so the
next worker runs that step again: the hardest case for idempotency.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud
from broker.operations import deprovision, provision
from broker.operations.deprovision import start_deprovision
from broker.operations.engine import CRASH_AFTER_STEP_ENV, Context
from broker.operations.params import Params
from broker.pg import replication
from broker.runtime import Runtime
from broker.store.models import DEPROVISIONED, IN_PROGRESS, READY, Operation
from harness.machine import list_namespaces, make_local_cloud
from harness.workflows import (
    cloud_json,
    connect_as_admin,
    finish,
    instance,
    make_engine,
    make_runtime,
    queue_provision,
    resource_counts,
)

pytestmark = pytest.mark.e2e
KEY = Fernet.generate_key().decode()
ROOT = Path(__file__).resolve().parents[1]

PROVISION_STEPS = [
    "nodes", "server_group", "service_port", "management_ports", "primary_volume",
    "primary_server", "primary_ready", "database", "service_address", "standby_slot",
    "standby_volume", "standby_server", "standby_streaming", "synchronous", "ready",
]
DEPROVISION_STEPS = ["begin", "stop_backups", "keep_backups", "servers", "volumes", "ports",
                     "server_group", "finish"]


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with make_local_cloud() as local:
        yield local


def _context(runtime: Runtime, instance_id: str, kind: str) -> Context:
    return Context(operation_id="-", instance_id=instance_id, kind=kind, params=Params(),
                   store=runtime.store, cloud=runtime.cloud, vault=runtime.vault,
                   catalog=runtime.catalog, settings=runtime.settings)


def _crashing_worker(runtime: Runtime, cloud: LocalCloud, op_id: str, crash_at: str) -> None:
    env = {**os.environ, CRASH_AFTER_STEP_ENV: crash_at, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-m", "harness.workflows", runtime.store.url, KEY,
         cloud_json(cloud), op_id],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    step = crash_at.partition(":")[2]
    with runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        assert (op.state, op.step) == (IN_PROGRESS, step), op.description


def test_crash_points_cover_every_step(cloud: LocalCloud, tmp_path: Path) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", KEY, cloud)
    instance_id, _ = queue_provision(runtime, "ha-sync")
    assert [s.name for s in provision.steps(_context(runtime, instance_id, "provision"))] \
        == PROVISION_STEPS
    assert [s.name for s in deprovision.steps(_context(runtime, instance_id, "deprovision"))] \
        == DEPROVISION_STEPS
    runtime.store.dispose()


@pytest.mark.parametrize("step", PROVISION_STEPS)
def test_provision_and_deprovision_resume_after_sigkill(step: str, cloud: LocalCloud,
                                                        tmp_path: Path) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", KEY, cloud)
    engine = make_engine(runtime)
    instance_id, op_id = queue_provision(runtime, "ha-sync")
    _crashing_worker(runtime, cloud, op_id, f"provision:{step}")

    finish(engine, op_id)
    inst = instance(runtime, instance_id)
    assert inst.state == READY
    assert resource_counts(cloud, instance_id) == {"server": 2, "volume": 2, "port": 3}
    live = inst.live_nodes()
    assert len(inst.nodes) == len(live) == 2
    assert {n.server_id for n in live} == {
        r.id for r in cloud.find_resources(instance_id) if r.kind == "server"}
    primary, standby = inst.primary(), inst.standby()
    assert primary is not None and standby is not None
    conn = connect_as_admin(runtime, inst, primary.management_address or "", "postgres")
    try:
        status = replication.replication_status(conn)
    finally:
        conn.close()
    assert [(s.application_name, s.state, s.sync_state) for s in status.standbys] == [
        (standby.application_name, "streaming", "sync")]

    # The same instance's deprovision, killed after one of its steps (cycled).
    namespaces = set(cloud.namespaces())
    dep_step = DEPROVISION_STEPS[PROVISION_STEPS.index(step) % len(DEPROVISION_STEPS)]
    dep_op = start_deprovision(runtime.store, instance_id)
    _crashing_worker(runtime, cloud, dep_op, f"deprovision:{dep_step}")
    finish(engine, dep_op)
    assert instance(runtime, instance_id).state == DEPROVISIONED
    assert resource_counts(cloud, instance_id) == {}
    assert not namespaces & list_namespaces()
    runtime.store.dispose()
