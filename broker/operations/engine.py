"""The durable operation engine: claim an Operation row, run its steps, record each.

The Operation row is the source of truth (cloud.gov external-domain-broker style):
- `step_index` is the next step to run; it advances only after a step returned.
- A step is an idempotent function: re-running it after a crash adopts what it made
  (resources are named after the instance and node), so a SIGKILL at any point is
  followed by the same step again and then the rest.
- Workers claim rows with a lease through the queue (queue.py), which holds the
  claim rules; several workers share it.
- The step names are stored when an operation is first run; a resume by a version
  whose list differs fails the operation instead of running the wrong step.
- A failing step is retried with backoff when the failure is transient; otherwise
  the workflow's `cleanup` runs and the operation ends `failed` with a plain reason.
- A workflow that declares `deprovision_preempts` (a rebuild, a rotation: work the
  platform never asked for) is stopped before its next step once a deprovision of
  its instance is requested: its cleanup runs and it ends `failed` ("cancelled"), and
  the deprovision queued behind it runs next. Others (a failover) run to their end,
  unless they were queued after the deprovision request: those never start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg2
import sqlalchemy.exc
from sqlalchemy.orm import Session

from broker.catalog import Catalog, Plan
from broker.cloud.base import Cloud, TransientCloudError
from broker.config import Settings
from broker.crypto import Vault
from broker.metrics import instruments
from broker.operations import queue, slots
from broker.operations.params import Params, ParamsError
from broker.store.db import Store
from broker.store.models import (
    IN_PROGRESS,
    OP_FAILED,
    SUCCEEDED,
    Instance,
    Operation,
)

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Params)

MAX_ATTEMPTS = 5
# Test hook: "kind:step" makes the process SIGKILL itself right after that step ran
# and before it was recorded, to prove that every step is safe to run again.
CRASH_AFTER_STEP_ENV = "BROKER_CRASH_AFTER_STEP"


class StepFailed(Exception):
    """An expected, permanent failure; the message is shown to the user as is."""


class RetryLater(Exception):
    """Not ready yet (e.g. a standby still catching up): run this step again soon."""

    def __init__(self, reason: str, delay: float = 0.5) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass
class Context:
    """What a step can touch. Steps open short sessions; they never hold one open."""

    operation_id: str
    instance_id: str
    kind: str
    params: Params
    store: Store
    cloud: Cloud
    vault: Vault
    catalog: Catalog
    settings: Settings
    attempt: int = 0
    scratch: dict[str, Any] = field(default_factory=dict)

    def params_of(self, kind: type[P]) -> P:
        """The parameters, as the workflow declared them."""
        if not isinstance(self.params, kind):
            raise StepFailed(f"a {self.kind} operation has no {kind.__name__}")
        return self.params

    def instance(self) -> Instance:
        with self.store.session() as s:
            inst = s.get(Instance, self.instance_id)
            if inst is None:
                raise StepFailed(f"instance {self.instance_id} is not in the state store")
            # Load the nodes before the session closes (steps read them; none reads the
            # bindings, which were a query more at each call).
            _ = list(inst.nodes)
            return inst

    def plan(self, plan_id: str | None = None) -> Plan:
        pid = plan_id or self.instance().plan_id
        plan = self.catalog.plan(pid)
        if plan is None:
            raise StepFailed(f"plan {pid} is no longer in the catalog")
        return plan

    def progress(self, description: str) -> None:
        """Say what the step is doing right now (shown by last_operation)."""
        with self.store.session() as s:
            op = s.get(Operation, self.operation_id)
            if op is not None:
                op.description = description
        log.info("operation %s (%s): %s", self.operation_id, self.kind, description)


@dataclass(frozen=True)
class Step:
    name: str
    describe: str                    # shown while the step runs ("creating standby in az2")
    run: Callable[[Context], None]


@dataclass(frozen=True)
class Workflow:
    kind: str
    steps: Callable[[Context], list[Step]]  # must be the same list every time for one op
    cleanup: Callable[[Context, str], None] | None = None  # after a permanent failure
    done: str = "done"                      # description once succeeded
    done_from: Callable[[Context], str] | None = None  # or this, when the outcome varies
    params: type[Params] = Params           # what the operation's `params` column holds
    deprovision_preempts: bool = False      # a deprovision request cancels it between steps


_REGISTRY: dict[str, Workflow] = {}
# Housekeeping an idle engine runs every so often: (seconds between runs, task).
_IDLE_TASKS: list[tuple[float, Callable[[Engine], None]]] = []


def on_idle(interval: float) -> Callable[[Callable[[Engine], None]], Callable[[Engine], None]]:
    """Register a task that each engine's loop runs when idle, at most every `interval`."""
    def register_task(task: Callable[[Engine], None]) -> Callable[[Engine], None]:
        _IDLE_TASKS.append((interval, task))
        return task
    return register_task


def register(workflow: Workflow) -> Workflow:
    _REGISTRY[workflow.kind] = workflow
    return workflow


def registered() -> dict[str, Workflow]:
    return dict(_REGISTRY)


def workflow_for(kind: str) -> Workflow:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise StepFailed(f"no workflow for operation kind {kind!r}") from None


class Engine:
    """Runs queued operations. One per worker process; thread-safe `wake()`."""

    def __init__(self, store: Store, cloud: Cloud, vault: Vault, catalog: Catalog,
                 settings: Settings, *, poll_interval: float = 0.25, owner: str | None = None,
                 lease_seconds: float = queue.LEASE_SECONDS) -> None:
        self.store = store
        self.cloud = cloud
        self.vault = vault
        self.catalog = catalog
        self.settings = settings
        self.owner = owner or queue.new_owner_id("engine")
        self.queue = queue.Queue(store, self.owner, lease_seconds)
        self.poll_interval = poll_interval
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    # --- claiming --------------------------------------------------------------
    def claim_next(self) -> str | None:
        return self.claim()

    def claim(self, op_id: str | None = None) -> str | None:
        """Claim `op_id` (or the next claimable operation); see queue.Queue.claim."""
        try:
            return self.queue.claim(op_id)
        except sqlalchemy.exc.OperationalError as exc:
            # SQLite: another connection wrote first ("database is locked"). Nothing
            # was claimed; the next poll tries again.
            log.debug("claim lost a race: %s", exc.orig)
            return None

    def _renew(self, op_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.queue.lease_seconds / 3):
            try:
                if not self.queue.renew(op_id):
                    return
            except Exception:  # a blip in the store: the next renewal tries again
                log.warning("could not renew the lease of operation %s", op_id)

    # --- running ---------------------------------------------------------------
    def run(self, op_id: str) -> str:
        """Run a claimed operation to its end (or to a retry); returns its state."""
        with self.store.session() as s:
            op = s.get(Operation, op_id)
            if op is None:
                return OP_FAILED
            workflow: Workflow | None = None
            params, problem = Params(), None
            try:
                workflow = workflow_for(op.kind)
                params = workflow.params.load(op.params)
            except ParamsError as exc:
                problem = StepFailed(f"the parameters of this {op.kind} operation are "
                                     f"invalid: {exc}")
            except StepFailed as exc:
                problem = exc
            ctx = Context(
                operation_id=op.id, instance_id=op.instance_id, kind=op.kind,
                params=params, store=self.store, cloud=self.cloud,
                vault=self.vault, catalog=self.catalog, settings=self.settings,
                attempt=op.attempts,
            )
            start_index = op.step_index
            recorded = list(op.steps) if op.steps is not None else None
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(op_id, stop), daemon=True)
        renewer.start()
        try:
            if workflow is None or problem is not None:
                return self._fail(ctx, None, problem or StepFailed("no workflow"))
            with slots.slot(self.settings.operations, ctx.kind, ctx.progress):
                return self._run_steps(ctx, workflow, start_index, recorded)
        finally:
            stop.set()

    def _run_steps(self, ctx: Context, workflow: Workflow, start_index: int,
                   recorded: list[str] | None) -> str:
        try:
            steps = workflow.steps(ctx)
        except Exception as exc:
            return self._fail(ctx, None, exc)
        names = [step.name for step in steps]
        if recorded is None:
            with self.store.session() as s:
                op = s.get(Operation, ctx.operation_id)
                assert op is not None
                op.steps = names
        elif recorded != names:
            # Running step N of another list would do the wrong thing; so would this
            # version's cleanup, which assumes its own steps ran.
            return self._fail(ctx, None, StepFailed(
                f"the broker was upgraded while this operation ran: it started with the "
                f"steps {', '.join(recorded)}, this version has {', '.join(names)}; nothing "
                f"more was done. Check the instance (`instances show`), then repeat the "
                f"request (the monitor queues its own operations again)"))
        crash_at = os.environ.get(CRASH_AFTER_STEP_ENV)
        for index in range(start_index, len(steps)):
            step = steps[index]
            # One session per step boundary: it records the step just done (step_index,
            # see below) and starts this one. Steps are idempotent, so a crash before
            # this commit runs the step just done again, as it would have anyway.
            with self.store.session() as s:
                op = s.get(Operation, ctx.operation_id)
                assert op is not None
                if index > start_index:
                    op.step_index = index
                    op.attempts = 0
                if self._preempted(s, workflow, op):
                    cancelled = StepFailed("cancelled: the instance is being deprovisioned")
                else:
                    cancelled = None
                    op.step = step.name
                    op.description = step.describe
            if cancelled is not None:
                # Nothing to clean up before the first step; and an operation queued
                # after the deprovision starts once the instance is gone: its cleanup
                # would mark a deprovisioned instance degraded.
                return self._fail(ctx, workflow if index > 0 else None, cancelled)
            log.info("operation %s (%s) step %d/%d %s: %s", ctx.operation_id, ctx.kind,
                     index + 1, len(steps), step.name, step.describe)
            try:
                with self.cloud.reporting(ctx.progress):
                    step.run(ctx)
            except RetryLater as exc:
                return self._retry(ctx, str(exc), exc.delay, count_attempt=False)
            except (TransientCloudError, psycopg2.OperationalError) as exc:
                if ctx.attempt + 1 < MAX_ATTEMPTS:
                    return self._retry(ctx, _plain(exc), min(2.0 ** ctx.attempt, 30.0))
                return self._fail(ctx, workflow, exc)
            except Exception as exc:
                return self._fail(ctx, workflow, exc)
            if crash_at == f"{ctx.kind}:{step.name}":
                log.warning("test hook %s: killing this process", CRASH_AFTER_STEP_ENV)
                os.kill(os.getpid(), 9)
            ctx.attempt = 0
        self.queue.finish(ctx.operation_id, SUCCEEDED,
                          workflow.done_from(ctx) if workflow.done_from else workflow.done,
                          step_index=len(steps))
        log.info("operation %s (%s) succeeded", ctx.operation_id, ctx.kind)
        return SUCCEEDED

    @staticmethod
    def _preempted(session: Session, workflow: Workflow, op: Operation) -> bool:
        """A deprovision was requested and this operation must not go on: its workflow
        yields to one, or it was queued after it (the monitor raced the request)."""
        if op.kind == queue.DEPROVISION:
            return False
        since = None if workflow.deprovision_preempts else op.created_at
        return queue.deprovision_requested(session, op.instance_id, before=since)

    def _retry(self, ctx: Context, reason: str, delay: float, *, count_attempt: bool = True) -> str:
        self.queue.release(ctx.operation_id, delay=delay,
                           note=reason if count_attempt else None)
        instruments.operation_retries.labels(kind=ctx.kind).inc()
        log.info("operation %s (%s) will retry in %.1fs: %s", ctx.operation_id, ctx.kind,
                 delay, reason)
        return IN_PROGRESS

    def _fail(self, ctx: Context, workflow: Workflow | None, exc: BaseException) -> str:
        reason = _plain(exc)
        log.error("operation %s (%s) failed: %s", ctx.operation_id, ctx.kind, reason,
                  exc_info=not isinstance(exc, StepFailed))
        if workflow is not None and workflow.cleanup is not None:
            try:
                ctx.progress(f"failed ({reason}); cleaning up")
                workflow.cleanup(ctx, reason)
            except Exception as cleanup_exc:
                log.exception("cleanup after operation %s failed", ctx.operation_id)
                reason = f"{reason}; cleanup incomplete: {_plain(cleanup_exc)}"
        self.queue.finish(ctx.operation_id, OP_FAILED, f"failed: {reason}", error=reason)
        return OP_FAILED

    # --- loop ------------------------------------------------------------------
    def run_pending(self, limit: int = 100) -> int:
        """Run claimable operations until none is left; returns how many ran."""
        ran = 0
        while ran < limit:
            op_id = self.claim_next()
            if op_id is None:
                break
            self.run(op_id)
            ran += 1
        return ran

    def run_until_finished(self, operation_id: str, timeout: float = 300.0) -> str:
        """Run operations until `operation_id` has finished; returns its final state.

        For tests, benchmarks and one-shot tools: `run_pending` alone returns while
        an operation waits out a RetryLater delay."""
        deadline = time.monotonic() + timeout
        while True:
            with self.store.session() as s:
                op = s.get(Operation, operation_id)
                if op is None:
                    raise StepFailed(f"no operation {operation_id}")
                state = op.state
            if not queue.is_unfinished(state):
                return state
            if time.monotonic() > deadline:
                raise StepFailed(f"operation {operation_id} did not finish in {timeout:.0f}s")
            if self.run_pending() == 0:
                time.sleep(0.05)

    def loop(self, stop: threading.Event) -> None:
        log.info("operation worker %s started", self.owner)
        last_run: dict[int, float] = {}
        while not stop.is_set():
            try:
                ran = self.run_pending()
            except Exception:
                log.exception("operation worker: unexpected error; continuing")
                ran = 0
            if ran == 0:
                self._housekeeping(last_run)
                self._wake.wait(self.poll_interval)
                self._wake.clear()
        log.info("operation worker %s stopped", self.owner)

    def _housekeeping(self, last_run: dict[int, float]) -> None:
        now = time.monotonic()
        for index, (interval, task) in enumerate(_IDLE_TASKS):
            if now - last_run.get(index, float("-inf")) < interval:
                continue
            last_run[index] = now
            try:
                task(self)
            except Exception:
                log.exception("operation worker: housekeeping %s failed", task.__name__)


def _plain(exc: BaseException) -> str:
    """A one-line reason for users: the message, with the type only when unexpected."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if isinstance(exc, StepFailed | TransientCloudError):
        return text
    if isinstance(exc, psycopg2.Error):
        return f"PostgreSQL: {text}"
    return f"{exc.__class__.__name__}: {text}"
