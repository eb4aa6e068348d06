"""What a user checks, and waiting for it: `eventually`, the instance's operations (a
rebuild waiting for its zone) and failovers, whether it settled with a streaming
standby, who holds its monitor lease; `at_once`, many threads released together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from broker.monitor.leases import Leases, monitor_lease_name
from broker.pg import connection, replication
from broker.store.models import NODE_DELETED, READY, UNFINISHED, Failover, Instance, Operation
from harness.env import HasRuntime
from harness.workflows import instance


def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (psycopg2.Error, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


def at_once(task: Callable[[], Any], count: int) -> list[Any]:
    """Run `task` in `count` threads released together (a barrier); what each returned,
    or the exception it raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait(timeout=45)
        try:
            result: Any = task()
        except BaseException as exc:
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def unfinished(env: HasRuntime, instance_id: str) -> list[Operation]:
    with env.runtime.store.session() as s:
        return list(s.query(Operation).filter(Operation.instance_id == instance_id,
                                              Operation.state.in_(UNFINISHED)))


def operations(env: HasRuntime, instance_id: str, kind: str | None = None) -> list[Operation]:
    with env.runtime.store.session() as s:
        q = s.query(Operation).filter(Operation.instance_id == instance_id)
        if kind is not None:
            q = q.filter(Operation.kind == kind)
        return list(q.order_by(Operation.created_at))


def rebuild_waiting_for(env: HasRuntime, instance_id: str, zone: str,
                        timeout: float) -> Operation:
    """The instance's rebuild once it says it waits for `zone` to come back; unfinished."""
    def waiting() -> Operation | None:
        return next((op for op in operations(env, instance_id, "rebuild")
                     if f"waiting for availability zone {zone}" in (op.description or "")),
                    None)
    rebuild: Operation = eventually(waiting, f"the rebuild waiting for {zone}", timeout)
    assert rebuild.state in ("queued", "in progress")
    return rebuild


def failovers(env: HasRuntime, instance_id: str) -> list[Failover]:
    with env.runtime.store.session() as s:
        return list(s.query(Failover).filter(Failover.instance_id == instance_id)
                    .order_by(Failover.detected_at))


def settled(env: HasRuntime, instance_id: str) -> bool:
    """Ready again, nothing running, a standby that the primary sees streaming."""
    inst = instance(env.runtime, instance_id)
    if inst.state != READY or unfinished(env, instance_id):
        return False
    return standby_streaming(env, inst) is not None


def standby_streaming(env: HasRuntime, inst: Instance) -> replication.StandbyInfo | None:
    primary, standby = inst.primary(), inst.standby()
    if primary is None or standby is None or not primary.management_address:
        return None
    conn = connection.connect(primary.management_address,
                              env.runtime.vault.decrypt(inst.admin_password_enc), timeout=3)
    try:
        status = replication.replication_status(conn)
    finally:
        conn.close()
    info = next((s for s in status.standbys if s.application_name == standby.application_name),
                None)
    return info if info is not None and info.state == "streaming" else None


def live_node_count(inst: Instance) -> int:
    return sum(1 for n in inst.nodes if n.state != NODE_DELETED)




def monitor_owner(env: HasRuntime, instance_id: str, pid: int | None = None) -> str | None:
    """The live holder of the instance's monitor lease (only if it is process `pid`)."""
    owner = Leases(env.runtime.store, "reader", 1.0).holder(monitor_lease_name(instance_id))
    if owner is None or (pid is not None and owner.split(":")[1] != str(pid)):
        return None
    return owner
