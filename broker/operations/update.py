"""Update: change plan (replication mode, standby added or removed) and parameters.

Operation params (written by the API): ``{"plan_id": new plan id or None,
"parameters": {...} (merged over the instance's), "maintenance_version": str|None}``.

- ha ⇄ ha-sync: only synchronous_standby_names changes (ALTER SYSTEM + reload): no
  restart, no downtime. A standby that does not stream is never named (writes
  would hang): the update fails instead and says so.
- standalone → ha/ha-sync: a standby is added in a zone other than the primary's.
- ha/ha-sync → standalone: synchronous replication is cleared first, then the
  standby's slot is dropped and its server, volume and port deleted.

The step list is the same for every update; each step looks at the target plan
and at the nodes that exist and does only what is missing, so a rerun after a
crash (or a repeated update) does nothing twice. The instance is `updating`
meanwhile; `plan_id`, `parameters` and `maintenance_version` change at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.operations import node_access, node_create, node_teardown, promotion, rows
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.params import UpdateParams
from broker.operations.queue import new_operation
from broker.store.db import Store
from broker.store.models import (
    DEGRADED,
    NODE_CREATING,
    READY,
    STANDBY,
    UPDATING,
    Instance,
    Node,
)

KIND = "update"
# Actions, not settings: never stored with the instance's parameters.
TRANSIENT_PARAMETERS = ("switchover", "backup")


def start_update(store: Store, instance_id: str, *, plan_id: str | None = None,
                 parameters: dict[str, Any] | None = None,
                 maintenance_version: str | None = None) -> str:
    """Queue an update operation; returns the operation id."""
    with store.session() as s:
        op = new_operation(instance_id, KIND, description="queued: updating", params=UpdateParams(
            plan_id=plan_id, parameters=parameters or {}, maintenance_version=maintenance_version))
        s.add(op)
        return op.id


def merged_parameters(inst: Instance, update: dict[str, Any]) -> dict[str, Any]:
    out = dict(inst.parameters or {})
    out.update({k: v for k, v in update.items() if k not in TRANSIENT_PARAMETERS})
    return out


def _new_standby(ctx: Context) -> Node | None:
    """The standby this update is making, if the target plan wants one."""
    if not rows.target_plan(ctx).cloud.is_ha:
        return None
    standby = ctx.instance().standby()
    if standby is not None and standby.state == NODE_CREATING:
        return standby
    return None


def _on_new_standby(action: Callable[[Context, str], Any]) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        standby = _new_standby(ctx)
        if standby is not None:
            action(ctx, standby.id)
    return run


# --- steps --------------------------------------------------------------------
def begin(ctx: Context) -> None:
    inst = ctx.instance()
    if inst.primary() is None:
        raise StepFailed("the instance has no primary; it cannot be updated now")
    if inst.state != UPDATING:
        rows.update_instance(ctx, state=UPDATING)


def standby_node(ctx: Context) -> None:
    plan = rows.target_plan(ctx)
    inst = ctx.instance()
    if not plan.cloud.is_ha or inst.standby() is not None:
        return
    primary = rows.primary_node(ctx)
    rows.add_node(ctx, STANDBY, rows.other_zone(plan, primary.availability_zone))


def replication_mode(ctx: Context) -> None:
    plan = rows.target_plan(ctx)
    inst = ctx.instance()
    standby = inst.standby()
    wanted = standby.id if plan.cloud.replication == "sync" and standby is not None else None
    if plan.id == inst.plan_id and inst.sync_standby_node_id == wanted:
        # Parameters only: leave replication as it is (and never wait for a standby
        # that is down: the monitor and its rebuild look after that).
        return
    mode = plan.cloud.replication if plan.cloud.is_ha else "none"
    node_access.set_replication_mode(ctx, mode, record_sync=False)
    if mode == "sync" and standby is not None:
        # The instance took writes while asynchronous: the standby counts as
        # synchronous (promotable) only once it holds all of them.
        promotion.enable_sync(ctx, standby.id)


def remove_standby(ctx: Context) -> None:
    if rows.target_plan(ctx).cloud.is_ha:
        return
    inst = ctx.instance()
    primary = rows.primary_node(ctx)
    for node in inst.live_nodes():
        if node.id != primary.id:
            node_teardown.teardown_node(ctx, node.id)  # rewrites the primary's pg_hba


def parameters(ctx: Context) -> None:
    update = ctx.params_of(UpdateParams).parameters
    if update:
        node_access.apply_parameters(ctx, merged_parameters(ctx.instance(), update))


def finish(ctx: Context) -> None:
    plan = rows.target_plan(ctx)
    params = ctx.params_of(UpdateParams)
    update = params.parameters
    with ctx.store.session() as s:
        inst = s.get(Instance, ctx.instance_id)
        assert inst is not None
        inst.parameters = merged_parameters(inst, update)
        inst.plan_id = plan.id
        inst.replication = plan.cloud.replication
        inst.maintenance_version = params.maintenance_version or \
            inst.maintenance_version or plan.maintenance_version
        inst.state = READY
        inst.state_reason = None


def steps(ctx: Context) -> list[Step]:
    plan = rows.target_plan(ctx)
    inst = ctx.instance()
    primary = inst.primary()
    zone = "another zone"
    if primary is not None and plan.cloud.is_ha:
        zone = rows.other_zone(plan, primary.availability_zone)
    return [
        Step("begin", "updating", begin),
        Step("standby_node", f"adding a standby in {zone}", standby_node),
        Step("standby_port", f"adding a standby in {zone}: management port",
             _on_new_standby(node_create.ensure_management_port)),
        Step("standby_access", f"adding a standby in {zone}: replication slot",
             _on_new_standby(node_create.prepare_primary_for)),
        Step("standby_volume", f"adding a standby in {zone}: volume",
             _on_new_standby(node_create.ensure_volume)),
        Step("standby_server", f"adding a standby in {zone}: base backup",
             _on_new_standby(node_create.ensure_server)),
        Step("standby_streaming", f"adding a standby in {zone}: waiting for streaming",
             _on_new_standby(node_create.wait_standby_streaming)),
        Step("replication_mode", f"switching to {plan.cloud.replication} replication"
             if plan.cloud.is_ha else "switching off replication", replication_mode),
        Step("remove_standby", "removing the standby", remove_standby),
        Step("parameters", "applying parameters", parameters),
        Step("finish", "finishing", finish),
    ]


def cleanup(ctx: Context, reason: str) -> None:
    """After a permanent failure: remove a standby this update was still making and
    go back to what the old plan promises (as far as the nodes allow)."""
    inst = ctx.instance()
    old_plan = ctx.plan(inst.plan_id)
    primary = inst.primary()
    for node in inst.live_nodes():
        # A one-node plan has no standby but the one this update added; an HA plan
        # keeps its standby unless this update was still making it.
        made_here = not old_plan.cloud.is_ha or node.state == NODE_CREATING
        if node.role == STANDBY and made_here and node is not primary:
            node_teardown.teardown_node(ctx, node.id)
    inst = ctx.instance()
    state, why = READY, None
    if old_plan.cloud.is_ha and inst.standby() is None:
        state, why = DEGRADED, f"the update failed and the standby is gone: {reason}"
    elif inst.primary() is not None:
        try:
            node_access.set_replication_mode(
                ctx, old_plan.cloud.replication if old_plan.cloud.is_ha else "none")
        except Exception as exc:  # leave it to the monitor; say why
            state, why = DEGRADED, f"the update failed ({reason}); replication mode: {exc}"
    rows.update_instance(ctx, state=state, state_reason=why)


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup, done="updated",
                    params=UpdateParams)
