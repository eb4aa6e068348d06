"""Which path a check's decision takes: pure rules, unit-tested.

Most checks find a healthy instance: the sweep (one thread, persistent probe
sessions, one store transaction for every routine record) handles those. A check
that found something to confirm or to do hands the instance to its own watcher,
which runs the full observe → decide → act check (fresh probes, the confirmation
rounds of loop.py's detection timing, the store read afresh) until it is settled
again.
"""

from __future__ import annotations

from broker.monitor.decide import Decision, Snapshot
from broker.store.models import DEGRADED


def settled(decision: Decision) -> bool:
    """Nothing to do and nothing to confirm: the sweep keeps the instance."""
    watch = decision.watch
    return (decision.action is None and not watch.urgent and watch.primary_failures == 0
            and watch.standby_failures == 0)


def record_only(snap: Snapshot, decision: Decision) -> bool:
    """The check's only effect is the routine record (lag, time of the check), which
    the sweep writes for every instance in one transaction."""
    record = decision.record
    return (decision.action is None and record is not None
            and record.sync_standby_id == snap.sync_standby_id
            and not (record.healthy and snap.state == DEGRADED))

