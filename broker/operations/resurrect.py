"""Resurrect a standalone instance: a new server in the same zone on the same volume.

Queued by the monitor when a one-node instance's server is lost. Slower than a
failover (a server boots) but automatic, and the data survives because the volume
moves. Steps:

    record → fence → node → port → server → ready → attach_port → remove_old

- fence: stop the dead server through the cloud and unplug the service port. On a
  dead host the stop may never be confirmed; the volume is then force-detached
  (Cinder os-force_detach on OpenStack), which cuts the old server off from the
  data as surely as a stop would. If even that fails, nothing more is done.
- node/port/server: a new node row that takes over the volume, its management
  port, and a server booted on that volume (the guest bootstrap finds the data
  directory and starts PostgreSQL on it, no initdb).
- attach_port: the service address, as before.
- remove_old: the old server and management port; never the volume.
"""

from __future__ import annotations

import logging

from broker.cloud.base import CloudError, FenceError
from broker.operations import naming, node_access, node_create, node_teardown, promotion, rows
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.params import FailoverParams
from broker.store.models import (
    DEGRADED,
    NODE_CREATING,
    NODE_DELETED,
    NODE_FENCED,
    NODE_RUNNING,
    OLD_PRIMARY,
    PRIMARY,
    READY,
    Node,
    utcnow,
)

log = logging.getLogger(__name__)

KIND = "resurrect"


def _new_node_id(ctx: Context) -> str:
    return promotion.derived_node_id(ctx.operation_id)


def record(ctx: Context) -> None:
    params = ctx.params_of(FailoverParams)
    cause = params.cause or "server lost"
    promotion.record_event(ctx, kind=KIND, cause=cause, old_node_id=params.old_primary_id,
                           new_node_id=_new_node_id(ctx), detected_at=params.detected(),
                           detail=params.detail)
    promotion.set_state(ctx, DEGRADED, f"resurrecting: {cause}")


def fence(ctx: Context) -> None:
    old_id, _ = promotion.event_nodes(ctx)
    old = promotion.node_row(ctx, old_id)
    try:
        promotion.fence(ctx, old_id)
    except FenceError as exc:
        log.warning("instance %s: server of %s not confirmed stopped (%s); force-detaching "
                    "its volume and port instead", ctx.instance_id, old_id, exc)
        promotion.unplug_service_port(ctx, old.server_id)
        promotion.set_outcome(ctx, "in progress", "stop not confirmed: fenced by detaching "
                                                  "the volume and the service port")
    volume_id = old.volume_id  # still the old node's: the `node` step moves it later
    if volume_id and old.server_id:
        volume = ctx.cloud.get_volume(volume_id)
        if volume is not None and volume.attached_to == old.server_id:
            try:
                ctx.cloud.detach_volume(volume_id, old.server_id, force=True)
            except CloudError as exc:
                raise promotion.refuse(ctx, f"resurrect stopped: the volume could not be "
                                            f"detached from the lost server ({exc})") from None
    if old.state != NODE_FENCED or old.role != OLD_PRIMARY:
        rows.update_node(ctx, old_id, state=NODE_FENCED, role=OLD_PRIMARY)
    promotion.stamp(ctx, fenced_at=utcnow())


def node(ctx: Context) -> None:
    """The new node takes the volume over (one transaction: it is never in two rows)."""
    old_id, _ = promotion.event_nodes(ctx)
    new_id = _new_node_id(ctx)
    with ctx.store.session() as s:
        if s.get(Node, new_id) is not None:
            return
        old = s.get(Node, old_id)
        if old is None or not old.volume_id:
            raise StepFailed("the lost node's volume is not known: nothing to resurrect")
        s.add(Node(id=new_id, instance_id=ctx.instance_id, role=PRIMARY, state=NODE_CREATING,
                   availability_zone=old.availability_zone, volume_id=old.volume_id,
                   slot_name=naming.slot_name(new_id)))
        old.volume_id = None


def port(ctx: Context) -> None:
    node_create.ensure_management_port(ctx, _new_node_id(ctx))


def server(ctx: Context) -> None:
    # The volume holds the instance's data: the guest must never format it.
    node_create.ensure_server(ctx, _new_node_id(ctx), volume_is_new=False)


def ready(ctx: Context) -> None:
    new_id = _new_node_id(ctx)
    node_create.wait_node_ready(ctx, new_id)
    node_access.refresh_hba(ctx, new_id)  # the data directory kept the old node's pg_hba
    rows.update_node(ctx, new_id, state=NODE_RUNNING)
    promotion.stamp(ctx, promoted_at=utcnow())


def attach_port(ctx: Context) -> None:
    promotion.plug_service_port(ctx, _new_node_id(ctx))


def remove_old(ctx: Context) -> None:
    """The old server and management port; the volume now belongs to the new node."""
    old_id, _ = promotion.event_nodes(ctx)
    old = promotion.node_row(ctx, old_id)
    if old.state == NODE_DELETED:
        return
    node_teardown.teardown_node(ctx, old_id, drop_slot=False, keep_volumes=True)
    rows.update_instance(ctx, state=READY, state_reason=None, last_failover_at=utcnow())
    promotion.set_outcome(ctx, "succeeded")


def steps(ctx: Context) -> list[Step]:
    return [
        Step("record", "resurrect: recording the event", record),
        Step("fence", "resurrect: fencing the lost server, detaching its volume", fence),
        Step("node", "resurrect: a new node for the volume", node),
        Step("port", "resurrect: management port", port),
        Step("server", "resurrect: booting a server on the volume", server),
        Step("ready", "resurrect: starting PostgreSQL", ready),
        Step("attach_port", "resurrect: moving the service address", attach_port),
        Step("remove_old", "resurrect: deleting the lost server", remove_old),
    ]


def cleanup(ctx: Context, reason: str) -> None:
    event = promotion.get_event(ctx)
    if event is not None and event.outcome in (None, "in progress"):
        promotion.set_outcome(ctx, "failed", reason)
    promotion.set_state(ctx, DEGRADED, f"resurrect failed: {reason}")


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup, params=FailoverParams,
                    done="resurrected on a new server")
