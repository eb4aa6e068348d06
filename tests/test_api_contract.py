"""The OSB contract, driven the way Cloud Controller drives a broker.

No worker runs here: provision/update/deprovision only queue operations, and the
tests move rows to the states the workflows leave them in, through the same
store. Binding with real credentials needs a real node: the end-to-end tests do it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.datastructures import Headers
from werkzeug.test import TestResponse

from broker.api import create_app
from broker.runtime import Runtime
from broker.store import Store
from broker.store.models import (
    DEGRADED,
    DEPROVISIONED,
    FAILED,
    IN_PROGRESS,
    NODE_DELETED,
    OP_FAILED,
    PROVISIONING,
    READY,
    STANDBY,
    SUCCEEDED,
    Instance,
    Node,
)
from broker.web.dashboard import token_for
from harness.machine import free_port
from tests.support.api import (
    API_VERSION,
    OTHER_PLAN_ID,
    OTHER_SERVICE_ID,
    PASSWORD,
    STANDALONE_LARGE_ID,
    USERNAME,
    add_nodes,
    auth_header,
    broker_env,
    make_runtime,
    operations,
    originating_identity,
    osb_headers,
    set_instance,
    set_operation,
    write_test_catalog,
)

ORG, SPACE = "org-guid-1", "space-guid-1"


@dataclass(frozen=True)
class Reply:
    status_code: int
    headers: Headers
    json: Any
    text: str


def _reply(response: TestResponse) -> Reply:
    return Reply(response.status_code, response.headers, response.get_json(silent=True),
                 response.get_data(as_text=True))


class CloudController:
    """Sends what Cloud Controller sends: version header, identity, full bodies."""

    def __init__(self, client: FlaskClient, runtime: Runtime) -> None:
        self.client = client
        self.runtime = runtime
        self.catalog = runtime.catalog
        self.service_id = runtime.catalog.services[0].id

    def plan_id(self, name: str) -> str:
        return self.catalog.plan_by_name(name).id

    def raw(self, method: str, path: str, *, headers: dict[str, str] | None = None,
            data: str | None = None, content_type: str | None = None) -> Reply:
        """Exactly these headers, nothing added."""
        return _reply(self.client.open(path, method=method, headers=headers or {}, data=data,
                                       content_type=content_type))

    def call(self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None
             = None, query: dict[str, str] | None = None) -> Reply:
        hdrs = osb_headers(**{"X-Broker-API-Originating-Identity": originating_identity("u-1")})
        hdrs.update(headers or {})
        return _reply(self.client.open(path, method=method, json=json, headers=hdrs,
                                       query_string=query))

    def provision_body(self, plan: str = "ha-sync", **overrides: Any) -> dict[str, Any]:
        plan_obj = self.catalog.plan_by_name(plan)
        body: dict[str, Any] = {
            "service_id": self.service_id, "plan_id": plan_obj.id,
            "organization_guid": ORG, "space_guid": SPACE,
            "context": {"platform": "cloudfoundry", "organization_guid": ORG,
                        "space_guid": SPACE, "instance_name": "db"},
            "parameters": {},
            "maintenance_info": {"version": plan_obj.maintenance_version},
        }
        body.update(overrides)
        return body

    def provision(self, iid: str, plan: str = "ha-sync", *, accepts_incomplete: bool = True,
                  **overrides: Any) -> Reply:
        query = {"accepts_incomplete": "true"} if accepts_incomplete else {}
        return self.call("PUT", f"/v2/service_instances/{iid}",
                         json=self.provision_body(plan, **overrides), query=query)

    def update(self, iid: str, *, plan: str | None = None, accepts_incomplete: bool = True,
               **body: Any) -> Reply:
        payload: dict[str, Any] = {"service_id": self.service_id, **body}
        if plan is not None:
            payload["plan_id"] = self.plan_id(plan)
        query = {"accepts_incomplete": "true"} if accepts_incomplete else {}
        return self.call("PATCH", f"/v2/service_instances/{iid}", json=payload, query=query)

    def deprovision(self, iid: str, plan: str = "ha-sync", *,
                    accepts_incomplete: bool = True) -> Reply:
        query = {"service_id": self.service_id, "plan_id": self.plan_id(plan)}
        if accepts_incomplete:
            query["accepts_incomplete"] = "true"
        return self.call("DELETE", f"/v2/service_instances/{iid}", query=query)

    def last_operation(self, iid: str, operation: str | None = None) -> Reply:
        query = {"operation": operation} if operation else {}
        return self.call("GET", f"/v2/service_instances/{iid}/last_operation", query=query)

    def get_instance(self, iid: str) -> Reply:
        return self.call("GET", f"/v2/service_instances/{iid}")

    def bind(self, iid: str, bid: str, plan: str = "ha-sync", **body: Any) -> Reply:
        payload = {"service_id": self.service_id, "plan_id": self.plan_id(plan),
                   "bind_resource": {"app_guid": "app-1"}, "app_guid": "app-1", **body}
        return self.call("PUT", f"/v2/service_instances/{iid}/service_bindings/{bid}",
                         json=payload)

    def unbind(self, iid: str, bid: str, plan: str = "ha-sync") -> Reply:
        return self.call("DELETE", f"/v2/service_instances/{iid}/service_bindings/{bid}",
                         query={"service_id": self.service_id, "plan_id": self.plan_id(plan)})

    def ready_instance(self, plan: str = "ha-sync", **params: Any) -> str:
        """Provision and move the rows to where a finished provision leaves them."""
        iid = new_id()
        response = self.provision(iid, plan, parameters=params)
        assert response.status_code == 202, response.json
        set_operation(self.runtime, response.json["operation"], SUCCEEDED, "ready")
        add_nodes(self.runtime, iid, standby=self.catalog.plan_by_name(plan).cloud.is_ha)
        set_instance(self.runtime, iid, READY)
        return iid


def new_id() -> str:
    return str(uuid.uuid4())


def assert_error(response: Reply, status: int, error: str | None = None,
                 mentions: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json
    assert isinstance(body, dict)
    assert isinstance(body.get("description"), str) and body["description"]
    assert isinstance(body.get("error"), str) and " " not in body["error"]
    assert "Traceback" not in response.text
    if error is not None:
        assert body["error"] == error, body
    if mentions is not None:
        assert mentions in body["description"], body
    return body


# --- fixtures ----------------------------------------------------------------------
@pytest.fixture
def wakeups() -> list[int]:
    return []


def _runtime(state_url: str, tmp_path: Path) -> Iterator[Runtime]:
    runtime = make_runtime(broker_env(state_url, tmp_path / "state", write_test_catalog(tmp_path)))
    try:
        yield runtime
    finally:
        runtime.store.dispose()


@pytest.fixture
def runtime(state_url: str, tmp_path: Path) -> Iterator[Runtime]:
    """On SQLite and on a real PostgreSQL state store."""
    yield from _runtime(state_url, tmp_path)


@pytest.fixture
def sqlite_runtime(tmp_path: Path) -> Iterator[Runtime]:
    yield from _runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", tmp_path)


@pytest.fixture
def cc(runtime: Runtime, wakeups: list[int]) -> CloudController:
    app = create_app(runtime, on_enqueue=lambda: wakeups.append(1))
    return CloudController(app.test_client(), runtime)


@pytest.fixture
def cc1(sqlite_runtime: Runtime, wakeups: list[int]) -> CloudController:
    """SQLite only: for what does not depend on the state store."""
    app = create_app(sqlite_runtime, on_enqueue=lambda: wakeups.append(1))
    return CloudController(app.test_client(), sqlite_runtime)


# --- authentication, headers, logging ----------------------------------------------------
ENDPOINTS = [
    ("GET", "/v2/catalog"),
    ("PUT", "/v2/service_instances/x"),
    ("PATCH", "/v2/service_instances/x"),
    ("DELETE", "/v2/service_instances/x"),
    ("GET", "/v2/service_instances/x"),
    ("GET", "/v2/service_instances/x/last_operation"),
    ("PUT", "/v2/service_instances/x/service_bindings/b"),
    ("GET", "/v2/service_instances/x/service_bindings/b"),
    ("DELETE", "/v2/service_instances/x/service_bindings/b"),
    ("GET", "/v2/service_instances/x/service_bindings/b/last_operation"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_authentication_comes_before_anything_else(cc1: CloudController, method: str,
                                                   path: str) -> None:
    cases: list[dict[str, str]] = [
        {"X-Broker-API-Version": "not-a-version"},  # no credentials, bad version
        {"Authorization": auth_header(USERNAME, "wrong"), "X-Broker-API-Version": "2.x"},
        {"Authorization": auth_header("wrong", PASSWORD)},  # and no version at all
        {"Authorization": "Bearer abc", "X-Broker-API-Version": API_VERSION},
    ]
    for headers in cases:
        response = cc1.raw(method, path, headers=headers, data="not json")
        body = assert_error(response, 401, "Unauthorized")
        assert "Basic" in response.headers["WWW-Authenticate"]
        assert PASSWORD not in str(body)


def test_health_needs_no_credentials_and_shows_no_secret(cc: CloudController) -> None:
    response = cc.raw("GET", "/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "state_store": "reachable"}
    text = response.text
    assert PASSWORD not in text and cc.runtime.settings.database_url not in text


@pytest.mark.parametrize(("version", "status"), [
    (None, 400), ("", 400), ("abc", 412), ("2.x", 412), ("2", 412), ("2.12", 412),
    ("1.14", 412), ("3.0", 412), ("2.13.1", 412),
    ("2.13", 200), ("2.14", 200), ("2.15", 200), ("2.16", 200), ("2.17", 200), ("2.20", 200),
])
def test_version_header(cc1: CloudController, version: str | None, status: int) -> None:
    headers = {"Authorization": auth_header()}
    if version is not None:
        headers["X-Broker-API-Version"] = version
    response = cc1.raw("GET", "/v2/catalog", headers=headers)
    if status == 200:
        assert response.status_code == 200
    else:
        assert_error(response, status)


def test_request_identity_is_echoed_on_every_answer(cc1: CloudController) -> None:
    rid = str(uuid.uuid4())
    ok = cc1.call("GET", "/v2/catalog", headers={"X-Broker-API-Request-Identity": rid})
    denied = cc1.raw("GET", "/v2/catalog", headers={"X-Broker-API-Request-Identity": rid})
    failed = cc1.call("GET", "/v2/service_instances/nope/last_operation",
                      headers={"X-Broker-API-Request-Identity": rid})
    for response, status in ((ok, 200), (denied, 401), (failed, 404)):
        assert response.status_code == status
        assert response.headers["X-Broker-API-Request-Identity"] == rid
    assert "X-Broker-API-Request-Identity" not in cc1.call("GET", "/v2/catalog").headers


def test_originating_identity_is_logged_and_no_secret_is(cc: CloudController,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level(logging.DEBUG)
    iid = new_id()
    response = cc.call("PUT", f"/v2/service_instances/{iid}",
                       json=cc.provision_body(), query={"accepts_incomplete": "true"},
                       headers={"X-Broker-API-Originating-Identity":
                                originating_identity("user-4711"),
                                "X-Broker-API-Request-Identity": "req-42"})
    assert response.status_code == 202
    cc.last_operation(iid)
    cc.raw("GET", "/v2/catalog", headers={"Authorization": auth_header(USERNAME, "guess")})
    lines = [r for r in caplog.records if r.name == "broker.api"]
    put = [r.getMessage() for r in lines if r.getMessage().startswith("PUT")]
    assert put and 'cloudfoundry {"user_id":"user-4711"}' in put[0] and "req-42" in put[0]
    # Polls change nothing and are most requests: DEBUG (the access log has them),
    # even though Cloud Controller names who asked on them too.
    polls = [r for r in lines if r.getMessage().startswith("GET") and "-> 200" in r.getMessage()]
    assert polls and {r.levelno for r in polls} == {logging.DEBUG}
    everything = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    with cc.runtime.store.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        secrets = [cc.runtime.vault.decrypt(inst.admin_password_enc),
                   cc.runtime.vault.decrypt(inst.replication_password_enc)]
    for secret in [PASSWORD, auth_header().split()[1], "guess", *secrets]:
        assert secret not in everything
    assert "Authorization" not in everything


def test_catalog_is_the_catalog_file(cc1: CloudController) -> None:
    response = cc1.call("GET", "/v2/catalog")
    assert response.status_code == 200
    assert response.json == cc1.runtime.catalog.osb()
    service = response.json["services"][0]
    assert service["tags"] == ["postgresql", "relational"]
    assert service["metadata"]["shareable"] is True
    for plan in service["plans"]:
        assert plan["maintenance_info"]["version"]
        assert "cloud" not in plan


def test_unknown_route_and_method_answer_json(cc1: CloudController) -> None:
    assert_error(cc1.call("GET", "/v2/nothing"), 404)
    response = cc1.call("POST", "/v2/catalog")
    assert_error(response, 405)
    assert "GET" in response.headers["Allow"]


# --- provision --------------------------------------------------------------------------
def test_provision_queues_one_operation_in_one_transaction(cc: CloudController,
                                                           wakeups: list[int]) -> None:
    iid = new_id()
    response = cc.provision(iid, "ha-sync")
    assert response.status_code == 202
    op_id = response.json["operation"]
    assert wakeups == [1]
    with cc.runtime.store.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        assert (inst.state, inst.replication, inst.plan_id) == (
            PROVISIONING, "sync", cc.plan_id("ha-sync"))
        assert (inst.organization_guid, inst.space_guid) == (ORG, SPACE)
        admin = cc.runtime.vault.decrypt(inst.admin_password_enc)
        replication = cc.runtime.vault.decrypt(inst.replication_password_enc)
        assert len(admin) >= 24 and admin != replication
        assert admin not in inst.admin_password_enc
    ops = operations(cc.runtime, iid)
    assert [(o.id, o.kind, o.state) for o in ops] == [(op_id, "provision", "queued")]

    # Cloud Controller retries an identical PUT (e.g. after a timeout): same operation.
    again = cc.provision(iid, "ha-sync")
    assert again.status_code == 202 and again.json["operation"] == op_id
    assert len(operations(cc.runtime, iid)) == 1


def test_provision_requires_async(cc: CloudController) -> None:
    iid = new_id()
    assert_error(cc.provision(iid, accepts_incomplete=False), 422, "AsyncRequired")
    assert operations(cc.runtime, iid) == []


@pytest.mark.parametrize(("overrides", "mentions"), [
    ({"service_id": "00000000-0000-0000-0000-000000000000"}, "service_id"),
    ({"plan_id": "00000000-0000-0000-0000-000000000000"}, "plan_id"),
    ({"plan_id": OTHER_PLAN_ID}, "not a plan of service"),
    ({"service_id": OTHER_SERVICE_ID}, "not a plan of service"),
    ({"service_id": None}, "service_id"),
    ({"plan_id": 7}, "plan_id"),
    ({"organization_guid": "", "context": {}}, "organization_guid"),
    ({"space_guid": "", "context": {}}, "space_guid"),
    ({"organization_guid": "  ", "context": {}}, "organization_guid"),
    ({"organization_guid": None, "context": {}}, "organization_guid"),
    ({"space_guid": "other"}, "space_guid"),
    ({"parameters": ["a"]}, "parameters"),
    ({"parameters": {"no_such_knob": 1}}, "no_such_knob"),
    ({"parameters": {"statement_timeout_ms": "soon"}}, "statement_timeout_ms"),
    ({"parameters": {"extensions": ["plpython3u"]}}, "extensions"),
    ({"maintenance_info": "1.0.0"}, "maintenance_info"),
    ({"context": "cf"}, "context"),
])
def test_provision_bad_requests(cc1: CloudController, overrides: dict[str, Any],
                                mentions: str) -> None:
    iid = new_id()
    body = cc1.provision_body(**overrides)
    body = {k: v for k, v in body.items() if v is not None}
    response = cc1.call("PUT", f"/v2/service_instances/{iid}", json=body,
                        query={"accepts_incomplete": "true"})
    assert_error(response, 400, mentions=mentions)
    assert operations(cc1.runtime, iid) == []


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", "null", '"text"', ""])
def test_provision_malformed_body(cc1: CloudController, raw: str) -> None:
    response = cc1.raw("PUT", f"/v2/service_instances/{new_id()}?accepts_incomplete=true",
                       data=raw, content_type="application/json", headers=osb_headers())
    assert_error(response, 400)


def test_provision_with_service_key_guids_only_in_context(cc1: CloudController) -> None:
    body = cc1.provision_body()
    del body["organization_guid"], body["space_guid"]
    response = cc1.call("PUT", f"/v2/service_instances/{new_id()}", json=body,
                        query={"accepts_incomplete": "true"})
    assert response.status_code == 202


def test_maintenance_info(cc: CloudController) -> None:
    response = cc.provision(new_id(), maintenance_info={"version": "9.9.9"})
    assert_error(response, 422, "MaintenanceInfoConflict", mentions="9.9.9")
    # A maintenance_info with no version counts as absent.
    assert cc.provision(new_id(), maintenance_info={"description": "x"}).status_code == 202
    body = cc.provision_body()
    del body["maintenance_info"]
    response = cc.call("PUT", f"/v2/service_instances/{new_id()}", json=body,
                       query={"accepts_incomplete": "true"})
    assert response.status_code == 202


def test_provision_repeats_and_conflicts(cc: CloudController) -> None:
    iid = cc.ready_instance("ha", extensions=["citext"])
    identical = cc.provision(iid, "ha", parameters={"extensions": ["citext"]})
    # The same status page as the first answer gave (the only field of a 200 here).
    assert identical.status_code == 200 and set(identical.json) == {"dashboard_url"}
    assert identical.json["dashboard_url"].endswith(f"/dashboard/{iid}/"
                                                    f"{token_for(cc.runtime, iid)}")
    # Identical and finished needs no async support.
    assert cc.provision(iid, "ha", accepts_incomplete=False,
                        parameters={"extensions": ["citext"]}).status_code == 200
    assert_error(cc.provision(iid, "ha-sync", parameters={"extensions": ["citext"]}), 409)
    assert_error(cc.provision(iid, "ha", parameters={}), 409)
    assert_error(cc.provision(iid, "ha", parameters={"extensions": ["citext"]},
                              space_guid="s2", context={}), 409)
    # While provisioning, a PUT with other attributes conflicts too.
    other = new_id()
    assert cc.provision(other, "ha").status_code == 202
    assert_error(cc.provision(other, "standalone"), 409)


def test_provision_of_a_deprovisioned_id_conflicts(cc: CloudController) -> None:
    iid = cc.ready_instance()
    set_instance(cc.runtime, iid, DEPROVISIONED)
    assert_error(cc.provision(iid), 409, mentions="deprovisioned")


def test_provision_instance_id_too_long(cc1: CloudController) -> None:
    assert_error(cc1.provision("x" * 200), 400, mentions="instance_id")


# --- last_operation ------------------------------------------------------------------------
def test_polling_honours_retry_after(cc: CloudController) -> None:
    """Cloud Controller's loop: poll, wait Retry-After, poll again until a final state."""
    iid = new_id()
    op_id = cc.provision(iid).json["operation"]
    steps = iter([(IN_PROGRESS, "creating primary in az1"),
                  (IN_PROGRESS, "creating standby in az2: base backup"),
                  (SUCCEEDED, "ready")])
    waited: list[int] = []
    seen: list[str] = []

    def wait(seconds: int) -> None:  # instead of sleeping: the workflow moves on
        waited.append(seconds)
        state, description = next(steps)
        set_operation(cc.runtime, op_id, state, description)

    while True:
        response = cc.last_operation(iid, op_id)
        assert response.status_code == 200
        body = response.json
        seen.append(f"{body['state']}: {body['description']}")
        if body["state"] != "in progress":
            assert "Retry-After" not in response.headers
            break
        retry_after = int(response.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        wait(retry_after)
    assert seen == ["in progress: queued: provisioning",
                    "in progress: creating primary in az1",
                    "in progress: creating standby in az2: base backup",
                    "succeeded: ready"]
    assert len(waited) == 3


def test_last_operation_selection_and_errors(cc: CloudController) -> None:
    iid = new_id()
    op_id = cc.provision(iid).json["operation"]
    latest = cc.last_operation(iid)  # no `operation`: the latest platform operation
    assert latest.status_code == 200 and latest.json["state"] == "in progress"
    assert_error(cc.last_operation(new_id()), 404)
    assert_error(cc.last_operation(new_id(), op_id), 404)
    other = new_id()
    cc.provision(other)
    assert_error(cc.last_operation(other, op_id), 400, mentions=other)
    assert_error(cc.last_operation(iid, "not-an-operation"), 400)
    set_operation(cc.runtime, op_id, OP_FAILED, "failed: no capacity in az2")
    failed = cc.last_operation(iid, op_id)
    assert failed.status_code == 200
    assert failed.json == {"state": "failed", "description": "failed: no capacity in az2"}
    assert "Retry-After" not in failed.headers


# --- fetch instance ----------------------------------------------------------------------------
def test_get_instance(cc: CloudController) -> None:
    iid = new_id()
    cc.provision(iid, "ha-sync", parameters={"statement_timeout_ms": 5000})
    assert_error(cc.get_instance(iid), 404)  # still provisioning
    assert_error(cc.get_instance(new_id()), 404)
    ready = cc.ready_instance("ha-sync", statement_timeout_ms=5000)
    response = cc.get_instance(ready)
    assert response.status_code == 200
    body = response.json
    plan = cc.catalog.plan_by_name("ha-sync")
    assert body["service_id"] == cc.service_id and body["plan_id"] == plan.id
    assert body["parameters"] == {"statement_timeout_ms": 5000}
    assert body["maintenance_info"]["version"] == plan.maintenance_version
    attributes = body["metadata"]["attributes"]
    assert attributes["service_address"] == "10.214.0.10"
    assert sorted((n["role"], n["zone"]) for n in attributes["nodes"]) == [
        ("primary", "az1"), ("standby", "az2")]
    assert "password" not in response.text.lower()
    # While an update runs: 422 ConcurrencyError.
    assert cc.update(ready, plan="ha").status_code == 202
    assert_error(cc.get_instance(ready), 422, "ConcurrencyError")
    set_instance(cc.runtime, ready, DEPROVISIONED)
    assert_error(cc.get_instance(ready), 404)


# --- update ----------------------------------------------------------------------------------
ALLOWED = [("ha", "ha-sync"), ("ha-sync", "ha"), ("standalone", "ha"), ("standalone", "ha-sync"),
           ("ha", "standalone"), ("ha-sync", "standalone")]


@pytest.mark.parametrize(("source", "target"), ALLOWED)
def test_supported_plan_changes_queue_an_update(cc1: CloudController, wakeups: list[int],
                                                source: str, target: str) -> None:
    iid = cc1.ready_instance(source)
    wakeups.clear()
    response = cc1.update(iid, plan=target, maintenance_info={
        "version": cc1.catalog.plan_by_name(target).maintenance_version})
    assert response.status_code == 202, response.json
    op = operations(cc1.runtime, iid)[-1]
    assert (op.id, op.kind, op.state) == (response.json["operation"], "update", "queued")
    assert op.params == {"plan_id": cc1.plan_id(target), "parameters": {},
                         "maintenance_version": cc1.catalog.plan_by_name(target)
                         .maintenance_version}
    assert wakeups == [1]


def test_unsupported_plan_changes(cc1: CloudController) -> None:
    iid = cc1.ready_instance("standalone")
    payload = {"service_id": cc1.service_id, "plan_id": STANDALONE_LARGE_ID}
    response = cc1.call("PATCH", f"/v2/service_instances/{iid}", json=payload,
                        query={"accepts_incomplete": "true"})
    assert_error(response, 422, mentions="not supported")
    payload = {"service_id": cc1.service_id, "plan_id": OTHER_PLAN_ID}
    response = cc1.call("PATCH", f"/v2/service_instances/{iid}", json=payload,
                        query={"accepts_incomplete": "true"})
    assert_error(response, 400, mentions="not a plan of service")
    payload = {"service_id": cc1.service_id, "plan_id": "nope"}
    response = cc1.call("PATCH", f"/v2/service_instances/{iid}", json=payload,
                        query={"accepts_incomplete": "true"})
    assert_error(response, 400, mentions="plan_id")
    assert len(operations(cc1.runtime, iid)) == 1  # only the provision


def test_update_rules(cc: CloudController) -> None:
    iid = cc.ready_instance("ha", extensions=["citext"])
    # Changes nothing: 200 {} and no operation (async support not needed).
    nothing: list[dict[str, Any]] = [{}, {"parameters": {}}, {"parameters": {
        "extensions": ["citext"]}}, {"parameters": {"switchover": False}}]
    for body in nothing:
        response = cc.update(iid, accepts_incomplete=False, **body)
        assert response.status_code == 200 and response.json == {}, body
    assert cc.update(iid, plan="ha").status_code == 200
    assert len(operations(cc.runtime, iid)) == 1
    # Parameters validated against the plan's update schema.
    assert_error(cc.update(iid, parameters={"bogus": 1}), 400, mentions="bogus")
    assert_error(cc.update(iid, parameters={"statement_timeout_ms": -1}), 400,
                 mentions="statement_timeout_ms")
    assert_error(cc.update(iid, plan="ha-sync", maintenance_info={"version": "0.0.1"}), 422,
                 "MaintenanceInfoConflict")
    assert_error(cc.update(iid, parameters={"statement_timeout_ms": 10}, accepts_incomplete=False),
                 422, "AsyncRequired")
    assert_error(cc.update(new_id(), plan="ha"), 422, mentions="does not exist")
    # A real change.
    response = cc.update(iid, parameters={"statement_timeout_ms": 10})
    assert response.status_code == 202
    op = operations(cc.runtime, iid)[-1]
    assert op.kind == "update" and op.params["parameters"] == {"statement_timeout_ms": 10}
    assert op.params["plan_id"] == cc.plan_id("ha")
    # Another while it runs: ConcurrencyError; so are deprovision, bind and unbind.
    assert_error(cc.update(iid, plan="ha-sync"), 422, "ConcurrencyError")
    assert_error(cc.deprovision(iid, "ha"), 422, "ConcurrencyError")
    assert_error(cc.bind(iid, new_id(), "ha"), 422, "ConcurrencyError")
    assert_error(cc.unbind(iid, new_id(), "ha"), 422, "ConcurrencyError")


def test_switchover(cc: CloudController) -> None:
    ha = cc.ready_instance("ha-sync")
    assert_error(cc.update(ha, plan="ha", parameters={"switchover": True}), 422,
                 mentions="plan change")
    assert_error(cc.update(ha, parameters={"switchover": True, "statement_timeout_ms": 1}),
                 422, mentions="alone")
    assert_error(cc.update(ha, parameters={"switchover": True}, accepts_incomplete=False),
                 422, "AsyncRequired")
    response = cc.update(ha, parameters={"switchover": True})
    assert response.status_code == 202
    op = operations(cc.runtime, ha)[-1]
    assert (op.id, op.kind) == (response.json["operation"], "switchover")
    standalone = cc.ready_instance("standalone")
    assert_error(cc.update(standalone, parameters={"switchover": True}), 422,
                 mentions="standby")
    # An HA instance that lost its standby (degraded) cannot switch over either.
    degraded = cc.ready_instance("ha")
    with cc.runtime.store.session() as s:
        for node in s.scalars(select(Node).where(Node.instance_id == degraded)):
            if node.role == STANDBY:
                node.state = NODE_DELETED
    set_instance(cc.runtime, degraded, DEGRADED, reason="standby lost in az2")
    assert_error(cc.update(degraded, parameters={"switchover": True}), 422,
                 mentions="standby lost in az2")


def test_update_of_instance_not_ready(cc1: CloudController) -> None:
    iid = new_id()
    cc1.provision(iid)
    assert_error(cc1.update(iid, plan="ha"), 422, "ConcurrencyError")
    op = operations(cc1.runtime, iid)[0]
    set_operation(cc1.runtime, op.id, OP_FAILED, "failed: quota")
    set_instance(cc1.runtime, iid, FAILED, reason="quota")
    assert_error(cc1.update(iid, plan="ha"), 422, mentions="quota")


# --- deprovision ---------------------------------------------------------------------------
def test_deprovision(cc: CloudController, wakeups: list[int]) -> None:
    iid = cc.ready_instance()
    path = f"/v2/service_instances/{iid}"
    for query in ({"plan_id": cc.plan_id("ha-sync")}, {"service_id": cc.service_id}, {}):
        assert_error(cc.call("DELETE", path, query={**query, "accepts_incomplete": "true"}),
                     400, mentions="required")
    assert_error(cc.call("DELETE", path, query={"service_id": cc.service_id,
                                                "plan_id": "nope", "accepts_incomplete": "true"}),
                 400, mentions="plan_id")
    assert_error(cc.deprovision(new_id()), 410)
    assert_error(cc.deprovision(iid, accepts_incomplete=False), 422, "AsyncRequired")
    wakeups.clear()
    response = cc.deprovision(iid)
    assert response.status_code == 202 and wakeups == [1]
    op_id = response.json["operation"]
    assert operations(cc.runtime, iid)[-1].kind == "deprovision"
    again = cc.deprovision(iid)
    assert again.status_code == 202 and again.json["operation"] == op_id
    # The workflow finishes: last_operation says succeeded (not 410), DELETE says 410.
    set_operation(cc.runtime, op_id, SUCCEEDED, "deprovisioned")
    set_instance(cc.runtime, iid, DEPROVISIONED)
    done = cc.last_operation(iid, op_id)
    assert done.status_code == 200 and done.json["state"] == "succeeded"
    assert cc.last_operation(iid).json["state"] == "succeeded"
    assert_error(cc.deprovision(iid), 410)


def test_deprovision_while_provisioning_is_a_concurrency_error(cc1: CloudController) -> None:
    iid = new_id()
    cc1.provision(iid)
    assert_error(cc1.deprovision(iid), 422, "ConcurrencyError")


def test_orphan_mitigation_after_a_failed_provision(cc: CloudController) -> None:
    iid = new_id()
    op_id = cc.provision(iid).json["operation"]
    set_operation(cc.runtime, op_id, OP_FAILED, "failed: no server could be created in az2")
    set_instance(cc.runtime, iid, FAILED, reason="no server could be created in az2")
    polled = cc.last_operation(iid, op_id)
    assert polled.json == {"state": "failed",
                           "description": "failed: no server could be created in az2"}
    assert_error(cc.get_instance(iid), 404)
    assert_error(cc.provision(iid), 409, mentions="failed to provision")
    # Cloud Controller cleans up with DELETE; it may repeat it.
    first = cc.deprovision(iid)
    assert first.status_code == 202
    assert cc.deprovision(iid).json["operation"] == first.json["operation"]
    assert cc.last_operation(iid).json["state"] == "in progress"
    set_operation(cc.runtime, first.json["operation"], SUCCEEDED, "deprovisioned")
    set_instance(cc.runtime, iid, DEPROVISIONED)
    assert cc.last_operation(iid, first.json["operation"]).json["state"] == "succeeded"
    assert_error(cc.deprovision(iid), 410)


# --- bindings (what needs no node; real binds are end-to-end) -----------------------------
def test_binding_status_codes_without_a_node(cc: CloudController) -> None:
    unknown = new_id()
    assert_error(cc.bind(unknown, new_id()), 422, mentions="does not exist")
    provisioning = new_id()
    cc.provision(provisioning)
    assert_error(cc.bind(provisioning, new_id()), 422, "ConcurrencyError")
    iid = cc.ready_instance("ha-sync")
    assert_error(cc.bind(iid, new_id(), parameters={"read_only": "yes"}), 400,
                 mentions="read_only")
    assert_error(cc.bind(iid, new_id(), parameters={"superuser": True}), 400,
                 mentions="superuser")
    assert_error(cc.bind(iid, new_id(), plan_id="nope"), 400, mentions="plan_id")
    assert_error(cc.bind(iid, new_id(), service_id=None), 400, mentions="service_id")
    assert_error(cc.bind(iid, new_id(), bind_resource="app"), 400, mentions="bind_resource")
    assert_error(cc.bind(iid, "b" * 200), 400, mentions="binding_id")
    assert_error(cc.unbind(unknown, new_id()), 410)
    assert_error(cc.unbind(iid, new_id()), 410)
    path = f"/v2/service_instances/{iid}/service_bindings/{new_id()}"
    assert_error(cc.call("DELETE", path, query={"service_id": cc.service_id}), 400,
                 mentions="plan_id")
    assert_error(cc.call("GET", path), 404)
    assert_error(cc.call("GET", path + "/last_operation"), 404)


# --- a real server: gunicorn on loopback ----------------------------------------------------
@pytest.fixture
def gunicorn_broker(tmp_path: Path) -> Iterator[str]:
    env = broker_env(f"sqlite:///{tmp_path / 'state.sqlite3'}", tmp_path / "state",
                     write_test_catalog(tmp_path))
    make_runtime(env).store.dispose()  # upgrade the schema once, before the workers start
    port = free_port()
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
         "--worker-class", "gthread", "--threads", "4", "--graceful-timeout", "5",
         "broker.api.app:make_wsgi_app()"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or workers still booting
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not start: "
                                   + (tmp_path / "gunicorn.log").read_text()[-2000:])
            time.sleep(0.1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        assert proc.returncode is not None


def test_cloud_controller_flow_over_http(gunicorn_broker: str) -> None:
    base = gunicorn_broker
    with requests.Session() as http:
        assert http.get(f"{base}/v2/catalog", headers={"X-Broker-API-Version": "x"}
                        ).status_code == 401
        http.headers.update(osb_headers(**{
            "X-Broker-API-Originating-Identity": originating_identity("u-9")}))
        catalog = http.get(f"{base}/v2/catalog").json()
        service = catalog["services"][0]
        plan = next(p for p in service["plans"] if p["name"] == "ha-sync")
        iid = new_id()
        body = {"service_id": service["id"], "plan_id": plan["id"], "organization_guid": ORG,
                "space_guid": SPACE, "maintenance_info": plan["maintenance_info"]}
        url = f"{base}/v2/service_instances/{iid}"
        assert http.put(url, json=body).status_code == 422  # AsyncRequired
        created = http.put(url, json=body, params={"accepts_incomplete": "true"},
                           headers={"X-Broker-API-Request-Identity": "r-1"})
        assert created.status_code == 202
        assert created.headers["X-Broker-API-Request-Identity"] == "r-1"
        op = created.json()["operation"]
        again = http.put(url, json=body, params={"accepts_incomplete": "true"})
        assert (again.status_code, again.json()["operation"]) == (202, op)
        polled = http.get(f"{url}/last_operation", params={
            "operation": op, "service_id": service["id"], "plan_id": plan["id"]})
        assert polled.status_code == 200 and polled.json()["state"] == "in progress"
        assert int(polled.headers["Retry-After"]) > 0
        assert http.get(url).status_code == 404
        deleted = http.delete(url, params={"service_id": service["id"], "plan_id": plan["id"],
                                           "accepts_incomplete": "true"})
        assert deleted.status_code == 422 and deleted.json()["error"] == "ConcurrencyError"
        assert http.get(f"{base}/v2/service_instances/{new_id()}/last_operation"
                        ).status_code == 404


def test_instance_row_is_untouched_by_refused_requests(cc: CloudController) -> None:
    """A 4xx applies nothing."""
    iid = cc.ready_instance("ha")
    with cc.runtime.store.session() as s:
        before = s.get(Instance, iid)
        assert before is not None
        snapshot = (before.plan_id, before.parameters, before.state, before.maintenance_version)
    cc.update(iid, plan="standalone", parameters={"nope": 1})
    cc.update(iid, plan="ha-sync", maintenance_info={"version": "7.0.0"})
    cc.provision(iid, "standalone")
    with cc.runtime.store.session() as s:
        after = s.get(Instance, iid)
        assert after is not None
        assert (after.plan_id, after.parameters, after.state,
                after.maintenance_version) == snapshot
    assert len(operations(cc.runtime, iid)) == 1


def test_state_store_unreachable(sqlite_runtime: Runtime,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """Health says so (503); other requests get a plain 500: no stack, no secret."""
    secret = "store-Pa55word-never-shown"
    down = Store(f"postgresql://broker:{secret}@127.0.0.1:{free_port()}/state")
    try:
        cc = CloudController(create_app(dataclasses.replace(sqlite_runtime, store=down))
                             .test_client(), sqlite_runtime)
        health = cc.raw("GET", "/health")
        assert health.status_code == 503
        assert health.json == {"status": "unavailable", "state_store": "unreachable"}
        for response in (cc.last_operation(new_id()), cc.provision(new_id()),
                         cc.deprovision(new_id())):
            body = assert_error(response, 500, "InternalError")
            assert "psycopg2" not in response.text and secret not in response.text, body
        assert secret not in caplog.text
    finally:
        down.dispose()
