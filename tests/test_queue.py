"""The operation queue on SQLite and PostgreSQL: who may claim an operation, that two
claimers never both win, lease expiry between workers on different hosts, the stored
step names, and typed parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker.operations.engine import Engine
from broker.operations.params import FailoverParams, Params, ParamsError, UpdateParams
from broker.operations.queue import (
    HOST_IDENTITY_ENV,
    RUNNER_ROLE,
    OwnerId,
    busy_kind,
    enqueue_follow_up,
    host_identity,
    is_runner,
    new_operation,
    new_owner_id,
    unfinished_for,
)
from broker.store import Store
from broker.store.models import OP_FAILED, QUEUED, SUCCEEDED, Instance, Operation, aware, utcnow
from tests.toy_workflow import KEY_ENV, ToyParams, make_engine

KEY = Fernet.generate_key().decode()
ROOT = Path(__file__).resolve().parents[1]


def _engine(state_url: str, host: str = "host-b", lease: float = 15.0) -> Engine:
    return make_engine(state_url, KEY, owner=new_owner_id("engine", host=host),
                       lease_seconds=lease)


def _instance(store: Store, instance_id: str) -> None:
    with store.session() as s:
        s.add(Instance(id=instance_id, service_id="svc", plan_id="plan",
                       organization_guid="org", space_guid="space", replication="sync",
                       admin_password_enc="x", replication_password_enc="y"))


def _queue(store: Store, instance_id: str, journal: Path, *, kind: str = "toy",
           owner: str | None = None, lease_in: float | None = None,
           gate: Path | None = None) -> str:
    with store.session() as s:
        op = new_operation(instance_id, kind, owner=owner, params=ToyParams(
            journal=str(journal), gate=str(gate) if gate else None))
        if lease_in is not None:
            op.owner = owner
            op.lease_expires_at = utcnow() + timedelta(seconds=lease_in)
        s.add(op)
        return op.id


@pytest.fixture
def engine(state_url: str) -> Engine:
    engine = _engine(state_url, host=host_identity())
    engine.store.upgrade()
    return engine


DEAD_PID = 999_999_999

# (who holds the row, seconds until its lease expires, may another worker claim it)
CLAIM_RULES = [
    pytest.param(None, None, True, id="free"),
    pytest.param("elsewhere:1:engine-aaaaaa", 60.0, False, id="leased"),
    pytest.param("elsewhere:1:engine-aaaaaa", -1.0, True, id="lease-expired"),
    pytest.param(f"HERE:{DEAD_PID}:engine-dead00", 60.0, True, id="dead-owner-this-host"),
    pytest.param(f"elsewhere:{DEAD_PID}:engine-dead00", 60.0, False,
                 id="dead-pid-other-host-waits-for-expiry"),
    pytest.param(f"HERE:{os.getpid()}:engine-alive0", 60.0, False, id="live-owner-this-host"),
]


@pytest.mark.parametrize(("owner", "lease_in", "claimable"), CLAIM_RULES)
def test_claim_rules(engine: Engine, tmp_path: Path, owner: str | None,
                     lease_in: float | None, claimable: bool) -> None:
    _instance(engine.store, "i-1")
    owner = owner.replace("HERE", host_identity()) if owner else None
    op_id = _queue(engine.store, "i-1", tmp_path / "j", owner=owner, lease_in=lease_in)
    expected = op_id if claimable else None
    assert engine.claim(op_id) == expected       # a given id
    if not claimable:
        assert engine.claim_next() is None       # and the next one: the same rule
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        assert op.owner == (engine.owner if claimable else owner)
    engine.store.dispose()


def test_older_operation_of_an_instance_goes_first(engine: Engine, tmp_path: Path) -> None:
    _instance(engine.store, "i-1")
    _instance(engine.store, "i-2")
    older = _queue(engine.store, "i-1", tmp_path / "a", owner="elsewhere:1:engine-aaaaaa",
                   lease_in=60.0)
    newer = _queue(engine.store, "i-1", tmp_path / "b")
    other = _queue(engine.store, "i-2", tmp_path / "c")
    assert engine.claim(newer) is None
    assert engine.claim_next() == other          # another instance is not held back
    with engine.store.session() as s:
        assert [op.id for op in unfinished_for(s, "i-1")] == [older, newer]
    assert busy_kind(engine.store, "i-1") == "toy"
    with engine.store.session() as s:
        row = s.get(Operation, older)
        assert row is not None
        row.state = SUCCEEDED
    assert engine.claim_next() == newer
    engine.store.dispose()


def test_not_before_holds_a_released_operation_back(engine: Engine, tmp_path: Path) -> None:
    _instance(engine.store, "i-1")
    op_id = _queue(engine.store, "i-1", tmp_path / "j")
    assert engine.claim(op_id) == op_id
    engine.queue.release(op_id, delay=60.0, note="the standby is catching up")
    other = _engine(engine.store.url)
    assert other.claim(op_id) is None and other.claim_next() is None
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.owner is None and op.attempts == 1
        assert op.description.endswith("(retrying: the standby is catching up)")
        op.not_before = utcnow() - timedelta(seconds=1)
    assert other.claim_next() == op_id
    other.store.dispose()
    engine.store.dispose()


def test_pre_claimed_operation_belongs_to_its_engine(engine: Engine, tmp_path: Path) -> None:
    runner = _engine(engine.store.url, host=host_identity())
    _instance(engine.store, "i-1")
    op_id = _queue(engine.store, "i-1", tmp_path / "j", owner=runner.owner)
    assert engine.claim_next() is None and engine.claim(op_id) is None
    assert runner.claim_next() is None             # its own: `next` never re-takes one
    assert runner.claim(op_id) == op_id            # handed to it by id
    assert runner.run(op_id) == SUCCEEDED
    runner.store.dispose()
    engine.store.dispose()


def test_follow_up_of_a_monitor_runner_is_born_owned_by_it(engine: Engine) -> None:
    runner = new_owner_id(RUNNER_ROLE)
    _instance(engine.store, "i-1")
    with engine.store.session() as s:
        s.add(new_operation("i-1", "failover", op_id="f-runner", owner=runner))
        s.add(new_operation("i-1", "failover", op_id="f-engine", owner=engine.owner))
    with engine.store.session() as s:
        for parent in ("f-runner", "f-engine"):
            enqueue_follow_up(s, parent, f"{parent}-rebuild", "i-1", "rebuild",
                              params=Params(), description="queued: rebuild")
    with engine.store.session() as s:
        by_runner = s.get(Operation, "f-runner-rebuild")
        by_engine = s.get(Operation, "f-engine-rebuild")
        assert by_runner is not None and by_engine is not None
        assert by_runner.owner == runner and by_runner.lease_expires_at is not None
        assert by_engine.owner is None           # an ordinary engine: any worker runs it
    assert is_runner(runner) and not is_runner(engine.owner)
    assert OwnerId.parse(runner) == OwnerId(host_identity(), os.getpid(), RUNNER_ROLE)
    engine.store.dispose()


def test_threads_racing_for_one_operation_never_both_win(engine: Engine,
                                                         tmp_path: Path) -> None:
    contenders = [_engine(engine.store.url, host=f"host-{i}") for i in range(6)]
    for round_ in range(4):
        _instance(engine.store, f"i-{round_}")
        op_id = _queue(engine.store, f"i-{round_}", tmp_path / "j")
        start = threading.Barrier(len(contenders))
        wins: list[str] = []

        def race(contender: Engine, op_id: str, start: threading.Barrier,
                 wins: list[str]) -> None:
            start.wait()
            while True:
                if contender.claim(op_id) == op_id:
                    wins.append(contender.owner)
                    return
                with contender.store.session() as s:
                    row = s.get(Operation, op_id)
                    if row is not None and row.owner is not None:
                        return

        threads = [threading.Thread(target=race, args=(c, op_id, start, wins))
                   for c in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(wins) == 1
        with engine.store.session() as s:
            row = s.get(Operation, op_id)
            assert row is not None and row.owner == wins[0]
    for contender in contenders:
        contender.store.dispose()
    engine.store.dispose()


def test_processes_racing_for_one_operation_never_both_win(engine: Engine,
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: KEY}
    for round_ in range(2):
        _instance(engine.store, f"i-{round_}")
        op_id = _queue(engine.store, f"i-{round_}", tmp_path / "j")
        start = time.time() + 3.0  # all four have started and connected by then
        workers = [subprocess.Popen(
            [sys.executable, "-m", "tests.toy_workflow", engine.store.url,
             "--claim", op_id, "--at", str(start)],
            env={**env, HOST_IDENTITY_ENV: f"host-{i}"}, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
        results = [w.communicate(timeout=60) for w in workers]
        said = sorted(out.strip() for out, _ in results)
        assert said == ["lost", "lost", "lost", "won"], [err[-500:] for _, err in results]
        with engine.store.session() as s:
            row = s.get(Operation, op_id)
            assert row is not None and OwnerId.parse(row.owner) is not None
    engine.store.dispose()


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_lease_expiry_hands_an_operation_to_a_worker_on_another_host(
        state_url: str, tmp_path: Path, how: str) -> None:
    """Worker A (host-a) holds an operation in its middle step and then stops renewing
    (frozen: it claimed and does nothing more; killed: SIGKILL). Worker B (host-b)
    polls every INTERVAL: it must not take the operation before A's lease expires
    (a dead pid on another host proves nothing), and takes it soon after."""
    lease, interval = 2.0, 0.1
    b = _engine(state_url, host="host-b", lease=lease)
    b.store.upgrade()
    _instance(b.store, "i-1")
    journal, gate = tmp_path / "journal", tmp_path / "gate"
    op_id = _queue(b.store, "i-1", journal, kind="toy-hold", gate=gate)
    worker_a: subprocess.Popen[str] | None = None
    if how == "frozen":
        a = _engine(state_url, host="host-a", lease=lease)
        assert a.claim(op_id) == op_id
        a.store.dispose()
    else:
        worker_a = subprocess.Popen(
            [sys.executable, "-m", "tests.toy_workflow", state_url, "--lease", str(lease)],
            env={**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: KEY,
                 HOST_IDENTITY_ENV: "host-a"},
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (journal.exists() and journal.read_text().split() == ["first"]):
            assert time.monotonic() < deadline and worker_a.poll() is None, "A never held it"
            time.sleep(0.05)
        time.sleep(lease)  # A has renewed its lease meanwhile: the hold outlives one lease
        worker_a.kill()
        worker_a.communicate(timeout=30)
    stopped_at = utcnow()
    with b.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.owner is not None
        holder = OwnerId.parse(op.owner)
        assert holder is not None and holder.host == "host-a"
        expires = aware(op.lease_expires_at)
    assert expires is not None and expires <= stopped_at + timedelta(seconds=lease)
    refused_before_expiry = 0
    deadline = time.monotonic() + 60
    while True:
        asked_at = utcnow()
        if b.claim(op_id) == op_id:
            taken_at = utcnow()
            break
        if asked_at < expires:
            refused_before_expiry += 1
        assert time.monotonic() < deadline, "B never took the operation over"
        time.sleep(interval)
    assert refused_before_expiry > 0      # B was asking all along, and was told no
    assert taken_at >= expires            # the order: expiry, then takeover
    # Within the lease plus one interval of A stopping, with a loose allowance for a
    # machine shared with other test runs.
    assert taken_at - stopped_at <= timedelta(seconds=lease + interval + 10.0)
    gate.touch()
    assert b.run(op_id) == SUCCEEDED
    # A's middle step never finished; B ran it and the rest.
    assert journal.read_text().split() == ["first", "hold", "third"]
    b.store.dispose()


def test_step_names_are_stored_when_first_run(engine: Engine, tmp_path: Path) -> None:
    _instance(engine.store, "i-1")
    op_id = _queue(engine.store, "i-1", tmp_path / "j")
    assert engine.run_pending() == 1
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.steps == ["first", "second", "third"]
    engine.store.dispose()


def test_resume_with_another_step_list_fails_plainly(engine: Engine, tmp_path: Path) -> None:
    """An operation started by a version whose steps were different: the resume runs
    nothing (not even cleanup, which assumes this version's steps) and says why."""
    _instance(engine.store, "i-1")
    journal = tmp_path / "j"
    op_id = _queue(engine.store, "i-1", journal, kind="toy-failing")
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        op.steps = ["first", "reserve", "boom", "never"]
        op.step_index = 2
    assert engine.run_pending() == 1
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.state == OP_FAILED
        assert "the broker was upgraded while this operation ran" in op.description
        assert "first, reserve, boom, never" in op.description
        assert "repeat the request" in op.description
    assert not journal.exists()
    engine.store.dispose()


def test_typed_parameters_round_trip() -> None:
    failover = FailoverParams(cause="primary lost", old_primary_id="n1", standby_id="n2",
                              detected_at=utcnow().isoformat(), last_primary_lsn=4096)
    assert FailoverParams.load(failover.dump()) == failover
    assert failover.detected() is not None
    update = UpdateParams(plan_id="p", parameters={"statement_timeout_ms": 10})
    assert UpdateParams.load(update.dump()) == update
    assert UpdateParams.load({}) == UpdateParams()


@pytest.mark.parametrize(("raw", "message"), [
    ({"old_primary_id": "n1"}, "parameter cause is missing"),
    ({"cause": "x", "old_primary_id": "n1", "standbyid": "n2"}, "unknown parameter standbyid"),
    ({"cause": "x", "old_primary_id": "n1", "last_primary_lsn": "4096"},
     "parameter last_primary_lsn must be int or null, not '4096'"),
    ({"cause": "x", "old_primary_id": "n1", "last_primary_lsn": True},
     "parameter last_primary_lsn must be int or null, not True"),
    ({"cause": "x", "old_primary_id": "n1", "detected_at": "yesterday"},
     "parameter detected_at is not a time: 'yesterday'"),
])
def test_bad_parameters_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ParamsError) as caught:
        FailoverParams.load(raw)
    assert str(caught.value) == message


def test_operation_with_bad_parameters_fails_saying_which(engine: Engine,
                                                          tmp_path: Path) -> None:
    _instance(engine.store, "i-1")
    journal = tmp_path / "j"
    op_id = _queue(engine.store, "i-1", journal)
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.state == QUEUED
        op.params = {"journal": 5}
    assert engine.run_pending() == 1
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None and op.state == OP_FAILED
        assert op.description == ("failed: the parameters of this toy operation are invalid: "
                                  "parameter journal must be str, not 5")
    assert not journal.exists()
    engine.store.dispose()


def test_a_host_identity_that_cannot_be_an_owner_id_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_IDENTITY_ENV, "rack:7")
    with pytest.raises(ValueError, match=r"BROKER_HOST_IDENTITY must be .* got 'rack:7'"):
        new_owner_id("engine")
    monkeypatch.setenv(HOST_IDENTITY_ENV, "rack-7")
    assert OwnerId.parse(new_owner_id("engine")) == OwnerId("rack-7", os.getpid(), "engine")
