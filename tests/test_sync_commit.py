"""ha-sync: a commit waits for the standby. Several unpaced writers commit through the
service address; the standby's walreceiver is frozen (its server still answers the
monitor's probes, it just receives nothing). On ha-sync every commit then blocks until
the broker switches synchronous replication off, which takes seconds (the walsender's
timeout, then the monitor's unsync), not a minute. On ha (asynchronous) the same cut
never blocks a commit: the measurement tells the two apart."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest

from broker.pg import probe as health
from broker.store.models import Instance
from harness.env import FailoverEnv, background, failover_env
from harness.faults import freeze_walreceiver, thaw
from harness.waiting import eventually, operations, settled
from harness.workflows import connect_as_admin, connect_with, instance, provision
from harness.writer import app_credentials

pytestmark = pytest.mark.e2e

WRITERS = 4
BLOCKED_AT_LEAST = 3.0    # s: on ha-sync no commit returns for this long after the cut
RESUME_BOUND = 20.0       # s: writes resume in seconds, not wal_sender_timeout's old 60 s
FLOWING_GAP = 1.5         # s: on ha no two commits are further apart than this


class UnpacedWriter(threading.Thread):
    """Commits one row after another with no pause and no client timeout: a commit
    that waits for the standby simply does not return."""

    def __init__(self, credentials: dict[str, Any], first_id: int) -> None:
        super().__init__(daemon=True)
        self.credentials = credentials
        self.next_id = first_id
        self.acked: list[float] = []    # monotonic times of the acknowledged commits
        self.error = ""
        self.halt = threading.Event()

    def run(self) -> None:
        conn = connect_with(self.credentials, timeout=5)
        try:
            with conn.cursor() as cur:
                while not self.halt.is_set():
                    cur.execute("INSERT INTO acked (id) VALUES (%s)", (self.next_id,))
                    self.acked.append(time.monotonic())
                    self.next_id += 1
        except psycopg2.Error as exc:
            self.error = " ".join(str(exc).split())
        finally:
            conn.close()


class SyncNamesWatch(threading.Thread):
    """Polls the primary's synchronous_standby_names; notes when it first goes empty."""

    def __init__(self, env: FailoverEnv, inst: Instance) -> None:
        super().__init__(daemon=True)
        primary = inst.primary()
        assert primary is not None and primary.management_address
        self.conn = connect_as_admin(env.runtime, inst, primary.management_address, "postgres")
        self.cleared_at: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.halt.is_set() and self.cleared_at is None:
                cur.execute("SHOW synchronous_standby_names")
                row = cur.fetchone()
                if row is not None and not str(row[0]).strip():
                    self.cleared_at = time.monotonic()
                time.sleep(0.05)
        self.conn.close()


@dataclass
class Stall:
    start: float     # the last commit acknowledged before the longest gap after the cut
    end: float       # the first one after it
    acked_after_cut: int

    @property
    def length(self) -> float:
        return self.end - self.start


def longest_stall(writers: list[UnpacedWriter], cut_at: float, until: float) -> Stall:
    times = sorted(t for w in writers for t in w.acked)
    window = [t for t in times if cut_at <= t <= until]
    before = [t for t in times if t < cut_at]
    points = [before[-1] if before else cut_at, *window, until]
    gaps = list(itertools.pairwise(points))
    start, end = max(gaps, key=lambda g: g[1] - g[0])
    return Stall(start=start, end=end, acked_after_cut=len(window))


@pytest.mark.parametrize("plan", ["ha-sync", "ha"])
def test_commits_wait_for_a_standby_that_stops_receiving(plan: str) -> None:
    synchronous = plan == "ha-sync"
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, plan)
        creds = app_credentials(env, instance_id)
        with background(env):
            eventually(lambda: settled(env, instance_id) and (
                not synchronous or instance(env.runtime, instance_id).sync_standby_node_id),
                "the standby streaming (and recorded synchronous on ha-sync)")
            inst = instance(env.runtime, instance_id)
            standby = inst.standby()
            assert standby is not None and standby.server_id and standby.management_address
            writers = [UnpacedWriter(creds, first_id=(k + 1) * 10**9) for k in range(WRITERS)]
            for w in writers:
                w.start()
            eventually(lambda: all(len(w.acked) > 20 for w in writers), "every writer committing")
            watch = SyncNamesWatch(env, inst)
            watch.start()

            cut_at = time.monotonic()
            receiver = freeze_walreceiver(env.cloud, standby.server_id)
            # The standby's server still answers the monitor's probe, in recovery.
            seen = health.probe(standby.management_address,
                                env.runtime.vault.decrypt(inst.admin_password_enc),
                                timeout=3.0, ca_pem=inst.ca_for(standby))
            assert seen.ok and seen.in_recovery, seen.error

            if synchronous:
                eventually(lambda: watch.cleared_at, "synchronous replication switched off",
                           timeout=RESUME_BOUND + 10)
                cleared_at = watch.cleared_at
                assert cleared_at is not None
                # The monitor unsynced a standby it still saw (no rebuild, no failover).
                after = instance(env.runtime, instance_id)
                assert after.sync_standby_node_id is None
                assert after.standby() is not None and after.standby().id == standby.id  # type: ignore[union-attr]
                assert [op.kind for op in operations(env, instance_id)] == ["provision"]
            time.sleep(2.0)
            until = time.monotonic()
            stall = longest_stall(writers, cut_at, until)

            thaw(receiver)
            # Streaming again, and on ha-sync the monitor switches synchronous back on.
            eventually(lambda: settled(env, instance_id) and (
                not synchronous or instance(env.runtime, instance_id).sync_standby_node_id
                == standby.id), "the standby streaming again", timeout=60)
            for w in writers:
                w.halt.set()
            for w in writers:
                w.join(timeout=10)
            watch.halt.set()
            watch.join(timeout=5)
        assert not any(w.error for w in writers), [w.error for w in writers]

        figures = (f"{plan}: longest stall {stall.length:.2f} s from {stall.start - cut_at:+.2f} s "
                   f"after the cut; {stall.acked_after_cut} commits in {until - cut_at:.1f} s")
        if synchronous:
            # Every writer blocked: nothing acknowledged for a while right after the cut...
            assert stall.start - cut_at < 1.0 and stall.length >= BLOCKED_AT_LEAST, figures
            # ...until the broker switched synchronous replication off, seconds later.
            assert cleared_at is not None and stall.end >= cleared_at - 0.1, figures
            assert stall.end - cut_at < RESUME_BOUND, figures
            assert stall.acked_after_cut > 0, figures
        else:
            # Asynchronous: the same cut never holds a commit back.
            assert stall.length < FLOWING_GAP and stall.acked_after_cut > 100, figures
        print(figures)
