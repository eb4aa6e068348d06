"""Reading and writing an operation's instance and node rows in the state store.

Rows are updated only with what the cloud returned, so a re-run step finds them
as the previous run left them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from broker.catalog import Plan
from broker.operations.engine import Context, StepFailed
from broker.operations.naming import new_node_id, slot_name
from broker.operations.params import UpdateParams
from broker.store.models import (
    NODE_CREATING,
    Instance,
    Node,
    Operation,
    aware,
    utcnow,
)


def target_plan(ctx: Context, inst: Instance | None = None) -> Plan:
    """The plan the instance is being built for: an update's new plan, else its own
    (`inst`: the caller's fresh read, to spare one)."""
    plan_id = ctx.params.plan_id if isinstance(ctx.params, UpdateParams) else None
    return ctx.plan(plan_id or (inst.plan_id if inst is not None else None))


def get_node(ctx: Context, node_id: str, inst: Instance | None = None) -> Node:
    """The node as the store has it now (`inst`: the caller's fresh read, to spare one)."""
    inst = inst or ctx.instance()
    node = next((n for n in inst.nodes if n.id == node_id), None)
    if node is None:
        raise StepFailed(f"node {node_id} is not in the state store")
    return node


def update_node(ctx: Context, node_id: str, **values: Any) -> None:
    with ctx.store.session() as s:
        node = s.get(Node, node_id)
        if node is None:
            raise StepFailed(f"node {node_id} is not in the state store")
        for key, value in values.items():
            setattr(node, key, value)


def update_instance(ctx: Context, **values: Any) -> None:
    with ctx.store.session() as s:
        inst = s.get(Instance, ctx.instance_id)
        if inst is None:
            raise StepFailed(f"instance {ctx.instance_id} is not in the state store")
        for key, value in values.items():
            setattr(inst, key, value)


def add_node(ctx: Context, role: str, zone: str) -> str:
    """A new Node row (state creating); returns its id. Not idempotent on its own:
    callers first look for the node a previous run of the same step made."""
    node_id = new_node_id()
    with ctx.store.session() as s:
        s.add(Node(id=node_id, instance_id=ctx.instance_id, role=role, state=NODE_CREATING,
                   availability_zone=zone, slot_name=slot_name(node_id)))
    return node_id


def other_zone(plan: Plan, zone: str) -> str:
    """A zone of the plan that is not `zone`: the standby never shares the primary's."""
    for candidate in plan.cloud.availability_zones:
        if candidate != zone:
            return candidate
    raise StepFailed(f"plan {plan.name} has no availability zone other than {zone} "
                     "for the standby")


def operation_age(ctx: Context) -> timedelta:
    with ctx.store.session() as s:
        op = s.get(Operation, ctx.operation_id)
        started = aware(op.created_at) if op is not None else None
    return utcnow() - started if started is not None else timedelta(0)


def primary_node(ctx: Context) -> Node:
    node = ctx.instance().primary()
    if node is None:
        raise StepFailed("the instance has no primary node")
    return node
