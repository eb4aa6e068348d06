"""A deprovision and the broker's own operations, in the engine: a kind that yields to a
deprovision stops before its next step (its cleanup runs), one that does not runs to
its end, one queued after the deprovision never starts, and no follow-up is queued
once a deprovision is requested. Toy workflows journal each step they run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker.operations.engine import Context, Engine, Step, Workflow, register
from broker.operations.queue import enqueue_follow_up, new_operation
from broker.store.models import OP_FAILED, QUEUED, SUCCEEDED, Instance, Operation
from tests.toy_workflow import ToyParams, make_engine

KEY = Fernet.generate_key().decode()


def _journal_step(name: str) -> Step:
    def run(ctx: Context) -> None:
        params = ctx.params_of(ToyParams)
        with Path(params.journal).open("a") as handle:
            handle.write(name + "\n")
        if name == "hold":
            assert params.gate is not None
            while not Path(params.gate).exists():
                time.sleep(0.05)

    return Step(name, f"doing {name}", run)


def _cleanup(ctx: Context, reason: str) -> None:
    params = ctx.params_of(ToyParams)
    with Path(params.journal).open("a") as handle:
        handle.write(f"cleanup: {reason}\n")


def _toy(kind: str, preempts: bool) -> Workflow:
    return register(Workflow(
        kind=kind, steps=lambda ctx: [_journal_step(n) for n in ("first", "hold", "third")],
        cleanup=_cleanup, params=ToyParams, deprovision_preempts=preempts))


YIELDS = _toy("toy-rebuild", preempts=True)
WAITS = _toy("toy-failover", preempts=False)


@pytest.fixture
def engine(state_url: str) -> Iterator[Engine]:
    engine = make_engine(state_url, KEY)
    engine.store.upgrade()
    with engine.store.session() as s:
        s.add(Instance(id="i-1", service_id="svc", plan_id="plan", organization_guid="org",
                       space_guid="space", replication="sync", admin_password_enc="x",
                       replication_password_enc="y"))
    yield engine
    engine.store.dispose()


def _queue(engine: Engine, kind: str, tmp_path: Path, state: str = QUEUED) -> str:
    with engine.store.session() as s:
        op = new_operation("i-1", kind, params=ToyParams(
            journal=str(tmp_path / f"{kind}.journal"), gate=str(tmp_path / "gate")))
        op.state = state
        s.add(op)
        return op.id


def _run_with_deprovision_requested_midway(engine: Engine, kind: str,
                                           tmp_path: Path) -> tuple[Operation, list[str]]:
    op_id = _queue(engine, kind, tmp_path)
    assert engine.claim(op_id) == op_id
    runner = threading.Thread(target=engine.run, args=(op_id,))
    runner.start()
    journal = tmp_path / f"{kind}.journal"
    deadline = time.monotonic() + 30
    while "hold" not in (journal.read_text() if journal.exists() else ""):
        assert time.monotonic() < deadline, "the toy never reached its hold step"
        time.sleep(0.02)
    # Cloud Controller's DELETE arrives while the operation is in its second step.
    _queue(engine, "deprovision", tmp_path)
    (tmp_path / "gate").touch()
    runner.join(timeout=30)
    assert not runner.is_alive()
    with engine.store.session() as s:
        op = s.get(Operation, op_id)
        assert op is not None
        return op, journal.read_text().splitlines()


def test_a_kind_that_yields_is_cancelled_before_its_next_step(engine: Engine,
                                                             tmp_path: Path) -> None:
    op, journal = _run_with_deprovision_requested_midway(engine, "toy-rebuild", tmp_path)
    reason = "cancelled: the instance is being deprovisioned"
    assert (op.state, op.error) == (OP_FAILED, reason)
    assert journal == ["first", "hold", f"cleanup: {reason}"]


def test_a_kind_that_does_not_yield_runs_to_its_end(engine: Engine, tmp_path: Path) -> None:
    op, journal = _run_with_deprovision_requested_midway(engine, "toy-failover", tmp_path)
    assert op.state == SUCCEEDED
    assert journal == ["first", "hold", "third"]


@pytest.mark.parametrize("kind", ["toy-rebuild", "toy-failover"])
def test_an_operation_queued_after_a_deprovision_never_starts(engine: Engine, tmp_path: Path,
                                                              kind: str) -> None:
    _queue(engine, "deprovision", tmp_path, state=SUCCEEDED)
    op_id = _queue(engine, kind, tmp_path)
    assert engine.claim(op_id) == op_id
    assert engine.run(op_id) == OP_FAILED
    assert not (tmp_path / f"{kind}.journal").exists()  # no step, no cleanup ran


def test_no_follow_up_is_queued_once_a_deprovision_is_requested(engine: Engine,
                                                                tmp_path: Path) -> None:
    parent = _queue(engine, "toy-failover", tmp_path)
    _queue(engine, "deprovision", tmp_path)
    with engine.store.session() as s:
        enqueue_follow_up(s, parent, "follow-up-1", "i-1", "toy-rebuild",
                          params=ToyParams(journal="-"), description="queued: rebuilding")
    with engine.store.session() as s:
        assert s.get(Operation, "follow-up-1") is None
