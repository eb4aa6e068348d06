"""schemathesis against the OSB v2.17 OpenAPI document, with the catalog's real ids.

The document is vendored in tests/data so that CI never depends on where the
shared copy lives; `test_vendored_spec_matches_shared_copy` catches drift.

Every request carries the version header, valid credentials and a valid
originating identity. Positive examples get the catalog's real service and plan
ids (and, half the time, no parameters, so that provisions are accepted); some
target instances that exist: provisioning ones, and ready ones whose rows the
fixture wrote as a finished provision leaves them. No worker runs: provision,
update and deprovision only queue operations. Negative examples (data the
document forbids) must be refused with a 4xx.

The document omits responses its own prose requires; the status check accepts
those and nothing else: 401 anywhere (schemathesis' `ignored_auth` check sends
requests without credentials), 400/412 for a negative example whose version
header is missing or invalid (412 also counts as refusing negative data), and 422
ConcurrencyError on GET instance while an operation runs ("422: MUST be returned if
the Service Instance is being updated").
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import DataGenerationMethod
from schemathesis.checks import ALL_CHECKS
from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance

from broker.api import create_app
from broker.runtime import Runtime
from broker.store.models import READY, SUCCEEDED
from tests.support.api import (
    add_nodes,
    auth_header,
    broker_env,
    make_runtime,
    set_instance,
    set_operation,
)

SPEC = Path(__file__).parent / "data" / "openapi-v2.17.yaml"
SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "osbapi" / "openapi-v2.17.yaml"
IDENTITY = "cloudfoundry " + base64.b64encode(json.dumps({"user_id": "st"}).encode()).decode()
HEADERS = {"Authorization": auth_header()}
READY_IDS = ["ready-ha", "ready-standalone"]
# Reused across examples so that one example's provision meets the next one's
# update, bind or delete of the same instance.
OTHER_IDS = ["inst-a", "0"]
BIND = "PUT /v2/service_instances/{instance_id}/service_bindings/{binding_id}"
# Codes the spec's prose requires but its OpenAPI document does not list.
EXTRA_CODES = {"GET /v2/service_instances/{instance_id}": {422: "ConcurrencyError"}}


def osb_status_code_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code == 401:
        return None
    version = (case.headers or {}).get("X-Broker-API-Version")
    if version != "2.17" and response.status_code in (400, 412):
        return None  # a negative example without a valid version header
    error = EXTRA_CODES.get(case.operation.verbose_name, {}).get(response.status_code)
    if error is not None:
        body = json.loads(response.get_data(as_text=True) if hasattr(response, "get_data")
                          else response.text)
        assert body.get("error") == error, body
        return None
    return status_code_conformance(ctx, response, case)


def osb_negative_data_rejection(ctx: Any, response: Any, case: Any) -> bool | None:
    """Negative data must be refused; a bad version header is refused with 412, which
    the OSB spec requires ("412 Precondition Failed") and schemathesis does not know."""
    version = (case.headers or {}).get("X-Broker-API-Version")
    if version != "2.17" and response.status_code == 412:
        return None
    return negative_data_rejection(ctx, response, case)


OURS: dict[Any, Any] = {status_code_conformance: osb_status_code_conformance,
                        negative_data_rejection: osb_negative_data_rejection}
CHECKS = tuple(OURS.get(c, c) for c in ALL_CHECKS)


def _ready_instance(runtime: Runtime, instance_id: str, plan_name: str) -> None:
    from broker.operations.queue import new_operation
    from broker.store.models import Instance

    plan = runtime.catalog.plan_by_name(plan_name)
    with runtime.store.session() as s:
        s.add(Instance(id=instance_id, service_id=plan.service_id, plan_id=plan.id,
                       organization_guid="org", space_guid="space", context={}, parameters={},
                       maintenance_version=plan.maintenance_version,
                       replication=plan.cloud.replication,
                       admin_password_enc=runtime.vault.encrypt("x"),
                       replication_password_enc=runtime.vault.encrypt("y")))
        s.flush()
        op = new_operation(instance_id, "provision")
        s.add(op)
    set_operation(runtime, op.id, SUCCEEDED, "ready")
    add_nodes(runtime, instance_id, standby=plan.cloud.is_ha)
    set_instance(runtime, instance_id, READY)


@pytest.fixture(scope="module")
def osb_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    root = tmp_path_factory.mktemp("schemathesis")
    runtime = make_runtime(broker_env(f"sqlite:///{root / 'state.sqlite3'}", root / "state"))
    _ready_instance(runtime, READY_IDS[0], "ha-sync")
    _ready_instance(runtime, READY_IDS[1], "standalone")
    try:
        yield runtime
    finally:
        runtime.store.dispose()


@pytest.fixture(scope="module")
def osb_schema(osb_runtime: Runtime) -> Any:
    schema = schemathesis.from_path(
        SPEC, app=create_app(osb_runtime),
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative])
    service_id = osb_runtime.catalog.services[0].id
    plan_ids = [p.id for p in osb_runtime.catalog.services[0].plans]

    def adjust(case: Any, plan_id: str, instance_id: str | None, plain: bool) -> Any:
        case.headers = {**(case.headers or {}),
                        "X-Broker-API-Originating-Identity": IDENTITY}
        if case.data_generation_method.is_positive:
            case.headers["X-Broker-API-Version"] = "2.17"
        if case.data_generation_method.is_negative:
            return case  # keep what makes it invalid (a missing version header too)
        if isinstance(case.body, dict):
            case.body = {**case.body, "service_id": service_id}
            if "plan_id" in case.body or case.method == "PUT":
                case.body["plan_id"] = plan_id
            if plain:  # what a platform sends: no parameters, guids it knows
                case.body["parameters"] = {}
                case.body.pop("context", None)
                for key in ("organization_guid", "space_guid"):
                    if key in case.body:
                        case.body[key] = f"{key}-1"
                if case.method in ("PUT", "PATCH") and "binding" not in case.path:
                    case.query = {**(case.query or {}), "accepts_incomplete": "true"}
                    generated = str(case.path_parameters.get("instance_id", ""))
                    digest = hashlib.sha256(generated.encode("utf-8", "surrogatepass"))
                    case.path_parameters = {**case.path_parameters,
                                            "instance_id": f"i-{digest.hexdigest()[:12]}"}
        if case.query and "service_id" in case.query:
            case.query = {**case.query, "service_id": service_id, "plan_id": plan_id}
        # Binding a ready instance would reach for a PostgreSQL that does not exist
        # here: the end-to-end tests bind for real.
        if instance_id is not None and "instance_id" in (case.path_parameters or {}) \
                and not (case.operation.verbose_name == BIND and instance_id in READY_IDS):
            case.path_parameters = {**case.path_parameters, "instance_id": instance_id}
        return case

    @schema.hook
    def before_generate_case(context: Any, strategy: st.SearchStrategy[Any]) -> Any:
        return strategy.flatmap(lambda case: st.tuples(
            st.sampled_from(plan_ids),
            st.one_of(st.none(), st.sampled_from(READY_IDS + OTHER_IDS)),
            st.booleans(),
        ).map(lambda chosen: adjust(case, *chosen)))

    return schema


schema = schemathesis.from_pytest_fixture("osb_schema")


@schema.parametrize()
@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case: Any) -> None:
    case.call_and_validate(headers=HEADERS, checks=CHECKS)


# sha256 of the team's shared openapi-v2.17.yaml when it was vendored.
SPEC_SHA256 = "158021c5c3323492e361d25ee94a468a2597d50dbbcf1776e82dc2409ebc2fb1"


def test_vendored_spec_is_the_shared_spec() -> None:
    """The run tests the spec the team agreed on: the vendored copy is unchanged, and
    equal to shared/'s copy wherever that sits beside the repository (as in CI)."""
    assert hashlib.sha256(SPEC.read_bytes()).hexdigest() == SPEC_SHA256
    if SHARED_SPEC.exists():
        assert SPEC.read_bytes() == SHARED_SPEC.read_bytes()
