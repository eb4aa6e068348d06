"""Planned switchover: promote the standby with no acknowledged commit lost, even in ha.

Queued by the API on ``{"switchover": true}`` and by
``python -m broker instances switchover ID`` (`start_switchover`), with the same
preconditions (`requests.queue_switchover`); and, as HOME_KIND, by the engines to move
a primary left in a fallback zone back to the plan's zones (zones.py): the same
steps, but not the platform's operation, so a deprovision waits behind it as behind
a failover. Steps:

    record → check → stop_writes → wait_replay → fence → clear_sync → attach_port
    → promote → rebuild_queued

- stop_writes: unplug the service port from the primary, shut apps out of its
  pg_hba, make it read-only by default (ALTER SYSTEM: not replicated) and end
  every client session. From here no app can commit on the old primary.
- wait_replay: read the old primary's final WAL position; wait until the standby
  has replayed it. Every commit ever acknowledged is now on the standby, also with
  asynchronous replication.
- fence, then promote and move the port exactly as a failover does.
A failure before the promotion rolls back (apps let in again, read-write, port
plugged back): the old primary simply stays the primary.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from broker.operations import node_access, node_create, promotion, requests, rows
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.refusals import UnknownInstance
from broker.pg import handover, hba
from broker.store.db import Store
from broker.store.models import DEGRADED, NODE_FENCED, NODE_RUNNING, PRIMARY, READY

log = logging.getLogger(__name__)

KIND = "switchover"
HOME_KIND = "switchover-home"
REPLAY_TIMEOUT = 60.0


def start_switchover(store: Store, instance_id: str) -> str:
    """Queue a switchover (a worker runs it); returns the operation id. Raises a
    `Refused` when the preconditions, the same as the API's, do not hold."""
    with store.session() as s:
        inst = requests.live_instance(s, instance_id)
        if inst is None:
            raise UnknownInstance(f"instance {instance_id} does not exist")
        return requests.queue_switchover(s, inst).id


def _hba(ctx: Context, node_id: str, *, apps: bool) -> list[str]:
    admin_cidrs, app_cidrs = node_access.access_cidrs(ctx, ctx.plan())
    peers = node_access.peer_addresses(ctx.instance(), node_id)
    return hba.render_hba(admin_cidrs=list(admin_cidrs), peer_addresses=list(peers),
                          app_cidrs=list(app_cidrs) if apps else [],
                          tls=node_access.node_ca(ctx, node_id) is not None)


# --- steps ---------------------------------------------------------------------------
def record(ctx: Context) -> None:
    inst = ctx.instance()
    primary, standby = inst.primary(), promotion.standby_of(inst)
    if primary is None or standby is None:
        raise StepFailed("switchover refused: the instance needs a primary and a standby")
    cause = "planned switchover"
    if ctx.kind == HOME_KIND:
        cause = (f"returning the primary from the fallback zone {primary.availability_zone} "
                 f"to {standby.availability_zone}")
    promotion.record_event(ctx, kind=KIND, cause=cause, old_node_id=primary.id,
                           new_node_id=standby.id)


def check(ctx: Context) -> None:
    old, new = promotion.event_nodes(ctx)
    assert new is not None
    primary = promotion.probe_node(ctx, promotion.node_row(ctx, old))
    standby_node = promotion.node_row(ctx, new)
    standby = promotion.probe_node(ctx, standby_node)
    if not primary.ok or primary.in_recovery:
        raise StepFailed(f"switchover refused: the primary is not healthy "
                         f"({primary.error or 'in recovery'}); nothing was changed")
    if not standby.ok or not standby.in_recovery:
        raise StepFailed(f"switchover refused: the standby is not healthy "
                         f"({standby.error or 'not in recovery'}); nothing was changed")
    replica = primary.replica(standby_node.application_name)
    if replica is None or replica.state != "streaming":
        raise StepFailed("switchover refused: the standby does not stream; nothing was changed")


def stop_writes(ctx: Context) -> None:
    old, _ = promotion.event_nodes(ctx)
    node = promotion.node_row(ctx, old)
    promotion.unplug_service_port(ctx, node.server_id)
    with node_access.admin_connection(ctx, node) as conn:
        hba.set_hba(conn, _hba(ctx, old, apps=False))
        handover.set_read_only(conn, True)
        if not handover.end_client_sessions(conn):
            raise StepFailed("client sessions on the primary did not end")
    log.info("instance %s: switchover: writes stopped on %s", ctx.instance_id, old)


def wait_replay(ctx: Context) -> None:
    old, new = promotion.event_nodes(ctx)
    assert new is not None
    with node_access.admin_connection(ctx, promotion.node_row(ctx, old)) as conn:
        final = handover.current_lsn(conn)
    standby = promotion.node_row(ctx, new)
    deadline = time.monotonic() + REPLAY_TIMEOUT
    while True:
        seen = promotion.probe_node(ctx, standby)
        if seen.ok and seen.lsn is not None and seen.lsn >= final:
            promotion.stamp(ctx, lag_bytes_at_promotion=0)
            return
        if time.monotonic() > deadline:
            raise StepFailed(f"the standby did not replay the primary's final position within "
                             f"{REPLAY_TIMEOUT:.0f} s")
        time.sleep(0.02)


def fence(ctx: Context) -> None:
    old, _ = promotion.event_nodes(ctx)
    promotion.fence_or_refuse(ctx, old, "switchover stopped")


def steps(ctx: Context) -> list[Step]:
    return [
        Step("record", "switchover: recording the event", record),
        Step("check", "switchover: checking primary and standby", check),
        Step("stop_writes", "switchover: stopping writes on the primary", stop_writes),
        Step("wait_replay", "switchover: waiting for the standby to replay everything",
             wait_replay),
        Step("fence", "switchover: stopping the old primary", fence),
        promotion.clear_sync_step("switchover"),
        *promotion.promotion_steps(
            "switchover", done="switched over",
            rebuild_cause="replacing the old primary after a switchover"),
    ]


def cleanup(ctx: Context, reason: str) -> None:
    """Before the promotion: undo stop_writes, the old primary stays the primary."""
    event = promotion.get_event(ctx)
    if event is None or not event.old_primary_node_id:
        return  # failed in `record`: nothing was touched
    old = promotion.node_row(ctx, event.old_primary_node_id)
    promoted = event.promoted_at is not None
    if promoted or old.state == NODE_FENCED:
        promotion.set_outcome(ctx, "failed", reason)
        promotion.set_state(ctx, DEGRADED, f"switchover failed after fencing: {reason}")
        return
    with node_access.admin_connection(ctx, old) as conn:
        hba.set_hba(conn, _hba(ctx, old.id, apps=True))
        handover.set_read_only(conn, False)
    node_create.attach_service_port(ctx, old.id)
    if old.role != PRIMARY or old.state != NODE_RUNNING:
        rows.update_node(ctx, old.id, role=PRIMARY, state=NODE_RUNNING)
    promotion.set_outcome(ctx, "failed", f"{reason}; rolled back, {old.id} stays the primary")
    promotion.set_state(ctx, READY, None)


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup,
                    done="switched over; a standby is being rebuilt")
HOME_WORKFLOW = dataclasses.replace(
    WORKFLOW, kind=HOME_KIND,
    done="switched the primary back to the plan's zones; a standby is being rebuilt")
