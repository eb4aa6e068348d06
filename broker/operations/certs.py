"""Rotate certificates: new node certificates, served without a restart.

Queued by `python -m broker instances rotate-certs ID` and by the monitor when a node
certificate enters its renewal window (BROKER_TLS_RENEW_DAYS). Steps:

    ca → certificates

- ca: the instance's CA, made if missing (an instance made before TLS gets one here).
- certificates: for each live node, primary first, a new certificate for the service
  address and the node's address, written by the node's own PostgreSQL (superuser
  COPY TO PROGRAM, as the server's user: no login on the node), `ssl` on and a
  reload (a node whose certificate already expired is reached without verifying
  it, the server proven by SCRAM channel binding); once a fresh connection
  verifies it, the store records it and pg_hba becomes TLS-only. A standby made
  before TLS then verifies its primary too. Re-running issues new certificates again:
  harmless, so the step is idempotent.
"""

from __future__ import annotations

import logging

from broker.operations import node_access, node_create, queue
from broker.operations.engine import Context, Step, StepFailed, Workflow
from broker.operations.params import RotationParams
from broker.pg import connection, tls, tls_files
from broker.store.db import Store
from broker.store.models import (
    DEGRADED,
    NODE_RUNNING,
    PRIMARY,
    READY,
    Instance,
    Node,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

KIND = "rotate_certs"
VERIFY_TIMEOUT = 10.0


class RotationRefused(Exception):
    """The instance cannot rotate its certificates now; the message says why."""


def queue_rotation(store: Store, instance_id: str, *, cause: str,
                   owner: str | None = None) -> str:
    """Queue a rotation; returns the operation id (RotationRefused if not possible).
    With `owner` the row is born claimed by that engine (the monitor runs it itself)."""
    with store.session() as s:
        inst = s.get(Instance, instance_id)
        if inst is None or inst.deleted_at is not None:
            raise RotationRefused(f"no instance {instance_id}")
        if inst.state not in (READY, DEGRADED):
            raise RotationRefused(f"instance {instance_id} is {inst.state}")
        busy = queue.busy_with(s, instance_id)
        if busy is not None:
            raise RotationRefused(f"instance {instance_id} has an operation in progress "
                                  f"({busy.kind}: {busy.description})")
        op = queue.new_operation(instance_id, KIND, params=RotationParams(cause=cause), owner=owner,
                                 description=f"queued: rotating certificates ({cause})")
        s.add(op)
        return op.id


def _nodes_in_order(inst: Instance) -> list[Node]:
    """Running nodes, the primary first: a standby made before TLS keeps replicating
    (its libpq prefers TLS) while the primary turns TLS-only."""
    live = [n for n in inst.live_nodes() if n.state == NODE_RUNNING and n.management_address]
    return sorted(live, key=lambda n: n.role != PRIMARY)


def ca(ctx: Context) -> None:
    node_create.ensure_ca(ctx)


def rotate_node(ctx: Context, node: Node) -> None:
    inst = ctx.instance()
    if not inst.tls_ca_cert or not inst.tls_ca_key_enc or not node.management_address:
        raise StepFailed("the instance has no CA")
    addresses = [a for a in (inst.service_address, node.management_address) if a]
    issued = tls.issue_node_cert(inst.tls_ca_cert, ctx.vault.decrypt(inst.tls_ca_key_enc),
                                 node_id=node.id, addresses=addresses,
                                 days=ctx.settings.tls.cert_days,
                                 previous_issued_at=node.tls_issued_at or 0)
    expiry = aware(node.tls_expires_at)
    if expiry is not None and expiry <= utcnow():
        conn = connection.connect(node.management_address, node_access.admin_password(ctx, inst),
                                  bind_channel=True)
    else:
        conn = connection.connect(node.management_address, node_access.admin_password(ctx, inst),
                                  ca_pem=inst.ca_for(node))
    try:
        ca_path = tls_files.install_tls(conn, ca_pem=inst.tls_ca_cert, cert_pem=issued.cert_pem,
                                        key_pem=issued.key_pem, issued_at=issued.issued_at)
    finally:
        conn.close()
    try:
        connection.wait_ready(node.management_address, node_access.admin_password(ctx, inst),
                              timeout=VERIFY_TIMEOUT, ca_pem=inst.tls_ca_cert)
    except connection.PgNotReady as exc:
        raise StepFailed(f"node {node.id} does not serve its new certificate: {exc}") from None
    node_create.record_certificate(ctx, node.id, issued)
    node_access.refresh_hba(ctx, node.id)
    with node_access.admin_connection(ctx, node) as conn:
        tls_files.verify_replication(conn, ca_path)
    log.info("instance %s: node %s serves a new certificate (expires %s)", inst.id, node.id,
             issued.expires_at.isoformat(timespec="seconds"))


def certificates(ctx: Context) -> None:
    for node in _nodes_in_order(ctx.instance()):
        ctx.progress(f"rotating certificates: node {node.id} ({node.role})")
        rotate_node(ctx, node)


def steps(ctx: Context) -> list[Step]:
    return [
        Step("ca", "rotating certificates: the instance's CA", ca),
        Step("certificates", "rotating certificates: the nodes", certificates),
    ]


WORKFLOW = Workflow(kind=KIND, steps=steps, done="certificates rotated",
                    params=RotationParams,
                    deprovision_preempts=True)
