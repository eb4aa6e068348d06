"""The state store's schema and the durable operation engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import inspect, select

from broker.operations.engine import CRASH_AFTER_STEP_ENV
from broker.operations.queue import new_operation
from broker.store import Store
from broker.store.models import OP_FAILED, SUCCEEDED, Instance, Operation
from tests.toy_workflow import KEY_ENV, ToyParams, make_engine

KEY = Fernet.generate_key().decode()
ROOT = Path(__file__).resolve().parents[1]


def _instance(store: Store, instance_id: str = "i-1") -> None:
    with store.session() as s:
        s.add(Instance(id=instance_id, service_id="svc", plan_id="plan",
                       organization_guid="org", space_guid="space", replication="sync",
                       admin_password_enc="x", replication_password_enc="y"))


def _queue(store: Store, kind: str, journal: Path, instance_id: str = "i-1") -> str:
    with store.session() as s:
        op = new_operation(instance_id, kind, params=ToyParams(journal=str(journal)))
        s.add(op)
        return op.id


def test_schema_upgrades_twice_without_harm(state_url: str) -> None:
    store = Store(state_url)
    store.upgrade()
    store.upgrade()
    tables = set(inspect(store.engine).get_table_names())
    assert {"instances", "nodes", "bindings", "operations", "failovers", "leases"} <= tables
    store.dispose()


def test_operation_runs_every_step_once_and_says_done(state_url: str, tmp_path: Path) -> None:
    engine = make_engine(state_url, KEY)
    engine.store.upgrade()
    _instance(engine.store)
    journal = tmp_path / "journal"
    op_id = _queue(engine.store, "toy", journal)
    assert engine.run_pending() == 1
    assert journal.read_text().split() == ["first", "second", "third"]
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        assert (op.state, op.description, op.step_index) == (SUCCEEDED, "toy done", 3)
        assert op.finished_at is not None and op.owner is None
    engine.store.dispose()


def test_failed_step_cleans_up_and_says_why(state_url: str, tmp_path: Path) -> None:
    engine = make_engine(state_url, KEY)
    engine.store.upgrade()
    _instance(engine.store)
    journal = tmp_path / "journal"
    op_id = _queue(engine.store, "toy-failing", journal)
    engine.run_pending()
    assert journal.read_text().splitlines() == [
        "first", "cleanup: the quota for volumes is exhausted"]
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        assert op.state == OP_FAILED
        assert op.description == "failed: the quota for volumes is exhausted"
    engine.store.dispose()


def test_operations_of_one_instance_run_in_order(state_url: str, tmp_path: Path) -> None:
    engine = make_engine(state_url, KEY)
    engine.store.upgrade()
    _instance(engine.store)
    first = _queue(engine.store, "toy", tmp_path / "a")
    second = _queue(engine.store, "toy", tmp_path / "b")
    assert engine.claim_next() == first
    # The second waits for the first, whoever asks.
    other = make_engine(state_url, KEY)
    assert other.claim_next() is None
    engine.run(first)
    assert other.claim_next() == second
    engine.store.dispose()
    other.store.dispose()


def test_worker_killed_after_a_step_resumes_with_that_step(state_url: str,
                                                           tmp_path: Path) -> None:
    engine = make_engine(state_url, KEY)
    engine.store.upgrade()
    _instance(engine.store)
    journal = tmp_path / "journal"
    op_id = _queue(engine.store, "toy", journal)
    env = {**os.environ, CRASH_AFTER_STEP_ENV: "toy:second", "PYTHONPATH": str(ROOT),
           KEY_ENV: KEY}
    child = subprocess.run([sys.executable, "-m", "tests.toy_workflow", state_url],
                           env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert child.returncode == -9, child.stderr
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.step == "second" and op.state == "in progress"
    # The dead worker's lease is taken over at once (same host, process gone).
    assert engine.run_pending() == 1
    # `second` ran again: that is why every step must be idempotent.
    assert journal.read_text().split() == ["first", "second", "second", "third"]
    with engine.store.session() as s:
        assert s.scalar(select(Operation.state).where(Operation.id == op_id)) == SUCCEEDED
    engine.store.dispose()


def test_two_workers_never_claim_the_same_operation(state_url: str, tmp_path: Path) -> None:
    engines = [make_engine(state_url, KEY) for _ in range(4)]
    engines[0].store.upgrade()
    for n in range(8):
        _instance(engines[0].store, f"i-{n}")
        _queue(engines[0].store, "toy", tmp_path / f"j{n}", instance_id=f"i-{n}")
    claimed: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 30

    def claim_all(engine_index: int) -> None:
        # A lost race returns None too (SQLite), so go on until all are taken.
        while len(claimed) < 8 and time.monotonic() < deadline:
            op_id = engines[engine_index].claim_next()
            if op_id is None:
                time.sleep(0.01)
                continue
            with lock:
                claimed.append(op_id)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 8
    assert len(set(claimed)) == 8
    for engine in engines:
        engine.store.dispose()


def test_web_and_worker_starting_together_upgrade_sqlite_once(tmp_path: Path) -> None:
    """`broker web` and `broker worker` upgrade the schema at start, at the same moment."""
    env = {"PATH": os.environ["PATH"], "BROKER_STATE_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-m", "broker", "db", "upgrade"], env=env,
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(8)]
    results = [(p.wait(timeout=60), p.stderr.read() if p.stderr else "") for p in runs]
    assert all(code == 0 for code, _ in results), [r for r in results if r[0] != 0]
    store = Store(f"sqlite:///{tmp_path / 'broker.sqlite3'}")
    assert "operations" in inspect(store.engine).get_table_names()
    store.dispose()


def test_sqlite_commits_skip_the_fsync_and_survive_the_broker_killed(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL: a commit does not wait for the disk (a dead host's
    failovers commit a few dozen times each), yet what was acknowledged survives the
    broker's SIGKILL right after the commit."""
    url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    Store(url).upgrade()
    script = (
        "import os, sys\n"
        "from broker.store import Store\n"
        "from broker.store.models import Instance\n"
        f"store = Store({url!r})\n"
        "with store.session() as s:\n"
        "    s.add(Instance(id='i-kept', service_id='svc', plan_id='plan',\n"
        "                   organization_guid='org', space_guid='space', replication='sync',\n"
        "                   admin_password_enc='x', replication_password_enc='y'))\n"
        "os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120, check=False)
    assert done.returncode == -9
    store = Store(url)
    with store.session() as s:
        assert s.get(Instance, "i-kept") is not None
        connection = s.connection()
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    store.dispose()
