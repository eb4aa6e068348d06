"""`python -m broker instances list|show ID [--json]|rotate-certs ID|switchover ID`:
what the broker runs, for operators.

`show` asks the primary for live replication facts (state, sync state, lag); a
node that does not answer is reported `unreachable`, never as an error. Certificate
expiries come from the store (no connection needed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from broker.backup import report
from broker.pg import connection, replication
from broker.runtime import Runtime
from broker.store.models import (
    DEPROVISIONED,
    NODE_DELETED,
    Failover,
    Instance,
    Node,
    Operation,
    aware,
)

CONNECT_TIMEOUT = 2.0


def _time(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat(timespec="milliseconds") if value is not None else None


def _plan_name(runtime: Runtime, plan_id: str) -> str:
    plan = runtime.catalog.plan(plan_id)
    return plan.name if plan is not None else f"unknown plan {plan_id}"


def list_instances(runtime: Runtime) -> int:
    with runtime.store.session() as s:
        rows = list(s.scalars(select(Instance).where(Instance.state != DEPROVISIONED)
                              .order_by(Instance.created_at)))
        lines = []
        for inst in rows:
            live = inst.live_nodes()
            lines.append((inst.id, _plan_name(runtime, inst.plan_id), inst.state,
                          inst.service_address or "-", str(len(live))))
    if not lines:
        print("no instances")
        return 0
    header = ("INSTANCE", "PLAN", "STATE", "SERVICE ADDRESS", "NODES")
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        print("  ".join(col.ljust(widths[i]) for i, col in enumerate(row)).rstrip())
    return 0


def _replication(runtime: Runtime, inst: Instance) -> dict[str, Any]:
    """Live facts from the primary, or why there are none."""
    primary = inst.primary()
    if primary is None or not primary.management_address:
        return {"reachable": False, "error": "no primary"}
    try:
        conn = connection.connect(primary.management_address,
                                  runtime.vault.decrypt(inst.admin_password_enc),
                                  timeout=CONNECT_TIMEOUT, ca_pem=inst.ca_for(primary))
    except Exception as exc:
        return {"reachable": False, "error": exc.__class__.__name__}
    try:
        status = replication.replication_status(conn)
    except Exception as exc:
        return {"reachable": False, "error": exc.__class__.__name__}
    finally:
        conn.close()
    return {
        "reachable": True,
        "primary_in_recovery": status.in_recovery,
        "synchronous_standby_names": status.synchronous_standby_names,
        "standbys": {
            s.application_name: {"state": s.state, "sync_state": s.sync_state,
                                 "lag_bytes": s.lag_bytes}
            for s in status.standbys
        },
    }


def _server_details(runtime: Runtime, node: Node) -> dict[str, Any]:
    if not node.server_id or node.state == NODE_DELETED:
        return {}
    try:
        server = runtime.cloud.get_server(node.server_id)
    except Exception as exc:
        return {"status": f"unknown ({exc.__class__.__name__})"}
    if server is None:
        return {"status": "gone"}
    return {"status": str(server.status), **server.details}


def describe_instance(runtime: Runtime, instance_id: str) -> dict[str, Any] | None:
    """Everything `show` prints, as plain data."""
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        if inst is None:
            return None
        node_rows = list(inst.nodes)
        ops = list(s.scalars(select(Operation).where(Operation.instance_id == instance_id)
                             .order_by(Operation.created_at)))
        failovers = list(s.scalars(select(Failover).where(Failover.instance_id == instance_id)
                                   .order_by(Failover.detected_at)))
        replication: dict[str, Any] = _replication(runtime, inst) if inst.live_nodes() else \
            {"reachable": False, "error": "no nodes"}
        standbys: dict[str, Any] = replication.get("standbys") or {}
        primary = inst.primary()
        out_nodes = []
        for node in node_rows:
            entry: dict[str, Any] = {
                "id": node.id, "role": node.role, "state": node.state,
                "availability_zone": node.availability_zone, "server_id": node.server_id,
                "management_address": node.management_address,
                "server": _server_details(runtime, node),
                "certificate_expires_at": _time(node.tls_expires_at),
            }
            if node.state != NODE_DELETED and primary is not None and node.id != primary.id:
                if not replication["reachable"]:
                    entry["replication"] = "unreachable"
                else:
                    entry["replication"] = standbys.get(
                        node.application_name, {"state": "not streaming"})
            out_nodes.append(entry)
        return {
            "id": inst.id,
            "plan": _plan_name(runtime, inst.plan_id),
            "plan_id": inst.plan_id,
            "state": inst.state,
            "state_reason": inst.state_reason,
            "replication_mode": inst.replication,
            "service_address": inst.service_address,
            "ca_expires_at": _time(inst.tls_ca_expires_at),
            "sync_standby_node_id": inst.sync_standby_node_id,
            "parameters": inst.parameters,
            "maintenance_version": inst.maintenance_version,
            "created_at": _time(inst.created_at),
            "deleted_at": _time(inst.deleted_at),
            "nodes": out_nodes,
            "replication": replication,
            "archiving": report.archiving(runtime, inst) if inst.live_nodes() else
            {"reachable": False, "error": "no nodes"},
            "operations": [
                {"id": op.id, "kind": op.kind, "state": op.state,
                 "description": op.description, "error": op.error,
                 "created_at": _time(op.created_at), "finished_at": _time(op.finished_at)}
                for op in ops
            ],
            "failovers": [
                {"kind": f.kind, "cause": f.cause, "outcome": f.outcome,
                 "old_primary": f.old_primary_node_id, "new_primary": f.new_primary_node_id,
                 "lag_bytes_at_promotion": f.lag_bytes_at_promotion,
                 "detected_at": _time(f.detected_at), "fenced_at": _time(f.fenced_at),
                 "promoted_at": _time(f.promoted_at),
                 "port_attached_at": _time(f.port_attached_at),
                 "standby_streaming_at": _time(f.standby_streaming_at),
                 "timings": _timings(f), "detail": f.detail}
                for f in failovers
            ],
        }


def _timings(f: Failover) -> dict[str, float | None]:
    """Seconds from detection to each stage: what operators compare between events."""
    start = aware(f.detected_at)
    out: dict[str, float | None] = {}
    for name in ("fenced_at", "promoted_at", "port_attached_at", "standby_streaming_at"):
        at = aware(getattr(f, name))
        out[name] = None if at is None or start is None else round(
            (at - start).total_seconds(), 3)
    return out


def _lag(value: Any) -> str:
    if isinstance(value, dict):
        lag = value.get("lag_bytes")
        text = f"{value.get('state')}"
        if value.get("sync_state"):
            text += f", {value['sync_state']}"
        if lag is not None:
            text += f", lag {lag} bytes"
        return text
    return str(value)


def show_instance(runtime: Runtime, instance_id: str, as_json: bool) -> int:
    info = describe_instance(runtime, instance_id)
    if info is None:
        print(f"no instance {instance_id}")
        return 1
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    state = info["state"] + (f" ({info['state_reason']})" if info["state_reason"] else "")
    print(f"instance         {info['id']}")
    print(f"plan             {info['plan']} (replication {info['replication_mode']})")
    print(f"state            {state}")
    print(f"service address  {info['service_address'] or '-'}")
    print(f"TLS CA expires   {info['ca_expires_at'] or '- (no TLS: run rotate-certs)'}")
    if not info["replication"]["reachable"] and info["state"] != DEPROVISIONED:
        print(f"replication      unreachable ({info['replication']['error']})")
    archiving = info["archiving"]
    print("archiving        " + (archiving["summary"] if archiving["reachable"]
                                 else f"unreachable ({archiving['error']})"))
    print("nodes")
    for node in info["nodes"]:
        server = node["server"]
        extra = ", ".join(f"{k} {v}" for k, v in server.items())
        print(f"  {node['id']}  {node['role']:<11} {node['state']:<8} "
              f"{node['availability_zone']:<6} server {node['server_id'] or '-'}"
              + (f" ({extra})" if extra else ""))
        if node["certificate_expires_at"] and node["state"] != NODE_DELETED:
            print(f"      certificate expires {node['certificate_expires_at']}")
        if "replication" in node:
            print(f"      replication: {_lag(node['replication'])}")
    print("operations")
    for op in info["operations"]:
        print(f"  {op['created_at']}  {op['kind']:<11} {op['state']:<11} {op['description']}"
              + (f"  finished {op['finished_at']}" if op["finished_at"] else ""))
    if info["failovers"]:
        print("failovers")
        for f in info["failovers"]:
            print(f"  {f['detected_at']}  {f['kind']:<10} {f['outcome'] or 'in progress':<10} "
                  f"{f['old_primary']} -> {f['new_primary']}: {f['cause']}")
            stages = ", ".join(f"{name.removesuffix('_at').replace('_', ' ')} +{t:.2f}s"
                               for name, t in f["timings"].items() if t is not None)
            lag = f["lag_bytes_at_promotion"]
            print(f"      {stages or 'no stage reached'}"
                  + (f"; lag at promotion {lag} B" if lag is not None else ""))
    return 0


def _queue(action: str, queued: str, instance_id: str, queue: Callable[[], str],
           refusal: type[Exception]) -> int:
    """Queue an operation (a worker runs it) and tell the operator how to follow it."""
    try:
        op_id = queue()
    except refusal as exc:
        print(f"broker: {action} refused: {exc}", file=sys.stderr)
        return 1
    print(f"{queued} queued as operation {op_id}; follow it with "
          f"`python -m broker instances show {instance_id}`")
    return 0


def rotate_certs(runtime: Runtime, instance_id: str) -> int:
    from broker.operations.certs import RotationRefused, queue_rotation

    return _queue("rotate-certs", "certificate rotation", instance_id,
                  lambda: queue_rotation(runtime.store, instance_id,
                                         cause="asked by an operator"),
                  RotationRefused)


def switchover(runtime: Runtime, instance_id: str) -> int:
    from broker.operations.refusals import Refused
    from broker.operations.switchover import start_switchover

    return _queue("switchover", "switchover", instance_id,
                  lambda: start_switchover(runtime.store, instance_id), Refused)
