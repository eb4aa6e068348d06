"""How many operations of one class a worker process runs at once.

A dead host carrying many primaries queues a failover for each of them, and after
each a standby rebuild (a base backup). Unbounded, they would all run at once and
compete for the CPU, the disks and the cloud's API with the monitor that watches
everything else. Each class has a per-process bound (OperationSettings); an
operation beyond it keeps its claim (its lease is renewed) and waits for a slot,
saying so in its description. Failovers and rebuilds have separate slots, so
that rebuilds never hold a failover back; and a rebuild starts only while no failover
of the process runs or waits: a base backup takes the cores and the disks that the
failovers still in flight need (measured on the local cloud with 10 primaries on a dead
host: the first failovers' rebuilds slowed the last failovers' steps). A rebuild
already running goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from broker.config import OperationSettings

FAILOVER = "failover"
REBUILD = "rebuild"
_CLASSES = {"failover": FAILOVER, "switchover": FAILOVER, "switchover-home": FAILOVER,
            "resurrect": FAILOVER,
            "rebuild": REBUILD}

_lock = threading.Lock()
_semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}
# Failover-class operations of this process running or waiting for a slot; rebuilds
# wait on `_calm` until there are none.
_calm = threading.Condition()
_failovers = 0


def slot_class(kind: str) -> str | None:
    """The class whose slots an operation kind takes; None: not bounded."""
    return _CLASSES.get(kind)


def _semaphore(cls: str, limit: int) -> threading.BoundedSemaphore:
    with _lock:
        return _semaphores.setdefault((cls, limit), threading.BoundedSemaphore(limit))


def limit_of(settings: OperationSettings, cls: str) -> int:
    return settings.max_failovers if cls == FAILOVER else settings.max_rebuilds


@contextlib.contextmanager
def slot(settings: OperationSettings, kind: str,
         waiting: Callable[[str], None]) -> Iterator[None]:
    """Hold a slot of `kind`'s class while the body runs (waiting for one if needed)."""
    cls = slot_class(kind)
    if cls is None:
        yield
        return
    if cls == FAILOVER:
        with _failover_in_flight(), _held(settings, cls, waiting):
            yield
        return
    _wait_for_failovers(waiting)
    with _held(settings, cls, waiting):
        yield


@contextlib.contextmanager
def _held(settings: OperationSettings, cls: str,
          waiting: Callable[[str], None]) -> Iterator[None]:
    limit = limit_of(settings, cls)
    semaphore = _semaphore(cls, limit)
    if not semaphore.acquire(blocking=False):
        waiting(f"queued: waiting for a free {cls} slot ({limit} run at once per worker)")
        semaphore.acquire()
    try:
        yield
    finally:
        semaphore.release()


@contextlib.contextmanager
def _failover_in_flight() -> Iterator[None]:
    global _failovers
    with _calm:
        _failovers += 1
    try:
        yield
    finally:
        with _calm:
            _failovers -= 1
            _calm.notify_all()


def _wait_for_failovers(waiting: Callable[[str], None]) -> None:
    with _calm:
        if _failovers:
            waiting("queued: waiting for this worker's failovers to finish first")
            _calm.wait_for(lambda: _failovers == 0)
