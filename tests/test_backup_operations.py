"""Backups as durable operations on real nodes: `cf update-service -c '{"backup": true}'`
takes a full backup through the workers; a worker SIGKILLed in the middle of a backup is
followed by another that finishes the same operation, and the repository stays
consistent; a backup that cannot be taken fails with pgBackRest's reason."""

from __future__ import annotations

import json
from typing import Any

from broker.operations import requests
from broker.runtime import Runtime
from broker.store.models import Operation
from harness.backups import pgbackrest, switch_and_wait_archived
from harness.env import FailoverEnv, failover_env
from harness.workflows import finish, instance, provision


def request_backup(runtime: Runtime, instance_id: str) -> str:
    """The platform's `cf update-service -c '{"backup": true}'`, as the API passes it on."""
    service_id = instance(runtime, instance_id).service_id
    accepted = requests.update(runtime.store, runtime.catalog,
                               requests.Change(instance_id=instance_id, service_id=service_id,
                                               parameters={"backup": True}),
                               accepts_incomplete=True)
    assert accepted.operation_id is not None and accepted.queued
    return accepted.operation_id


def backups_of(env: FailoverEnv, instance_id: str) -> list[dict[str, Any]]:
    node = instance(env.runtime, instance_id).primary()
    assert node is not None
    out = pgbackrest(env.cloud, node, instance_id, "--output=json", "info")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)[0]["backup"])


def test_a_backup_requested_by_the_platform_is_taken_by_the_workers() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        switch_and_wait_archived(env.runtime, instance_id)
        op_id = request_backup(env.runtime, instance_id)
        finish(env.engine, op_id)
        taken = backups_of(env, instance_id)
        assert [b["type"] for b in taken] == ["full"]
        assert taken[0]["annotation"] == {"pgha-operation": op_id}
        with env.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            assert op is not None and op.kind == "backup" and op.description == "backup taken"
        node = instance(env.runtime, instance_id).primary()
        assert node is not None
        verify = pgbackrest(env.cloud, node, instance_id, "verify")
        assert verify.returncode == 0, verify.stderr + verify.stdout
        # Asked again: a second full backup, not the first one found again.
        finish(env.engine, request_backup(env.runtime, instance_id))
        assert len(backups_of(env, instance_id)) == 2
