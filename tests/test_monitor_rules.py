"""The monitor's decision ladder and the HA rules, without root and without PostgreSQL.

One row per rung, as Patroni's test_ha.py does: a snapshot of the instance and of what
the probes saw goes into `decide`, and the row names the status sentence (a fragment
of it) and the action that must come out. The end-to-end tests (test_failover_*.py)
show the same rungs against real nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from broker.cloud.base import ServerStatus
from broker.config import MonitorSettings
from broker.ha import rules
from broker.monitor.decide import (
    NOT_STREAMING_GRACE,
    REBUILD_RETRY,
    Action,
    Certificates,
    Decision,
    Degrade,
    EnableSync,
    NodeView,
    QueueFailover,
    QueueRebuild,
    QueueRotation,
    Record,
    Snapshot,
    Unsync,
    Watch,
    decide,
)
from broker.pg.probe import CloudState, Probe, ReplicaInfo
from broker.store.models import DEGRADED, UPDATING

SETTINGS = MonitorSettings()          # 3 failures before acting, 60 s gap, 1 MiB lag
LIMIT = SETTINGS.maximum_lag_on_failover
PRIMARY = NodeView("p1", "node_p1")
STANDBY = NodeView("s1", "node_s1")
NOW = 1000.0
LSN = 50_000_000


def replica(state: str = "streaming", sync_state: str = "async",
            flush: int = LSN) -> ReplicaInfo:
    return ReplicaInfo(STANDBY.application_name, state, sync_state, flush, flush)


def primary_ok(*replicas: ReplicaInfo, names: str = "") -> Probe:
    return Probe("10.0.0.1", "ok", 0.01, in_recovery=False, lsn=LSN,
                 synchronous_standby_names=names, replicas=replicas)


def standby_ok(received: int = LSN) -> Probe:
    return Probe("10.0.0.2", "ok", 0.01, in_recovery=True, lsn=received, receive_lsn=received)


DOWN = Probe("10.0.0.1", "down", 1.0, error="connection refused")
STANDBY_DOWN = Probe("10.0.0.2", "down", 1.0, error="no answer within 1 s")
CLOUD_SHUTOFF = CloudState(ServerStatus.SHUTOFF)
CLOUD_ACTIVE = CloudState(ServerStatus.ACTIVE)
CLOUD_UNREACHABLE = CloudState(None, error="no answer within 5 s")

# An ha instance whose primary and standby are healthy; rows change what they test.
HA = Snapshot("i1", Watch(), NOW, plan_ha=True, primary=PRIMARY, standby=STANDBY,
              last_lag_bytes=0, primary_seen=primary_ok(replica()), standby_seen=standby_ok())
SYNC = replace(HA, replication="sync", sync_standby_id=STANDBY.id,
               primary_seen=primary_ok(replica(sync_state="sync"), names="node_s1"))
STANDALONE = replace(HA, plan_ha=False, standby=None, standby_seen=None,
                     primary_seen=primary_ok())


def down(snap: Snapshot, failures: int = 3,
         cloud: CloudState | None = CLOUD_SHUTOFF) -> Snapshot:
    """The primary has failed `failures` probes in a row."""
    watch = replace(snap.watch, primary_failures=failures, last_primary_lsn=LSN)
    return replace(snap, watch=watch, primary_seen=DOWN, cloud=cloud)


@dataclass(frozen=True)
class Row:
    name: str
    snapshot: Snapshot
    status: str                         # a fragment of the status sentence
    action: Action | None = None


FAILOVER_CAUSE = "primary p1 unreachable (connection refused); server SHUTOFF"

ROWS = [
    # --- before any probe ------------------------------------------------------------
    Row("no lease", replace(HA, held=False), "no lease"),
    Row("instance gone", replace(HA, exists=False), "instance gone"),
    Row("operation already running", replace(HA, busy="rebuild (queued: rebuilding)"),
        "operation in progress: rebuild (queued: rebuilding)"),
    Row("instance updating", replace(HA, state=UPDATING), "instance updating: not acting"),
    Row("no primary recorded", replace(HA, primary=None),
        "no primary recorded: nothing to watch"),
    # --- the primary -------------------------------------------------------------------
    Row("primary healthy", HA, "primary healthy, standby streaming (async), lag 0 B"),
    Row("primary healthy, standalone", STANDALONE, "primary healthy (standalone)"),
    Row("primary answers but refuses the broker",
        replace(HA, primary_seen=Probe("10.0.0.1", "answering", 0.01,
                                       error="too many clients")),
        "primary answers but refuses the broker: too many clients"),
    Row("primary in recovery",
        replace(HA, primary_seen=replace(primary_ok(), in_recovery=True)),
        "the recorded primary is in recovery: not acting"),
    Row("primary failed once", down(HA, 1, cloud=None),
        "primary unreachable 1/3: connection refused"),
    Row("primary failed twice", down(HA, 2, cloud=None),
        "primary unreachable 2/3: connection refused"),
    Row("primary failed the threshold: failover", down(HA),
        f"failover queued: {FAILOVER_CAUSE}",
        QueueFailover(FAILOVER_CAUSE, PRIMARY.id, STANDBY.id, LSN)),
    Row("primary down, the cloud says it runs: failover with fencing",
        down(HA, cloud=CLOUD_ACTIVE),
        "failover queued",
        QueueFailover("primary p1 unreachable (connection refused); server ACTIVE", PRIMARY.id,
                      STANDBY.id, LSN, detail="the cloud says the server runs: fenced through "
                                              "the cloud (partition?)")),
    Row("primary down but cloud unreachable", down(HA, cloud=CLOUD_UNREACHABLE),
        "primary unreachable 3/3 (connection refused) and cloud API unreachable (no answer "
        "within 5 s): not failing over (a partition cannot be told from a crash)",
        Degrade("primary p1 unreachable and the cloud API too: not failing over (a partition "
                "cannot be told from a crash)")),
    Row("recent failover within the anti-flapping gap", replace(down(HA), last_failover_age=20.0),
        "primary unreachable 3/3 (connection refused); last failover 20 s ago, less than "
        "60 s: waiting"),
    Row("a failover longer ago than the gap does not hold back",
        replace(down(HA), last_failover_age=61.0), "failover queued",
        QueueFailover(FAILOVER_CAUSE, PRIMARY.id, STANDBY.id, LSN)),
    Row("standby lagging over the limit in ha",
        replace(down(HA), standby_seen=standby_ok(LSN - LIMIT - 1)),
        f"primary p1 lost; failover refused: the standby s1 is {LIMIT + 1} bytes behind, "
        f"more than maximum_lag_on_failover ({LIMIT} bytes)",
        Degrade(f"primary p1 lost; failover refused: the standby s1 is {LIMIT + 1} bytes "
                f"behind, more than maximum_lag_on_failover ({LIMIT} bytes)")),
    Row("standby exactly at the limit in ha",
        replace(down(HA), standby_seen=standby_ok(LSN - LIMIT)),
        "failover queued", QueueFailover(FAILOVER_CAUSE, PRIMARY.id, STANDBY.id, LSN)),
    Row("ha-sync standby not confirmed sync", down(replace(SYNC, sync_standby_id=None)),
        "primary p1 lost; failover refused: the standby s1 was not known to be synchronous",
        Degrade("primary p1 lost; failover refused: the standby s1 was not known to be "
                "synchronous, so promoting it could lose acknowledged commits")),
    Row("ha-sync standby confirmed sync, far behind: failover",
        replace(down(SYNC), standby_seen=standby_ok(0)), "failover queued",
        QueueFailover(FAILOVER_CAUSE, PRIMARY.id, STANDBY.id, LSN)),
    Row("no standby", down(replace(HA, standby=None, standby_seen=None)),
        "primary p1 lost and there is no standby",
        Degrade("primary p1 lost and there is no standby")),
    Row("standby does not answer either", replace(down(HA), standby_seen=STANDBY_DOWN),
        "primary p1 lost and the standby s1 does not answer either (no answer within 1 s): "
        "nothing to promote",
        Degrade("primary p1 lost and the standby s1 does not answer either (no answer within "
                "1 s): nothing to promote")),
    Row("standby not in recovery", replace(down(HA), standby_seen=replace(standby_ok(),
                                                                        in_recovery=False)),
        "primary p1 lost and the standby s1 is not in recovery: not acting",
        Degrade("primary p1 lost and the standby s1 is not in recovery: not acting")),
    Row("standalone dead: resurrect", down(STANDALONE), f"resurrect queued: {FAILOVER_CAUSE}",
        QueueFailover(FAILOVER_CAUSE, PRIMARY.id, None, LSN, resurrect=True)),
    # --- the standby, with the primary healthy ------------------------------------------
    Row("standby unreachable once", replace(HA, standby_seen=STANDBY_DOWN),
        "primary healthy; standby unreachable 1/3: no answer within 1 s"),
    Row("standby lost: rebuild",
        replace(HA, standby_seen=STANDBY_DOWN, watch=Watch(standby_failures=2)),
        "standby s1 unreachable (no answer within 1 s): rebuild queued",
        QueueRebuild("s1", "standby s1 unreachable (no answer within 1 s)")),
    Row("sync standby lost: unsync, then rebuild",
        replace(SYNC, standby_seen=STANDBY_DOWN, watch=Watch(standby_failures=2)),
        "standby s1 unreachable (no answer within 1 s): rebuild queued",
        QueueRebuild("s1", "standby s1 unreachable (no answer within 1 s)",
                     unsync="standby s1 unreachable (no answer within 1 s)")),
    Row("standby lost, the last rebuild failed recently",
        replace(HA, standby_seen=STANDBY_DOWN, watch=Watch(standby_failures=2),
                rebuild_failed=("no capacity", REBUILD_RETRY - 1)),
        "standby s1 unreachable (no answer within 1 s); the last rebuild failed (no "
        "capacity): trying again soon",
        Degrade("standby s1 unreachable (no answer within 1 s); the last rebuild failed (no "
                "capacity): trying again soon")),
    Row("standby missing in ha: rebuild", replace(HA, standby=None, standby_seen=None),
        "the standby is missing: rebuild queued", QueueRebuild(None, "the standby is missing")),
    Row("standby not streaming, within the grace",
        replace(HA, primary_seen=primary_ok(replica("catchup")),
                watch=Watch(not_streaming_since=NOW - 5)),
        "primary healthy; standby answers but does not stream (catchup) for 5 s"),
    Row("standby not streaming past the grace: rebuild",
        replace(HA, primary_seen=primary_ok(), watch=Watch(not_streaming_since=NOW - 31)),
        "standby s1 has not streamed for 31 s (not connected): rebuild queued",
        QueueRebuild("s1", "standby s1 has not streamed for 31 s (not connected)")),
    Row("sync standby named but not streaming: unsync",
        replace(SYNC, primary_seen=primary_ok(names="node_s1"),
                watch=Watch(not_streaming_since=NOW - 1)),
        "primary healthy; standby answers but does not stream (not connected) for 1 s",
        Unsync("standby s1 does not stream (not connected)")),
    Row("sync standby caught up again: sync on",
        replace(SYNC, sync_standby_id=None, primary_seen=primary_ok(replica())),
        "primary healthy; standby s1 caught up (lag 0 B): synchronous replication switched "
        "on again", EnableSync("node_s1")),
    Row("ha-sync standby streaming, not yet confirmed",
        replace(SYNC, sync_standby_id=None),
        "primary healthy, standby streaming (sync), lag 0 B; not yet recorded synchronous"),
    Row("ha-sync standby confirmed", SYNC, "primary healthy, standby streaming (sync), lag 0 B"),
    # --- certificates ----------------------------------------------------------------------
    Row("certificate due on a healthy instance: rotation",
        replace(HA, certificates=Certificates(due=("p1",))),
        "primary healthy", QueueRotation("certificate of node p1 expires within 30 days")),
    Row("certificate rotation queued recently: not again",
        replace(HA, certificates=Certificates(due=("p1",), last_rotation_age=60.0)),
        "primary healthy"),
    Row("expired certificate: the broker cannot verify the primary",
        replace(HA, primary_seen=Probe("10.0.0.1", "answering", 0.01,
                                       error="certificate verify failed"),
                certificates=Certificates(due=("p1",), expired=True)),
        "primary answers but refuses the broker",
        QueueRotation("certificate of node p1 expires within 30 days")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_rung(row: Row) -> None:
    decision = decide(row.snapshot, SETTINGS)
    assert row.status in decision.status, decision.status
    assert decision.action == row.action


def test_every_action_kind_has_a_row() -> None:
    kinds = {type(r.action) for r in ROWS if r.action is not None}
    assert kinds == {QueueFailover, QueueRebuild, Degrade, Unsync, EnableSync, QueueRotation}


# --- what the ladder remembers between two checks -------------------------------------
def test_first_failure_asks_for_quick_rechecks_and_a_healthy_check_forgets_it() -> None:
    failing = decide(down(HA, 1, cloud=None), SETTINGS)
    assert failing.watch.urgent and failing.watch.primary_failures == 1
    healthy = decide(replace(HA, watch=failing.watch), SETTINGS)
    assert not healthy.watch.urgent and healthy.watch.primary_failures == 0
    assert healthy.watch.last_primary_lsn == LSN


def test_standby_failures_count_up_to_the_rebuild() -> None:
    snap = replace(HA, standby_seen=STANDBY_DOWN)
    first = decide(snap, SETTINGS)
    second = decide(replace(snap, watch=first.watch), SETTINGS)
    third = decide(replace(snap, watch=second.watch), SETTINGS)
    assert (first.action, second.action) == (None, None)
    assert "2/3" in second.status and isinstance(third.action, QueueRebuild)
    assert third.watch.standby_failures == 0


def test_not_streaming_is_timed_from_the_first_check_that_saw_it() -> None:
    snap = replace(HA, primary_seen=primary_ok(replica("startup")))
    first = decide(snap, SETTINGS)
    assert first.watch.not_streaming_since == NOW
    later = decide(replace(snap, watch=first.watch, now=NOW + NOT_STREAMING_GRACE), SETTINGS)
    assert isinstance(later.action, QueueRebuild)
    again = decide(replace(HA, watch=first.watch), SETTINGS)
    assert again.watch.not_streaming_since is None


def test_a_sync_standby_is_recorded_after_two_looks() -> None:
    """Seen sync at LSN, then with its flush position past that LSN: recorded."""
    snap = replace(SYNC, sync_standby_id=None)
    first = decide(snap, SETTINGS)
    assert first.record == Record(lag=0, sync_standby_id=None)
    assert first.watch.sync_mark == rules.SyncMark(STANDBY.id, LSN)
    second = decide(replace(snap, watch=first.watch), SETTINGS)
    assert second.record == Record(lag=0, sync_standby_id=STANDBY.id, healthy=True)
    behind = replace(snap, watch=first.watch,
                     primary_seen=primary_ok(replica(sync_state="sync", flush=LSN - 1),
                                             names="node_s1"))
    assert decide(behind, SETTINGS).record == Record(lag=1, sync_standby_id=None)


def test_a_healthy_check_records_lag_and_says_healthy() -> None:
    decision = decide(replace(HA, state=DEGRADED, primary_seen=primary_ok(replica(flush=LSN - 7))),
                      SETTINGS)
    assert decision == Decision("primary healthy, standby streaming (async), lag 7 B",
                                watch=Watch(last_primary_lsn=LSN),
                                record=Record(lag=7, sync_standby_id=None, healthy=True))


# --- the rules the failover operation shares ----------------------------------------------
@pytest.mark.parametrize(("replication", "sync_id", "lag", "refused"), [
    ("async", None, 0, None),
    ("async", None, LIMIT, None),
    ("async", None, LIMIT + 1, "more than maximum_lag_on_failover"),
    ("async", None, None, "lag is unknown"),
    ("sync", "s1", LIMIT * 10, None),
    ("sync", None, 0, "not known to be synchronous"),
    ("sync", "other", 0, "not known to be synchronous"),
])
def test_failover_refusal(replication: str, sync_id: str | None, lag: int | None,
                          refused: str | None) -> None:
    reason = rules.failover_refusal(replication=replication, standby_id="s1",
                                    sync_standby_id=sync_id, lag=lag, limit=LIMIT)
    assert (reason is None) == (refused is None)
    if refused is not None:
        assert reason is not None and refused in reason


def test_lag_at_failover_counts_what_the_standby_received() -> None:
    assert rules.lag_at_failover(1000, 400, 900, None) == 100
    assert rules.lag_at_failover(1000, 1200, None, None) == 0
    assert rules.lag_at_failover(None, 400, 900, 77) == 77


def test_unsync_forgets_in_the_store_before_the_primary_stops_waiting() -> None:
    steps: list[str] = []
    rules.unsync(lambda: steps.append("store"), lambda: steps.append("primary"))
    assert steps == ["store", "primary"]


def test_confirm_sync_starts_over_when_the_standby_stops_being_sync() -> None:
    confirmed, mark = rules.confirm_sync(None, "s1", streaming=True, sync_state="sync",
                                         primary_lsn=10, flush_lsn=5)
    assert not confirmed and mark == rules.SyncMark("s1", 10)
    confirmed, mark = rules.confirm_sync(mark, "s1", streaming=True, sync_state="potential",
                                         primary_lsn=20, flush_lsn=20)
    assert not confirmed and mark is None
    confirmed, mark = rules.confirm_sync(rules.SyncMark("other", 0), "s1", streaming=True,
                                         sync_state="sync", primary_lsn=30, flush_lsn=30)
    assert not confirmed and mark == rules.SyncMark("s1", 30)
    assert rules.confirm_sync(mark, "s1", streaming=True, sync_state="sync", primary_lsn=40,
                              flush_lsn=30) == (True, mark)
