"""The monitor's sweep: persistent probe sessions, a closed session noticed at once, a
node that never answers decided on by its probes' deadline, leases between workers.

The e2e tests run the monitor with a 60 s check interval against a real PostgreSQL
server that answers as a standalone instance's node, or against a black hole (a
loopback address whose SYNs are dropped): anything the monitor does within seconds of
the fault cannot come from its next sweep. The unit tests cover schedule.py, which
sends a check's decision to the sweep or to a watcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg2
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from broker.config import load_settings
from broker.monitor import schedule
from broker.monitor.decide import (
    Decision,
    QueueFailover,
    Record,
    Snapshot,
    Watch,
)
from broker.monitor.leases import monitor_lease_name
from broker.monitor.loop import MAX_SUSPECTED, Monitor
from broker.monitor.sweep import ProbeLoop
from broker.operations.resurrect import KIND as RESURRECT
from broker.pg.probe import Probe
from broker.runtime import Runtime, build_runtime
from broker.store.models import (
    DEGRADED,
    NODE_RUNNING,
    PRIMARY,
    READY,
    Instance,
    Node,
    Operation,
)
from harness.machine import pg_bin_dir, release_interlock, world_traversable_tmpdir
from harness.waiting import eventually

INTERVAL = 60.0  # far longer than any of these tests waits for the monitor


# --- unit: which path a decision takes ----------------------------------------------------
def _snap(**kw: object) -> Snapshot:
    return Snapshot("i", Watch(), 0.0, **kw)  # type: ignore[arg-type]


def test_a_healthy_check_stays_in_the_sweep_and_its_record_is_batched() -> None:
    decision = Decision("primary healthy (standalone)", record=Record(0, None, healthy=True))
    assert schedule.settled(decision)
    assert schedule.record_only(_snap(), decision)


def test_a_failed_probe_or_an_action_goes_to_a_watcher() -> None:
    first_failure = Decision("primary unreachable 1/3", watch=Watch(primary_failures=1,
                                                                    urgent=True))
    standby_failure = Decision("standby unreachable 1/3", watch=Watch(standby_failures=1))
    failover = Decision("failover queued", QueueFailover("gone", "p", "s", None))
    for decision in (first_failure, standby_failure, failover):
        assert not schedule.settled(decision)


def test_records_that_change_state_are_not_batched() -> None:
    healthy = Decision("primary healthy", record=Record(0, None, healthy=True))
    assert not schedule.record_only(_snap(state=DEGRADED), healthy)  # back to ready
    newly_sync = Decision("primary healthy", record=Record(0, "s"))
    assert not schedule.record_only(_snap(), newly_sync)             # sync standby changed
    assert schedule.record_only(_snap(sync_standby_id="s"), newly_sync)
    assert not schedule.record_only(_snap(), Decision("operation in progress"))


# --- e2e: a real server behind a standalone instance -----------------------------------------
class NodeServer:
    """PostgreSQL on a random loopback address, port 5432 (the port the monitor probes)."""

    def __init__(self) -> None:
        self.address = f"127.{random.randint(100, 199)}.{random.randint(1, 254)}." \
                       f"{random.randint(1, 254)}"
        self.password = uuid.uuid4().hex
        self.root = world_traversable_tmpdir("pgha-sweep-")
        self.data = self.root / "data"
        bin_dir = pg_bin_dir()
        user = pwd.getpwnam("postgres")
        os.chown(self.root, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            self._as_postgres(f"{bin_dir}/initdb", "-D", str(self.data), "-U", "postgres",
                              "-N", "-A", "scram-sha-256", f"--pwfile={pwfile}")
            pwfile.unlink()
            self._as_postgres(f"{bin_dir}/pg_ctl", "-D", str(self.data), "-w", "-l",
                              str(self.root / "log"), "-o",
                              f"-c listen_addresses={self.address} -c port=5432 "
                              f"-c unix_socket_directories={self.root} -c fsync=off", "start")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.bin_dir = bin_dir

    @staticmethod
    def _as_postgres(*cmd: str) -> None:
        user = pwd.getpwnam("postgres")

        def demote() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        subprocess.run(cmd, check=True, capture_output=True, preexec_fn=demote)

    def monitor_sessions(self) -> list[str]:
        """The states of the monitor's sessions, as the server sees them."""
        return [str(state) for state, _pid, _query in self._monitor_activity()]

    def monitor_session_queries(self) -> list[tuple[int, str]]:
        """(backend pid, last statement) of each of the monitor's sessions."""
        return [(int(str(pid)), str(query)) for _state, pid, query in self._monitor_activity()]

    def _monitor_activity(self) -> list[tuple[object, ...]]:
        conn = psycopg2.connect(host=self.address, user="postgres", password=self.password,
                                dbname="postgres", connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT state, pid, query FROM pg_stat_activity "
                            "WHERE application_name = 'pgha-monitor'")
                return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()

    def terminate_monitor_sessions(self) -> None:
        conn = psycopg2.connect(host=self.address, user="postgres", password=self.password,
                                dbname="postgres", connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'pgha-monitor'")
        finally:
            conn.close()

    def kill(self) -> None:
        """kill -9 the postmaster and every backend: a crash."""
        self._signal_all(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP every process: the kernel still accepts connections, nothing answers."""
        self.frozen = True
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)
        self.frozen = False

    def _signal_all(self, signum: int) -> None:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                  text=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        if getattr(self, "frozen", False):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.thaw()   # else the stop below would wait for it
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_postgres(f"{self.bin_dir}/pg_ctl", "-D", str(self.data), "-m",
                                  "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # killed by the test
        finally:
            release_interlock(self.data)
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def node_server() -> Iterator[NodeServer]:
    server = NodeServer()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _runtime(pg_state_url: str, **env: str) -> Iterator[Runtime]:
    state_dir = world_traversable_tmpdir("pgha-sweep-state-")
    settings = load_settings({
        "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": str(state_dir),
        "DATABASE_URL": pg_state_url, "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        **env})
    rt = build_runtime(settings)
    try:
        yield rt
    finally:
        rt.store.dispose()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def runtime(pg_state_url: str) -> Iterator[Runtime]:
    with _runtime(pg_state_url, BROKER_MONITOR_INTERVAL=str(INTERVAL),
                  BROKER_MONITOR_LEASE_SECONDS=str(INTERVAL * 3)) as rt:
        yield rt


class BlackHole:
    """A loopback address whose port 5432 drops every SYN: a listener with a backlog of
    one, filled by a connection it never accepts. A probe's connect gets no answer at
    all (no refusal, no event on its socket), as from a host whose links are down."""

    def __init__(self) -> None:
        self.address = f"127.{random.randint(100, 199)}.{random.randint(1, 254)}." \
                       f"{random.randint(1, 254)}"
        self.password = uuid.uuid4().hex
        self.listener = socket.socket()
        self.listener.bind((self.address, 5432))
        self.listener.listen(0)
        self.filler = socket.create_connection((self.address, 5432), timeout=5)

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


def _standalone(runtime: Runtime, server: NodeServer | BlackHole) -> str:
    plan = runtime.catalog.plan_by_name("standalone")
    secret = runtime.vault.encrypt(server.password)
    instance_id = str(uuid.uuid4())
    with runtime.store.session() as s:
        s.add(Instance(id=instance_id, service_id=plan.service_id, plan_id=plan.id,
                       organization_guid="org", space_guid="space", state=READY,
                       replication="async", service_address=server.address,
                       admin_password_enc=secret, replication_password_enc=secret,
                       context={"instance_name": "sweep"}))
        s.add(Node(id=uuid.uuid4().hex[:8], instance_id=instance_id, role=PRIMARY,
                   state=NODE_RUNNING, availability_zone="az1",
                   management_address=server.address))
    return instance_id


def _queued(runtime: Runtime, instance_id: str) -> list[str]:
    with runtime.store.session() as s:
        return list(s.scalars(select(Operation.kind)
                              .where(Operation.instance_id == instance_id)))


@pytest.fixture
def watched(runtime: Runtime, node_server: NodeServer) -> Iterator[tuple[str, float]]:
    """The instance, watched by a monitor started at the returned monotonic time, once
    its persistent probe session is idle on the server."""
    instance_id = _standalone(runtime, node_server)
    monitor = Monitor(runtime, None, drive_queued=False)
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        eventually(lambda: node_server.monitor_sessions() == ["idle"],
                   "one idle monitor session on the server", 30)
        yield instance_id, started
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.mark.e2e
def test_a_crashed_node_is_failed_over_at_once_not_at_the_next_sweep(
        runtime: Runtime, node_server: NodeServer, watched: tuple[str, float]) -> None:
    instance_id, started = watched
    assert _queued(runtime, instance_id) == []
    node_server.kill()
    killed = time.monotonic()
    eventually(lambda: _queued(runtime, instance_id) == [RESURRECT],
               "the failover (resurrect) queued", 30)
    queued = time.monotonic()
    # The sweep after the first one is due INTERVAL after the start: the failover was
    # queued long before, so the closed session, not a sweep, set it off.
    assert queued - started < INTERVAL / 2
    assert queued - killed < INTERVAL / 2


@pytest.mark.e2e
def test_one_closed_session_is_not_enough_to_fail_over(
        runtime: Runtime, node_server: NodeServer, watched: tuple[str, float]) -> None:
    """A terminated session while the server runs (an administrator, a pooler) counts as
    one failed probe: the confirmations connect afresh, find the node alive, and the
    sweep opens a new session; nothing is queued."""
    instance_id, started = watched
    node_server.terminate_monitor_sessions()
    eventually(lambda: node_server.monitor_sessions() == ["idle"],
               "a new idle monitor session on the server", 20)
    assert time.monotonic() - started < INTERVAL / 2  # not by the next sweep either
    time.sleep(1.0)  # the confirmations' time, with margin: still nothing queued
    assert _queued(runtime, instance_id) == []


def test_a_black_hole_gets_no_answer_at_all(black_hole: BlackHole) -> None:
    """The fixture is what it claims: a connect there neither succeeds nor fails."""
    probe = socket.socket()
    probe.settimeout(1.5)
    try:
        with pytest.raises(TimeoutError):
            probe.connect((black_hole.address, 5432))
    finally:
        probe.close()


def test_a_new_session_to_a_node_that_never_answers_ends_at_its_deadline(
        black_hole: BlackHole) -> None:
    """The first probe of a link connects: its socket is new to the selector and gets
    no event, ever. Its deadline alone ends it, as a failed probe."""
    results: list[tuple[tuple[str, str], Probe]] = []
    loop = ProbeLoop(1.0, lambda key, result: results.append((key, result)))
    key = ("instance", PRIMARY)
    try:
        loop.link(key, black_hole.address, black_hole.password, None)
        loop.submit([key])
        stop = threading.Event()
        guard = time.monotonic() + 45
        while not results and time.monotonic() < guard:
            loop.run(until=time.monotonic() + 0.5, stop=stop)
    finally:
        loop.close_all()
    [(seen_key, result)] = results
    assert seen_key == key
    assert result.outcome == "down" and result.error == "no answer within 1 s", result
    assert loop.in_flight == 0


def _failed_over_before_the_next_sweep(runtime: Runtime, monitor: Monitor,
                                       instance_id: str) -> None:
    """Run `monitor` until it queued the instance's failover (resurrect), which must come
    before its next sweep, due INTERVAL after the start."""
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        eventually(lambda: _queued(runtime, instance_id) == [RESURRECT],
                   "the failover (resurrect) queued", 45)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - started < INTERVAL / 2


@pytest.mark.e2e
def test_a_node_black_holed_from_the_first_sweep_is_failed_over(
        runtime: Runtime, black_hole: BlackHole) -> None:
    """The first sweep's probes of a fresh monitor stay pending (no answer, no refusal):
    the instance is still decided on, by their deadline and the watcher's
    confirmations, not left out of every later sweep."""
    instance_id = _standalone(runtime, black_hole)
    _failed_over_before_the_next_sweep(runtime, Monitor(runtime, None, drive_queued=False),
                                       instance_id)


@pytest.mark.e2e
def test_an_instance_whose_probe_was_lost_is_still_decided_on(
        runtime: Runtime, black_hole: BlackHole) -> None:
    """Should the probe loop ever lose a probe (here: its submissions are dropped), the
    instance waits for nothing that runs: its own watcher checks it with fresh probes
    and fails the black-holed node over, long before the next sweep."""
    instance_id = _standalone(runtime, black_hole)
    monitor = Monitor(runtime, None, drive_queued=False)
    monitor.probes.submit = lambda jobs: None  # type: ignore[method-assign]
    _failed_over_before_the_next_sweep(runtime, monitor, instance_id)


LEASE_SECONDS = 4.0


@pytest.mark.e2e
def test_a_dead_worker_on_another_host_is_taken_over_when_its_lease_expires(
        pg_state_url: str, node_server: NodeServer) -> None:
    """A worker of another host took the instance and died (its pid is dead here too,
    which must not matter: that host's pids are not this one's). Another worker takes
    it over only once the lease expired, then fails the instance over when it crashes."""
    with _runtime(pg_state_url, BROKER_MONITOR_LEASE_SECONDS=str(LEASE_SECONDS)) as rt:
        instance_id = _standalone(rt, node_server)
        dead = Monitor(rt, None, owner="other-host:999999:monitor-dead00",
                       drive_queued=False)
        dead.tick(threading.Event())   # its heartbeat and the instance's lease; then "dies"
        dead.probes.close_all()
        held = dead.leases.term(monitor_lease_name(instance_id))
        assert held is not None and held[0] == dead.owner
        expiry = held[1]

        heir = Monitor(rt, None, drive_queued=False)
        stop = threading.Event()
        thread = threading.Thread(target=heir.run, args=(stop,), daemon=True)
        thread.start()
        try:
            taken = eventually(lambda: (lambda h: h if h and h[0] == heir.owner else None)(
                heir.leases.term(monitor_lease_name(instance_id))),
                "the heir holding the lease", 45)
            # A lease runs LEASE_SECONDS from its taking or renewal, so it was taken
            # (or renewed) at taken - LEASE_SECONDS: after the dead one's expired.
            assert taken[1] - timedelta(seconds=LEASE_SECONDS) >= expiry, (taken, expiry)
            eventually(lambda: node_server.monitor_sessions() == ["idle"],
                       "the heir's idle probe session on the server", 45)
            node_server.kill()
            eventually(lambda: _queued(rt, instance_id) == [RESURRECT],
                       "the heir's failover (resurrect) queued", 45)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()


def _probe_once(loop: ProbeLoop, key: tuple[str, str],
                results: list[tuple[tuple[str, str], Probe]]) -> Probe:
    """One probe of `key` driven to its result."""
    before = len(results)
    loop.submit([key])
    stop = threading.Event()
    guard = time.monotonic() + 45
    while len(results) == before and time.monotonic() < guard:
        loop.run(until=time.monotonic() + 0.2, stop=stop)
    assert len(results) == before + 1, "no result within 45 s"
    return results[-1][1]


def test_a_persistent_session_prepares_the_probe_once(node_server: NodeServer) -> None:
    """The node parses and plans the health query once per session: later probes on it
    only execute it, and a new session (after the old one was terminated) prepares it
    again and answers."""
    results: list[tuple[tuple[str, str], Probe]] = []
    loop = ProbeLoop(5.0, lambda key, result: results.append((key, result)))
    key = ("instance", PRIMARY)
    try:
        loop.link(key, node_server.address, node_server.password, None)
        first = _probe_once(loop, key, results)
        assert first.ok and first.in_recovery is False and first.replicas == (), first
        [(pid, query)] = node_server.monitor_session_queries()
        assert query.startswith("PREPARE pgha_probe AS"), query
        for _ in range(2):
            again = _probe_once(loop, key, results)
            assert again.ok and again.lsn is not None and again.lsn >= (first.lsn or 0)
            assert node_server.monitor_session_queries() == [(pid, "EXECUTE pgha_probe")]
        node_server.terminate_monitor_sessions()
        eventually(lambda: node_server.monitor_session_queries() == [],
                   "the monitor's session gone", 20)
        lost = _probe_once(loop, key, results)
        assert lost.outcome == "down", lost    # the session was closed under it
        fresh = _probe_once(loop, key, results)
        assert fresh.ok, fresh
        [(new_pid, query)] = node_server.monitor_session_queries()
        assert new_pid != pid and query.startswith("PREPARE pgha_probe AS"), query
    finally:
        loop.close_all()


SUSPECT_ENV = {"BROKER_MONITOR_INTERVAL": "1", "BROKER_MONITOR_CONNECT_TIMEOUT": "3"}


@contextlib.contextmanager
def _monitoring(rt: Runtime, server: NodeServer) -> Iterator[str]:
    """A standalone instance on `server`, watched by a running monitor whose probe
    session on the server is idle."""
    instance_id = _standalone(rt, server)
    monitor = Monitor(rt, None, drive_queued=False)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        eventually(lambda: server.monitor_sessions() == ["idle"],
                   "the monitor's idle probe session", 45)
        yield instance_id
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.mark.e2e
def test_the_sweep_follows_a_node_moved_in_the_store(pg_state_url: str) -> None:
    """The sweep reuses a routine instance's store read for a few seconds, never for
    good: once the store says the instance's node is another server (a rebuild, an
    operator's repair), the monitor's session moves there, with no failover queued."""
    old, new = NodeServer(), NodeServer()
    try:
        with _runtime(pg_state_url, BROKER_MONITOR_INTERVAL="1") as rt:
            with _monitoring(rt, old) as instance_id:
                with rt.store.session() as s:
                    inst = s.get(Instance, instance_id)
                    assert inst is not None
                    inst.admin_password_enc = rt.vault.encrypt(new.password)
                    inst.nodes[0].management_address = new.address
                eventually(lambda: new.monitor_sessions() == ["idle"]
                           and old.monitor_sessions() == [],
                           "the monitor's session moved to the second server", 45)
            assert _queued(rt, instance_id) == []
    finally:
        old.stop()
        new.stop()

@pytest.mark.e2e
def test_a_frozen_primary_is_confirmed_without_waiting_out_the_hung_probe(
        pg_state_url: str, node_server: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    """A sweep probe that hangs on its open session (a frozen or black-holed node) sets
    off every confirmation at once, after a third of the deadline: the failover comes
    from those three failed probes."""
    with _runtime(pg_state_url, **SUSPECT_ENV) as rt, \
            caplog.at_level(logging.INFO, logger="broker.monitor"), \
            _monitoring(rt, node_server) as instance_id:
        node_server.freeze()
        eventually(lambda: _queued(rt, instance_id) == [RESURRECT],
                   "the failover (resurrect) queued", 45)
    assert f"instance {instance_id}: the primary has not answered its probe in 1.00 s: " \
           "confirming now" in caplog.text
    assert "unreachable (no answer within 3 s)" in caplog.text


@pytest.mark.e2e
def test_a_primary_that_pauses_is_suspected_but_not_failed_over(
        pg_state_url: str, node_server: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    """A primary that stops answering for a moment (a long fsync, a migration's lock on
    the catalog) is suspected, and the confirmations, with their full deadline, find it
    answering again: nothing is queued, the sweep has its session back."""
    with _runtime(pg_state_url, **SUSPECT_ENV) as rt, \
            caplog.at_level(logging.INFO, logger="broker.monitor"), \
            _monitoring(rt, node_server) as instance_id:
        node_server.freeze()
        eventually(lambda: "confirming now" in caplog.text, "the primary suspected", 45)
        node_server.thaw()   # well within the confirmations' 3 s deadline
        eventually(lambda: node_server.monitor_sessions() == ["idle"],
                   "the sweep's probe session back", 45)
        time.sleep(2)        # a check or two more: still nothing queued
        assert _queued(rt, instance_id) == []


@pytest.mark.e2e
def test_a_hung_server_carrying_many_primaries_is_suspected_a_few_at_a_time(
        pg_state_url: str, node_server: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    """Every watcher a hung probe sets off opens new sessions: on a saturated host that
    must not snowball. At most MAX_SUSPECTED instances are confirming early at once; the
    others' probes run to their deadline, and every primary is still failed over."""
    count = MAX_SUSPECTED + 3
    with _runtime(pg_state_url, **SUSPECT_ENV) as rt, \
            caplog.at_level(logging.INFO, logger="broker.monitor"):
        ids = [_standalone(rt, node_server) for _ in range(count)]
        monitor = Monitor(rt, None, drive_queued=False)
        stop = threading.Event()
        thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
        thread.start()
        try:
            eventually(lambda: node_server.monitor_sessions() == ["idle"] * count,
                       "the monitor's idle probe sessions", 45)
            node_server.freeze()
            eventually(lambda: all(_queued(rt, i) == [RESURRECT] for i in ids),
                       "every instance's failover (resurrect) queued", 60)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()
    suspected = caplog.text.count("has not answered its probe in 1.00 s: confirming now")
    assert 1 <= suspected <= MAX_SUSPECTED, suspected
