"""The monitor's decision ladder: a snapshot in, a status sentence and one action out.

`decide` is pure (no clock, no store, no network), like Patroni's HA loop: the
observe step (observe.py) reads the store and probes the nodes, `decide` picks the
first rung that applies, and the executor (act.py) carries out the action. The
rungs, in order:

    no lease → instance gone → operation in progress → not ready/degraded
    → primary answers but refuses the broker (alive: never a failover)
    → primary unreachable k/N (re-check quickly)
    → primary unreachable N/N and the cloud API too → no failover (partition?)
    → ... last failover too recent → wait (no flapping)
    → ... no eligible standby → degraded, and say why
    → failover (or resurrect) queued
    → primary healthy: standby lost → unsync (ha-sync) and rebuild queued
    → primary healthy, standby streaming, lag N B
    → ... a node certificate within its renewal window → rotation queued
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from broker.cloud.base import ServerStatus
from broker.config import MonitorSettings
from broker.ha import rules
from broker.pg.probe import CloudState, Probe, lag_bytes
from broker.store.models import DEGRADED, READY

# A standby that answers but does not stream is rebuilt after this long.
NOT_STREAMING_GRACE = 30.0
# A failed rebuild is tried again after this long.
REBUILD_RETRY = 60.0
# A certificate rotation the monitor queued is queued again at most this often.
RENEWAL_RETRY = 3600.0


def recheck_delay(settings: MonitorSettings) -> float:
    """The pause between the confirmations of a first failure."""
    return max(0.05, min(0.1, settings.check_interval / 10))


def suspect_delay(settings: MonitorSettings) -> float:
    """How long the sweep waits for a primary's answer on its open session before it
    starts the confirmations: a healthy node answers a prepared query in milliseconds;
    a frozen or black-holed one never does, and waiting out the whole deadline first
    would put a second deadline on top of the first."""
    return max(recheck_delay(settings), settings.connect_timeout / 3)


# --- what the monitor remembers between two checks -----------------------------------
@dataclass(frozen=True)
class Watch:
    primary_failures: int = 0
    standby_failures: int = 0
    not_streaming_since: float | None = None     # monotonic seconds
    last_primary_lsn: int | None = None
    sync_mark: rules.SyncMark | None = None
    urgent: bool = False                          # re-check after `recheck`, not the interval
    suspect: bool = False                         # the sweep's probe hangs: confirm at once

    def primary_reset(self) -> Watch:
        return replace(self, primary_failures=0, urgent=False)


# --- the snapshot ------------------------------------------------------------------
@dataclass(frozen=True)
class NodeView:
    id: str
    application_name: str


@dataclass(frozen=True)
class Certificates:
    """Node certificates within their renewal window, and the last rotation queued."""

    due: tuple[str, ...] = ()
    expired: bool = False
    last_rotation_age: float | None = None       # seconds
    renew_days: float = 30.0


@dataclass(frozen=True)
class Snapshot:
    instance_id: str
    watch: Watch
    now: float                                    # monotonic seconds
    held: bool = True
    exists: bool = True
    state: str = READY
    state_reason: str | None = None
    replication: str = "async"
    plan_ha: bool | None = None                   # None: the plan left the catalog
    primary: NodeView | None = None               # None: none with a management address
    standby: NodeView | None = None
    sync_standby_id: str | None = None
    last_lag_bytes: int | None = None
    busy: str | None = None                       # the unfinished operation, in words
    primary_seen: Probe | None = None
    standby_seen: Probe | None = None             # None: the standby has no address
    cloud: CloudState | None = None               # asked once the primary fails
    last_failover_age: float | None = None        # seconds since the last automatic one
    rebuild_failed: tuple[str, float] | None = None  # (error, seconds ago) of the last rebuild
    certificates: Certificates = Certificates()


# --- actions -----------------------------------------------------------------------
@dataclass(frozen=True)
class QueueFailover:
    """Queue a failover (or, standalone, a resurrect) of the primary and run it."""

    cause: str
    old_primary_id: str
    standby_id: str | None
    last_primary_lsn: int | None
    resurrect: bool = False
    detail: str | None = None


@dataclass(frozen=True)
class QueueRebuild:
    """Queue a standby's rebuild (unsynchronising first when `unsync` says why)."""

    replace_node_id: str | None
    cause: str
    unsync: str | None = None


@dataclass(frozen=True)
class Degrade:
    reason: str
    unsync: str | None = None


@dataclass(frozen=True)
class Unsync:
    """Switch synchronous replication off so that the primary stays writable."""

    why: str


@dataclass(frozen=True)
class EnableSync:
    """Name the standby in synchronous_standby_names again."""

    application_name: str


@dataclass(frozen=True)
class QueueRotation:
    cause: str


Action = QueueFailover | QueueRebuild | Degrade | Unsync | EnableSync | QueueRotation


@dataclass(frozen=True)
class Record:
    """What the check saw: the standby's lag, the synchronous standby, healthy or not."""

    lag: int | None
    sync_standby_id: str | None
    healthy: bool = False


@dataclass(frozen=True)
class Decision:
    status: str
    action: Action | None = None
    watch: Watch = Watch()
    record: Record | None = None


# --- the ladder ----------------------------------------------------------------------
def before_probe(snap: Snapshot) -> Decision | None:
    """The rungs that need no probe (the observe step probes only past them)."""
    watch = snap.watch
    if not snap.held:
        return Decision("no lease", watch=watch)
    if not snap.exists:
        return Decision("instance gone", watch=watch)
    if snap.busy is not None:
        return Decision(f"operation in progress: {snap.busy}",
                        watch=replace(watch.primary_reset(), standby_failures=0))
    if snap.state not in (READY, DEGRADED):
        return Decision(f"instance {snap.state}: not acting", watch=watch.primary_reset())
    if snap.primary is None:
        return Decision("no primary recorded: nothing to watch", watch=watch)
    return None


def decide(snap: Snapshot, settings: MonitorSettings) -> Decision:
    early = before_probe(snap)
    if early is not None:
        return early
    seen = snap.primary_seen
    assert seen is not None and snap.primary is not None
    if seen.outcome == "answering":
        return _certificates(snap, Decision(
            f"primary answers but refuses the broker: {seen.error}",
            watch=snap.watch.primary_reset()))
    if not seen.ok:
        return _primary_down(snap, settings, seen)
    watch = snap.watch.primary_reset()
    if seen.in_recovery:
        return Decision("the recorded primary is in recovery: not acting", watch=watch)
    snap = replace(snap, watch=replace(watch, last_primary_lsn=seen.lsn))
    if snap.standby is None:
        decision = _no_standby(snap)
    else:
        decision = _with_standby(snap, settings, seen, snap.standby)
    return _certificates(snap, decision)


def _primary_down(snap: Snapshot, settings: MonitorSettings, seen: Probe) -> Decision:
    assert snap.primary is not None
    primary = snap.primary
    limit = settings.failures_before_acting
    watch = snap.watch
    if watch.primary_failures < limit:
        return Decision(f"primary unreachable {watch.primary_failures}/{limit}: {seen.error}",
                        watch=replace(watch, urgent=True))
    watch = replace(watch, urgent=False)
    cloud = snap.cloud or CloudState(None, error="not asked")
    head = f"primary unreachable {limit}/{limit} ({seen.error})"
    if not cloud.reachable:
        return Decision(f"{head} and {cloud.describe}: not failing over (a partition cannot "
                        "be told from a crash)",
                        Degrade(f"primary {primary.id} unreachable and the cloud API too: not "
                                "failing over (a partition cannot be told from a crash)"),
                        watch=watch)
    cause = f"primary {primary.id} unreachable ({seen.error}); {cloud.describe}"
    age = snap.last_failover_age
    if age is not None and age < settings.min_seconds_between_failovers:
        return Decision(f"{head}; last failover {age:.0f} s ago, less than "
                        f"{settings.min_seconds_between_failovers:.0f} s: waiting", watch=watch)
    standby, standby_seen = snap.standby, snap.standby_seen
    if standby is None:
        if snap.plan_ha is False:
            return Decision(f"resurrect queued: {cause}",
                            QueueFailover(cause, primary.id, None, watch.last_primary_lsn,
                                          resurrect=True), watch=watch)
        return _degrade(watch, f"primary {primary.id} lost and there is no standby")
    if standby_seen is None or not standby_seen.ok:
        why = standby_seen.error if standby_seen is not None else "no address"
        return _degrade(watch, f"primary {primary.id} lost and the standby {standby.id} does "
                               f"not answer either ({why}): nothing to promote")
    if not standby_seen.in_recovery:
        return _degrade(watch, f"primary {primary.id} lost and the standby {standby.id} is "
                               "not in recovery: not acting")
    # The failover's own rules, on what the monitor knows now: refusing here leaves
    # the old primary untouched (it may come back).
    lag = rules.lag_at_failover(watch.last_primary_lsn, standby_seen.lsn,
                                standby_seen.receive_lsn, snap.last_lag_bytes)
    refusal = rules.failover_refusal(replication=snap.replication, standby_id=standby.id,
                                     sync_standby_id=snap.sync_standby_id, lag=lag,
                                     limit=settings.maximum_lag_on_failover)
    if refusal is not None:
        return _degrade(watch, f"primary {primary.id} lost; failover refused: {refusal}")
    detail = None
    if cloud.status == ServerStatus.ACTIVE:
        detail = "the cloud says the server runs: fenced through the cloud (partition?)"
    return Decision(f"failover queued: {cause}",
                    QueueFailover(cause, primary.id, standby.id, watch.last_primary_lsn,
                                  detail=detail), watch=watch)


def _degrade(watch: Watch, reason: str, unsync: str | None = None) -> Decision:
    return Decision(reason, Degrade(reason, unsync), watch=watch)


def _no_standby(snap: Snapshot) -> Decision:
    record = Record(lag=None, sync_standby_id=None)
    if not snap.plan_ha:
        return Decision("primary healthy (standalone)", watch=snap.watch,
                        record=replace(record, healthy=True))
    return replace(_rebuild(snap, None, "the standby is missing"), record=record)


def _rebuild(snap: Snapshot, replace_node_id: str | None, cause: str,
             unsync: str | None = None) -> Decision:
    failed = snap.rebuild_failed
    if failed is not None and failed[1] < REBUILD_RETRY:
        return _degrade(snap.watch, f"{cause}; the last rebuild failed ({failed[0]}): trying "
                                    "again soon", unsync)
    return Decision(f"{cause}: rebuild queued", QueueRebuild(replace_node_id, cause, unsync),
                    watch=snap.watch)


def _with_standby(snap: Snapshot, settings: MonitorSettings, seen: Probe,
                  standby: NodeView) -> Decision:
    limit = settings.failures_before_acting
    replica = seen.replica(standby.application_name)
    lag = lag_bytes(seen, replica)
    named = standby.application_name in seen.synchronous_standby_names
    streaming = replica is not None and replica.state == "streaming"
    watch = snap.watch
    # Which standby holds every acknowledged commit: true as long as it is named (commits
    # wait for it), once confirmed (rules.confirm_sync).
    sync_id: str | None = None
    if snap.replication != rules.SYNC or not named:
        watch = replace(watch, sync_mark=None)
    elif snap.sync_standby_id == standby.id:
        sync_id = standby.id
    else:
        confirmed, mark = rules.confirm_sync(
            watch.sync_mark, standby.id, streaming=streaming,
            sync_state=replica.sync_state if replica is not None else "",
            primary_lsn=seen.lsn, flush_lsn=replica.flush_lsn if replica is not None else None)
        watch = replace(watch, sync_mark=mark)
        sync_id = standby.id if confirmed else None
    record = Record(lag=lag, sync_standby_id=sync_id)
    snap = replace(snap, watch=watch)

    def lost(cause: str, watch: Watch) -> Decision:
        unsync = cause if snap.replication == rules.SYNC else None
        decision = _rebuild(replace(snap, watch=replace(watch, standby_failures=0)),
                            standby.id, cause, unsync)
        return replace(decision, record=record)

    standby_seen = snap.standby_seen
    if standby_seen is not None and standby_seen.outcome == "down":
        failures = watch.standby_failures + 1
        if failures < limit:
            return Decision(f"primary healthy; standby unreachable {failures}/{limit}: "
                            f"{standby_seen.error}",
                            watch=replace(watch, standby_failures=failures, urgent=True),
                            record=record)
        return lost(f"standby {standby.id} unreachable ({standby_seen.error})",
                    replace(watch, urgent=False))
    watch = replace(watch, standby_failures=0, urgent=False)
    if replica is None or not streaming:
        since = watch.not_streaming_since if watch.not_streaming_since is not None else snap.now
        watch = replace(watch, not_streaming_since=since)
        state = replica.state if replica is not None else "not connected"
        waited = snap.now - since
        if waited >= NOT_STREAMING_GRACE:
            return lost(f"standby {standby.id} has not streamed for {waited:.0f} s ({state})",
                        watch)
        status = (f"primary healthy; standby answers but does not stream ({state}) for "
                  f"{waited:.0f} s")
        action: Action | None = None
        if named and snap.replication == rules.SYNC:
            if rules.unsync_due(waited, recheck_delay(settings), limit):
                action = Unsync(f"standby {standby.id} does not stream ({state})")
            else:
                watch = replace(watch, urgent=True)
        return Decision(status, action, watch=watch, record=record)
    watch = replace(watch, not_streaming_since=None)
    if rules.may_sync_again(snap.replication, seen.synchronous_standby_names, lag,
                            settings.maximum_lag_on_failover):
        return Decision(f"primary healthy; standby {standby.id} caught up (lag {lag} B): "
                        "synchronous replication switched on again",
                        EnableSync(standby.application_name), watch=watch, record=record)
    assert replica is not None
    status = f"primary healthy, standby streaming ({replica.sync_state}), lag {lag} B"
    if snap.replication == rules.SYNC and sync_id is None:
        return Decision(status + "; not yet recorded synchronous", watch=watch, record=record)
    return Decision(status, watch=watch, record=replace(record, healthy=True))


def _certificates(snap: Snapshot, decision: Decision) -> Decision:
    """A node certificate in its renewal window gets new ones when all else is well (at
    most once per RENEWAL_RETRY, so a failing rotation is not hammered); so does one
    that expired (the broker cannot verify it any more)."""
    certs = snap.certificates
    if decision.action is not None or not certs.due:
        return decision
    if not (decision.status.startswith("primary healthy") or certs.expired):
        return decision
    if certs.last_rotation_age is not None and certs.last_rotation_age < RENEWAL_RETRY:
        return decision
    cause = (f"certificate of node {', '.join(certs.due)} expires within "
             f"{certs.renew_days:g} days")
    return replace(decision, action=QueueRotation(cause))
