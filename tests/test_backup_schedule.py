"""The backup schedule lives in the state store: two workers ticking at once queue one
backup, a restarted worker queues nothing new, differential and full backups come at
the plan's intervals; a deleted instance's repository is kept for the restore window
and purged after it."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from broker.backup import records, report
from broker.backup import schedule as backup_schedule
from broker.backup.schedule import FIRST_BACKUP_DELAY, Scheduler
from broker.config import load_settings
from broker.operations import backup, queue, restore
from broker.operations.params import BackupParams
from broker.operations.refusals import InvalidRequest
from broker.runtime import build_runtime
from broker.store.db import Store
from broker.store.models import (
    NODE_RUNNING,
    PRIMARY,
    READY,
    BackupRepository,
    Instance,
    Node,
    Operation,
    aware,
    utcnow,
)
from harness.backups import repository, switch_and_wait_archived
from harness.env import ROOT, failover_env
from harness.workflows import deprovision, finish, make_engine, make_runtime, provision


def scheduled(store: Store, instance_id: str) -> list[Operation]:
    with store.session() as s:
        return list(s.scalars(select(Operation).where(Operation.instance_id == instance_id)
                              .where(Operation.kind == backup.SCHEDULED_KIND)
                              .order_by(Operation.created_at)))


def test_two_workers_queue_each_scheduled_backup_once_and_a_restart_changes_nothing() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        switch_and_wait_archived(env.runtime, instance_id)
        clock = {"now": utcnow()}
        # Two workers: their own runtime and engine on the same store and cloud.
        other = make_runtime(env.state_url, env.key, env.cloud)
        workers = [Scheduler(env.runtime, now=lambda: clock["now"]),
                   Scheduler(other, now=lambda: clock["now"])]

        def tick_together() -> list[str]:
            out: list[list[str]] = [[], []]
            threads = [threading.Thread(target=lambda i=i: out[i].extend(workers[i].tick()))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out[0] + out[1]

        assert tick_together() == []  # first seen: the first backup in ten minutes
        clock["now"] += FIRST_BACKUP_DELAY + timedelta(seconds=1)
        first = tick_together()
        assert len(first) == 1
        finish(make_engine(other), first[0])
        ops = scheduled(env.runtime.store, instance_id)
        assert [BackupParams.load(op.params).type for op in ops] == ["full"]
        # A worker restarted: a new scheduler on the same store queues nothing new.
        assert Scheduler(env.runtime, now=lambda: clock["now"]).tick() == []
        clock["now"] += timedelta(days=1, seconds=1)
        diff = tick_together()
        assert len(diff) == 1
        finish(env.engine, diff[0])
        clock["now"] += timedelta(days=6)
        full = tick_together()
        assert len(full) == 1
        finish(env.engine, full[0])
        ops = scheduled(env.runtime.store, instance_id)
        assert [BackupParams.load(op.params).type for op in ops] == ["full", "diff", "full"]
        with env.runtime.store.session() as s:
            kept = records.backups(s, instance_id)
        assert [b.type for b in kept] == ["full", "diff", "full"]
        other.store.dispose()


def test_a_deleted_instances_backups_are_kept_for_the_window_then_purged() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        Scheduler(env.runtime).tick()
        ops = Scheduler(env.runtime, now=lambda: utcnow() + FIRST_BACKUP_DELAY).tick()
        finish(env.engine, ops[0])
        deprovision(env.runtime, env.engine, instance_id)
        scheduler = Scheduler(env.runtime)
        assert repository(env.cloud, instance_id).exists()
        with env.runtime.store.session() as s:
            row = s.get(BackupRepository, instance_id)
            assert row is not None and row.keep_until is not None
            keep_until = aware(row.keep_until)
            assert keep_until is not None
            assert keep_until - utcnow() > timedelta(days=6, hours=23)
            restore.check_request(s, service_id=env.runtime.catalog.plan_by_name(
                "standalone").service_id, organization_guid="org",
                parameters={"restore_from": instance_id})
        assert scheduler.tick() == []  # nothing due, nothing purged yet
        assert repository(env.cloud, instance_id).exists()
        later = Scheduler(env.runtime, now=lambda: keep_until + timedelta(seconds=1))
        later.tick()
        assert not repository(env.cloud, instance_id).exists()
        with env.runtime.store.session() as s, pytest.raises(InvalidRequest, match="no backup"):
            restore.check_request(s, service_id=env.runtime.catalog.plan_by_name(
                "standalone").service_id, organization_guid="org",
                parameters={"restore_from": instance_id})



def test_backups_list_shows_deleted_instances_and_delete_purges_after_confirmation() -> None:
    with failover_env() as env:
        live = provision(env.runtime, env.engine, "standalone")
        gone = provision(env.runtime, env.engine, "standalone")
        Scheduler(env.runtime).tick()
        for op_id in Scheduler(env.runtime, now=lambda: utcnow() + FIRST_BACKUP_DELAY).tick():
            finish(env.engine, op_id)
        deprovision(env.runtime, env.engine, gone)

        def cli(*args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "broker", "backups", *args],
                                  input=answer, capture_output=True, text=True, timeout=120,
                                  env=env.worker_env(), cwd=ROOT, check=False)

        listed = cli("list")
        assert listed.returncode == 0, listed.stderr
        assert f"instance {live} (live)" in listed.stdout
        assert f"instance {gone} (deleted, kept until" in listed.stdout
        assert "restorable  20" in listed.stdout and "last archived" in listed.stdout
        assert cli("delete", live, "--yes").returncode == 1  # a live instance's: never
        refused = cli("delete", gone, answer="n\n")
        assert refused.returncode == 1 and "nothing deleted" in refused.stdout
        assert repository(env.cloud, gone).exists()
        deleted = cli("delete", gone, answer="y\n")
        assert deleted.returncode == 0, deleted.stderr
        assert not repository(env.cloud, gone).exists()
        assert repository(env.cloud, live).exists()
        assert f"instance {gone}" not in cli("list").stdout


def test_nothing_waits_behind_a_backup_and_the_monitor_acts_during_one() -> None:
    """A scheduled backup in progress: a failover (here a switchover, claimed the same
    way) queued after it is claimed at once, and the monitor does not call the
    instance busy; a backup queued after another operation waits for it."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        with env.runtime.store.session() as s:
            running = backup.new_backup(instance_id, "full", cause="test",
                                        kind=backup.SCHEDULED_KIND)
            s.add(running)
        assert env.engine.claim(running.id) == running.id  # in progress
        with env.runtime.store.session() as s:
            failover = queue.new_operation(instance_id, "switchover")
            s.add(failover)
        assert env.engine.claim(failover.id) == failover.id
        with env.runtime.store.session() as s:
            busy = queue.busy_with(s, instance_id, except_kinds=queue.BACKGROUND_KINDS)
            assert busy is not None and busy.id == failover.id
            later = backup.new_backup(instance_id, "diff", cause="test")
            s.add(later)
        assert env.engine.claim(later.id) is None  # behind the switchover
        for op_id in (running.id, failover.id, later.id):
            env.engine.queue.finish(op_id, "failed", "test over", error="test over")
        with env.runtime.store.session() as s:
            s.add(backup.new_backup(instance_id, "full", cause="test"))
            assert queue.busy_with(s, instance_id, except_kinds=queue.BACKGROUND_KINDS) is None


def test_the_archiving_check_connects_to_a_few_primaries_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 instances must not cost their nodes 1,000 new sessions in a burst: each call
    reads the archiving of at most ARCHIVING_BATCH primaries, a round covers every
    instance once, and the next round waits for ARCHIVING_CHECK_SECONDS."""
    rt = build_runtime(load_settings({
        "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": str(tmp_path),
        "BROKER_ENCRYPTION_KEY": Fernet.generate_key().decode()}))
    count = backup_schedule.ARCHIVING_BATCH * 2 + 3
    plan = rt.catalog.plan_by_name("standalone")
    secret = rt.vault.encrypt("pw")
    with rt.store.session() as s:
        for k in range(count):
            instance_id = str(uuid.uuid4())
            s.add(Instance(id=instance_id, service_id=plan.service_id, plan_id=plan.id,
                           organization_guid="o", space_guid="s", state=READY,
                           replication="async", admin_password_enc=secret,
                           replication_password_enc=secret))
            # Nothing listens there: a refused connection, as fast as it gets.
            s.add(Node(id=uuid.uuid4().hex[:8], instance_id=instance_id, role=PRIMARY,
                       state=NODE_RUNNING, availability_zone="az1",
                       management_address=f"127.0.9.{k % 250 + 1}"))
    checked: list[str] = []
    real = report.archiving

    def counting(runtime: Any, inst: Instance) -> dict[str, Any]:
        checked.append(inst.id)
        return real(runtime, inst)

    monkeypatch.setattr(report, "archiving", counting)
    try:
        scheduler = Scheduler(rt)
        calls = 0
        while True:
            before = len(checked)
            scheduler.check_archiving(lambda _: True)
            calls += 1
            assert len(checked) - before <= backup_schedule.ARCHIVING_BATCH
            if len(checked) == before:
                break
        assert sorted(checked) == sorted(set(checked)) and len(checked) == count
        assert calls == 4   # three batches, then a round that has not come yet
        monkeypatch.setattr(backup_schedule, "ARCHIVING_CHECK_SECONDS", 0.0)
        scheduler.check_archiving(lambda _: True)
        assert len(checked) == count + backup_schedule.ARCHIVING_BATCH  # the next round
    finally:
        rt.store.dispose()
