"""Making and unmaking nodes: the step helpers shared by every workflow.

Provision, update and rebuild all create nodes the same way, and deprovision,
update and failed provisions all tear them down the same way, so the pieces live
here. Every helper is idempotent (safe to run again after a SIGKILL at any point):
cloud resources are named after the instance and the node and adopted if they
exist; rows are updated only with what the cloud returned.

Creating a node `node_id` (a Node row with role, zone and slot name already set):

    ensure_management_port(ctx, node_id)   # its fixed address, known before boot
    prepare_primary_for(ctx, node_id)      # standby only: pg_hba + slot on the primary
    ensure_volume(ctx, node_id)
    ensure_server(ctx, node_id)            # boots; a standby takes its base backup
    wait_node_ready(ctx, node_id)          # primary: PostgreSQL answers
    wait_standby_streaming(ctx, node_id)   # standby: streaming from the primary

or all of it at once with `create_node(ctx, node_id)`. Tearing down:
`teardown_node(ctx, node_id)` for one node, `teardown_instance(ctx)` for everything
of the instance (found by rows and by tags).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from psycopg2.extensions import connection as Connection
from sqlalchemy import select

from broker.catalog import Plan
from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    TAG_NODE,
    TAG_PLAN,
    TAG_ROLE,
    CloudError,
    CloudResource,
    ServerSpec,
)
from broker.guest.bootstrap import GuestConfig
from broker.operations.engine import Context, RetryLater, StepFailed
from broker.operations.params import UpdateParams
from broker.pg import admin, tls
from broker.store.models import (
    NODE_CREATING,
    NODE_DELETED,
    NODE_DELETING,
    NODE_FENCED,
    NODE_RUNNING,
    PRIMARY,
    STANDBY,
    Instance,
    Node,
    Operation,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

# How long a node may take before the operation gives up (from the operation's start).
# An OpenStack VM boots and runs cloud-init in minutes; a base backup of a big
# database may take much longer than that.
NODE_READY_DEADLINE = timedelta(minutes=10)
STREAMING_DEADLINE = timedelta(minutes=60)
# A new instance gets its CA while provisioning; an older one through `rotate-certs`.
PROVISION = "provision"
# One blocking wait inside a step; after that the step is retried (RetryLater), so
# a worker is never stuck on one operation for long.
WAIT_SLICE = 30.0
# Replay lag that counts as "caught up" when a standby is added under live writes.
CAUGHT_UP_BYTES = 16 * 1024 * 1024


# --- names and tags ---------------------------------------------------------
def new_node_id() -> str:
    return uuid.uuid4().hex[:8]


def node_resource_name(instance_id: str, node_id: str) -> str:
    """Name of a node's server, volume and management port."""
    return f"pgha-{instance_id}-{node_id}"


def service_port_name(instance_id: str) -> str:
    return f"pgha-{instance_id}-service"


def server_group_name(instance_id: str) -> str:
    return f"pgha-{instance_id}"


def slot_name(node_id: str) -> str:
    return f"slot_{node_id}"


def instance_tags(instance_id: str) -> dict[str, str]:
    return {TAG_INSTANCE: instance_id, TAG_MANAGED: "true"}


def node_tags(instance_id: str, node_id: str, role: str) -> dict[str, str]:
    return {**instance_tags(instance_id), TAG_NODE: node_id, TAG_ROLE: role}


# --- reading and writing rows ----------------------------------------------
def target_plan(ctx: Context) -> Plan:
    """The plan the instance is being built for: an update's new plan, else its own."""
    plan_id = ctx.params.plan_id if isinstance(ctx.params, UpdateParams) else None
    return ctx.plan(plan_id or None)


def get_node(ctx: Context, node_id: str) -> Node:
    inst = ctx.instance()
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


# --- PostgreSQL access -------------------------------------------------------
def admin_password(ctx: Context, inst: Instance | None = None) -> str:
    inst = inst or ctx.instance()
    return ctx.vault.decrypt(inst.admin_password_enc)


@contextmanager
def admin_connection(ctx: Context, node: Node, *, dbname: str = "postgres",
                     timeout: float = 5.0) -> Iterator[Connection]:
    """The broker's superuser connection to one node, over its management address,
    verifying the node's certificate once it has one."""
    if not node.management_address:
        raise StepFailed(f"node {node.id} has no management address yet")
    conn = admin.connect(node.management_address, admin_password(ctx), dbname=dbname,
                         timeout=timeout, ca_pem=node_ca(ctx, node.id))
    try:
        yield conn
    finally:
        conn.close()


def node_ca(ctx: Context, node_id: str) -> str | None:
    """The CA to verify a node with, from the store as it is now (the caller's row may
    predate the node's first certificate)."""
    inst = ctx.instance()
    node = next((n for n in inst.nodes if n.id == node_id), None)
    return inst.ca_for(node) if node is not None else None


def primary_node(ctx: Context) -> Node:
    node = ctx.instance().primary()
    if node is None:
        raise StepFailed("the instance has no primary node")
    return node


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


def refresh_hba(ctx: Context, node_id: str, *, timeout: float = 5.0) -> None:
    """Rewrite one running node's pg_hba for the instance's current nodes (a peer came
    or went). Replication is allowed only between the instance's own nodes."""
    inst = ctx.instance()
    node = next((n for n in inst.live_nodes() if n.id == node_id), None)
    if node is None:
        return
    admin_cidrs, app_cidrs = access_cidrs(ctx, target_plan(ctx))
    lines = admin.render_hba(admin_cidrs=list(admin_cidrs),
                             peer_addresses=list(peer_addresses(inst, node_id)),
                             app_cidrs=list(app_cidrs), tls=bool(node.tls_cert))
    with admin_connection(ctx, node, timeout=timeout) as conn:
        if node.role == PRIMARY and not admin.tenant_model_in_place(conn):
            # Made by an earlier version: its read-only roles join the group that the
            # new pg_hba admits before that file replaces the one naming the old group.
            admin.ensure_tenant_model(conn)
        admin.set_hba(conn, lines)


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


# --- creating a node ---------------------------------------------------------
def ensure_server_group(ctx: Context) -> None:
    inst = ctx.instance()
    group_id = ctx.cloud.ensure_server_group(server_group_name(inst.id), instance_tags(inst.id))
    if group_id != inst.server_group_id:
        update_instance(ctx, server_group_id=group_id)


def ensure_service_port(ctx: Context) -> None:
    inst = ctx.instance()
    port = ctx.cloud.create_port(service_port_name(inst.id), "service",
                                 {**instance_tags(inst.id), TAG_PLAN: target_plan(ctx).id})
    if (port.id, port.address) != (inst.service_port_id, inst.service_address):
        update_instance(ctx, service_port_id=port.id, service_address=port.address)


def ensure_management_port(ctx: Context, node_id: str) -> str:
    """The node's management port (made before boot so peers' pg_hba know it)."""
    node = get_node(ctx, node_id)
    # The plan tag tells the cloud which of the plan's networks the port belongs to.
    port = ctx.cloud.create_port(node_resource_name(ctx.instance_id, node_id), "management",
                                 {**node_tags(ctx.instance_id, node_id, node.role),
                                  TAG_PLAN: target_plan(ctx).id})
    if (port.id, port.address) != (node.management_port_id, node.management_address):
        update_node(ctx, node_id, management_port_id=port.id, management_address=port.address)
    return port.address


def ensure_volume(ctx: Context, node_id: str) -> str:
    node = get_node(ctx, node_id)
    plan = target_plan(ctx)
    volume = ctx.cloud.create_volume(
        node_resource_name(ctx.instance_id, node_id), plan.cloud.volume_size_gb,
        node.availability_zone, plan.cloud.volume_type,
        node_tags(ctx.instance_id, node_id, node.role))
    if volume.id != node.volume_id:
        update_node(ctx, node_id, volume_id=volume.id)
    return volume.id


def node_certificate(ctx: Context, node_id: str) -> tls.Issued | None:
    """The node's certificate for the instance's service address and the node's own
    address, issued once (a retried boot gets the same one); None on an instance
    without a CA (made before TLS: `instances rotate-certs` gives it one)."""
    inst = ctx.instance()
    node = get_node(ctx, node_id)
    if not inst.tls_ca_cert and ctx.kind == PROVISION and not any(n.server_id for n in inst.nodes):
        inst = ensure_ca(ctx)
    if not inst.tls_ca_cert or not inst.tls_ca_key_enc:
        return None
    if not inst.service_address or not node.management_address:
        raise StepFailed("a node's certificate names the service address and the node's "
                         "address: both must exist before it boots")
    wanted = {inst.service_address, node.management_address}
    if node.tls_cert and node.tls_key_enc and node.tls_issued_at \
            and tls.addresses(node.tls_cert) == wanted:
        return tls.Issued(node.tls_cert, ctx.vault.decrypt(node.tls_key_enc),
                          aware(node.tls_expires_at) or tls.expires_at(node.tls_cert),
                          node.tls_issued_at)
    issued = tls.issue_node_cert(inst.tls_ca_cert, ctx.vault.decrypt(inst.tls_ca_key_enc),
                                 node_id=node_id, addresses=sorted(wanted),
                                 days=ctx.settings.tls.cert_days,
                                 previous_issued_at=node.tls_issued_at or 0)
    record_certificate(ctx, node_id, issued)
    return issued


def ensure_ca(ctx: Context) -> Instance:
    """The instance's CA, made once (long-lived; its key stored encrypted)."""
    with ctx.store.session() as s:
        inst = s.get(Instance, ctx.instance_id)
        if inst is None:
            raise StepFailed(f"instance {ctx.instance_id} is not in the state store")
        if not inst.tls_ca_cert:
            ca = tls.new_ca(inst.id)
            inst.tls_ca_cert, inst.tls_ca_expires_at = ca.cert_pem, ca.expires_at
            inst.tls_ca_key_enc = ctx.vault.encrypt(ca.key_pem)
    return ctx.instance()


def record_certificate(ctx: Context, node_id: str, issued: tls.Issued) -> None:
    update_node(ctx, node_id, tls_cert=issued.cert_pem,
                tls_key_enc=ctx.vault.encrypt(issued.key_pem),
                tls_expires_at=issued.expires_at, tls_issued_at=issued.issued_at)


def guest_config(ctx: Context, node_id: str) -> GuestConfig:
    """What the node's guest bootstrap makes of it: a primary, or a standby of the
    current primary (base backup over the primary's management address)."""
    cert = node_certificate(ctx, node_id)
    inst = ctx.instance()
    node = next((n for n in inst.live_nodes() if n.id == node_id), None)
    if node is None:
        raise StepFailed(f"node {node_id} is not a live node of the instance")
    plan = target_plan(ctx)
    admin_cidrs, app_cidrs = access_cidrs(ctx, plan)
    primary_address: str | None = None
    if node.role == STANDBY:
        primary = inst.primary()
        if primary is None or not primary.management_address:
            raise StepFailed("a standby needs a primary to copy, and there is none")
        primary_address = primary.management_address
    return GuestConfig(
        instance_id=inst.id,
        node_id=node.id,
        role=PRIMARY if node.role == PRIMARY else STANDBY,
        admin_password=ctx.vault.decrypt(inst.admin_password_enc),
        replication_password=ctx.vault.decrypt(inst.replication_password_enc),
        replication=plan.cloud.replication,
        application_name=node.application_name,
        primary_address=primary_address,
        slot_name=node.slot_name or slot_name(node.id),
        admin_cidrs=admin_cidrs,
        peer_addresses=peer_addresses(inst, node.id),
        app_cidrs=app_cidrs,
        tls_ca_cert=(inst.tls_ca_cert or "") if cert is not None else "",
        tls_cert=cert.cert_pem if cert is not None else "",
        tls_key=cert.key_pem if cert is not None else "",
        tls_issued_at=cert.issued_at if cert is not None else 0,
    )


def prepare_primary_for(ctx: Context, node_id: str) -> None:
    """Before a standby boots: the primary lets its address replicate and keeps WAL
    for it in its own slot."""
    node = get_node(ctx, node_id)
    if not node.management_address:
        raise StepFailed(f"node {node_id} has no management address yet")
    primary = primary_node(ctx)
    refresh_hba(ctx, primary.id)
    with admin_connection(ctx, primary) as conn:
        admin.ensure_slot(conn, node.slot_name or slot_name(node_id))


def ensure_server(ctx: Context, node_id: str) -> str:
    """Boot the node's server (adopting one a previous run made)."""
    node = get_node(ctx, node_id)
    inst = ctx.instance()
    plan = target_plan(ctx)
    if not node.management_port_id or not node.volume_id:
        raise StepFailed(f"node {node_id} needs its port and volume before its server")
    spec = ServerSpec(
        name=node_resource_name(inst.id, node_id),
        availability_zone=node.availability_zone,
        flavor=plan.cloud.flavor,
        image=plan.cloud.image,
        management_port_id=node.management_port_id,
        volume_id=node.volume_id,
        guest=guest_config(ctx, node_id),
        server_group_id=inst.server_group_id,
        tags=node_tags(inst.id, node_id, node.role),
    )
    server = ctx.cloud.create_server(spec)
    values: dict[str, Any] = {}
    if server.id != node.server_id:
        values["server_id"] = server.id
    if server.management_address and server.management_address != node.management_address:
        values["management_address"] = server.management_address
    if values:
        update_node(ctx, node_id, **values)
    return server.id


def _give_up_or_retry(ctx: Context, deadline: timedelta, what: str) -> RetryLater:
    if operation_age(ctx) > deadline:
        raise StepFailed(f"gave up waiting for {what} after "
                         f"{int(deadline.total_seconds() // 60)} minutes")
    return RetryLater(f"still waiting for {what}", delay=1.0)


def wait_node_ready(ctx: Context, node_id: str, *, timeout: float = WAIT_SLICE) -> None:
    """Until PostgreSQL on the node accepts the broker's connections."""
    node = get_node(ctx, node_id)
    if not node.management_address:
        raise StepFailed(f"node {node_id} has no management address")
    try:
        admin.wait_ready(node.management_address, admin_password(ctx), timeout=timeout,
                         ca_pem=node_ca(ctx, node_id))
    except admin.PgNotReady:
        raise _give_up_or_retry(ctx, NODE_READY_DEADLINE,
                                f"PostgreSQL on node {node_id} to start") from None
    if node.state == NODE_CREATING and node.role == PRIMARY:
        update_node(ctx, node_id, state=NODE_RUNNING)


def wait_standby_streaming(ctx: Context, node_id: str, *, timeout: float = WAIT_SLICE,
                           max_lag_bytes: int = CAUGHT_UP_BYTES) -> None:
    """Until the standby streams from the primary and has (nearly) caught up."""
    node = get_node(ctx, node_id)
    primary = primary_node(ctx)
    with admin_connection(ctx, primary) as conn:
        try:
            admin.wait_streaming(conn, node.application_name, timeout=timeout,
                                 max_lag_bytes=max_lag_bytes)
        except admin.PgNotReady:
            raise _give_up_or_retry(ctx, STREAMING_DEADLINE,
                                    f"the standby {node_id} to stream") from None
    if node.state != NODE_RUNNING:
        update_node(ctx, node_id, state=NODE_RUNNING)


def create_node(ctx: Context, node_id: str) -> None:
    """Everything above in order: port, (primary prepared), volume, server, ready."""
    node = get_node(ctx, node_id)
    ensure_management_port(ctx, node_id)
    if node.role == STANDBY:
        prepare_primary_for(ctx, node_id)
    ensure_volume(ctx, node_id)
    ensure_server(ctx, node_id)
    if node.role == STANDBY:
        wait_standby_streaming(ctx, node_id)
    else:
        wait_node_ready(ctx, node_id)


def attach_service_port(ctx: Context, node_id: str) -> None:
    """Plug the service port into the node's server (no-op if it is already there)."""
    inst = ctx.instance()
    node = get_node(ctx, node_id)
    if not inst.service_port_id or not node.server_id:
        raise StepFailed("the service port and the server must exist before attaching")
    port = ctx.cloud.get_port(inst.service_port_id)
    if port is None:
        raise StepFailed("the service port is gone from the cloud")
    if port.device_id == node.server_id:
        return
    if port.device_id:
        # Bound elsewhere (e.g. the old primary): only a failover may take it.
        raise StepFailed("the service port is attached to another server")
    ctx.cloud.attach_port(inst.service_port_id, node.server_id)


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
                admin.wait_streaming(conn, name, timeout=WAIT_SLICE,
                                     max_lag_bytes=CAUGHT_UP_BYTES)
            except admin.PgNotReady:
                raise StepFailed("the standby does not stream; synchronous replication "
                                 "was not switched on so that writes do not hang") from None
        admin.set_synchronous_standby(conn, name)
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
        with admin_connection(ctx, primary, dbname=admin.APP_DATABASE) as conn:
            try:
                admin.ensure_extensions(conn, extensions)
            except ValueError as exc:
                raise StepFailed(str(exc)) from None
    if "statement_timeout_ms" in parameters:
        timeout_ms = parameters["statement_timeout_ms"] or 0
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
            raise StepFailed("parameter statement_timeout_ms must be a whole number of "
                             "milliseconds (0 = no timeout)")
        with admin_connection(ctx, primary) as conn:
            admin.set_database_setting(conn, admin.APP_DATABASE, "statement_timeout",
                                       str(timeout_ms) if timeout_ms else None)


# --- tearing down ------------------------------------------------------------
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
                    lambda conn: admin.set_synchronous_standby(conn, None))
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
        _on_primary(ctx, primary, f"drop slot {slot}", lambda conn: admin.drop_slot(conn, slot))
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


def delete_servers(ctx: Context) -> None:
    inst = ctx.instance()
    ids = {n.server_id for n in inst.nodes if n.server_id}
    ids |= {r.id for r in instance_resources(ctx) if r.kind == "server"}
    for server_id in sorted(ids):
        _quietly(f"server {server_id}", ctx.cloud.delete_server, server_id)
    with ctx.store.session() as s:
        for node in s.scalars(select(Node).where(Node.instance_id == ctx.instance_id)):
            if node.state != NODE_DELETED:
                node.state = NODE_DELETING


def delete_volumes(ctx: Context) -> None:
    inst = ctx.instance()
    ids = {n.volume_id for n in inst.nodes if n.volume_id}
    ids |= {r.id for r in instance_resources(ctx) if r.kind == "volume"}
    for volume_id in sorted(ids):
        _quietly(f"volume {volume_id}", ctx.cloud.delete_volume, volume_id)


def delete_ports(ctx: Context) -> None:
    inst = ctx.instance()
    ids = {n.management_port_id for n in inst.nodes if n.management_port_id}
    if inst.service_port_id:
        ids.add(inst.service_port_id)
    ids |= {r.id for r in instance_resources(ctx) if r.kind == "port"}
    for port_id in sorted(ids):
        _quietly(f"port {port_id}", ctx.cloud.delete_port, port_id)


def delete_server_group(ctx: Context) -> None:
    inst = ctx.instance()
    ids = {inst.server_group_id} if inst.server_group_id else set()
    ids |= {r.id for r in instance_resources(ctx) if r.kind == "server_group"}
    for group_id in sorted(ids):
        _quietly(f"server group {group_id}", ctx.cloud.delete_server_group, group_id)


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
