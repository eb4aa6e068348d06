"""Deprovision: delete everything of an instance, found by its rows and by its tags.

First a backup in progress is stopped (operations/backup.py). Then the backup
repository is kept (its last WAL archived) for the plan's restore
window; a worker purges it after that. Then servers (deleting a server frees its
ports and volumes), volumes, ports and the server group; then the rows: nodes and
bindings deleted, the instance `deprovisioned`. Each step only deletes (deleting
what is gone is quiet), so the operation is safe to repeat and also cleans up a
half-made instance.
"""

from __future__ import annotations

from sqlalchemy import select

from broker.operations import backup, node_teardown, rows
from broker.operations.engine import Context, Step, Workflow
from broker.operations.queue import new_operation
from broker.store.db import Store
from broker.store.models import (
    BINDING_DELETED,
    DEPROVISIONED,
    DEPROVISIONING,
    Binding,
    Instance,
    utcnow,
)

KIND = "deprovision"


def start_deprovision(store: Store, instance_id: str) -> str:
    """Queue a deprovision operation for the instance; returns the operation id."""
    with store.session() as s:
        op = new_operation(instance_id, KIND, description="queued: deprovisioning")
        s.add(op)
        return op.id


def begin(ctx: Context) -> None:
    inst = ctx.instance()
    if inst.state != DEPROVISIONED:
        rows.update_instance(ctx, state=DEPROVISIONING)


def finish(ctx: Context) -> None:
    node_teardown.mark_nodes_deleted(ctx)
    now = utcnow()
    with ctx.store.session() as s:
        for binding in s.scalars(select(Binding).where(
                Binding.instance_id == ctx.instance_id)):
            if binding.state != BINDING_DELETED:
                binding.state = BINDING_DELETED
                binding.deleted_at = now
        inst = s.get(Instance, ctx.instance_id)
        assert inst is not None
        inst.state = DEPROVISIONED
        inst.state_reason = None
        inst.deleted_at = inst.deleted_at or now


def steps(ctx: Context) -> list[Step]:
    return [
        Step("begin", "deprovisioning", begin),
        Step("stop_backups", "stopping any backup in progress", backup.stop_backups),
        Step("keep_backups", "archiving the last WAL, keeping the backups",
             backup.keep_repository),
        Step("servers", "deleting the servers", node_teardown.delete_servers),
        Step("volumes", "deleting the volumes", node_teardown.delete_volumes),
        Step("ports", "deleting the service port and management ports", node_teardown.delete_ports),
        Step("server_group", "deleting the server group", node_teardown.delete_server_group),
        Step("finish", "finishing", finish),
    ]


WORKFLOW = Workflow(kind=KIND, steps=steps, done="deprovisioned")
