"""Shared by the failover tests and benchmarks/failover.py.

- `failover_env`: a local cloud whose root is `<state dir>/local-cloud`, so that a real
  `python -m broker worker` started with BROKER_STATE_DIR=<state dir> drives the very
  same cloud; a state store (SQLite there, or a PostgreSQL URL), a key, a runtime.
  Teardown destroys everything and asserts nothing is left.
- `Writer`: an app writing through the service address the whole time, with client
  deadlines (a frozen server must not hang it), recording which commits were
  acknowledged and when.
- Faults: kill -9 everything in a server's namespace, take its links down, SIGSTOP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud, namespace_pids
from broker.monitor.loop import Monitor
from broker.operations import bindings
from broker.operations.engine import Engine
from broker.pg import connection, replication
from broker.pg.probe import DeadlinePassed, wait_async
from broker.runtime import Runtime
from broker.store.models import (
    NODE_DELETED,
    READY,
    UNFINISHED,
    Failover,
    Instance,
    Operation,
)
from tests.fixtures.local import (
    assert_no_users_left,
    cloud_users,
    crash_namespace,
    free_test_network,
    list_interfaces,
    list_namespaces,
    postgres_processes_under,
)
from tests.fixtures.pg import pg_bin_dir, world_traversable_tmpdir
from tests.workflow_support import app_tls, instance, make_engine, make_runtime

ROOT = Path(__file__).resolve().parent.parent


# --- the environment ---------------------------------------------------------------------
@dataclass
class FailoverEnv:
    base: Path                  # BROKER_STATE_DIR
    cloud: LocalCloud
    state_url: str
    key: str
    runtime: Runtime
    engine: Engine
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update({
            "BROKER_STATE_DIR": str(self.base), "DATABASE_URL": self.state_url,
            "BROKER_ENCRYPTION_KEY": self.key, "BROKER_LOCAL_NETWORK": str(self.cloud.network),
            "BROKER_LOCAL_BRIDGE": self.cloud.bridge, "BROKER_PG_BIN": self.cloud.pg_bin,
            "BROKER_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def start_worker(self, log_name: str, **extra: str) -> subprocess.Popen[bytes]:
        """A real `python -m broker worker` (engine + monitor) on this store and cloud."""
        log = open(self.base / f"{log_name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "broker", "worker"], cwd=ROOT,
                                env=self.worker_env(**extra), stdout=log, stderr=log)
        log.close()
        self.workers.append(proc)
        return proc

    def worker_log(self, log_name: str) -> str:
        path = self.base / f"{log_name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_workers(self) -> None:
        keep = os.environ.get("FAILOVER_KEEP_LOGS")
        if keep:  # for a human debugging a run: copy the workers' logs out first
            for path in self.base.glob("*.log"):
                shutil.copy(path, Path(keep) / f"{self.base.name}-{path.name}")
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


@contextlib.contextmanager
def failover_env(state_url: str | None = None) -> Iterator[FailoverEnv]:
    if os.geteuid() != 0:
        import pytest

        pytest.skip("the local cloud needs root")
    base = world_traversable_tmpdir("pgha-fo-")
    cloud = LocalCloud(base / "local-cloud", free_test_network(), f"pgf{os.urandom(4).hex()}",
                       pg_bin=pg_bin_dir())
    key = Fernet.generate_key().decode()
    url = state_url or f"sqlite:///{base / 'broker.sqlite3'}"
    runtime = make_runtime(url, key, cloud)
    env = FailoverEnv(base=base, cloud=cloud, state_url=url, key=key, runtime=runtime,
                      engine=make_engine(runtime))
    try:
        yield env
    finally:
        env.stop_workers()
        heal_partitions()
        thaw_everything(cloud)
        namespaces = set(cloud.namespaces())
        interfaces = set(cloud.interface_names())
        users = cloud_users(cloud)
        cloud.destroy_everything()
        runtime.store.dispose()
        leftovers = postgres_processes_under(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not namespaces & list_namespaces(), "namespaces left behind"
        assert not interfaces & list_interfaces(), "interfaces left behind"
        assert not leftovers, "PostgreSQL processes left behind"
        assert_no_users_left(cloud, users)
        assert not base.exists(), f"{base} left behind"


@contextlib.contextmanager
def background(env: FailoverEnv, runtime: Runtime | None = None) -> Iterator[Monitor]:
    """The worker's two threads in this process: the engine loop and the monitor."""
    runtime = runtime or env.runtime
    stop = threading.Event()
    engine = make_engine(runtime)
    monitor = Monitor(runtime, engine)
    threads = [threading.Thread(target=engine.loop, args=(stop,), daemon=True),
               threading.Thread(target=monitor.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    try:
        yield monitor
    finally:
        stop.set()
        engine.wake()
        for t in threads:
            t.join(timeout=30)


# --- faults --------------------------------------------------------------------------------
def netns(cloud: LocalCloud, server_id: str) -> str:
    return cloud.namespace(server_id)


def kill_server(cloud: LocalCloud, server_id: str, *, links_down: bool = False) -> None:
    """kill -9 every process in the server's namespace (and cut its links: a dead host)."""
    crash_namespace(netns(cloud, server_id), links_down=links_down)


def freeze_server(cloud: LocalCloud, server_id: str) -> list[int]:
    """SIGSTOP the postmaster and all its children (the server hangs, TCP still answers)."""
    pids = namespace_pids(netns(cloud, server_id))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


_BLACKHOLES: set[str] = set()


def partition_from_broker(cloud: LocalCloud, server_id: str) -> None:
    """The broker (this host) can no longer reach the server's management address; apps
    still reach the service address and the standby still streams: a partition."""
    server = cloud.get_server(server_id)
    assert server is not None and server.management_address
    subprocess.run(["ip", "route", "add", "blackhole", f"{server.management_address}/32"],
                   check=True)
    _BLACKHOLES.add(server.management_address)


def heal_partitions() -> None:
    for address in list(_BLACKHOLES):
        subprocess.run(["ip", "route", "del", "blackhole", f"{address}/32"], check=False,
                       capture_output=True)
        _BLACKHOLES.discard(address)


def thaw_everything(cloud: LocalCloud) -> None:
    """SIGCONT whatever a test froze, so that teardown can stop it."""
    for ns in cloud.namespaces():
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --- the app -------------------------------------------------------------------------------
class Writer(threading.Thread):
    """Inserts increasing ids through the service address; an id counts as acknowledged
    only when its COMMIT returned. Client deadlines: connect 0.5 s, statement 1 s (a
    frozen server would otherwise hang the app, as it would without driver timeouts)."""

    def __init__(self, credentials: dict[str, Any], *, connect_timeout: float = 0.5,
                 statement_timeout: float = 1.0, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.pause = pause
        self.acked: list[tuple[int, float]] = []    # (id, monotonic time of the ack)
        self.failures = 0
        self.last_error = ""
        self._halt = threading.Event()
        self.errors: list[tuple[float, str]] = []    # (monotonic time, what failed)
        self._next = 1
        self._conn: Any = None

    def _connect(self) -> Any:
        c = self.credentials
        conn = psycopg2.connect(host=c["host"], port=c["port"], user=c["username"],
                                password=c["password"], dbname=c["name"], async_=True,
                                sslmode=c.get("sslmode", "prefer"), **app_tls(c))
        try:
            wait_async(conn, time.monotonic() + self.connect_timeout)
        except DeadlinePassed:
            conn.close()
            raise DeadlinePassed("connect timed out") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _insert(self, value: int) -> None:
        if self._conn is None:
            self._conn = self._connect()
        cur = self._conn.cursor()
        cur.execute("INSERT INTO acked (id) VALUES (%s)", (value,))
        try:
            wait_async(self._conn, time.monotonic() + self.statement_timeout)
        except DeadlinePassed:
            raise DeadlinePassed("statement timed out") from None

    def run(self) -> None:
        while not self._halt.is_set():
            value = self._next
            self._next += 1
            try:
                self._insert(value)
                self.acked.append((value, time.monotonic()))
            except (psycopg2.Error, DeadlinePassed, OSError) as exc:
                self.failures += 1
                self.last_error = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:120]}"
                self.errors.append((time.monotonic(), self.last_error))
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                    self._conn = None
            time.sleep(self.pause)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def acked_after(self, moment: float) -> list[int]:
        return [i for i, t in self.acked if t > moment]

    def first_ack_after(self, moment: float) -> float | None:
        return next((t for _i, t in self.acked if t > moment), None)

    def first_error_after(self, moment: float) -> float | None:
        return next((t for t, _e in self.errors if t > moment), None)

    def wait_recovery(self, fault_at: float, timeout: float = 60.0) -> float:
        """The first acknowledged write after the outage the fault caused (a commit that
        was in flight at the fault and returned right after it does not count)."""
        deadline = time.monotonic() + timeout
        while True:
            failed = self.first_error_after(fault_at)
            if failed is not None:
                first = self.first_ack_after(failed)
                if first is not None:
                    return first
            if time.monotonic() > deadline:
                raise AssertionError(f"writes did not resume within {timeout:.0f} s "
                                     f"(last error: {self.last_error})")
            time.sleep(0.01)

    def wait_acks(self, count: int, after: float = 0.0, timeout: float = 60.0) -> float:
        """Until `count` acks happened after `after`; returns the first such ack's time."""
        deadline = time.monotonic() + timeout
        while len(self.acked_after(after)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"writes did not resume within {timeout:.0f} s "
                                     f"(last error: {self.last_error})")
            time.sleep(0.01)
        first = self.first_ack_after(after)
        assert first is not None
        return first


def app_credentials(env: FailoverEnv, instance_id: str, binding_id: str = "app") -> dict[str, Any]:
    creds = bindings.create_binding(env.runtime, instance_id, binding_id, app_guid="app-guid",
                                    bind_resource={}, parameters={}).credentials
    conn = psycopg2.connect(creds["uri"], connect_timeout=5, **app_tls(creds))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    conn.close()
    return creds


def stored_ids(credentials: dict[str, Any]) -> set[int]:
    conn = psycopg2.connect(credentials["uri"], connect_timeout=5, **app_tls(credentials))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM acked")
            return {int(r[0]) for r in cur.fetchall()}
    finally:
        conn.close()


# --- what a user checks ------------------------------------------------------------------
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


def unfinished(env: FailoverEnv, instance_id: str) -> list[Operation]:
    with env.runtime.store.session() as s:
        return list(s.query(Operation).filter(Operation.instance_id == instance_id,
                                              Operation.state.in_(UNFINISHED)))


def operations(env: FailoverEnv, instance_id: str, kind: str | None = None) -> list[Operation]:
    with env.runtime.store.session() as s:
        q = s.query(Operation).filter(Operation.instance_id == instance_id)
        if kind is not None:
            q = q.filter(Operation.kind == kind)
        return list(q.order_by(Operation.created_at))


def failovers(env: FailoverEnv, instance_id: str) -> list[Failover]:
    with env.runtime.store.session() as s:
        return list(s.query(Failover).filter(Failover.instance_id == instance_id)
                    .order_by(Failover.detected_at))


def settled(env: FailoverEnv, instance_id: str) -> bool:
    """Ready again, nothing running, a standby that the primary sees streaming."""
    inst = instance(env.runtime, instance_id)
    if inst.state != READY or unfinished(env, instance_id):
        return False
    return standby_streaming(env, inst) is not None


def standby_streaming(env: FailoverEnv, inst: Instance) -> replication.StandbyInfo | None:
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


# --- one primary failure, checked the way a user would ---------------------------------------
@dataclass
class Outcome:
    kill_at: float
    first_write: float          # seconds from the fault to the first acknowledged write
    settled: float              # seconds from the fault to a streaming standby, instance ready
    acked: int
    lost: set[int]


def fail_primary(env: FailoverEnv, instance_id: str, creds: dict[str, Any], writer: Writer,
                 fault: Callable[[LocalCloud, str], Any], *, settle_timeout: float = 90.0
                 ) -> Outcome:
    """Apply `fault` to the primary's server under write load; wait until writes resume
    and the instance is ready with a streaming standby again."""
    inst = instance(env.runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.server_id is not None
    writer.wait_acks(20)
    kill_at = time.monotonic()
    fault(env.cloud, primary.server_id)
    first = writer.wait_acks(5, after=kill_at, timeout=60)
    eventually(lambda: settled(env, instance_id) and
               instance(env.runtime, instance_id).primary().id != primary.id,  # type: ignore[union-attr]
               "the instance ready again with a streaming standby", settle_timeout)
    settled_at = time.monotonic()
    writer.wait_acks(5, after=settled_at)
    return Outcome(kill_at=kill_at, first_write=first - kill_at,
                   settled=settled_at - kill_at, acked=len(writer.acked),
                   lost={i for i, _ in writer.acked} - stored_ids(creds))


def monitor_owner(env: FailoverEnv, instance_id: str, pid: int | None = None) -> str | None:
    """The live holder of the instance's monitor lease (only if it is process `pid`)."""
    from broker.monitor.leases import Leases, monitor_lease_name

    owner = Leases(env.runtime.store, "reader", 1.0).holder(monitor_lease_name(instance_id))
    if owner is None or (pid is not None and owner.split(":")[1] != str(pid)):
        return None
    return owner


def fail_primary_standalone(env: FailoverEnv, instance_id: str, creds: dict[str, Any],
                            writer: Writer, fault: Callable[[LocalCloud, str], Any]) -> set[int]:
    """Fault the only server; wait for the resurrect; returns acknowledged ids lost."""
    inst = instance(env.runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.server_id is not None
    writer.wait_acks(20)
    kill_at = time.monotonic()
    fault(env.cloud, primary.server_id)
    writer.wait_acks(5, after=kill_at, timeout=120)
    eventually(lambda: not unfinished(env, instance_id) and
               instance(env.runtime, instance_id).state == READY and
               instance(env.runtime, instance_id).primary().id != primary.id,  # type: ignore[union-attr]
               "the instance resurrected", 120)
    return {i for i, _ in writer.acked} - stored_ids(creds)
