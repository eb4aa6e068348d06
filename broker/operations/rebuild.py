"""Rebuild: a new standby in the zone of the node it replaces, then the old one goes.

Queued after a failover/switchover (the old primary is replaced) and by the
monitor when a standby died (or is missing). Params:
``{"replace_node_id": id or None, "cause": str, "failover_id": event id or None}``.

    retire → node → port → access → volume → server → streaming → synchronous
    → remove_old → finish

- retire: a dead standby stops counting as the standby (role `old-standby`). In
  ha-sync the store forgets the synchronous standby first and then
  synchronous_standby_names is cleared on the primary, so the primary stays
  writable meanwhile (non-strict, like Patroni's default `synchronous_mode`); a
  failover in this window is refused (no synchronous standby is recorded), which
  is what keeps a standby that has not caught up from ever being promoted.
- node…streaming: the shared node helpers (node_create.py): management port, pg_hba and a
  fresh slot on the primary, volume, server with a base backup, streaming.
- server: when the zone chosen in `node` dies before the server boots (NoValidHost),
  the new standby moves to a live fallback zone (zones.move_new_standby) or the
  rebuild waits for the zone.
- synchronous (ha-sync): name the new standby and record it synchronous once it
  holds every acknowledged commit (promotion.enable_sync).
- remove_old: the replaced node's slot, server, volume and management port.
"""

from __future__ import annotations

import logging

from broker.cloud.base import NoValidHost
from broker.operations import (
    naming,
    node_access,
    node_create,
    node_teardown,
    promotion,
    rows,
    zones,
)
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.params import RebuildParams
from broker.pg import replication
from broker.store.models import (
    DEGRADED,
    NODE_CREATING,
    NODE_DELETED,
    OLD_PRIMARY,
    READY,
    STANDBY,
    Node,
    utcnow,
)

log = logging.getLogger(__name__)

KIND = promotion.REBUILD
RETIRED_ROLES = (OLD_PRIMARY, promotion.OLD_STANDBY)


def _new_node_id(ctx: Context) -> str:
    return promotion.derived_node_id(ctx.operation_id)


def _replaced(ctx: Context) -> Node | None:
    node_id = ctx.params_of(RebuildParams).replace_node_id
    return promotion.node_row(ctx, node_id) if node_id else None


def _zone(ctx: Context) -> str:
    """The new standby's zone once chosen (the node step), its home zone until then."""
    with ctx.store.session() as s:
        made = s.get(Node, _new_node_id(ctx))
        if made is not None:
            return made.availability_zone
    return zones.home_zone(ctx)


def retire(ctx: Context) -> None:
    inst = ctx.instance()
    if inst.primary() is None:
        raise StepFailed("the instance has no primary to copy a standby from")
    replaced = _replaced(ctx)
    if replaced is not None and replaced.role == STANDBY:
        promotion.unsync(ctx)
        rows.update_node(ctx, replaced.id, role=promotion.OLD_STANDBY)
    elif inst.sync_standby_node_id is not None and inst.sync_standby_node_id != _new_node_id(ctx):
        promotion.unsync(ctx)
    if replaced is not None and replaced.slot_name:
        # It will never stream again: stop the primary keeping WAL for it now.
        try:
            with node_access.admin_connection(ctx, rows.primary_node(ctx), timeout=3.0) as conn:
                replication.drop_slot(conn, replaced.slot_name)
        except Exception as exc:  # best effort: remove_old drops it again
            log.info("instance %s: slot %s not dropped yet (%s)", ctx.instance_id,
                     replaced.slot_name, exc.__class__.__name__)
    reason = ctx.params_of(RebuildParams).cause or "rebuilding the standby"
    promotion.set_state(ctx, DEGRADED, f"{reason}: rebuilding a standby in {_zone(ctx)}")


def node(ctx: Context) -> None:
    node_id = _new_node_id(ctx)
    with ctx.store.session() as s:
        if s.get(Node, node_id) is not None:
            return
    zone = zones.standby_zone(ctx)  # or wait (RetryLater) while no zone can take it
    with ctx.store.session() as s:
        s.add(Node(id=node_id, instance_id=ctx.instance_id, role=STANDBY,
                   state=NODE_CREATING, availability_zone=zone,
                   slot_name=naming.slot_name(node_id)))


def port(ctx: Context) -> None:
    node_create.ensure_management_port(ctx, _new_node_id(ctx))


def access(ctx: Context) -> None:
    node_create.prepare_primary_for(ctx, _new_node_id(ctx))


def volume(ctx: Context) -> None:
    node_create.ensure_volume(ctx, _new_node_id(ctx))


def server(ctx: Context) -> None:
    node_id = _new_node_id(ctx)
    node_create.ensure_volume(ctx, node_id)  # again after a move to a fallback zone
    try:
        node_create.ensure_server(ctx, node_id)
    except NoValidHost as exc:  # the zone died after it was chosen
        zone = _zone(ctx)
        fallback = zones.refuge(ctx, zone)
        if fallback is None:
            zones.wait_for_zone(ctx, zone, str(exc))
        zones.move_new_standby(ctx, node_id, fallback)
        node_create.ensure_volume(ctx, node_id)
        node_create.ensure_server(ctx, node_id)


def streaming(ctx: Context) -> None:
    node_create.wait_standby_streaming(ctx, _new_node_id(ctx))
    promotion.stamp(ctx, standby_streaming_at=utcnow())


def synchronous(ctx: Context) -> None:
    if ctx.instance().replication == "sync":
        promotion.enable_sync(ctx, _new_node_id(ctx))


def remove_old(ctx: Context) -> None:
    inst = ctx.instance()
    retired = [n for n in inst.nodes if n.role in RETIRED_ROLES and n.state != NODE_DELETED]
    for old in retired:
        node_teardown.teardown_node(ctx, old.id)  # rewrites the pg_hba of the nodes that stay


def finish(ctx: Context) -> None:
    promotion.set_state(ctx, READY, None)
    log.info("instance %s: standby %s streams again", ctx.instance_id, _new_node_id(ctx))


def steps(ctx: Context) -> list[Step]:
    zone = _zone(ctx)
    what = f"rebuilding a standby in {zone}"
    return [
        Step("retire", f"{what}: retiring the old node", retire),
        Step("node", what, node),
        Step("port", f"{what}: management port", port),
        Step("access", f"{what}: replication slot", access),
        Step("volume", f"{what}: volume", volume),
        Step("server", f"{what}: base backup", server),
        Step("streaming", f"{what}: waiting for streaming", streaming),
        Step("synchronous", f"{what}: switching on synchronous replication", synchronous),
        Step("remove_old", "deleting the old node", remove_old),
        Step("finish", "finishing", finish),
    ]


def cleanup(ctx: Context, reason: str) -> None:
    """The new node goes; the instance stays degraded (the monitor tries again later)."""
    node_id = _new_node_id(ctx)
    with ctx.store.session() as s:
        made = s.get(Node, node_id) is not None
    if made:
        node_teardown.teardown_node(ctx, node_id)
    promotion.set_state(ctx, DEGRADED, f"no standby: rebuilding one failed ({reason})")


WORKFLOW = Workflow(kind=KIND, steps=steps, cleanup=cleanup, params=RebuildParams,
                    done="standby rebuilt and streaming",
                    deprovision_preempts=True)
