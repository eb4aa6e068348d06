"""The request decisions (`broker.operations.requests`), called directly on a real
state store: what each request queues, answers or refuses given the instance's
state, with no HTTP in between."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.operations import requests
from broker.operations.refusals import (
    AlreadyGone,
    AsyncRequired,
    Busy,
    Conflict,
    InvalidRequest,
    MaintenanceMismatch,
    NotAllowed,
    Refused,
    UnknownInstance,
)
from broker.operations.switchover import start_switchover
from broker.runtime import Runtime
from broker.store.models import (
    DEGRADED,
    DEPROVISIONED,
    FAILED,
    NODE_DELETED,
    OP_FAILED,
    PROVISIONING,
    READY,
    STANDBY,
    SUCCEEDED,
    Instance,
    Node,
    Operation,
)
from tests.support.api import (
    add_nodes,
    broker_env,
    make_runtime,
    operations,
    set_instance,
    set_operation,
    write_test_catalog,
)


@pytest.fixture
def runtime(state_url: str, tmp_path: Path) -> Iterator[Runtime]:
    """On SQLite and on a real PostgreSQL state store."""
    runtime = make_runtime(broker_env(state_url, tmp_path / "state", write_test_catalog(tmp_path)))
    try:
        yield runtime
    finally:
        runtime.store.dispose()


def new_instance(runtime: Runtime, plan: str = "ha", **overrides: object) -> requests.NewInstance:
    fields: dict[str, object] = {
        "id": str(uuid.uuid4()), "service_id": runtime.catalog.services[0].id,
        "plan": runtime.catalog.plan_by_name(plan), "organization_guid": "org",
        "space_guid": "space"}
    fields.update(overrides)
    return requests.NewInstance(**fields)  # type: ignore[arg-type]


def provision(runtime: Runtime, request: requests.NewInstance,
              accepts_incomplete: bool = True) -> requests.Accepted:
    return requests.provision(runtime.store, runtime.vault, request, accepts_incomplete)


def ready(runtime: Runtime, plan: str = "ha", **parameters: object) -> str:
    """An instance where a finished provision leaves it."""
    request = new_instance(runtime, plan, parameters=dict(parameters))
    accepted = provision(runtime, request)
    assert accepted.operation_id is not None
    set_operation(runtime, accepted.operation_id, SUCCEEDED, "ready")
    add_nodes(runtime, request.id, standby=request.plan.cloud.is_ha)
    set_instance(runtime, request.id, READY)
    return request.id


def change(runtime: Runtime, instance_id: str, plan: str | None = None,
           **parameters: object) -> requests.Change:
    return requests.Change(
        instance_id=instance_id, service_id=runtime.catalog.services[0].id,
        plan_id=runtime.catalog.plan_by_name(plan).id if plan else None,
        parameters=dict(parameters))


# --- provision -----------------------------------------------------------------------------
def test_provision_queues_once_and_answers_repeats(runtime: Runtime) -> None:
    request = new_instance(runtime, "ha-sync")
    with pytest.raises(AsyncRequired):
        provision(runtime, request, accepts_incomplete=False)
    with runtime.store.session() as s:
        assert s.get(Instance, request.id) is None  # refused before any row
    first = provision(runtime, request)
    assert first.queued and first.operation_id is not None
    with runtime.store.session() as s:
        inst = s.get(Instance, request.id)
        assert inst is not None and inst.state == PROVISIONING and inst.replication == "sync"
    # The same request while it runs: the same operation, nothing new queued.
    assert provision(runtime, request) == requests.Accepted(first.operation_id)
    with pytest.raises(AsyncRequired):
        provision(runtime, request, accepts_incomplete=False)
    with pytest.raises(Conflict, match="other attributes"):
        provision(runtime, new_instance(runtime, "ha", id=request.id))
    assert [op.kind for op in operations(runtime, request.id)] == ["provision"]
    # Finished: an identical request is answered as done.
    set_operation(runtime, first.operation_id, SUCCEEDED, "ready")
    set_instance(runtime, request.id, READY)
    assert provision(runtime, request) == requests.Accepted()


@pytest.mark.parametrize(("state", "refusal"), [
    (FAILED, "failed to provision (no quota left)"),
    (DEPROVISIONED, "never reused"),
])
def test_provision_of_a_used_id_is_a_conflict(runtime: Runtime, state: str,
                                              refusal: str) -> None:
    request = new_instance(runtime)
    accepted = provision(runtime, request)
    assert accepted.operation_id is not None
    set_operation(runtime, accepted.operation_id, OP_FAILED, "failed: quota")
    set_instance(runtime, request.id, state, reason="no quota left")
    with pytest.raises(Conflict) as refused:
        provision(runtime, request)
    assert refusal in str(refused.value)


def test_provision_checks_parameters_and_maintenance_version(runtime: Runtime) -> None:
    with pytest.raises(InvalidRequest, match="bogus"):
        provision(runtime, new_instance(runtime, parameters={"bogus": 1}))
    with pytest.raises(MaintenanceMismatch, match="refresh the catalog"):
        provision(runtime, new_instance(runtime, maintenance_version="0.0.1"))


# --- update --------------------------------------------------------------------------------
def test_update_queues_only_a_change(runtime: Runtime) -> None:
    iid = ready(runtime, "ha", extensions=["citext"])
    update = requests.update
    for nothing in (change(runtime, iid), change(runtime, iid, "ha"),
                    change(runtime, iid, extensions=["citext"]),
                    change(runtime, iid, switchover=False)):
        assert update(runtime.store, runtime.catalog, nothing, False) == requests.Accepted()
    with pytest.raises(AsyncRequired):
        update(runtime.store, runtime.catalog, change(runtime, iid, statement_timeout_ms=10),
               False)
    accepted = update(runtime.store, runtime.catalog,
                      change(runtime, iid, statement_timeout_ms=10), True)
    assert accepted.queued
    op = operations(runtime, iid)[-1]
    assert (op.id, op.kind) == (accepted.operation_id, "update")
    assert op.params == {"plan_id": runtime.catalog.plan_by_name("ha").id,
                         "parameters": {"statement_timeout_ms": 10},
                         "maintenance_version": runtime.catalog.plan_by_name("ha")
                         .maintenance_version}
    with pytest.raises(Busy, match="update"):
        update(runtime.store, runtime.catalog, change(runtime, iid, "ha-sync"), True)


@pytest.mark.parametrize(("plan", "make", "refusal", "mentions"), [
    ("ha", lambda r, iid: requests.Change(instance_id=str(uuid.uuid4()),
                                          service_id=r.catalog.services[0].id),
     UnknownInstance, "does not exist"),
    ("ha", lambda r, iid: requests.Change(instance_id=iid, service_id="another"),
     InvalidRequest, "service_id"),
    ("ha", lambda r, iid: change(r, iid, bogus=1), InvalidRequest, "bogus"),
    ("standalone", lambda r, iid: change(r, iid, "standalone-large"), NotAllowed,
     "not supported"),
    ("ha", lambda r, iid: requests.Change(instance_id=iid, service_id=r.catalog.services[0].id,
                                          plan_id=r.catalog.plan_by_name("standalone").id,
                                          maintenance_version="0.0.1"),
     MaintenanceMismatch, "0.0.1"),
])
def test_update_refusals(runtime: Runtime, plan: str,
                         make: Callable[[Runtime, str], requests.Change],
                         refusal: type[Refused], mentions: str) -> None:
    iid = ready(runtime, plan)
    with pytest.raises(refusal, match=mentions):
        requests.update(runtime.store, runtime.catalog, make(runtime, iid), True)
    assert [op.kind for op in operations(runtime, iid)] == ["provision"]


def test_update_of_an_instance_that_failed(runtime: Runtime) -> None:
    iid = ready(runtime)
    set_instance(runtime, iid, FAILED, reason="quota")
    with pytest.raises(NotAllowed, match="cannot be updated while failed: quota"):
        requests.update(runtime.store, runtime.catalog, change(runtime, iid, "ha-sync"), True)


# --- switchover: one set of preconditions for the API and the CLI ------------------------------
def _lose_standby(runtime: Runtime, iid: str) -> None:
    with runtime.store.session() as s:
        for node in s.scalars(select(Node).where(Node.instance_id == iid)):
            if node.role == STANDBY:
                node.state = NODE_DELETED
    set_instance(runtime, iid, DEGRADED, reason="standby lost in az2")


def _queue_update(runtime: Runtime, iid: str) -> None:
    requests.update(runtime.store, runtime.catalog, change(runtime, iid, statement_timeout_ms=5),
                    True)


SITUATIONS: list[tuple[str, str, Callable[[Runtime, str], None], type[Refused], str]] = [
    ("one node", "standalone", lambda r, iid: None, NotAllowed, "single node"),
    ("standby lost", "ha", _lose_standby, NotAllowed, "right now (standby lost in az2)"),
    ("busy", "ha-sync", _queue_update, Busy, "another operation is in progress"),
    ("failed", "ha", lambda r, iid: set_instance(r, iid, FAILED, reason="quota"),
     NotAllowed, "while failed: quota"),
]


@pytest.mark.parametrize(("plan", "situation", "refusal", "mentions"),
                         [s[1:] for s in SITUATIONS], ids=[s[0] for s in SITUATIONS])
def test_switchover_preconditions_are_the_same_for_api_and_cli(
        runtime: Runtime, plan: str, situation: Callable[[Runtime, str], None],
        refusal: type[Refused], mentions: str) -> None:
    iid = ready(runtime, plan)
    situation(runtime, iid)
    before = len(operations(runtime, iid))
    with pytest.raises(refusal) as by_api:
        requests.update(runtime.store, runtime.catalog, change(runtime, iid, switchover=True),
                        True)
    with pytest.raises(refusal) as by_cli:
        start_switchover(runtime.store, iid)
    assert mentions in str(by_api.value) and mentions in str(by_cli.value)
    assert len(operations(runtime, iid)) == before


def test_switchover_queued_by_either_caller(runtime: Runtime) -> None:
    iid = ready(runtime, "ha")
    with pytest.raises(NotAllowed, match="plan change"):
        requests.update(runtime.store, runtime.catalog,
                        change(runtime, iid, "ha-sync", switchover=True), True)
    with pytest.raises(NotAllowed, match="alone"):
        requests.update(runtime.store, runtime.catalog,
                        change(runtime, iid, switchover=True, statement_timeout_ms=1), True)
    with pytest.raises(AsyncRequired):
        requests.update(runtime.store, runtime.catalog, change(runtime, iid, switchover=True),
                        False)
    accepted = requests.update(runtime.store, runtime.catalog,
                               change(runtime, iid, switchover=True), True)
    assert accepted.queued
    assert operations(runtime, iid)[-1].kind == "switchover"
    other = ready(runtime, "ha-sync")
    op_id = start_switchover(runtime.store, other)
    assert [(op.id, op.kind) for op in operations(runtime, other)][-1] == (op_id, "switchover")
    with pytest.raises(UnknownInstance):
        start_switchover(runtime.store, str(uuid.uuid4()))


# --- deprovision ------------------------------------------------------------------------------
def test_deprovision(runtime: Runtime) -> None:
    with pytest.raises(AlreadyGone):
        requests.deprovision(runtime.store, str(uuid.uuid4()), True)
    iid = ready(runtime)
    _queue_update(runtime, iid)
    with pytest.raises(Busy, match="update"):
        requests.deprovision(runtime.store, iid, True)
    with runtime.store.session() as s:
        for op in s.scalars(select(Operation).where(Operation.instance_id == iid)):
            op.state = SUCCEEDED
    with pytest.raises(AsyncRequired):
        requests.deprovision(runtime.store, iid, False)
    first = requests.deprovision(runtime.store, iid, True)
    assert first.queued and first.operation_id is not None
    assert requests.deprovision(runtime.store, iid, True) == requests.Accepted(first.operation_id)
    set_operation(runtime, first.operation_id, SUCCEEDED, "deprovisioned")
    set_instance(runtime, iid, DEPROVISIONED)
    with pytest.raises(AlreadyGone):
        requests.deprovision(runtime.store, iid, True)


# --- bindings ----------------------------------------------------------------------------------
def plan_id(runtime: Runtime, name: str = "ha") -> str:
    return runtime.catalog.plan_by_name(name).id


def test_bind_and_unbind_prechecks(runtime: Runtime) -> None:
    with pytest.raises(UnknownInstance):
        requests.check_bindable(runtime.store, str(uuid.uuid4()), plan_id(runtime))
    with pytest.raises(AlreadyGone, match="binding b1"):
        requests.check_unbindable(runtime.store, str(uuid.uuid4()), "b1", plan_id(runtime))
    iid = ready(runtime)
    # Another plan than the instance's: refused, for bind and unbind alike.
    with pytest.raises(InvalidRequest, match="not the plan of instance"):
        requests.check_bindable(runtime.store, iid, plan_id(runtime, "ha-sync"))
    with pytest.raises(InvalidRequest, match="not the plan of instance"):
        requests.check_unbindable(runtime.store, iid, "b1", plan_id(runtime, "ha-sync"))
    requests.check_bindable(runtime.store, iid, plan_id(runtime))
    requests.check_unbindable(runtime.store, iid, "b1", plan_id(runtime))
    _queue_update(runtime, iid)
    with pytest.raises(Busy):
        requests.check_bindable(runtime.store, iid, plan_id(runtime))
    with pytest.raises(Busy):
        requests.check_unbindable(runtime.store, iid, "b1", plan_id(runtime))
    failed = ready(runtime)
    set_instance(runtime, failed, FAILED, reason="quota")
    with pytest.raises(NotAllowed, match="quota"):
        requests.check_bindable(runtime.store, failed, plan_id(runtime))
