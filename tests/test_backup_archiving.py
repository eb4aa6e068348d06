"""Continuous archiving with pgBackRest on real nodes of the local cloud: the primary
pushes every WAL file to its instance's repository on the host; after a failover the
new primary goes on, on its new timeline, and the repository stays consistent; the
standby reads the repository; another instance's node reaches none of it."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from broker.backup import archiver, names
from broker.backup.schedule import Scheduler
from broker.cli.instances import show_instance
from broker.store.models import OP_FAILED, Operation
from harness.backups import (
    archived_files,
    node_user,
    node_volume,
    pgbackrest,
    repository,
    switch_and_wait_archived,
)
from harness.env import failover_env
from harness.faults import kill_server
from harness.scenarios import fail_primary, under_write_load
from harness.waiting import eventually
from harness.workflows import connect_as_admin, instance, provision
from tests.test_backup_operations import request_backup


def segments(files: list[str], timeline: int) -> list[int]:
    prefix = f"{timeline:08X}"
    return [int(f[8:], 16) for f in files if len(f) == 24 and f.startswith(prefix)]


def test_the_new_primary_archives_its_timeline_after_a_failover() -> None:
    with failover_env() as env, under_write_load(env, "ha-sync") as load:
        first = switch_and_wait_archived(env.runtime, load.instance_id)
        assert first in archived_files(env.cloud, load.instance_id)
        outcome = fail_primary(env, load.instance_id, load.credentials, load.writer,
                               kill_server)
        assert not outcome.lost
        load.stop()
        last = switch_and_wait_archived(env.runtime, load.instance_id)
        assert last.startswith("00000002"), last
        files = archived_files(env.cloud, load.instance_id)
        assert "00000002.history" in files
        # No gap: timeline 1 up to where the new primary took over, timeline 2 from there.
        old, new = segments(files, 1), segments(files, 2)
        assert old == list(range(1, max(old) + 1)), old
        assert new == list(range(min(new), max(new) + 1)) and min(new) <= max(old) + 1, new
        inst = instance(env.runtime, load.instance_id)
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and standby is not None
        # The promotion ran without restore_command (fast, see replication.promote) and
        # put it back: a restore or a demotion of this node fetches WAL again.
        assert primary.management_address is not None
        conn = connect_as_admin(env.runtime, inst, primary.management_address, "postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW restore_command")
                assert "archive-get" in cur.fetchone()[0]
        finally:
            conn.close()
        verify = pgbackrest(env.cloud, primary, load.instance_id, "verify")
        assert verify.returncode == 0, verify.stderr + verify.stdout
        # The rebuilt standby catches up from the repository: it can read it.
        got = pgbackrest(env.cloud, standby, load.instance_id, "archive-get",
                         "00000002.history", "/dev/null")
        assert got.returncode == 0, got.stderr + got.stdout


def test_a_node_of_another_instance_reaches_no_repository_but_its_own() -> None:
    """A tenant who got the PostgreSQL OS account of its own node (e.g. a superuser's
    COPY ... TO PROGRAM) can neither read nor write another instance's repository."""
    with failover_env() as env:
        victim = provision(env.runtime, env.engine, "standalone")
        attacker = provision(env.runtime, env.engine, "standalone")
        victim_wal = switch_and_wait_archived(env.runtime, victim)
        repo = repository(env.cloud, victim)
        archive_info = repo / "archive" / names.stanza(victim) / "archive.info"
        assert archive_info.exists()
        attacker_node = instance(env.runtime, attacker).primary()
        assert attacker_node is not None
        user = node_user(env.cloud, attacker_node)

        def as_attacker(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                  cwd="/", capture_output=True, text=True, check=False)

        assert as_attacker("cat", str(archive_info)).returncode != 0
        assert as_attacker("ls", str(repo)).returncode != 0
        assert as_attacker("ls", str(repo.parent)).returncode != 0  # no list of stanzas
        assert as_attacker("touch", str(repo / "planted")).returncode != 0
        assert as_attacker("rm", "-rf", str(repo / "archive")).returncode != 0
        # pgBackRest itself, with its own node's configuration pointed at the victim's
        # repository and stanza, gets nothing either.
        own_data = f"--pg1-path={node_volume(env.cloud, attacker_node) / 'data'}"
        stolen = pgbackrest(env.cloud, attacker_node, victim, f"--repo1-path={repo}", own_data,
                            "archive-get", victim_wal, "/tmp/stolen-wal")
        assert stolen.returncode != 0 and "Permission denied" in stolen.stderr + stolen.stdout
        assert not os.path.exists("/tmp/stolen-wal")
        stolen = pgbackrest(env.cloud, attacker_node, victim, f"--repo1-path={repo}", own_data,
                            "--output=json", "info")
        assert '"status":{"code":0' not in stolen.stdout
        # Nothing in the repository is readable, writable or reachable by anyone else.
        for top, dirs, files in os.walk(repo):
            for name in (*dirs, *files):
                assert not os.lstat(os.path.join(top, name)).st_mode & 0o007, name
        # Its own repository works for the attacker's node.
        own = pgbackrest(env.cloud, attacker_node, attacker, "info")
        assert own.returncode == 0 and names.stanza(attacker) in own.stdout


def test_an_archive_failure_is_visible_and_catches_up_once_the_repository_is_back(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """The repository becomes unreachable: `instances show` says archiving fails, the
    monitor's worker warns, a backup fails saying why; once the repository is back,
    archiving catches up with no one's help."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        switch_and_wait_archived(env.runtime, instance_id)
        repo = repository(env.cloud, instance_id)
        away = repo.with_name(repo.name + ".away")
        repo.rename(away)  # as an object store that stopped answering
        inst = instance(env.runtime, instance_id)
        primary = inst.primary()
        assert primary is not None and primary.management_address
        conn = connect_as_admin(env.runtime, inst, primary.management_address, "postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:  # some WAL, then its file closed
                cur.execute("SELECT pg_catalog.pg_logical_emit_message(false, 'pgha', 'x')")
                cur.execute("SELECT pg_catalog.pg_walfile_name(pg_catalog.pg_switch_wal())")
                stuck = str(cur.fetchone()[0])
            eventually(lambda: archiver.archiving(conn).status.failing, "archiving failing", 60)
            assert show_instance(env.runtime, instance_id, as_json=False) == 0
            assert "FAILING since" in capsys.readouterr().out
            with caplog.at_level(logging.INFO, logger="broker.backup.schedule"):
                Scheduler(env.runtime).check_archiving(lambda _: True)
            assert f"instance {instance_id}: archiving is behind" in caplog.text
            op_id = request_backup(env.runtime, instance_id)
            assert env.engine.run_until_finished(op_id, timeout=180) == OP_FAILED
            with env.runtime.store.session() as s:
                op = s.get(Operation, op_id)
                assert op is not None and op.description.startswith("failed: the backup failed:")
            away.rename(repo)
            # No switch, no nudge: PostgreSQL's archiver retries on its own.
            eventually(lambda: (archiver.archiving(conn).status.last_archived_wal or "") >= stuck
                       and not archiver.archiving(conn).status.failing,
                       "archiving caught up", 150)
        finally:
            conn.close()
        assert switch_and_wait_archived(env.runtime, instance_id) > stuck
