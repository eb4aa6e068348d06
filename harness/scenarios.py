"""Whole scenarios under write load: an instance with an app writing to it and the
worker running (`under_write_load`), and one primary failure checked the way a user
would (`fail_primary`, `fail_primary_standalone`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from broker.cloud.local import LocalCloud
from broker.store.models import READY, Node
from harness.env import FailoverEnv, HasEngine, background
from harness.waiting import eventually, settled, unfinished
from harness.workflows import instance, provision
from harness.writer import Writer, app_credentials, stored_ids

EnvT = TypeVar("EnvT", bound=HasEngine)


@dataclass
class UnderLoad(Generic[EnvT]):
    """An instance an app is writing to, its binding's credentials and the writer."""
    env: EnvT
    instance_id: str
    credentials: dict[str, Any]
    writer: Writer
    running: contextlib.ExitStack = field(repr=False)

    def stop(self) -> None:
        """Stop the monitor (if it runs here), then the writer; a second call does nothing."""
        self.running.close()


@contextlib.contextmanager
def under_write_load(env: EnvT, plan: str = "ha-sync", *,
                     monitor: bool = True) -> Iterator[UnderLoad[EnvT]]:
    """Provision `plan`, bind an app, start a Writer and (with `monitor`) the worker's
    engine and monitor in this process; `stop()` or the exit stops them, monitor first."""
    instance_id = provision(env.runtime, env.engine, plan)
    creds = app_credentials(env, instance_id)
    writer = Writer(creds)
    with contextlib.ExitStack() as running:
        writer.start()
        running.callback(writer.stop)
        if monitor:
            running.enter_context(background(env))
        yield UnderLoad(env, instance_id, creds, writer, running)


@dataclass
class Outcome:
    kill_at: float
    first_write: float          # seconds from the fault to the first acknowledged write
    settled: float              # seconds from the fault to a streaming standby, instance ready
    acked: int
    lost: set[int]


def _fault_primary(env: FailoverEnv, instance_id: str, writer: Writer,
                   fault: Callable[[LocalCloud, str], Any]) -> tuple[Node, float]:
    """Once the writer is under way, apply `fault` to the primary's server: the primary
    as it was, and when the fault landed."""
    primary = instance(env.runtime, instance_id).primary()
    assert primary is not None and primary.server_id is not None
    writer.wait_acks(20)
    kill_at = time.monotonic()
    fault(env.cloud, primary.server_id)
    return primary, kill_at


def fail_primary(env: FailoverEnv, instance_id: str, creds: dict[str, Any], writer: Writer,
                 fault: Callable[[LocalCloud, str], Any], *, settle_timeout: float = 90.0
                 ) -> Outcome:
    """Apply `fault` to the primary's server under write load; wait until writes resume
    and the instance is ready with a streaming standby again."""
    primary, kill_at = _fault_primary(env, instance_id, writer, fault)
    first = writer.wait_acks(5, after=kill_at, timeout=60)
    eventually(lambda: settled(env, instance_id) and
               instance(env.runtime, instance_id).primary().id != primary.id,  # type: ignore[union-attr]
               "the instance ready again with a streaming standby", settle_timeout)
    settled_at = time.monotonic()
    writer.wait_acks(5, after=settled_at)
    return Outcome(kill_at=kill_at, first_write=first - kill_at,
                   settled=settled_at - kill_at, acked=len(writer.acked),
                   lost={i for i, _ in writer.acked} - stored_ids(creds))


def fail_primary_standalone(env: FailoverEnv, instance_id: str, creds: dict[str, Any],
                            writer: Writer, fault: Callable[[LocalCloud, str], Any]) -> set[int]:
    """Fault the only server; wait for the resurrect; returns acknowledged ids lost."""
    primary, kill_at = _fault_primary(env, instance_id, writer, fault)
    writer.wait_acks(5, after=kill_at, timeout=120)
    eventually(lambda: not unfinished(env, instance_id) and
               instance(env.runtime, instance_id).state == READY and
               instance(env.runtime, instance_id).primary().id != primary.id,  # type: ignore[union-attr]
               "the instance resurrected", 120)
    return {i for i, _ in writer.acked} - stored_ids(creds)
