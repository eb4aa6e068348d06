"""`cf delete-service` while the broker does its own work, on the local cloud: right
after a failover (the deprovision waits for it, then runs) and during a standby
rebuild (the rebuild is cancelled); the platform gets 202 and a succeeded
last_operation, and nothing of the instance is left. Also a real binding's answer
(endpoints) and its repeated unbind (410). Requests go through the broker's app the
way Cloud Controller sends them; the worker's engine and monitor run in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from broker.api import create_app
from broker.store.models import DEPROVISIONED, IN_PROGRESS, OP_FAILED, SUCCEEDED
from harness.env import FailoverEnv, background, failover_env
from harness.faults import kill_server
from harness.waiting import eventually, operations, unfinished
from harness.workflows import instance, provision, resource_counts
from tests.support.api import API_VERSION, auth_header, originating_identity

pytestmark = pytest.mark.e2e
PLAN = "ha-sync"


class Platform:
    """Cloud Controller's requests to the broker of a failover environment."""

    def __init__(self, env: FailoverEnv) -> None:
        self.env = env
        self.client: FlaskClient = create_app(env.runtime).test_client()
        self.service_id = env.runtime.catalog.services[0].id
        self.plan_id = env.runtime.catalog.plan_by_name(PLAN).id
        settings = env.runtime.settings
        self.headers = {"Authorization": auth_header(settings.username, settings.password),
                        "X-Broker-API-Version": API_VERSION,
                        "X-Broker-API-Originating-Identity": originating_identity("u-1")}

    def _ids(self) -> dict[str, str]:
        return {"service_id": self.service_id, "plan_id": self.plan_id}

    def delete_service(self, iid: str) -> tuple[int, Any]:
        r = self.client.delete(f"/v2/service_instances/{iid}", headers=self.headers,
                               query_string={**self._ids(), "accepts_incomplete": "true"})
        return r.status_code, r.get_json()

    def last_operation(self, iid: str, op: str) -> dict[str, Any]:
        r = self.client.get(f"/v2/service_instances/{iid}/last_operation", headers=self.headers,
                            query_string={"operation": op})
        assert r.status_code == 200, r.get_data(as_text=True)
        body: dict[str, Any] = r.get_json()
        return body

    def bind(self, iid: str, bid: str) -> tuple[int, Any]:
        r = self.client.put(f"/v2/service_instances/{iid}/service_bindings/{bid}",
                            headers=self.headers, json={**self._ids(), "app_guid": "app-1",
                                                        "bind_resource": {"app_guid": "app-1"}})
        return r.status_code, r.get_json()

    def get_binding(self, iid: str, bid: str) -> tuple[int, Any]:
        r = self.client.get(f"/v2/service_instances/{iid}/service_bindings/{bid}",
                            headers=self.headers)
        return r.status_code, r.get_json()

    def unbind(self, iid: str, bid: str) -> tuple[int, Any]:
        r = self.client.delete(f"/v2/service_instances/{iid}/service_bindings/{bid}",
                               headers=self.headers, query_string=self._ids())
        return r.status_code, r.get_json()

    def deleted(self, iid: str, op_id: str) -> None:
        """Poll as Cloud Controller does until the deprovision has succeeded."""
        def done() -> bool:
            body = self.last_operation(iid, op_id)
            assert body["state"] != "failed", body
            return bool(body["state"] == "succeeded")

        eventually(done, "the deprovision succeeded", timeout=240, interval=0.25)
        assert instance(self.env.runtime, iid).state == DEPROVISIONED
        assert not unfinished(self.env, iid)
        assert not resource_counts(self.env.cloud, iid), resource_counts(self.env.cloud, iid)


@pytest.fixture
def ready() -> Iterator[tuple[Platform, str]]:
    with failover_env() as env:
        iid = provision(env.runtime, env.engine, PLAN)
        yield Platform(env), iid


def test_binding_answers_endpoints_and_a_repeated_unbind_is_gone(
        ready: tuple[Platform, str]) -> None:
    platform, iid = ready
    address = instance(platform.env.runtime, iid).service_address
    endpoints = [{"host": address, "ports": ["5432"], "protocol": "tcp"}]
    status, body = platform.bind(iid, "b-1")
    assert status == 201 and body["endpoints"] == endpoints, body
    assert body["credentials"]["hostname"] == address
    status, again = platform.bind(iid, "b-1")
    assert status == 200 and again["endpoints"] == endpoints
    status, fetched = platform.get_binding(iid, "b-1")
    assert status == 200 and fetched["endpoints"] == endpoints
    assert platform.unbind(iid, "b-1") == (200, {})
    status, gone = platform.unbind(iid, "b-1")
    assert status == 410 and gone["error"] == "Gone", gone


def test_delete_right_after_a_failover_waits_for_it(ready: tuple[Platform, str]) -> None:
    platform, iid = ready
    env = platform.env
    primary = instance(env.runtime, iid).primary()
    assert primary is not None and primary.server_id is not None
    with background(env):
        kill_server(env.cloud, primary.server_id, links_down=True)
        failover = eventually(lambda: operations(env, iid, "failover"), "a failover queued",
                              timeout=60, interval=0.02)[0]
        status, body = platform.delete_service(iid)
        assert status == 202, body
        platform.deleted(iid, body["operation"])
    # The failover ran to its end; nothing was rebuilt for an instance being deleted.
    ops = {op.id: op for op in operations(env, iid)}
    assert ops[failover.id].state == SUCCEEDED, ops[failover.id].description
    for op in ops.values():
        if op.kind == "rebuild":
            assert op.state == OP_FAILED and "cancelled" in (op.error or ""), op.description


def test_delete_during_a_rebuild_cancels_it(ready: tuple[Platform, str]) -> None:
    platform, iid = ready
    env = platform.env
    standby = instance(env.runtime, iid).standby()
    assert standby is not None and standby.server_id is not None
    with background(env):
        kill_server(env.cloud, standby.server_id, links_down=True)
        rebuild = eventually(lambda: [op for op in operations(env, iid, "rebuild")
                                      if op.state == IN_PROGRESS],
                             "a rebuild running", timeout=60, interval=0.02)[0]
        started = time.monotonic()
        status, body = platform.delete_service(iid)
        assert status == 202, body
        assert "after the rebuild" in platform.last_operation(iid, body["operation"])[
            "description"]
        platform.deleted(iid, body["operation"])
    [cancelled] = [op for op in operations(env, iid, "rebuild") if op.id == rebuild.id]
    assert cancelled.state == OP_FAILED, (cancelled.state, cancelled.description,
                                          time.monotonic() - started)
    assert "cancelled: the instance is being deprovisioned" in (cancelled.error or "")
