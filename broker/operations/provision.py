"""Provision: build an instance's nodes, service port and database, step by step.

For an HA plan (primary in zones[0], standby in zones[1], never the same zone):

    nodes → server group → service port → management ports (all nodes, so each
    node's pg_hba knows its peers before boot) → primary volume → primary server
    → primary ready → database (objects, extensions, statement_timeout) → service
    address on the primary → standby slot → standby volume → standby server (base
    backup) → standby streaming → synchronous replication (ha-sync) → ready.

A standalone plan skips the standby steps. Every step adopts what a previous run
of it made, so the operation resumes after a SIGKILL at any point. A permanent
failure tears down every cloud resource of the instance and leaves it `failed`
with the reason; the platform's DELETE then finishes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.catalog import Plan
from broker.crypto import Vault, new_password
from broker.operations import naming, node_access, node_create, node_teardown, restore, rows
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.queue import new_operation
from broker.pg import tenants
from broker.store.db import Store
from broker.store.models import (
    FAILED,
    NODE_RUNNING,
    PRIMARY,
    PROVISIONING,
    READY,
    STANDBY,
    Instance,
    Node,
)

KIND = "provision"


def new_instance(vault: Vault, plan: Plan, instance_id: str, *, organization_guid: str,
                 space_guid: str, parameters: dict[str, Any] | None = None,
                 context: dict[str, Any] | None = None) -> Instance:
    """A provisioning Instance row with fresh cluster passwords (encrypted)."""
    return Instance(
        id=instance_id, service_id=plan.service_id, plan_id=plan.id,
        organization_guid=organization_guid, space_guid=space_guid,
        context=context or {}, parameters=parameters or {},
        maintenance_version=plan.maintenance_version, state=PROVISIONING,
        replication=plan.cloud.replication,
        admin_password_enc=vault.encrypt(new_password()),
        replication_password_enc=vault.encrypt(new_password()),
    )


def start_provision(store: Store, vault: Vault, plan: Plan, instance_id: str, *,
                    organization_guid: str = "org", space_guid: str = "space",
                    parameters: dict[str, Any] | None = None,
                    context: dict[str, Any] | None = None) -> str:
    """Add the instance and its queued provision operation; returns the operation id."""
    with store.session() as s:
        s.add(new_instance(vault, plan, instance_id, organization_guid=organization_guid,
                           space_guid=space_guid, parameters=parameters, context=context))
        s.flush()
        op = new_operation(instance_id, KIND, description="queued: provisioning")
        s.add(op)
        return op.id


# --- steps --------------------------------------------------------------------
def _node(ctx: Context, role: str) -> Node:
    inst = ctx.instance()
    node = next((n for n in inst.live_nodes() if n.role == role), None)
    if node is None:
        raise StepFailed(f"the instance has no {role} node")
    return node


def _on(role: str, action: Callable[[Context, str], object]) -> Callable[[Context], None]:
    """A step that runs a node action on the instance's node of `role`."""
    def run(ctx: Context) -> None:
        action(ctx, _node(ctx, role).id)
    return run


def plan_nodes(ctx: Context) -> None:
    """The Node rows, once: primary in the plan's first zone, standby in another."""
    inst = ctx.instance()
    if inst.live_nodes():
        return  # a previous run of this step made them
    plan = ctx.plan()
    primary_zone = plan.cloud.availability_zones[0]
    with ctx.store.session() as s:
        ids = [naming.new_node_id() for _ in range(plan.cloud.nodes)]
        s.add(Node(id=ids[0], instance_id=inst.id, role=PRIMARY, availability_zone=primary_zone,
                   slot_name=naming.slot_name(ids[0])))
        if plan.cloud.is_ha:
            s.add(Node(id=ids[1], instance_id=inst.id, role=STANDBY,
                       availability_zone=rows.other_zone(plan, primary_zone),
                       slot_name=naming.slot_name(ids[1])))


def management_ports(ctx: Context) -> None:
    for node in ctx.instance().live_nodes():
        node_create.ensure_management_port(ctx, node.id)


def database(ctx: Context) -> None:
    inst = ctx.instance()
    primary = _node(ctx, PRIMARY)
    with node_access.admin_connection(ctx, primary) as conn:
        tenants.ensure_cluster_objects(
            conn, replication_password=ctx.vault.decrypt(inst.replication_password_enc))
    node_access.apply_parameters(ctx, inst.parameters or {})


def synchronous(ctx: Context) -> None:
    node_access.set_replication_mode(ctx, ctx.plan().cloud.replication)


def ready(ctx: Context) -> None:
    with ctx.store.session() as s:
        inst = s.get(Instance, ctx.instance_id)
        assert inst is not None
        for node in inst.live_nodes():
            node.state = NODE_RUNNING
        inst.state = READY
        inst.state_reason = None


def steps(ctx: Context) -> list[Step]:
    plan = ctx.plan()
    zones = plan.cloud.availability_zones
    primary = f"creating primary in {zones[0]}"
    restoring = restore.source_of(ctx) is not None
    out = [
        Step("nodes", "planning the nodes", plan_nodes),
        *([Step("seal_source", "restoring: archiving the source's latest WAL",
                restore.seal_source)] if restoring else []),
        Step("server_group", "creating the server group", node_create.ensure_server_group),
        Step("service_port", "creating the service port", node_create.ensure_service_port),
        Step("management_ports", "creating the management ports", management_ports),
        Step("primary_volume", f"{primary}: volume", _on(PRIMARY, node_create.ensure_volume)),
        Step("primary_server", f"{primary}: server", _on(PRIMARY, node_create.ensure_server)),
        *([Step("restored", f"{primary}: taking over the restored cluster", restore.adopt)]
          if restoring else []),
        Step("primary_ready", f"{primary}: starting PostgreSQL",
             _on(PRIMARY, node_create.wait_node_ready)),
        Step("database", "creating the database", database),
        Step("service_address", "attaching the service address to the primary",
             _on(PRIMARY, node_create.attach_service_port)),
    ]
    if plan.cloud.is_ha:
        standby = f"creating standby in {rows.other_zone(plan, zones[0])}"
        out += [
            Step("standby_slot", f"{standby}: replication slot",
                 _on(STANDBY, node_create.prepare_primary_for)),
            Step("standby_volume", f"{standby}: volume", _on(STANDBY, node_create.ensure_volume)),
            Step("standby_server", f"{standby}: base backup",
                 _on(STANDBY, node_create.ensure_server)),
            Step("standby_streaming", f"{standby}: waiting for streaming",
                 _on(STANDBY, node_create.wait_standby_streaming)),
        ]
        if plan.cloud.replication == "sync":
            out.append(Step("synchronous", "switching on synchronous replication", synchronous))
    out.append(Step("ready", "finishing", ready))
    return out


def cleanup(ctx: Context, reason: str) -> None:
    """After a permanent failure: nothing of the instance stays in the cloud.

    The instance is `failed` first, so that it says why even if the teardown itself
    fails (the platform's DELETE then tries the teardown again)."""
    rows.update_instance(ctx, state=FAILED, state_reason=reason, sync_standby_node_id=None)
    node_teardown.teardown_instance(ctx)


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup, done="ready")
