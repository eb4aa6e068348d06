"""Each instance's status page: `/dashboard/<instance id>/<token>`, the OSB `dashboard_url`.

Access: whoever holds the URL. The token is an HMAC of the instance id under a key
derived from the broker's encryption key (`Vault.mac`), so nothing is stored and no
migration is needed; Cloud Controller hands the URL only to those who may see the
instance (space members). A wrong token and an unknown instance get the same 404,
and the token is checked (constant time) before the store is read, so the answer
says nothing about which instances exist. The page reads the store only (no node,
no cloud call): it costs one query whoever loads it, however often.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from flask import Flask, Response, request
from sqlalchemy import select

from broker.metrics.store import failover_phases
from broker.runtime import Runtime
from broker.store.models import NODE_DELETED, Failover, Instance, aware, utcnow
from broker.web import page

ENDPOINT = "dashboard"
_PURPOSE = "dashboard"
# The failovers a page lists, newest first.
HISTORY = 20


def token_for(runtime: Runtime, instance_id: str) -> str:
    return runtime.vault.mac(_PURPOSE, instance_id)


def dashboard_url(runtime: Runtime, instance_id: str) -> str:
    """The instance's status page; its base is BROKER_EXTERNAL_URL (or the app's first
    Cloud Foundry route), else the URL the platform is calling the broker at."""
    base = runtime.settings.observability.external_url or request.host_url.rstrip("/")
    return f"{base}/dashboard/{quote(instance_id, safe='')}/{token_for(runtime, instance_id)}"


@dataclass(frozen=True)
class NodeRow:
    id: str
    role: str
    state: str
    zone: str
    server: str
    lag: str
    certificate_expires: str


@dataclass(frozen=True)
class FailoverRow:
    detected: str
    kind: str
    outcome: str
    nodes: str
    cause: str
    phases: list[tuple[str, str]]
    lag_at_promotion: str
    detail: str


@dataclass(frozen=True)
class Status:
    instance_id: str
    name: str
    plan: str
    state: str
    state_reason: str
    replication: str
    service_address: str
    checked: str
    ca_expires: str
    nodes: list[NodeRow]
    failovers: list[FailoverRow]
    generated: str


def _when(value: datetime | None) -> str:
    value = aware(value)
    if value is None:
        return "-"
    seconds = (value - utcnow()).total_seconds()
    ago = abs(seconds)
    span = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200
            else f"{ago / 3600:.0f} h" if ago < 172800 else f"{ago / 86400:.0f} days")
    relative = f"in {span}" if seconds > 0 else f"{span} ago"
    return f"{value.strftime('%Y-%m-%d %H:%M:%S')} UTC ({relative})"


def read_status(runtime: Runtime, instance_id: str) -> Status | None:
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        if inst is None or inst.deleted_at is not None:
            return None
        plan = runtime.catalog.plan(inst.plan_id)
        nodes = []
        for node in inst.nodes:
            if node.state == NODE_DELETED:
                continue
            lag = "-"
            if node.role == "standby":
                lag = "not measured yet" if inst.last_lag_bytes is None else \
                    f"{inst.last_lag_bytes} bytes"
                if node.id == inst.sync_standby_node_id:
                    lag += ", synchronous"
            nodes.append(NodeRow(node.id, node.role, node.state, node.availability_zone,
                                 node.server_id or "-", lag, _when(node.tls_expires_at)))
        rows = s.scalars(select(Failover).where(Failover.instance_id == instance_id)
                         .order_by(Failover.detected_at.desc()).limit(HISTORY))
        failovers = [FailoverRow(
            _when(f.detected_at), f.kind, f.outcome or "in progress",
            f"{f.old_primary_node_id or '-'} → {f.new_primary_node_id or '-'}", f.cause,
            [(phase, f"{seconds:.3f} s") for phase, seconds in failover_phases(f)],
            "-" if f.lag_bytes_at_promotion is None else f"{f.lag_bytes_at_promotion} bytes",
            f.detail or "") for f in rows]
        name = (inst.context or {}).get("instance_name")
        return Status(
            instance_id=inst.id, name=name if isinstance(name, str) else inst.id,
            plan=plan.name if plan is not None else inst.plan_id, state=inst.state,
            state_reason=inst.state_reason or "", replication=inst.replication,
            service_address=inst.service_address or "-", checked=_when(inst.last_checked_at),
            ca_expires=_when(inst.tls_ca_expires_at), nodes=nodes, failovers=failovers,
            generated=_when(utcnow()))


def install(app: Flask, runtime: Runtime) -> None:
    def show(instance_id: str, token: str) -> Response:
        # The token first, whatever the instance: a miss costs the same either way.
        expected = token_for(runtime, instance_id)
        status = None
        if hmac.compare_digest(token.encode("utf-8", "surrogateescape"), expected.encode()):
            status = read_status(runtime, instance_id)
        if status is None:
            return page.respond(page.NOT_FOUND, 404)
        return page.respond(page.render(status), 200)

    app.add_url_rule("/dashboard/<instance_id>/<token>", ENDPOINT, show, methods=["GET"])
