"""Shared by the API tests: a runtime on a given state store, a Cloud-Controller-like
client, and helpers that move rows to the states the workflows would leave them in."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography.fernet import Fernet

from broker.config import DEFAULT_CATALOG, load_settings
from broker.runtime import Runtime, build_runtime
from broker.store.models import (
    IN_PROGRESS,
    NODE_RUNNING,
    PRIMARY,
    STANDBY,
    Instance,
    Node,
    Operation,
    utcnow,
)

USERNAME = "cc-broker-user"
PASSWORD = "s3cret-Broker-Pa55word"  # searched for in logs: it must never appear
API_VERSION = "2.15"  # what Cloud Controller sends today

# Extra catalog entries the tests need besides the shipped three plans.
STANDALONE_LARGE_ID = "4a3f3f8e-6f47-4bf5-9a1e-2b8b8d6f1c01"
OTHER_SERVICE_ID = "9d1d0c5e-0f0e-4f55-8a43-6d7b1e9e2a10"
OTHER_PLAN_ID = "c5a3e0c2-3b7e-4b8f-bc71-0f3c6f0f9d22"


def catalog_document_for_tests() -> dict[str, Any]:
    """The shipped catalog plus a second one-node plan and a second service, so that
    unsupported plan changes and plans of another service can be exercised."""
    document: dict[str, Any] = yaml.safe_load(DEFAULT_CATALOG.read_text())
    service = document["services"][0]
    large = copy.deepcopy(service["plans"][0])
    large.update(id=STANDALONE_LARGE_ID, name="standalone-large",
                 description="One bigger server.")
    large["cloud"]["flavor"] = "m1.large"
    service["plans"].append(large)
    other = copy.deepcopy(service)
    other.update(id=OTHER_SERVICE_ID, name="other-service", plans=[
        {**copy.deepcopy(service["plans"][0]), "id": OTHER_PLAN_ID, "name": "other-plan"}])
    document["services"].append(other)
    return document


def write_test_catalog(directory: Path) -> Path:
    path = directory / "catalog.yml"
    path.write_text(yaml.safe_dump(catalog_document_for_tests(), sort_keys=False))
    return path


def broker_env(state_url: str, state_dir: Path, catalog: Path | None = None) -> dict[str, str]:
    env = {
        "BROKER_USERNAME": USERNAME,
        "BROKER_PASSWORD": PASSWORD,
        "BROKER_STATE_DIR": str(state_dir),
        "DATABASE_URL": state_url,
        "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "BROKER_LOG_LEVEL": "INFO",
    }
    if catalog is not None:
        env["BROKER_CATALOG"] = str(catalog)
    return env


def make_runtime(env: Mapping[str, str]) -> Runtime:
    return build_runtime(load_settings(dict(env)), upgrade=True)


def auth_header(username: str = USERNAME, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def originating_identity(user_id: str) -> str:
    value = base64.b64encode(json.dumps({"user_id": user_id}).encode()).decode()
    return f"cloudfoundry {value}"


def osb_headers(**extra: str) -> dict[str, str]:
    return {"Authorization": auth_header(), "X-Broker-API-Version": API_VERSION, **extra}


# --- moving rows as the workflows would ----------------------------------------------
def set_operation(runtime: Runtime, op_id: str, state: str,
                  description: str | None = None) -> None:
    with runtime.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        op.state = state
        if description is not None:
            op.description = description
        if state not in ("queued", IN_PROGRESS):
            op.finished_at = utcnow()
        if state == "failed":
            op.error = description


def set_instance(runtime: Runtime, instance_id: str, state: str, *,
                 reason: str | None = None, **fields: Any) -> None:
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        assert inst is not None
        inst.state = state
        inst.state_reason = reason
        for key, value in fields.items():
            setattr(inst, key, value)


def add_nodes(runtime: Runtime, instance_id: str, *, standby: bool) -> None:
    """Node rows as a finished provision leaves them (no real server behind them)."""
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        assert inst is not None
        inst.service_address = "10.214.0.10"
        s.add(Node(id=uuid.uuid4().hex[:8], instance_id=instance_id, role=PRIMARY,
                   state=NODE_RUNNING, availability_zone="az1",
                   management_address="10.214.0.11"))
        if standby:
            s.add(Node(id=uuid.uuid4().hex[:8], instance_id=instance_id, role=STANDBY,
                       state=NODE_RUNNING, availability_zone="az2",
                       management_address="10.214.0.12"))


def operations(runtime: Runtime, instance_id: str) -> list[Operation]:
    from sqlalchemy import select

    with runtime.store.session() as s:
        return list(s.scalars(select(Operation).where(Operation.instance_id == instance_id)
                              .order_by(Operation.created_at)))
