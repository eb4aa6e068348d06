"""Backups: a full or differential pgBackRest backup of an instance, run by the workers.

Queued by `cf update-service db -c '{"backup": true}'` (kind `backup`: what the
platform polls through last_operation) and by the schedule (kind `scheduled_backup`,
broker/backup/schedule.py). One step:

- backup: on the primary, by its own server (broker/backup/commands.py), annotated
  with the operation's id, with the plan's retention (pgBackRest then expires what
  the restore window no longer needs). A run that finds a backup carrying its
  annotation is done: a worker killed mid-backup leaves pgBackRest running on the
  node, and the next run waits for the stanza's lock (RetryLater), then finds the
  finished backup. A backup that pgBackRest itself left unfinished is resumed or
  cleaned by pgBackRest's next backup.

A backup never holds the platform back: binds and unbinds go on during one, and a
deprovision stops it (`stop_backups`, the deprovision's first step: pgBackRest's
processes of the stanza are terminated on the primary, the operation ends
"cancelled"); what pgBackRest left of the unfinished backup is never listed as a
backup, and every earlier backup and the archive stay restorable.

Backups are taken on the primary: pgBackRest reaches a server only through its own
node's socket, and a backup from the standby needs the primary's too (pgBackRest's
remote protocol between nodes, which the nodes do not run).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import psycopg2

from broker.backup import archiver, commands, names, records
from broker.catalog import BackupSettings
from broker.operations import queue
from broker.operations.engine import Context, RetryLater, Step, StepFailed, Workflow
from broker.operations.node_access import admin_connection
from broker.operations.params import BackupParams
from broker.operations.rows import operation_age
from broker.store.models import IN_PROGRESS, NODE_RUNNING, Operation, utcnow

log = logging.getLogger(__name__)

KIND, SCHEDULED_KIND = queue.BACKGROUND_KINDS  # nothing waits behind a backup
ANNOTATION = records.ANNOTATION
LOCK_RETRY_SECONDS = 5.0
SEAL_TIMEOUT = 60.0
CANCELLED = "cancelled: the instance is being deprovisioned"
# A deprovision stops a running backup and waits this long for its operation to end
# (its worker may be gone: its lease runs out first); then it goes on regardless.
STOP_DEADLINE = timedelta(minutes=5)
STOP_RETRY_SECONDS = 2.0


def new_backup(instance_id: str, backup_type: str, *, cause: str,
               kind: str = KIND) -> Operation:
    return queue.new_operation(instance_id, kind, params=BackupParams(type=backup_type,
                                                                      cause=cause),
                               description=f"queued: {backup_type} backup ({cause})")


def retention(ctx: Context) -> list[str]:
    """Full backups are kept so that any time of the last `retention_days` can be restored."""
    days = ctx.plan().cloud.backups.retention_days
    return ["--repo1-retention-full-type=time", f"--repo1-retention-full={days}"]


def annotated(backups: list[dict[str, Any]], operation_id: str) -> dict[str, Any] | None:
    return next((b for b in backups
                 if (b.get("annotation") or {}).get(ANNOTATION) == operation_id), None)


def record(ctx: Context, reported: list[dict[str, Any]]) -> None:
    with ctx.store.session() as s:
        records.repository(s, ctx.instance_id)
        records.record_backups(s, ctx.instance_id, reported)


def take_backup(ctx: Context) -> None:
    params = ctx.params_of(BackupParams)
    inst = ctx.instance()
    node = inst.primary()
    if node is None or node.state != NODE_RUNNING or not node.management_address:
        raise StepFailed("the instance has no running primary to back up")
    stanza = names.stanza(inst.id)
    with admin_connection(ctx, node, timeout=5.0) as conn:
        try:
            reported = commands.info(conn, stanza).get("backup", [])
            if annotated(reported, ctx.operation_id):
                record(ctx, reported)
                return
            if _deprovisioning(ctx):
                raise StepFailed(CANCELLED)
            ctx.progress(f"taking a {params.type} backup ({params.cause})")
            commands.run(conn, stanza, f"--type={params.type}",
                         f"--annotation={ANNOTATION}={ctx.operation_id}", *retention(ctx),
                         "backup")
            reported = commands.info(conn, stanza).get("backup", [])
        except commands.PgBackRestFailed as exc:
            if _deprovisioning(ctx):
                raise StepFailed(CANCELLED) from None
            if exc.lock_held:
                raise RetryLater("another backup of this instance is still running",
                                 LOCK_RETRY_SECONDS) from None
            raise StepFailed(f"the backup failed: {exc}") from None
    record(ctx, reported)
    log.info("instance %s: %s backup taken (operation %s)", inst.id, params.type,
             ctx.operation_id)


def _deprovisioning(ctx: Context) -> bool:
    with ctx.store.session() as s:
        return queue.deprovision_requested(s, ctx.instance_id)


def stop_backups(ctx: Context) -> None:
    """Deprovisioning: a backup in progress is stopped and the step waits until its
    operation has ended (a queued one is cancelled by the engine before it starts).
    Stopping again at every retry also catches a backup that started meanwhile."""
    with ctx.store.session() as s:
        running = [op.id for op in queue.unfinished_for(s, ctx.instance_id,
                                                          kinds=queue.BACKGROUND_KINDS)]
        started = [op_id for op_id in running
                   if (op := s.get(Operation, op_id)) is not None and op.state == IN_PROGRESS]
    if not running:
        return
    if operation_age(ctx) > STOP_DEADLINE:
        log.warning("instance %s: backup %s has not stopped; deprovisioning goes on (deleting "
                    "the servers ends it)", ctx.instance_id, ", ".join(running))
        return
    if started:
        _terminate_pgbackrest(ctx)
    raise RetryLater(f"stopping the backup in progress ({', '.join(running)})",
                     STOP_RETRY_SECONDS)


def _terminate_pgbackrest(ctx: Context) -> None:
    """`pgbackrest stop --force` ends the stanza's running processes (the backup, and
    the asynchronous archiver, which the next archive_command starts again), then
    `start` lets the last WAL be archived. An unreachable primary ends the backup by
    itself."""
    node = ctx.instance().primary()
    if node is None or node.state != NODE_RUNNING or not node.management_address:
        return
    stanza = names.stanza(ctx.instance_id)
    try:
        with admin_connection(ctx, node, timeout=5.0) as conn:
            try:
                commands.run(conn, stanza, "--force", "stop")
            finally:
                commands.run(conn, stanza, "start")
    except (psycopg2.Error, commands.PgBackRestFailed, StepFailed) as exc:
        log.warning("instance %s: the backup in progress was not stopped (%s); waiting for "
                    "it", ctx.instance_id, " ".join(str(exc).split()))


def keep_repository(ctx: Context) -> None:
    """Deprovisioning: the primary's last WAL archived (when it still runs), the
    repository kept for the plan's restore window, so the instance can be restored
    after its deletion; the schedule stops."""
    inst = ctx.instance()
    with ctx.store.session() as s:
        if records.repository(s, inst.id).keep_until is not None:
            return
    sealed_at = None
    primary = inst.primary()
    if primary is not None and primary.state == NODE_RUNNING and primary.management_address:
        try:
            with admin_connection(ctx, primary, timeout=3.0) as conn:
                sealed_at = archiver.seal(conn, SEAL_TIMEOUT)
        except (psycopg2.Error, archiver.NotArchived, StepFailed) as exc:
            log.warning("instance %s: its last WAL is not archived (%s); it can be restored "
                        "up to its last archived commit", inst.id, " ".join(str(exc).split()))
    plan = ctx.catalog.plan(inst.plan_id)
    days = (plan.cloud.backups if plan else BackupSettings()).retention_days
    with ctx.store.session() as s:
        row = records.repository(s, inst.id)
        kept = records.backups(s, inst.id)
        row.archive_end_at = sealed_at or (records.stopped_at(kept[-1]) if kept else None)
        row.keep_until = utcnow() + timedelta(days=days)
        row.next_full_at = row.next_diff_at = None


def steps(ctx: Context) -> list[Step]:
    return [Step("backup", "taking a backup", take_backup)]


# A deprovision cancels a backup that has not started, or waits on a retry.
WORKFLOW = Workflow(kind=KIND, steps=steps, done="backup taken", params=BackupParams,
                    deprovision_preempts=True)
SCHEDULED_WORKFLOW = Workflow(kind=SCHEDULED_KIND, steps=steps, done="backup taken",
                              params=BackupParams, deprovision_preempts=True)

