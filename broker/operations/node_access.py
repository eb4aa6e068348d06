"""The broker's PostgreSQL access to an instance's nodes: its admin connection, who
pg_hba admits (the broker, the replication peers, the apps), the synchronous standby
and the parameters the primary applies."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg2.extensions import connection as Connection

from broker.backup import names as backup_names
from broker.backup import standby as backup_standby
from broker.catalog import Plan
from broker.operations.engine import Context, StepFailed
from broker.operations.rows import primary_node, target_plan, update_instance
from broker.pg import connection, hba, tenants
from broker.pg.connection import PgNotReady
from broker.pg.names import APP_DATABASE
from broker.pg.replication import set_synchronous_standby, wait_streaming
from broker.store.models import (
    NODE_DELETING,
    NODE_FENCED,
    PRIMARY,
    STANDBY,
    Instance,
    Node,
)

log = logging.getLogger(__name__)

# One blocking wait inside a step; after that the step is retried (RetryLater), so
# a worker is never stuck on one operation for long.
WAIT_SLICE = 30.0
# Replay lag that counts as "caught up" when a standby is added under live writes.
CAUGHT_UP_BYTES = 16 * 1024 * 1024


def admin_password(ctx: Context, inst: Instance | None = None) -> str:
    inst = inst or ctx.instance()
    return ctx.vault.decrypt(inst.admin_password_enc)


@contextmanager
def admin_connection(ctx: Context, node: Node, *, dbname: str = "postgres",
                     timeout: float = 5.0, inst: Instance | None = None
                     ) -> Iterator[Connection]:
    """The broker's superuser connection to one node, over its management address,
    verifying the node's certificate once it has one (`inst`: the caller's fresh read
    of the instance, to spare one)."""
    if not node.management_address:
        raise StepFailed(f"node {node.id} has no management address yet")
    inst = inst or ctx.instance()  # one read for both: a failover opens several
    conn = connection.connect(node.management_address, admin_password(ctx, inst),
                              dbname=dbname, timeout=timeout,
                              ca_pem=node_ca(ctx, node.id, inst))
    try:
        yield conn
    finally:
        conn.close()


def node_ca(ctx: Context, node_id: str, inst: Instance | None = None) -> str | None:
    """The CA to verify a node with, from the store as it is now (the caller's row may
    predate the node's first certificate); `inst`: the caller's fresh read."""
    inst = inst or ctx.instance()
    node = next((n for n in inst.nodes if n.id == node_id), None)
    return inst.ca_for(node) if node is not None else None


def access_cidrs(ctx: Context, plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(admin_cidrs, app_cidrs) for pg_hba: who is the broker, where apps come from."""
    admin_cidrs = ctx.cloud.admin_cidrs()
    if not admin_cidrs:
        raise StepFailed("BROKER_ADMIN_CIDR is not set: the nodes must know the broker's "
                         "address to let it administer PostgreSQL")
    app_cidrs = ctx.cloud.app_cidrs(plan)
    if not app_cidrs:
        raise StepFailed(f"plan {plan.name} has no network.app_cidrs and BROKER_APP_CIDR is "
                         "not set: apps could not reach the database")
    return admin_cidrs, app_cidrs


def replication_peers(inst: Instance) -> list[Node]:
    """The nodes that may replicate: the primary and the standby, being made or running.
    A fenced node, a retired one or one being deleted never again: its address goes
    back to the cloud and may become anyone's."""
    return [n for n in inst.live_nodes() if n.role in (PRIMARY, STANDBY)
            and n.state not in (NODE_FENCED, NODE_DELETING)]


def peer_addresses(inst: Instance, node_id: str) -> tuple[str, ...]:
    return tuple(n.management_address for n in replication_peers(inst)
                 if n.id != node_id and n.management_address)


def backup_peers(inst: Instance, node_id: str) -> tuple[str, ...]:
    """The nodes whose certificates may reach this node's pgBackRest TLS server."""
    return tuple(n.id for n in replication_peers(inst) if n.id != node_id)


def refresh_hba(ctx: Context, node_id: str, *, timeout: float = 5.0) -> None:
    """Rewrite one running node's pg_hba for the instance's current nodes (a peer came
    or went), and the peers its pgBackRest TLS server admits. Replication and backups
    are allowed only between the instance's own nodes."""
    inst = ctx.instance()
    node = next((n for n in inst.live_nodes() if n.id == node_id), None)
    if node is None:
        return
    admin_cidrs, app_cidrs = access_cidrs(ctx, target_plan(ctx, inst))
    lines = hba.render_hba(admin_cidrs=list(admin_cidrs),
                           peer_addresses=list(peer_addresses(inst, node_id)),
                           app_cidrs=list(app_cidrs), tls=bool(node.tls_cert))
    with admin_connection(ctx, node, timeout=timeout, inst=inst) as conn:
        if node.role == PRIMARY and not tenants.tenant_model_in_place(conn):
            # Made by an earlier version: its read-only roles join the group that the
            # new pg_hba admits before that file replaces the one naming the old group.
            tenants.ensure_tenant_model(conn)
        hba.set_hba(conn, lines)
        backup_standby.refresh_server(conn, address=node.management_address or "",
                                      stanza=backup_names.stanza(inst.id),
                                      peers=list(backup_peers(inst, node_id)))


def refresh_peers_hba(ctx: Context) -> None:
    """pg_hba on every node that may replicate, after the set of nodes changed.

    Best effort: a node that does not answer is down, and whatever brings it back
    (a failover, a rebuild, the next change of nodes) rewrites its pg_hba again; its
    bootstrap never does on an existing cluster, so a reboot admits no one who left."""
    for node in replication_peers(ctx.instance()):
        if not node.server_id:
            continue  # not booted yet: its guest config has the current peers
        try:
            refresh_hba(ctx, node.id, timeout=3.0)
        except Exception as exc:  # down or unreachable: see the docstring
            log.warning("instance %s: pg_hba of node %s not refreshed (%s)",
                        ctx.instance_id, node.id, exc.__class__.__name__)


def set_replication_mode(ctx: Context, replication: str, *, record_sync: bool = True) -> None:
    """Name the standby in synchronous_standby_names for `sync`, clear it otherwise.

    Only a streaming standby is named: naming one that does not stream would make
    every commit on the primary wait. With `record_sync=False` the store is not told
    that the standby is synchronous: the caller proves it first (an instance that
    already took writes, see promotion.enable_sync)."""
    inst = ctx.instance()
    primary = primary_node(ctx)
    standby = inst.standby()
    name: str | None = None
    if replication == "sync" and standby is not None:
        name = standby.application_name
    with admin_connection(ctx, primary) as conn:
        if name is not None:
            try:
                wait_streaming(conn, name, timeout=WAIT_SLICE,
                               max_lag_bytes=CAUGHT_UP_BYTES)
            except PgNotReady:
                raise StepFailed("the standby does not stream; synchronous replication "
                                 "was not switched on so that writes do not hang") from None
        set_synchronous_standby(conn, name)
    sync_id = standby.id if name is not None and standby is not None else None
    if sync_id is not None and not record_sync:
        return
    if inst.sync_standby_node_id != sync_id:
        update_instance(ctx, sync_standby_node_id=sync_id)


def apply_parameters(ctx: Context, parameters: dict[str, Any]) -> None:
    """Provision/update parameters on the primary: extensions, statement_timeout."""
    primary = primary_node(ctx)
    extensions = list(parameters.get("extensions") or [])
    if extensions:
        with admin_connection(ctx, primary, dbname=APP_DATABASE) as conn:
            try:
                tenants.ensure_extensions(conn, extensions)
            except ValueError as exc:
                raise StepFailed(str(exc)) from None
    if "statement_timeout_ms" in parameters:
        timeout_ms = parameters["statement_timeout_ms"] or 0
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
            raise StepFailed("parameter statement_timeout_ms must be a whole number of "
                             "milliseconds (0 = no timeout)")
        with admin_connection(ctx, primary) as conn:
            tenants.set_database_setting(conn, APP_DATABASE, "statement_timeout",
                                         str(timeout_ms) if timeout_ms else None)
