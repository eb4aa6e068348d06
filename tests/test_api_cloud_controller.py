"""What Cloud Controller sees, for the requests independent OSB clients found wrong:
a re-sent PATCH, a repeated unbind, a route binding, another plan's plan_id, and a
DELETE while the broker does its own work (a failover, a rebuild). Driven over the
app as the platform sends them; no worker runs, so queued operations stay queued
and the tests move rows as the workflows would (the local-cloud runs of the same
requests are in test_api_cloud_controller_e2e.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.api import create_app
from broker.operations import queue
from broker.operations.params import RebuildParams
from broker.runtime import Runtime
from broker.store.models import BINDING_DELETED, IN_PROGRESS, SUCCEEDED, Binding, Instance
from tests.support.api import (
    broker_env,
    make_runtime,
    operations,
    set_operation,
    write_test_catalog,
)
from tests.test_api_contract import CloudController, assert_error, new_id


@pytest.fixture
def wakeups() -> list[int]:
    return []


def _client(state_url: str, tmp_path: Path, wakeups: list[int]) -> Iterator[CloudController]:
    runtime: Runtime = make_runtime(broker_env(state_url, tmp_path / "state",
                                               write_test_catalog(tmp_path)))
    try:
        app = create_app(runtime, on_enqueue=lambda: wakeups.append(1))
        yield CloudController(app.test_client(), runtime)
    finally:
        runtime.store.dispose()


@pytest.fixture
def cc(state_url: str, tmp_path: Path, wakeups: list[int]) -> Iterator[CloudController]:
    """On SQLite and on a real PostgreSQL state store."""
    yield from _client(state_url, tmp_path, wakeups)


@pytest.fixture
def cc1(tmp_path: Path, wakeups: list[int]) -> Iterator[CloudController]:
    """SQLite only: for what does not depend on the state store."""
    yield from _client(f"sqlite:///{tmp_path / 'state.sqlite3'}", tmp_path, wakeups)


# --- a re-sent PATCH -------------------------------------------------------------------------
def test_resent_update_while_it_runs_answers_202_with_its_operation(cc: CloudController) -> None:
    iid = cc.ready_instance("ha", extensions=["citext"])
    body: dict[str, Any] = {"parameters": {"statement_timeout_ms": 10},
                            "maintenance_info": {"version": cc.catalog.plan_by_name("ha")
                                                 .maintenance_version}}
    first = cc.update(iid, **body)
    assert first.status_code == 202
    op_id = first.json["operation"]
    # Cloud Controller did not get the answer (a timeout) and sends the same PATCH again.
    for _ in range(2):
        again = cc.update(iid, **body)
        assert (again.status_code, again.json) == (202, {"operation": op_id})
    set_operation(cc.runtime, op_id, IN_PROGRESS, "updating: restarting the standby")
    again = cc.update(iid, **body)
    assert (again.status_code, again.json) == (202, {"operation": op_id})
    # Without accepts_incomplete it is still asynchronous work.
    assert_error(cc.update(iid, accepts_incomplete=False, **body), 422, "AsyncRequired")
    # Another change meanwhile is a concurrent one.
    assert_error(cc.update(iid, parameters={"statement_timeout_ms": 20}), 422,
                 "ConcurrencyError")
    assert_error(cc.update(iid, plan="ha-sync"), 422, "ConcurrencyError")
    assert [op.kind for op in operations(cc.runtime, iid)] == ["provision", "update"]
    # Once finished, the same PATCH changes nothing: 200.
    set_operation(cc.runtime, op_id, SUCCEEDED, "updated")
    with cc.runtime.store.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        inst.parameters = {**(inst.parameters or {}), "statement_timeout_ms": 10}
    assert cc.update(iid, **body).status_code == 200


def test_resent_plan_change_and_switchover_answer_their_operation(cc: CloudController) -> None:
    iid = cc.ready_instance("ha")
    first = cc.update(iid, plan="ha-sync")
    assert first.status_code == 202
    again = cc.update(iid, plan="ha-sync")
    assert (again.status_code, again.json) == (202, first.json)
    other = cc.ready_instance("ha-sync")
    switch = cc.update(other, parameters={"switchover": True})
    assert switch.status_code == 202
    again = cc.update(other, parameters={"switchover": True})
    assert (again.status_code, again.json) == (202, switch.json)
    assert_error(cc.update(other, parameters={"statement_timeout_ms": 5}), 422,
                 "ConcurrencyError")


# --- bindings ----------------------------------------------------------------------------------
def test_unbinding_a_deleted_binding_is_gone(cc: CloudController) -> None:
    iid = cc.ready_instance("ha")
    binding_id = new_id()
    with cc.runtime.store.session() as s:
        # As an unbind leaves it: the role dropped, the row kept as deleted.
        s.add(Binding(id=binding_id, instance_id=iid, role_name=f"b_{uuid.uuid4().hex[:12]}",
                      password_enc="-", state=BINDING_DELETED, app_guid="app-1"))
    assert_error(cc.unbind(iid, binding_id, "ha"), 410, "Gone")
    assert_error(cc.unbind(iid, binding_id, "ha"), 410, "Gone")


def test_route_binding_is_refused_without_route_forwarding(cc1: CloudController) -> None:
    service = cc1.catalog.services[0]
    assert "route_forwarding" not in (service.raw.get("requires") or [])
    iid = cc1.ready_instance("ha")
    for resource in ({"route": "https://app.example.com"},
                     {"app_guid": "app-1", "route": "app.example.com/db"}):
        body = assert_error(cc1.bind(iid, new_id(), "ha", bind_resource=resource,
                                     app_guid=None), 400, "BadRequest",
                            mentions="route_forwarding")
        assert "credentials" not in body


def test_bind_and_unbind_with_another_plans_id_are_refused(cc1: CloudController) -> None:
    iid = cc1.ready_instance("ha")
    for plan in ("ha-sync", "standalone"):
        assert_error(cc1.bind(iid, new_id(), plan), 400, "BadRequest",
                     mentions="not the plan of instance")
    with cc1.runtime.store.session() as s:
        s.add(Binding(id="b-live", instance_id=iid, role_name="b_live", password_enc="-",
                      state="created", app_guid="app-1"))
    for plan in ("ha-sync", "standalone"):
        assert_error(cc1.unbind(iid, "b-live", plan), 400, "BadRequest",
                     mentions="not the plan of instance")
    with cc1.runtime.store.session() as s:
        row = s.get(Binding, "b-live")
        assert row is not None and row.state == "created"  # nothing was done


# --- DELETE during the broker's own work --------------------------------------------------------
def _broker_operation(cc: CloudController, iid: str, kind: str, state: str = IN_PROGRESS) -> str:
    """A failover or rebuild the monitor queued (the platform knows nothing of it)."""
    with cc.runtime.store.session() as s:
        params = RebuildParams(replace_node_id=None, cause="standby lost") \
            if kind == "rebuild" else None
        op = queue.new_operation(iid, kind, params=params, description=f"{kind}: running")
        op.state = state
        s.add(op)
        return op.id


def test_delete_during_a_failover_or_rebuild_is_accepted_and_queued_behind(
        cc: CloudController, wakeups: list[int]) -> None:
    for kind in ("failover", "rebuild"):
        iid = cc.ready_instance("ha-sync")
        running = _broker_operation(cc, iid, kind)
        wakeups.clear()
        deleted = cc.deprovision(iid)
        assert deleted.status_code == 202, deleted.json
        op_id = deleted.json["operation"]
        assert wakeups == [1]
        ops = operations(cc.runtime, iid)
        assert [op.kind for op in ops][-2:] == [kind, "deprovision"]
        assert ops[-1].id == op_id and ops[-2].id == running
        polled = cc.last_operation(iid, op_id)
        assert polled.status_code == 200 and polled.json["state"] == "in progress"
        assert f"after the {kind} in progress" in polled.json["description"]
        # Cloud Controller's retry of the DELETE: the same operation.
        again = cc.deprovision(iid)
        assert (again.status_code, again.json) == (202, {"operation": op_id})
        assert_error(cc.deprovision(iid, accepts_incomplete=False), 422, "AsyncRequired")
        # Until it runs, the instance takes no new binding.
        assert_error(cc.bind(iid, new_id()), 422, "ConcurrencyError")


def test_delete_during_the_platforms_own_operation_is_still_a_concurrency_error(
        cc: CloudController) -> None:
    iid = cc.ready_instance("ha")
    assert cc.update(iid, parameters={"statement_timeout_ms": 10}).status_code == 202
    assert_error(cc.deprovision(iid, "ha"), 422, "ConcurrencyError")
    assert [op.kind for op in operations(cc.runtime, iid)] == ["provision", "update"]
