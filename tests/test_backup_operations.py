"""Backups as durable operations on real nodes: `cf update-service -c '{"backup": true}'`
takes a full backup through the workers; a worker SIGKILLed in the middle of a backup is
followed by another that finishes the same operation, and the repository stays
consistent; a backup that cannot be taken fails with pgBackRest's reason."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from broker.operations import requests
from broker.runtime import Runtime
from broker.store.models import SUCCEEDED, Operation
from harness.backups import pgbackrest, switch_and_wait_archived
from harness.env import FailoverEnv, failover_env
from harness.waiting import eventually
from harness.workflows import connect_with, finish, instance, provision
from harness.writer import app_credentials


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
        node = instance(env.runtime, instance_id).primary()
        assert node is not None
        assert taken[0]["annotation"] == {
            "pgha-operation": op_id, "pgha-source-node": node.id, "pgha-source-role": "primary",
            "pgha-source-note": "the instance has no standby"}
        with env.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            assert op is not None and op.kind == "backup" and op.description == (
                f"full backup taken on the primary (node {node.id}): the instance has no "
                "standby")
        verify = pgbackrest(env.cloud, node, instance_id, "verify")
        assert verify.returncode == 0, verify.stderr + verify.stdout
        # Asked again: a second full backup, not the first one found again.
        finish(env.engine, request_backup(env.runtime, instance_id))
        assert len(backups_of(env, instance_id)) == 2


def backup_processes(env: FailoverEnv, instance_id: str) -> list[int]:
    """pgBackRest's backup processes on the instance's primary."""
    node = instance(env.runtime, instance_id).primary()
    assert node is not None and node.server_id
    found = []
    for pid in env.cloud.server_pids(node.server_id):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"pgbackrest") and b"backup" in argv:
                found.append(pid)
    return found


@pytest.mark.parametrize("also_pgbackrest", [False, True], ids=["worker", "worker+pgbackrest"])
def test_a_worker_killed_mid_backup_is_followed_by_one_that_finishes_it(
        also_pgbackrest: bool) -> None:
    """SIGKILL the worker while pgBackRest copies (and, as a node that rebooted, its
    backup too): another worker finishes the same operation, with one backup carrying
    its annotation, and the repository passes `check` and `verify`."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        creds = app_credentials(env, instance_id)
        conn = connect_with(creds)
        with conn.cursor() as cur:  # something to copy for a moment
            cur.execute("CREATE TABLE big AS SELECT i, md5(i::text) AS m "
                        "FROM generate_series(1, 1500000) AS i")
        conn.close()
        op_id = request_backup(env.runtime, instance_id)
        worker = env.start_worker("killed")
        eventually(lambda: backup_processes(env, instance_id), "pgBackRest backing up", 120,
                   interval=0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        if also_pgbackrest:
            for pid in backup_processes(env, instance_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finish(env.engine, op_id)
        taken = backups_of(env, instance_id)
        assert [b["annotation"]["pgha-operation"] for b in taken] == [op_id]
        node = instance(env.runtime, instance_id).primary()
        assert node is not None
        for command in ("check", "verify"):
            out = pgbackrest(env.cloud, node, instance_id, command)
            assert out.returncode == 0, command + ": " + out.stderr + out.stdout
        with env.runtime.store.session() as s:
            op = s.get(Operation, op_id)
            assert op is not None and op.state == SUCCEEDED
