"""A worker SIGKILLed after every step of every workflow, and once in the middle of a
long step, is followed by another that finishes the operation, with no cloud resource,
namespace or PostgreSQL process left over.

One instance goes through a chain of operations; at each step a new worker process
(tests/crash_worker.py) runs the instance's operations with
BROKER_CRASH_AFTER_STEP=<kind>:<step>: it dies right after that step ran and before
it was recorded, so the next worker runs the step again (the hardest case for
idempotency) and dies after the following one. A failover's or a switchover's rebuild
is crashed the same way, step by step. The ha-sync chain is failover → rebuild →
switchover → rebuild → rotate_certs → deprovision; the standalone chain is resurrect →
update to ha-sync (killed during the standby's base backup too) → deprovision.
Provision and deprovision alone are covered by test_crash_resume.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import pytest
import requests

from broker.cloud.local import namespace_pids
from broker.operations.certs import queue_rotation
from broker.operations.deprovision import start_deprovision
from broker.operations.engine import CRASH_AFTER_STEP_ENV, Context, workflow_for
from broker.operations.failover import queue_failover, start_switchover
from broker.operations.update import start_update
from broker.pg.roles import binding_role_name
from broker.store.models import (
    BINDING_CREATED,
    BINDING_CREATING,
    BINDING_DELETED,
    DEPROVISIONED,
    IN_PROGRESS,
    READY,
    SUCCEEDED,
    UNFINISHED,
    Binding,
    Operation,
    utcnow,
)
from harness.env import FailoverEnv, failover_env
from harness.faults import freeze_server, kill_server
from harness.machine import free_port, postgres_processes_under
from harness.waiting import operations, settled, standby_streaming
from harness.workflows import (
    cloud_json,
    connect_as_admin,
    connect_with,
    instance,
    provision,
    resource_counts,
)
from harness.writer import app_credentials

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
HA = {"server": 2, "volume": 2, "port": 3}
STANDALONE = {"server": 1, "volume": 1, "port": 2}


# --- workers ---------------------------------------------------------------------------
def _worker(env: FailoverEnv, instance_id: str, crash_at: str | None = None
            ) -> subprocess.Popen[bytes]:
    """A worker process; its log goes to `crash-worker.log` in the state directory."""
    extra = {CRASH_AFTER_STEP_ENV: crash_at} if crash_at else {}
    child_env = {k: v for k, v in os.environ.items() if k != CRASH_AFTER_STEP_ENV}
    with open(env.base / "crash-worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash_worker", env.state_url, env.key,
             cloud_json(env.cloud), instance_id],
            env={**child_env, **extra, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=log)


def _log_tail(env: FailoverEnv) -> str:
    return env.worker_log("crash-worker")[-2000:]


def _unfinished_operations(env: FailoverEnv, instance_id: str) -> list[Operation]:
    with env.runtime.store.session() as s:
        return list(s.query(Operation).filter(Operation.instance_id == instance_id,
                                              Operation.state.in_(UNFINISHED))
                    .order_by(Operation.created_at))


def _operation(env: FailoverEnv, op_id: str) -> Operation:
    with env.runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        return op


def step_names(env: FailoverEnv, op: Operation) -> list[str]:
    rt = env.runtime
    workflow = workflow_for(op.kind)
    ctx = Context(operation_id=op.id, instance_id=op.instance_id, kind=op.kind,
                  params=workflow.params.load(op.params), store=rt.store, cloud=rt.cloud,
                  vault=rt.vault, catalog=rt.catalog, settings=rt.settings)
    return [step.name for step in workflow.steps(ctx)]


def kill_in_the_middle(env: FailoverEnv, instance_id: str, op_id: str, step: str,
                       index: int) -> None:
    """Start a worker, SIGKILL it while it is inside `step` (not after it)."""
    child = _worker(env, instance_id)
    deadline = time.monotonic() + 120
    while True:
        op = _operation(env, op_id)
        if op.step == step and op.state == IN_PROGRESS:
            break
        assert child.poll() is None, f"the worker ended before {step}: {_log_tail(env)}"
        assert time.monotonic() < deadline, f"{op_id} never reached {step}"
        time.sleep(0.02)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    op = _operation(env, op_id)
    assert (op.state, op.step, op.step_index) == (IN_PROGRESS, step, index), \
        f"the worker was not killed inside {step}: {op.step} #{op.step_index}"


def crash_after_every_step(env: FailoverEnv, instance_id: str, *,
                           kill_inside: str | None = None) -> list[str]:
    """Run the instance's operations (and those they queue) with a worker killed after
    each of their steps, and once inside `kill_inside` ("kind:step"); a last worker
    finishes them. Returns the crash points, in order."""
    points: list[str] = []
    last_crash: dict[str, int] = {}
    while True:
        pending = _unfinished_operations(env, instance_id)
        target = None
        for op in pending:
            names = step_names(env, op)
            index = last_crash.get(op.id, -1) + 1
            if index < len(names):
                target = (op, names, index)
                break
        if target is None:
            break
        op, names, index = target
        point = f"{op.kind}:{names[index]}"
        if point == kill_inside:
            kill_in_the_middle(env, instance_id, op.id, names[index], index)
        child = _worker(env, instance_id, point)
        child.wait(timeout=180)
        assert child.returncode == -signal.SIGKILL, f"{point}: {_log_tail(env)}"
        crashed = _operation(env, op.id)
        assert (crashed.state, crashed.step) == (IN_PROGRESS, names[index]), \
            f"{point}: {crashed.state} {crashed.description}"
        last_crash[op.id] = index
        points.append(point)
    child = _worker(env, instance_id)
    child.wait(timeout=180)
    assert child.returncode == 0, _log_tail(env)
    for op_id in last_crash:
        done = _operation(env, op_id)
        assert done.state == SUCCEEDED, f"{done.kind} {done.state}: {done.description}"
    return points


def _every_step(env: FailoverEnv, kind: str, points: list[str], instance_id: str) -> None:
    """Each operation of `kind` on the instance was crashed after each of its steps."""
    ops = operations(env, instance_id, kind)
    assert ops
    for op in ops:
        expected = [f"{kind}:{name}" for name in step_names(env, op)]
        crashed = [p for p in points if p in expected]
        assert sorted(set(crashed)) == sorted(expected), (kind, crashed, expected)


def no_leaks(env: FailoverEnv, instance_id: str, expected: dict[str, int]) -> None:
    """Exactly the instance's resources, one namespace per server, and PostgreSQL only
    in those namespaces."""
    assert resource_counts(env.cloud, instance_id) == expected
    servers = [r.id for r in env.cloud.find_resources(instance_id) if r.kind == "server"]
    namespaces = {env.cloud.namespace(sid) for sid in servers}
    assert set(env.cloud.namespaces()) == namespaces
    inside = {pid for ns in namespaces for pid in namespace_pids(ns)}
    stray = set(postgres_processes_under(env.base)) - inside
    assert not stray, f"PostgreSQL processes outside the servers: {sorted(stray)}"


def _write(creds: dict[str, object], value: int) -> None:
    conn = connect_with(creds, timeout=5)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO acked (id) VALUES (%s)", (value,))
    conn.close()


def _read(creds: dict[str, object]) -> set[int]:
    conn = connect_with(creds, timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM acked")
        found = {int(r[0]) for r in cur.fetchall()}
    conn.close()
    return found


# --- the chains --------------------------------------------------------------------------
# A kill after every step of several long workflows: minutes on a quiet machine.
@pytest.mark.timeout(900)
def test_ha_sync_failover_rebuild_switchover_rotation_deprovision_after_every_step() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        creds = app_credentials(env, instance_id)
        _write(creds, 1)
        points: list[str] = []

        # Failover (the primary's host died) and the rebuild it queues; one worker is
        # killed during the new standby's base backup.
        inst = instance(env.runtime, instance_id)
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and primary.server_id and standby is not None
        kill_server(env.cloud, primary.server_id, links_down=True)
        queue_failover(env.runtime.store, instance_id, kind="failover", cause="host lost",
                       old_primary_id=primary.id, standby_id=standby.id, detected_at=utcnow(),
                       last_primary_lsn=None)
        points += crash_after_every_step(env, instance_id, kill_inside="rebuild:server")
        after = instance(env.runtime, instance_id)
        assert after.primary() is not None and after.primary().id == standby.id  # type: ignore[union-attr]
        assert settled(env, instance_id) and after.state == READY
        no_leaks(env, instance_id, HA)
        _write(creds, 2)

        # A planned switchover and its rebuild.
        start_switchover(env.runtime.store, instance_id)
        points += crash_after_every_step(env, instance_id)
        assert settled(env, instance_id)
        info = standby_streaming(env, instance(env.runtime, instance_id))
        assert info is not None and info.sync_state == "sync"
        no_leaks(env, instance_id, HA)
        _write(creds, 3)

        # New node certificates.
        issued = {n.id: n.tls_issued_at for n in instance(env.runtime, instance_id).live_nodes()}
        queue_rotation(env.runtime.store, instance_id, cause="test")
        points += crash_after_every_step(env, instance_id)
        rotated = instance(env.runtime, instance_id)
        assert all((n.tls_issued_at or 0) > (issued[n.id] or 0) for n in rotated.live_nodes())
        assert _read(creds) == {1, 2, 3}
        no_leaks(env, instance_id, HA)

        for kind in ("failover", "rebuild", "switchover", "rotate_certs"):
            _every_step(env, kind, points, instance_id)

        start_deprovision(env.runtime.store, instance_id)
        points += crash_after_every_step(env, instance_id)
        _every_step(env, "deprovision", points, instance_id)
        assert instance(env.runtime, instance_id).state == DEPROVISIONED
        no_leaks(env, instance_id, {})


# A kill after every step of several long workflows: minutes on a quiet machine.
@pytest.mark.timeout(900)
def test_standalone_resurrect_update_after_every_step() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        creds = app_credentials(env, instance_id)
        _write(creds, 1)
        points: list[str] = []

        # Resurrect: the only server's host died; a new server on the same volume.
        old = instance(env.runtime, instance_id).primary()
        assert old is not None and old.server_id
        kill_server(env.cloud, old.server_id, links_down=True)
        queue_failover(env.runtime.store, instance_id, kind="resurrect", cause="host lost",
                       old_primary_id=old.id, standby_id=None, detected_at=utcnow(),
                       last_primary_lsn=None)
        points += crash_after_every_step(env, instance_id)
        new = instance(env.runtime, instance_id).primary()
        assert new is not None and new.id != old.id and new.volume_id == old.volume_id
        assert _read(creds) == {1}
        no_leaks(env, instance_id, STANDALONE)

        # Update to ha-sync: a standby is added; one worker dies during its base backup.
        start_update(env.runtime.store, instance_id,
                     plan_id=env.runtime.catalog.plan_by_name("ha-sync").id)
        points += crash_after_every_step(env, instance_id, kill_inside="update:standby_server")
        assert settled(env, instance_id)
        info = standby_streaming(env, instance(env.runtime, instance_id))
        assert info is not None and info.sync_state == "sync"
        _write(creds, 2)
        assert _read(creds) == {1, 2}
        no_leaks(env, instance_id, HA)

        for kind in ("resurrect", "update"):
            _every_step(env, kind, points, instance_id)
        start_deprovision(env.runtime.store, instance_id)
        points += crash_after_every_step(env, instance_id)
        no_leaks(env, instance_id, {})


# --- bind and unbind: synchronous API calls, so the API process is what dies ----------------
API_USER, API_PASSWORD = "cc", "bind-test-Pa55word"


def _start_api(env: FailoverEnv, port: int) -> subprocess.Popen[bytes]:
    """`python -m broker serve`; its monitor never acts on a node frozen by the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve"], cwd=ROOT,
        env=env.worker_env(BROKER_USERNAME=API_USER, BROKER_PASSWORD=API_PASSWORD,
                           PORT=str(port), BROKER_MONITOR_FAILURES="100"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.1)


def _kill_mid_call(env: FailoverEnv, api: subprocess.Popen[bytes], server_id: str,
                   call: Callable[[], requests.Response],
                   in_flight: Callable[[], bool]) -> None:
    """Freeze the primary so that `call` hangs inside the broker, SIGKILL the API
    process once `in_flight` holds, then thaw the primary."""
    frozen = freeze_server(env.cloud, server_id)
    outcome: list[object] = []
    caller = threading.Thread(target=lambda: outcome.append(_try(call)), daemon=True)
    caller.start()
    try:
        deadline = time.monotonic() + 4  # inside the broker's 5 s connect timeout
        while not in_flight():
            assert time.monotonic() < deadline, "the call never got under way"
            time.sleep(0.02)
        time.sleep(0.3)
        assert caller.is_alive(), f"the call returned before the kill: {outcome}"
        api.send_signal(signal.SIGKILL)
        api.wait()
        caller.join(timeout=10)
        assert outcome and isinstance(outcome[0], requests.RequestException), outcome
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _try(call: Callable[[], requests.Response]) -> object:
    try:
        return call()
    except requests.RequestException as exc:
        return exc


def _role_exists(env: FailoverEnv, instance_id: str, role: str) -> bool:
    inst = instance(env.runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.management_address
    conn = connect_as_admin(env.runtime, inst, primary.management_address, "postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def test_bind_and_unbind_converge_when_the_api_dies_mid_call() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        plan = env.runtime.catalog.plan_by_name("standalone")
        server_id = instance(env.runtime, instance_id).primary().server_id  # type: ignore[union-attr]
        assert server_id
        port = free_port()
        url = f"http://127.0.0.1:{port}/v2/service_instances/{instance_id}/service_bindings/b1"
        auth = (API_USER, API_PASSWORD)
        headers = {"X-Broker-API-Version": "2.17"}
        body = {"service_id": plan.service_id, "plan_id": plan.id,
                "bind_resource": {"app_guid": "app"}}
        query = {"service_id": plan.service_id, "plan_id": plan.id}
        role = binding_role_name("b1")

        def put() -> requests.Response:
            return requests.put(url, json=body, auth=auth, headers=headers, timeout=30)

        def delete() -> requests.Response:
            return requests.delete(url, params=query, auth=auth, headers=headers, timeout=30)

        def binding_state() -> str | None:
            with env.runtime.store.session() as s:
                row = s.get(Binding, "b1")
                return row.state if row is not None else None

        # Bind: killed once the binding's row is written and the broker waits for the
        # primary; the platform's repeated PUT then finishes the binding.
        api = _start_api(env, port)
        _kill_mid_call(env, api, server_id, put, lambda: binding_state() == BINDING_CREATING)
        api = _start_api(env, port)
        first = put()
        assert first.status_code == 201, first.text
        creds = first.json()["credentials"]
        conn = connect_with(creds)
        conn.close()
        again = put()
        assert again.status_code == 200 and again.json()["credentials"] == creds, again.text
        assert binding_state() == BINDING_CREATED and _role_exists(env, instance_id, role)

        # Unbind: killed while the broker waits for the primary to drop the role; the
        # repeated DELETE drops it, and a third is still an answer the platform accepts.
        started = time.monotonic()
        _kill_mid_call(env, api, server_id, delete, lambda: time.monotonic() - started > 0.5)
        assert binding_state() == BINDING_CREATED  # the kill came before the drop
        api = _start_api(env, port)
        gone = delete()
        assert gone.status_code == 200, gone.text
        assert binding_state() == BINDING_DELETED and not _role_exists(env, instance_id, role)
        with pytest.raises(psycopg2.OperationalError):
            connect_with(creds)
        assert delete().status_code in (200, 410)
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=20)
        no_leaks(env, instance_id, STANDALONE)
