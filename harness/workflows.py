"""A runtime and an engine on a given state store and local cloud, helpers to run whole
operations, and how an app connects with a binding's credentials.

Run as a script it is a worker process on the same state store and local cloud:

    python -m harness.workflows STATE_URL KEY CLOUD_JSON OPERATION_ID

(used with BROKER_CRASH_AFTER_STEP to SIGKILL a worker after a given step).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg2

from broker.catalog import load_catalog
from broker.cloud.local import LocalCloud
from broker.config import DEFAULT_CATALOG, load_settings
from broker.crypto import Vault
from broker.operations import workflows
from broker.operations.deprovision import start_deprovision
from broker.operations.engine import Engine
from broker.operations.provision import start_provision
from broker.operations.update import start_update
from broker.pg import connection, tls
from broker.pg.names import APP_DATABASE
from broker.runtime import Runtime
from broker.store import Store
from broker.store.models import SUCCEEDED, Instance, Operation


def make_runtime(state_url: str, key: str, cloud: LocalCloud) -> Runtime:
    settings = load_settings({
        "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": str(cloud.root),
        "DATABASE_URL": state_url, "BROKER_LOCAL_NETWORK": str(cloud.network),
        "BROKER_LOCAL_BRIDGE": cloud.bridge,
    })
    store = Store(state_url)
    store.upgrade()
    runtime = Runtime(settings=settings, catalog=load_catalog(DEFAULT_CATALOG), store=store,
                      vault=Vault(key))
    runtime.cloud = cloud
    return runtime


def make_engine(runtime: Runtime) -> Engine:
    workflows.install()
    return Engine(runtime.store, runtime.cloud, runtime.vault, runtime.catalog,
                  runtime.settings, poll_interval=0.05)


def cloud_json(cloud: LocalCloud) -> str:
    return json.dumps({"root": str(cloud.root), "network": str(cloud.network),
                       "bridge": cloud.bridge, "pg_bin": cloud.pg_bin})


def cloud_from_json(text: str) -> LocalCloud:
    raw: dict[str, Any] = json.loads(text)
    return LocalCloud(Path(raw["root"]), ipaddress.IPv4Network(raw["network"]), raw["bridge"],
                      pg_bin=raw["pg_bin"])


def new_instance_id() -> str:
    return str(uuid.uuid4())


def queue_provision(runtime: Runtime, plan_name: str, instance_id: str | None = None,
                    parameters: dict[str, Any] | None = None) -> tuple[str, str]:
    """(instance id, operation id) of a queued provision."""
    instance_id = instance_id or new_instance_id()
    plan = runtime.catalog.plan_by_name(plan_name)
    op_id = start_provision(runtime.store, runtime.vault, plan, instance_id,
                            parameters=parameters)
    return instance_id, op_id


def finish(engine: Engine, op_id: str) -> None:
    state = engine.run_until_finished(op_id, timeout=180)
    if state != SUCCEEDED:
        with engine.store.session() as s:
            op = s.get(Operation, op_id)
            raise AssertionError(f"operation {op_id} ended {state}: "
                                 f"{op.description if op else '?'}")


def provision(runtime: Runtime, engine: Engine, plan_name: str,
              parameters: dict[str, Any] | None = None) -> str:
    instance_id, op_id = queue_provision(runtime, plan_name, parameters=parameters)
    finish(engine, op_id)
    return instance_id


def deprovision(runtime: Runtime, engine: Engine, instance_id: str) -> None:
    finish(engine, start_deprovision(runtime.store, instance_id))


def update(runtime: Runtime, engine: Engine, instance_id: str, plan_name: str | None = None,
           parameters: dict[str, Any] | None = None) -> None:
    plan_id = runtime.catalog.plan_by_name(plan_name).id if plan_name else None
    finish(engine, start_update(runtime.store, instance_id, plan_id=plan_id,
                                parameters=parameters))


def instance(runtime: Runtime, instance_id: str) -> Instance:
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        assert inst is not None
        _ = list(inst.nodes)
        return inst


def resource_counts(cloud: LocalCloud, instance_id: str) -> Counter[str]:
    return Counter(r.kind for r in cloud.find_resources(instance_id))


def connect_as_admin(runtime: Runtime, inst: Instance, host: str,
                     dbname: str = APP_DATABASE) -> Any:
    return connection.connect(host, runtime.vault.decrypt(inst.admin_password_enc), dbname=dbname)


def app_tls(credentials: dict[str, Any]) -> dict[str, Any]:
    """What an app does with the binding's CA: libpq reads it from a file."""
    pem = credentials.get("ca_certificate")
    return {"sslrootcert": tls.ca_file(pem)} if pem else {}


def connect_with(credentials: dict[str, Any], timeout: int = 3) -> Any:
    """Connect like an app: the binding's uri, through the service address."""
    conn = psycopg2.connect(credentials["uri"], connect_timeout=timeout, **app_tls(credentials))
    conn.autocommit = True
    return conn


def main(argv: list[str]) -> int:
    state_url, key, cloud_text, op_id = argv
    runtime = make_runtime(state_url, key, cloud_from_json(cloud_text))
    make_engine(runtime).run_until_finished(op_id, timeout=180)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
