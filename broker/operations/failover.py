"""Failover: the primary is gone; fence it, promote the standby, move the address.

Queued by the monitor (`queue_failover`) with what it saw: the cause, when it
decided, the old primary, the standby and the primary's last LSN. Steps:

    record → check → clear_sync → fence → attach_port → promote → rebuild_queued

- check (reads only): ha-sync promotes only the standby recorded synchronous; ha
  refuses beyond `maximum_lag_on_failover` (against the primary's last LSN the
  monitor saw). Done before the fence so that a refusal leaves the old primary
  untouched (it may come back); the verdict cannot change after the fence, where
  the standby's position can only have grown.
- clear_sync: reset synchronous_standby_names on the standby (copied from the old
  primary) before it takes writes, so that the new primary never waits for itself.
- fence: stop the old primary's server through the cloud, confirmed, and unplug the
  service port from it. Nothing before this step changes anything; nothing after it
  runs unless the stop was confirmed. Unconfirmed → refused: the instance is
  `degraded` with the reason and nothing is promoted (apps never see two primaries).
- attach_port BEFORE promote: from the fence on the address answers nothing, and a
  client whose SYN is lost then waits for its timeout or TCP's 1 s retransmission;
  plugging the port in right after the fence keeps that dark window to the port
  move itself (~25 ms each way on the local cloud). The promotion (~0.1 s) then
  happens with the address in place: clients that connect meanwhile get a fast
  "read-only transaction" error and retry at once (measured on the local cloud, this
  order is better: 0.14-0.22 s to the first write, ~1.05 s only when a reconnect hit the move).
  The old primary is fenced by then, so no second writer can appear.
- promote: pg_promote (idempotent); the store's roles move; the event is stamped.
- rebuild_queued: a `rebuild` operation makes a new standby in the old primary's
  zone (rebuild.py); the instance stays `degraded` until it streams.

switchover.py, rebuild.py and resurrect.py hold the other workflows this module starts.
"""

from __future__ import annotations

from datetime import datetime

from broker.operations import promotion, queue
from broker.operations.engine import Context, Step, Workflow
from broker.operations.params import FailoverParams
from broker.operations.rebuild import KIND as REBUILD_KIND
from broker.operations.resurrect import KIND as RESURRECT_KIND
from broker.operations.switchover import KIND as SWITCHOVER_KIND
from broker.operations.switchover import start_switchover
from broker.store.db import Store
from broker.store.models import DEGRADED, Failover, utcnow

KIND = "failover"

__all__ = [
    "KIND",
    "REBUILD_KIND",
    "RESURRECT_KIND",
    "SWITCHOVER_KIND",
    "queue_failover",
    "start_switchover",
]


def queue_failover(store: Store, instance_id: str, *, kind: str, cause: str,
                   old_primary_id: str, standby_id: str | None, detected_at: datetime,
                   last_primary_lsn: int | None, detail: str | None = None,
                   owner: str | None = None) -> str:
    """Queue a failover (or, with kind "resurrect", a resurrect); returns its id.

    The caller (the monitor) has checked that no operation is unfinished. With
    `owner`, the row is born claimed by that engine (pre-claimed, see queue.py)."""
    with store.session() as s:
        params = FailoverParams(cause=cause, old_primary_id=old_primary_id,
                                standby_id=standby_id, detected_at=detected_at.isoformat(),
                                last_primary_lsn=last_primary_lsn, detail=detail)
        op = queue.new_operation(instance_id, kind, owner=owner, params=params,
                                 description=f"queued: {kind} ({cause})")
        s.add(op)
        return op.id


def record(ctx: Context) -> None:
    params = ctx.params_of(FailoverParams)
    cause = params.cause or "primary lost"
    promotion.record_event(ctx, kind=KIND, cause=cause, old_node_id=params.old_primary_id,
                           new_node_id=params.standby_id,
                           detected_at=params.detected() or utcnow(), detail=params.detail)
    promotion.set_state(ctx, DEGRADED, f"failing over: {cause}")


def fence(ctx: Context) -> None:
    old, _ = promotion.event_nodes(ctx)
    promotion.fence_or_refuse(ctx, old, "failover refused")


def check(ctx: Context) -> None:
    _, standby = promotion.event_nodes(ctx)
    if standby is None:
        raise promotion.refuse(ctx, "failover refused: the instance has no standby")
    promotion.check_eligible(ctx, standby)


def steps(ctx: Context) -> list[Step]:
    return [
        Step("record", "failover: recording the event", record),
        Step("check", "failover: checking that the standby may be promoted", check),
        promotion.clear_sync_step("failover"),
        Step("fence", "failover: fencing the old primary (stop, unplug the address)", fence),
        *promotion.promotion_steps("failover", done="failed over",
                                   rebuild_cause="replacing the failed primary"),
    ]


def cleanup(ctx: Context, reason: str) -> None:
    """A failover is never undone: the old primary is fenced or was never touched.
    Say what happened; the instance stays degraded with the reason."""
    row: Failover | None = promotion.get_event(ctx)
    if row is not None and row.outcome is None:
        promotion.set_outcome(ctx, "failed", reason)
    inst = ctx.instance()
    if inst.state != DEGRADED or not inst.state_reason:
        promotion.set_state(ctx, DEGRADED, f"failover failed: {reason}")
    elif reason not in inst.state_reason:
        promotion.set_state(ctx, DEGRADED, f"{inst.state_reason}; failover failed: {reason}")


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup, params=FailoverParams,
                    done="failed over; a standby is being rebuilt")

