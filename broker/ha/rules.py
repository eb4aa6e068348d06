"""The HA rules, on plain values: the monitor and the failover operation both ask here.

- Eligibility: in ha-sync only the standby recorded as synchronous may be promoted
  (it holds every acknowledged commit); in ha only one at most
  `maximum_lag_on_failover` bytes behind the primary's last seen position.
- Sync confirmation (Patroni's sync key): a standby named in
  synchronous_standby_names is recorded as synchronous once it has been seen `sync`
  twice, with its flush position at the second look past the primary's position at
  the first: then it also holds the commits acknowledged before it became synchronous.
- Unsync (non-strict synchronous mode): the store forgets the synchronous standby
  FIRST, then the primary stops waiting for it. In the other order a failover in
  between could promote a standby that no longer receives every acknowledged commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SYNC = "sync"


def lag_at_failover(last_primary_lsn: int | None, standby_replay_lsn: int | None,
                    standby_receive_lsn: int | None, last_lag_bytes: int | None) -> int | None:
    """What promoting the standby now could lose: the primary's last seen position minus
    what the standby received, or else the last lag the monitor recorded."""
    if last_primary_lsn is None:
        return last_lag_bytes
    received = max(standby_receive_lsn or 0, standby_replay_lsn or 0)
    return max(0, last_primary_lsn - received)


def failover_refusal(*, replication: str, standby_id: str, sync_standby_id: str | None,
                     lag: int | None, limit: int) -> str | None:
    """Why this standby may not become primary, or None when it may."""
    if replication == SYNC:
        if sync_standby_id != standby_id:
            return (f"the standby {standby_id} was not known to be synchronous, so promoting "
                    "it could lose acknowledged commits")
        return None
    if lag is None:
        return f"the standby {standby_id}'s lag is unknown (it was never seen streaming)"
    if lag > limit:
        return (f"the standby {standby_id} is {lag} bytes behind, more than "
                f"maximum_lag_on_failover ({limit} bytes)")
    return None


@dataclass(frozen=True)
class SyncMark:
    """A standby first seen `sync`, and the primary's position at that look."""

    standby_id: str
    primary_lsn: int


def confirm_sync(mark: SyncMark | None, standby_id: str, *, streaming: bool, sync_state: str,
                 primary_lsn: int | None, flush_lsn: int | None
                 ) -> tuple[bool, SyncMark | None]:
    """One look at a standby named in synchronous_standby_names: (confirmed, new mark)."""
    if not streaming or sync_state != SYNC:
        return False, None
    if mark is None or mark.standby_id != standby_id:
        return False, SyncMark(standby_id, primary_lsn or 0)
    if (flush_lsn or 0) >= mark.primary_lsn:
        return True, mark
    return False, mark


def unsync_due(not_streaming_for: float, recheck: float, failures_before_acting: int) -> bool:
    """A standby named synchronous that does not stream makes every commit wait: switch
    synchronous replication off after as long as the primary's own confirmations take."""
    return not_streaming_for >= recheck * (failures_before_acting - 1)


def may_sync_again(replication: str, synchronous_standby_names: str, lag: int | None,
                   limit: int) -> bool:
    """ha-sync with nobody named: name the standby again once it has caught up."""
    return (replication == SYNC and not synchronous_standby_names.strip()
            and lag is not None and lag <= limit)


def unsync(forget_in_store: Callable[[], None], clear_on_primary: Callable[[], None]) -> None:
    """Switch synchronous replication off in the one safe order."""
    forget_in_store()
    clear_on_primary()
