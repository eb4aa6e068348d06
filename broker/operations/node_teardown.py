"""Tearing down: `teardown_node(ctx, node_id)` for one node, `teardown_instance(ctx)`
for everything of the instance (found by rows and by tags). Delete calls are
idempotent, so a re-run step deletes only what is left."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from psycopg2.extensions import connection as Connection
from sqlalchemy import select

from broker.cloud.base import TAG_NODE, CloudError, CloudResource
from broker.operations.engine import Context
from broker.operations.naming import node_resource_name
from broker.operations.node_access import admin_connection, refresh_peers_hba
from broker.operations.rows import update_instance, update_node
from broker.pg import replication
from broker.store.models import (
    NODE_DELETED,
    NODE_DELETING,
    Instance,
    Node,
)

log = logging.getLogger(__name__)


def _quietly(what: str, action: Any, *args: Any) -> None:
    """Delete calls are idempotent by contract; a CloudError is re-raised with context."""
    try:
        action(*args)
    except CloudError as exc:
        # Same class, so a transient error stays retryable.
        raise exc.__class__(f"could not delete {what}: {exc}") from exc


def teardown_node(ctx: Context, node_id: str, *, drop_slot: bool = True,
                  keep_volumes: bool = False) -> None:
    """Delete one node's server, volume and management port; the row ends `deleted`.

    With `keep_volumes` its volume stays (a resurrected node carries it on).

    The other nodes' pg_hba stop admitting it before its port (and so its address)
    goes back to the cloud.

    With `drop_slot`, its slot on the primary is dropped (when the primary answers),
    so the primary stops keeping WAL for it. Order matters: synchronous replication
    is switched off before the standby goes (or commits would wait for it), and the
    slot is dropped only after the server is gone (a live standby reconnects at once
    and holds the slot again)."""
    inst = ctx.instance()
    node = next((n for n in inst.nodes if n.id == node_id), None)
    if node is None or node.state == NODE_DELETED:
        return
    if node.state != NODE_DELETING:
        update_node(ctx, node_id, state=NODE_DELETING)
    refresh_peers_hba(ctx)
    primary = inst.primary()
    on_primary = primary is not None and primary.id != node_id
    if on_primary and inst.sync_standby_node_id == node_id:
        assert primary is not None
        _on_primary(ctx, primary, "switch off synchronous replication",
                    lambda conn: replication.set_synchronous_standby(conn, None))
    if inst.sync_standby_node_id == node_id:
        update_instance(ctx, sync_standby_node_id=None)
    name = node_resource_name(inst.id, node_id)
    tagged = [r for r in ctx.cloud.find_resources(inst.id) if r.tags.get(TAG_NODE) == node_id]
    servers = {node.server_id} | {r.id for r in tagged if r.kind == "server"}
    for server_id in sorted(s for s in servers if s):
        _quietly(f"server {name}", ctx.cloud.delete_server, server_id)
    slot = node.slot_name
    if drop_slot and on_primary and slot:
        assert primary is not None
        _on_primary(ctx, primary, f"drop slot {slot}",
                    lambda conn: replication.drop_slot(conn, slot))
    volumes = {node.volume_id} | {r.id for r in tagged if r.kind == "volume"}
    for volume_id in sorted(v for v in volumes if v and not keep_volumes):
        _quietly(f"volume {name}", ctx.cloud.delete_volume, volume_id)
    ports = {node.management_port_id} | {r.id for r in tagged if r.kind == "port"}
    for port_id in sorted(p for p in ports if p):
        _quietly(f"port {name}", ctx.cloud.delete_port, port_id)
    update_node(ctx, node_id, state=NODE_DELETED)


def _on_primary(ctx: Context, primary: Node, what: str,
                action: Callable[[Connection], None]) -> None:
    try:
        with admin_connection(ctx, primary, timeout=3.0) as conn:
            action(conn)
    except Exception as exc:  # the primary may be down; its slot goes with it then
        log.warning("could not %s on the primary: %s", what, exc.__class__.__name__)


def instance_resources(ctx: Context) -> list[CloudResource]:
    return ctx.cloud.find_resources(ctx.instance_id)


def _delete_found(ctx: Context, kind: str, known: set[str | None],
                  delete: Callable[[str], None]) -> None:
    """Delete every resource of `kind` the rows know or the cloud finds by tag."""
    ids = {i for i in known if i} | {r.id for r in instance_resources(ctx) if r.kind == kind}
    for resource_id in sorted(ids):
        _quietly(f"{kind.replace('_', ' ')} {resource_id}", delete, resource_id)


def delete_servers(ctx: Context) -> None:
    _delete_found(ctx, "server", {n.server_id for n in ctx.instance().nodes},
                  ctx.cloud.delete_server)
    with ctx.store.session() as s:
        for node in s.scalars(select(Node).where(Node.instance_id == ctx.instance_id)):
            if node.state != NODE_DELETED:
                node.state = NODE_DELETING


def delete_volumes(ctx: Context) -> None:
    _delete_found(ctx, "volume", {n.volume_id for n in ctx.instance().nodes},
                  ctx.cloud.delete_volume)


def delete_ports(ctx: Context) -> None:
    inst = ctx.instance()
    _delete_found(ctx, "port", {n.management_port_id for n in inst.nodes} | {inst.service_port_id},
                  ctx.cloud.delete_port)


def delete_server_group(ctx: Context) -> None:
    _delete_found(ctx, "server_group", {ctx.instance().server_group_id},
                  ctx.cloud.delete_server_group)


def mark_nodes_deleted(ctx: Context) -> None:
    with ctx.store.session() as s:
        for node in s.scalars(select(Node).where(Node.instance_id == ctx.instance_id)):
            node.state = NODE_DELETED
        inst = s.get(Instance, ctx.instance_id)
        if inst is not None:
            inst.sync_standby_node_id = None


def teardown_instance(ctx: Context) -> None:
    """Every cloud resource of the instance, found by its rows and by its tags, in the
    order the cloud needs (servers free their ports and volumes when deleted)."""
    delete_servers(ctx)
    delete_volumes(ctx)
    delete_ports(ctx)
    delete_server_group(ctx)
    mark_nodes_deleted(ctx)
