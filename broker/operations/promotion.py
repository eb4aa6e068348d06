"""The pieces failover, switchover, resurrect and rebuild share.

Rules they all keep:
- Fence before promote: the old primary is stopped through the cloud and the
  service port is unplugged from it before any other node may take writes. If the
  stop cannot be confirmed, nothing is promoted: apps must never see two primaries.
- Every helper is idempotent: it looks at the cloud and at PostgreSQL and does only
  what is missing, so a step cut short by a SIGKILL is simply run again.
- Node ids a workflow acts on are kept in its `Failover` event row (id = operation
  id), written by the first step; later steps read them from there, so a resumed
  operation acts on the same nodes even though the roles in the store have moved on.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg2

from broker.backup import names as backup_names
from broker.cloud.base import FenceError, ServerStatus
from broker.ha import rules
from broker.operations import node_access, node_create, queue, rows
from broker.operations.engine import Context, RetryLater, Step, StepFailed
from broker.operations.params import FailoverParams, RebuildParams
from broker.pg import handover, probe, replication
from broker.store.models import (
    DEGRADED,
    NODE_FENCED,
    NODE_RUNNING,
    OLD_PRIMARY,
    PRIMARY,
    STANDBY,
    Failover,
    Instance,
    Node,
    utcnow,
)

log = logging.getLogger(__name__)

# A standby replaced by a rebuild, waiting to be deleted (like OLD_PRIMARY).
OLD_STANDBY = "old-standby"

REBUILD = "rebuild"
# How long the sync step waits before giving the step back to the engine.
SYNC_WAIT_SLICE = 30.0


# --- the event row ------------------------------------------------------------
def event_id(ctx: Context) -> str:
    """The Failover row of this operation (a rebuild points at its failover's)."""
    failover_id = ctx.params.failover_id if isinstance(ctx.params, RebuildParams) else None
    return failover_id or ctx.operation_id


def get_event(ctx: Context) -> Failover | None:
    with ctx.store.session() as s:
        return s.get(Failover, event_id(ctx))


def record_event(ctx: Context, *, kind: str, cause: str, old_node_id: str | None,
                 new_node_id: str | None, detected_at: datetime | None = None,
                 detail: str | None = None) -> Failover:
    """The event row, once (a rerun finds the one it made)."""
    with ctx.store.session() as s:
        row = s.get(Failover, ctx.operation_id)
        if row is None:
            row = Failover(id=ctx.operation_id, instance_id=ctx.instance_id,
                           operation_id=ctx.operation_id, kind=kind, cause=cause,
                           old_primary_node_id=old_node_id, new_primary_node_id=new_node_id,
                           detected_at=detected_at or utcnow(), detail=detail)
            s.add(row)
        return row


def event_nodes(ctx: Context) -> tuple[str, str | None]:
    """(old primary, node taking over) as recorded by the first step. They never change
    once recorded, so one read serves every later step of this run."""
    cached = ctx.scratch.get("event_nodes")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    row = get_event(ctx)
    if row is None or not row.old_primary_node_id:
        raise StepFailed("the failover event of this operation is missing")
    nodes = (row.old_primary_node_id, row.new_primary_node_id)
    ctx.scratch["event_nodes"] = nodes
    return nodes


def stamp(ctx: Context, **values: Any) -> None:
    """Set event fields that are still empty (a rerun keeps the first timestamps)."""
    with ctx.store.session() as s:
        row = s.get(Failover, event_id(ctx))
        if row is None:
            return
        for key, value in values.items():
            if getattr(row, key) is None:
                setattr(row, key, value)


def set_outcome(ctx: Context, outcome: str, detail: str | None = None) -> None:
    with ctx.store.session() as s:
        row = s.get(Failover, event_id(ctx))
        if row is None:
            return
        row.outcome = outcome
        if detail:
            row.detail = f"{row.detail}; {detail}" if row.detail else detail


def set_state(ctx: Context, state: str, reason: str | None) -> None:
    rows.update_instance(ctx, state=state, state_reason=reason)


def refuse(ctx: Context, reason: str) -> StepFailed:
    """Record a refusal (nothing more is done) and return the error to raise."""
    set_outcome(ctx, "refused", reason)
    set_state(ctx, DEGRADED, reason)
    log.warning("instance %s: %s", ctx.instance_id, reason)
    return StepFailed(reason)


# --- nodes ----------------------------------------------------------------------
def node_row(ctx: Context, node_id: str) -> Node:
    with ctx.store.session() as s:
        node = s.get(Node, node_id)
        if node is None or node.instance_id != ctx.instance_id:
            raise StepFailed(f"node {node_id} is not in the state store")
        return node


def password(ctx: Context) -> str:
    return ctx.vault.decrypt(ctx.instance().admin_password_enc)


def probe_node(ctx: Context, node: Node, *, timeout: float = 3.0, tries: int = 3) -> probe.Probe:
    """The node's replication state; a few tries, because one lost SYN is not death."""
    if not node.management_address:
        raise StepFailed(f"node {node.id} has no management address")
    inst = ctx.instance()
    ca_pem, pw = node_access.node_ca(ctx, node.id, inst), node_access.admin_password(ctx, inst)
    result = probe.probe(node.management_address, pw, timeout=timeout, ca_pem=ca_pem)
    for _ in range(tries - 1):
        if result.ok:
            break
        time.sleep(0.3)
        result = probe.probe(node.management_address, pw, timeout=timeout, ca_pem=ca_pem)
    return result


# --- the service port -----------------------------------------------------------
def unplug_service_port(ctx: Context, server_id: str | None) -> None:
    """Detach the service port from `server_id` if it is plugged there."""
    inst = ctx.instance()
    if not server_id or not inst.service_port_id:
        return
    port = ctx.cloud.get_port(inst.service_port_id)
    if port is not None and port.device_id == server_id:
        ctx.cloud.detach_port(port.id, server_id)


def plug_service_port(ctx: Context, node_id: str) -> None:
    node_create.attach_service_port(ctx, node_id)
    stamp(ctx, port_attached_at=utcnow())


# --- fence ----------------------------------------------------------------------
def fence(ctx: Context, node_id: str, *, retired_role: str = OLD_PRIMARY) -> None:
    """Stop the node's server through the cloud, then unplug the service port from it.

    Raises FenceError (from the driver) when the stop cannot be confirmed; the
    caller must then not promote anything."""
    node = node_row(ctx, node_id)
    if node.server_id:
        server = ctx.cloud.get_server(node.server_id)
        if server is not None and server.status != ServerStatus.SHUTOFF:
            ctx.cloud.stop_server(node.server_id)
    unplug_service_port(ctx, node.server_id)
    values: dict[str, Any] = {}
    if node.state != NODE_FENCED:
        values["state"] = NODE_FENCED
    if node.role != retired_role:
        values["role"] = retired_role
    if values:
        rows.update_node(ctx, node_id, **values)
    stamp(ctx, fenced_at=utcnow())


def fence_or_refuse(ctx: Context, node_id: str, what: str) -> None:
    """Fence; when the cloud cannot confirm the stop, degrade and stop here."""
    try:
        fence(ctx, node_id)
    except FenceError as exc:
        raise refuse(ctx, f"{what}: the old primary could not be confirmed stopped "
                          f"({' '.join(str(exc).split())}); the standby was not promoted so "
                          "that apps never see two primaries") from None


# --- promote --------------------------------------------------------------------
def clear_sync_on(ctx: Context, node: Node) -> None:
    """Get the standby about to be promoted ready for it (handover.prepare_for_promotion);
    synchronous_standby_names is reset again right after the promotion."""
    try:
        with node_access.admin_connection(ctx, node, timeout=3.0) as conn:
            handover.prepare_for_promotion(conn)
    except psycopg2.Error as exc:
        log.info("instance %s: standby not prepared before promotion (%s); "
                 "synchronous_standby_names is reset right after", ctx.instance_id,
                 exc.__class__.__name__)


def promote(ctx: Context, node_id: str) -> None:
    """pg_promote (idempotent), then make the node the instance's primary in the store."""
    node = node_row(ctx, node_id)
    if node.volume_id:  # the old primary is fenced: one writer at a time
        ctx.cloud.hand_repository_to(backup_names.stanza(ctx.instance_id), node.volume_id)
    with node_access.admin_connection(ctx, node, timeout=5.0) as conn:
        replication.promote(conn, timeout=30.0)
        replication.set_synchronous_standby(conn, None)
    now = utcnow()
    with ctx.store.session() as s:
        row = s.get(Node, node_id)
        inst = s.get(Instance, ctx.instance_id)
        assert row is not None and inst is not None
        row.role = PRIMARY
        row.state = NODE_RUNNING
        # Nothing is synchronous until a new standby has caught up (non-strict mode).
        inst.sync_standby_node_id = None
        inst.last_failover_at = now
    stamp(ctx, promoted_at=now)


def check_eligible(ctx: Context, standby_id: str) -> None:
    """May this standby become primary without losing what the plan promises?

    - ha-sync: only the standby the monitor recorded as synchronous (it has flushed
      every acknowledged commit).
    - ha: only if it is at most `maximum_lag_on_failover` bytes behind the last
      position the monitor saw on the primary.
    A standby already promoted by an earlier run of this operation passed before."""
    standby = node_row(ctx, standby_id)
    seen = probe_node(ctx, standby)
    if not seen.ok:
        raise refuse(ctx, f"the standby {standby_id} does not answer ({seen.error}): "
                          "there is nothing to promote")
    if not seen.in_recovery:
        return
    inst = ctx.instance()
    last_primary = (ctx.params.last_primary_lsn if isinstance(ctx.params, FailoverParams)
                    else None)
    lag = rules.lag_at_failover(int(last_primary) if last_primary is not None else None,
                                seen.lsn, seen.receive_lsn, inst.last_lag_bytes)
    refusal = rules.failover_refusal(
        replication=inst.replication, standby_id=standby_id,
        sync_standby_id=inst.sync_standby_node_id, lag=lag,
        limit=ctx.settings.monitor.maximum_lag_on_failover)
    if refusal is not None:
        raise refuse(ctx, f"failover refused: {refusal}")
    stamp(ctx, lag_bytes_at_promotion=lag if lag is not None else 0)


# --- synchronous replication ------------------------------------------------------
def unsync(ctx: Context) -> None:
    """Non-strict synchronous mode: the primary stops waiting for its standby, so that
    it stays writable (rules.unsync: the store forgets the standby first)."""
    inst = ctx.instance()
    primary = inst.primary()

    def forget() -> None:
        if inst.sync_standby_node_id is not None:
            rows.update_instance(ctx, sync_standby_node_id=None)

    def clear() -> None:
        if inst.replication != rules.SYNC or primary is None:
            return
        with node_access.admin_connection(ctx, primary, timeout=3.0) as conn:
            replication.set_synchronous_standby(conn, None)

    rules.unsync(forget, clear)


def enable_sync(ctx: Context, standby_id: str, *, timeout: float = SYNC_WAIT_SLICE) -> None:
    """Name the standby in synchronous_standby_names and record it as synchronous
    once rules.confirm_sync says it holds every acknowledged commit."""
    primary = rows.primary_node(ctx)
    standby = node_row(ctx, standby_id)
    name = standby.application_name
    with node_access.admin_connection(ctx, primary, timeout=5.0) as conn:
        replication.set_synchronous_standby(conn, name)
    deadline = time.monotonic() + timeout
    mark: rules.SyncMark | None = None
    pw = password(ctx)
    ca_pem = node_access.node_ca(ctx, primary.id)
    assert primary.management_address is not None
    while time.monotonic() < deadline:
        seen = probe.probe(primary.management_address, pw, timeout=3.0, ca_pem=ca_pem)
        replica = seen.replica(name) if seen.ok else None
        confirmed, mark = rules.confirm_sync(
            mark, standby_id, streaming=replica is not None and replica.state == "streaming",
            sync_state=replica.sync_state if replica is not None else "",
            primary_lsn=seen.lsn, flush_lsn=replica.flush_lsn if replica is not None else None)
        if confirmed:
            rows.update_instance(ctx, sync_standby_node_id=standby_id)
            return
        time.sleep(0.1)
    raise RetryLater(f"standby {standby_id} is not synchronous yet", delay=1.0)


# --- operations -------------------------------------------------------------------
def derived_id(operation_id: str, purpose: str) -> str:
    """A stable id for what an operation makes (a rerun finds the same one)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pgha:{purpose}:{operation_id}"))


def derived_node_id(operation_id: str) -> str:
    return hashlib.sha256(f"node:{operation_id}".encode()).hexdigest()[:8]


def queue_rebuild(ctx: Context, replace_node_id: str, cause: str) -> str:
    """Queue the rebuild of a standby in `replace_node_id`'s zone (once per operation);
    it runs when this operation has finished (next, when a monitor runner runs this)."""
    op_id = derived_id(ctx.operation_id, REBUILD)
    zone = node_row(ctx, replace_node_id).availability_zone
    with ctx.store.session() as s:
        params = RebuildParams(replace_node_id=replace_node_id, cause=cause,
                               failover_id=event_id(ctx))
        queue.enqueue_follow_up(s, ctx.operation_id, op_id, ctx.instance_id, REBUILD,
                                params=params,
                                description=f"queued: rebuilding a standby in {zone}")
    return op_id


def standby_of(inst: Instance, exclude: str | None = None) -> Node | None:
    return next((n for n in inst.live_nodes() if n.role == STANDBY and n.id != exclude), None)


# --- steps shared by failover and switchover (they differ in how they start) ---------
def step_clear_sync(ctx: Context) -> None:
    """Reset synchronous_standby_names on the node about to be promoted."""
    _, new = event_nodes(ctx)
    assert new is not None
    clear_sync_on(ctx, node_row(ctx, new))


def step_attach_port(ctx: Context) -> None:
    _, new = event_nodes(ctx)
    assert new is not None
    plug_service_port(ctx, new)


def step_promote(done: str) -> Callable[[Context], None]:
    """Promote the event's new primary; `done` names the event in the state reason."""
    def run(ctx: Context) -> None:
        old, new = event_nodes(ctx)
        assert new is not None
        promote(ctx, new)
        node_access.refresh_peers_hba(ctx)  # the fenced old primary may replicate no more
        zone = node_row(ctx, old).availability_zone
        set_state(ctx, DEGRADED, f"{done} to {new}; rebuilding a standby in {zone}")
    return run


def step_queue_rebuild(cause: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        old, _ = event_nodes(ctx)
        queue_rebuild(ctx, old, cause)
        set_outcome(ctx, "succeeded")
    return run


def clear_sync_step(kind: str) -> Step:
    return Step("clear_sync", f"{kind}: clearing synchronous replication on the standby",
                step_clear_sync)


def promotion_steps(kind: str, *, done: str, rebuild_cause: str) -> list[Step]:
    """The last steps of a failover or switchover, once the old primary is fenced."""
    return [
        Step("attach_port", f"{kind}: moving the service address to the standby",
             step_attach_port),
        Step("promote", f"{kind}: promoting the standby", step_promote(done)),
        Step("rebuild_queued", f"{kind}: queueing the rebuild of a standby",
             step_queue_rebuild(rebuild_cause)),
    ]
