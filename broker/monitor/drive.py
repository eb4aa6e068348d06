"""Running what the monitor queued: at once, with the monitor's own engine.

The monitor runs the operations it queues itself (claiming them at once with its own
Engine object), so a failover never waits behind another instance's long operation.
The operation stays durable: any worker's engine resumes it after a crash.
"""

from __future__ import annotations

import threading
import time

from broker.operations import queue, workflows
from broker.operations.engine import Engine
from broker.operations.promotion import REBUILD, derived_id
from broker.runtime import Runtime
from broker.store.models import SUCCEEDED

# How long the monitor drives one operation it queued before leaving it to the engine.
DRIVE_TIMEOUT = 900.0


class Driver:
    def __init__(self, runtime: Runtime, engine: Engine | None) -> None:
        self.runtime = runtime
        self.engine = engine
        self._runner: Engine | None = None
        # Watchers queue at once when a host dies: one runner for them all, or one
        # watcher's pre-claimed operation belongs to another's runner and waits out the
        # claim's lease (15 s) until the worker's engine takes it.
        self._runner_lock = threading.Lock()

    def reset(self) -> None:
        """A new engine for the next operation (the runtime's cloud was replaced)."""
        with self._runner_lock:
            self._runner = None

    def _op_state(self, op_id: str) -> str | None:
        return queue.state_of(self.runtime.store, op_id)

    def runner(self) -> Engine:
        """This monitor's own engine: runs what the monitor queued, at once."""
        with self._runner_lock:
            if self._runner is None:
                rt = self.runtime
                workflows.install()
                self._runner = Engine(rt.store, rt.cloud, rt.vault, rt.catalog, rt.settings,
                                      owner=queue.new_owner_id(queue.RUNNER_ROLE))
            return self._runner

    def drive(self, op_id: str, stop: threading.Event | None = None) -> str | None:
        """Run an operation this monitor queued to its end, here and now (then the
        rebuild it queued). Another worker that claimed it first simply runs it."""
        runner = self.runner()
        if self.engine is not None:
            self.engine.wake()
        deadline = time.monotonic() + DRIVE_TIMEOUT
        state = self._op_state(op_id)
        while queue.is_unfinished(state) and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return state
            if runner.claim(op_id) is not None:
                state = runner.run(op_id)
                if queue.is_unfinished(state) and self.engine is not None:
                    # Released to be retried later: from here the worker's engine runs it,
                    # so that only one claimer ever competes for the row.
                    self.engine.wake()
                    return state
                continue
            time.sleep(0.05)
            state = self._op_state(op_id)
        if state == SUCCEEDED:
            follow_up = derived_id(op_id, REBUILD)
            if queue.is_unfinished(self._op_state(follow_up)):
                return self.drive(follow_up, stop)
        return state

