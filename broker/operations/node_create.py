"""Creating a node `node_id` (a Node row with role, zone and slot name already set),
one idempotent step at a time (safe to run again after a SIGKILL at any point):

    ensure_management_port(ctx, node_id)   # its fixed address, known before boot
    prepare_primary_for(ctx, node_id)      # standby only: pg_hba + slot on the primary
    ensure_volume(ctx, node_id)
    ensure_server(ctx, node_id)            # boots; a standby takes its base backup
    wait_node_ready(ctx, node_id)          # primary: PostgreSQL answers
    wait_standby_streaming(ctx, node_id)   # standby: streaming from the primary

Before those, the instance's server group and service port; the node's certificate
goes into its guest config; `attach_service_port` plugs the service port into it.
Cloud resources are named after the instance and the node and adopted if they exist.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from broker.backup import names as backup_names
from broker.backup import s3
from broker.cloud.base import TAG_PLAN, ServerSpec
from broker.guest.bootstrap import GuestConfig
from broker.operations import restore
from broker.operations.engine import Context, RetryLater, StepFailed
from broker.operations.naming import (
    instance_tags,
    node_resource_name,
    node_tags,
    server_group_name,
    service_port_name,
    slot_name,
)
from broker.operations.node_access import (
    CAUGHT_UP_BYTES,
    WAIT_SLICE,
    access_cidrs,
    admin_connection,
    admin_password,
    backup_peers,
    node_ca,
    peer_addresses,
    refresh_hba,
)
from broker.operations.rows import (
    get_node,
    operation_age,
    primary_node,
    target_plan,
    update_instance,
    update_node,
)
from broker.pg import connection, replication, tls
from broker.pg.connection import PgNotReady
from broker.store.models import (
    NODE_CREATING,
    NODE_RUNNING,
    PRIMARY,
    STANDBY,
    Instance,
    aware,
)

# How long a node may take before the operation gives up (from the operation's start).
# An OpenStack VM boots and runs cloud-init in minutes; a base backup of a big
# database may take much longer than that.
NODE_READY_DEADLINE = timedelta(minutes=10)
STREAMING_DEADLINE = timedelta(minutes=60)
# A new instance gets its CA while provisioning; an older one through `rotate-certs`.
PROVISION = "provision"


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


def guest_config(ctx: Context, node_id: str, *, volume_is_new: bool = True) -> GuestConfig:
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
    if not inst.service_port_id or not node.management_address:
        raise StepFailed("a node's guest config names its address and the service port's: "
                         "both must exist before it boots")
    # Every node gets the service port's NIC: any of them may carry it one day, and
    # its agent configures it when it appears (no metadata service needed).
    nic = ctx.cloud.port_nic(inst.service_port_id)
    with ctx.store.session() as s:
        storage = s3.instance_storage(s, ctx.settings, ctx.catalog, inst.id, plan.id)
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
        volume_is_new=volume_is_new,
        management_address=node.management_address,
        service_mac=nic.mac,
        service_address=nic.address,
        service_prefix_length=nic.prefix_length,
        service_gateway=nic.gateway,
        service_mtu=nic.mtu,
        backup_stanza=backup_names.stanza(inst.id),
        backup_repo=s3.repository_options(storage, backup_names.stanza(inst.id))
        if storage else {},
        backup_repo_ca=storage.ca_pem if storage else "",
        archive_timeout_s=plan.cloud.backups.archive_timeout_s,
        restore_from=restore.guest_restore(ctx) if node.role == PRIMARY else {},
        backup_peers=backup_peers(inst, node.id),
        backup_server=plan.cloud.is_ha,
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
        replication.ensure_slot(conn, node.slot_name or slot_name(node_id))


def ensure_server(ctx: Context, node_id: str, *, volume_is_new: bool = True) -> str:
    """Boot the node's server (adopting one a previous run made). `volume_is_new`: the
    node's volume was created for it (provision, rebuild), so the guest may format it
    if it has no filesystem; False (resurrect) makes the guest refuse to."""
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
        guest=guest_config(ctx, node_id, volume_is_new=volume_is_new),
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
        connection.wait_ready(node.management_address, admin_password(ctx), timeout=timeout,
                              ca_pem=node_ca(ctx, node_id))
    except PgNotReady:
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
            replication.wait_streaming(conn, node.application_name, timeout=timeout,
                                       max_lag_bytes=max_lag_bytes)
        except PgNotReady:
            raise _give_up_or_retry(ctx, STREAMING_DEADLINE,
                                    f"the standby {node_id} to stream") from None
    if node.state != NODE_RUNNING:
        update_node(ctx, node_id, state=NODE_RUNNING)


def attach_service_port(ctx: Context, node_id: str) -> None:
    """Plug the service port into the node's server (no-op if it is already there)."""
    inst = ctx.instance()
    node = get_node(ctx, node_id, inst)
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
