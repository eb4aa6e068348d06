"""Restore: provisioning from a source instance's backups.

`cf create-service postgresql-ha PLAN db2 -c '{"restore_from": "<source id>",
"point_in_time": "<RFC 3339>"}'` makes a normal instance of PLAN whose primary's
guest bootstrap restores the source's backups and replays its archive up to
`point_in_time` (every commit at or before it; without it, the end of the archive).

- The request (`check_request`): the source is an instance of the same service in
  the same organization (deleted ones too, while their backups are kept), and the
  time lies in its restorable window; otherwise a 400 that states the window. An
  unknown source and one of another organization get the same answer: a tenant learns
  nothing of other organizations' instances.
- `seal_source` (first step): a live source closes its current WAL file and the step
  waits until it is archived, so everything committed before the request is in the
  repository.
- `adopt` (after the primary booted): the restored cluster holds the source's roles;
  the broker logs in with the source's superuser password once, gives `postgres` the
  new instance's, drops every other LOGIN role (the source's bindings: their
  credentials must not open the copy) and hands the source's repository back to its
  own standby.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
from sqlalchemy.orm import Session

from broker.backup import archiver, names, records, s3
from broker.guest.bootstrap import ADMIN_USER, REPLICATION_USER
from broker.operations.engine import Context, RetryLater, StepFailed
from broker.operations.node_access import admin_password, node_ca
from broker.operations.refusals import InvalidRequest
from broker.operations.rows import get_node, operation_age, primary_node
from broker.pg import connection, roles
from broker.store.models import DEPROVISIONED, NODE_RUNNING, Instance

log = logging.getLogger(__name__)

SEAL_DEADLINE = timedelta(minutes=5)
SEAL_WAIT = 120.0


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with its offset ("Z" allowed)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"point_in_time {text!r} is not an RFC 3339 time "
                             "(e.g. 2026-12-02T07:30:00Z)") from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"point_in_time {text!r} has no time zone offset "
                             "(e.g. 2026-12-02T07:30:00Z)")
    return moment.astimezone(UTC)


def check_request(session: Session, *, service_id: str, organization_guid: str,
                  parameters: dict[str, Any]) -> None:
    """Refuse a restore the broker cannot do, saying why (InvalidRequest: 400)."""
    source_id = parameters.get("restore_from")
    if source_id is None:
        if "point_in_time" in parameters:
            raise InvalidRequest("point_in_time needs restore_from (the instance to restore)")
        return
    source = session.get(Instance, source_id) if isinstance(source_id, str) else None
    if source is None or source.organization_guid != organization_guid \
            or source.service_id != service_id:
        raise InvalidRequest(f"restore_from: there is no instance {source_id!r} of this "
                             "service in this organization to restore from")
    deleted = source.deleted_at is not None or source.state == DEPROVISIONED
    window = records.window(session, source.id, deleted=deleted)
    if window is None:
        raise InvalidRequest(f"restore_from: instance {source_id} has no backup to restore "
                             "from yet (its first backup is taken within 10 minutes of its "
                             "creation; `{\"backup\": true}` takes one now)")
    text = parameters.get("point_in_time")
    if text is None:
        return
    moment = parse_time(str(text))
    if not window.holds(moment):
        raise InvalidRequest(f"point_in_time {text} is outside the restorable window of "
                             f"instance {source_id}: {window.describe()}")


def source_of(ctx: Context) -> str | None:
    source = (ctx.instance().parameters or {}).get("restore_from")
    return source if isinstance(source, str) else None


def guest_restore(ctx: Context) -> dict[str, str]:
    """What the primary's bootstrap restores from (only while provisioning)."""
    source = source_of(ctx)
    if source is None or ctx.kind != "provision":
        return {}
    text = (ctx.instance().parameters or {}).get("point_in_time")
    where = _source_place(ctx, source)
    if not text:
        return {"stanza": names.stanza(source), "target": "", **where}
    target = parse_time(str(text))
    with ctx.store.session() as s:
        before = [b for b in records.backups(s, source) if records.stopped_at(b) <= target]
    if not before:
        raise StepFailed(f"instance {source} has no backup from before {text} any more")
    # pgBackRest picks a backup set from a time only to the millisecond: name the set,
    # and give PostgreSQL the time to the microsecond.
    return {"stanza": names.stanza(source), "set": before[-1].label,
            "target": target.strftime("%Y-%m-%d %H:%M:%S.%f+00"), **where}


def _source_place(ctx: Context, source_id: str) -> dict[str, str]:
    """Where the source's repository is (stored with it: a plan changed since, or
    another plan's, does not matter), as options for the restoring node's command line:
    no credentials, which its own configuration holds."""
    with ctx.store.session() as s:
        source = s.get(Instance, source_id)
        assert source is not None
        theirs = s3.instance_storage(s, ctx.settings, ctx.catalog, source_id, source.plan_id)
        ours = s3.instance_storage(s, ctx.settings, ctx.catalog, ctx.instance_id,
                                   ctx.instance().plan_id)
    if theirs is None:
        if ours is not None:
            raise StepFailed(f"instance {source_id}'s backups are on the host, and this "
                             "plan's repositories are in object storage: restore into a "
                             "plan that keeps them on the host")
        return {}
    if ours is None:
        raise StepFailed(f"instance {source_id}'s backups are in object storage, and this "
                         "plan's repositories are on the host: restore into a plan that "
                         "keeps them in object storage")
    return s3.place_options(theirs, names.stanza(source_id))


def seal_source(ctx: Context) -> None:
    """A live source's current WAL file archived, so the target's commits are in the
    repository."""
    source_id = source_of(ctx)
    if source_id is None:
        return
    with ctx.store.session() as s:
        source = s.get(Instance, source_id)
        assert source is not None
        if source.deleted_at is not None or source.state == DEPROVISIONED:
            return
        primary = source.primary()
        password = ctx.vault.decrypt(source.admin_password_enc)
        address = primary.management_address if primary is not None else None
        if primary is None or primary.state != NODE_RUNNING or not address:
            raise _wait(ctx, "the source instance's primary")
        ca = node_ca(ctx, primary.id)
    try:
        conn = connection.connect(address, password, timeout=5, ca_pem=ca)
    except psycopg2.OperationalError:
        raise _wait(ctx, "the source instance's primary") from None
    try:
        archiver.seal(conn, SEAL_WAIT)
    except archiver.NotArchived as exc:
        raise StepFailed(f"the source's latest WAL is not archived: {exc}") from None
    finally:
        conn.close()


def _wait(ctx: Context, what: str) -> RetryLater | StepFailed:
    if operation_age(ctx) > SEAL_DEADLINE:
        return StepFailed(f"gave up waiting for {what}")
    return RetryLater(f"waiting for {what}", delay=1.0)


def adopt(ctx: Context) -> None:
    """The restored cluster becomes this instance's: its superuser password, no login
    role of the source's, the source's repository back to the source."""
    source_id = source_of(ctx)
    if source_id is None:
        return
    node = get_node(ctx, primary_node(ctx).id)
    with ctx.store.session() as s:
        source = s.get(Instance, source_id)
        assert source is not None
        source_password = ctx.vault.decrypt(source.admin_password_enc)
        standby = source.standby() if source.deleted_at is None else None
        standby_volume = standby.volume_id if standby is not None else None
    password = admin_password(ctx)
    conn = None
    for candidate in (password, source_password):  # a re-run finds the new one set
        try:
            conn = connection.connect(node.management_address or "", candidate, timeout=5,
                                      ca_pem=node_ca(ctx, node.id))
            break
        except psycopg2.OperationalError:
            continue
    if conn is None:
        raise RetryLater("waiting for the restored primary to accept the broker", delay=1.0)
    try:
        # PostgreSQL removes recovery.signal before its end-of-recovery checkpoint:
        # writable only once that is done.
        if connection.fetch_one(conn, "SELECT pg_catalog.pg_is_in_recovery()"):
            raise RetryLater("waiting for the restored primary to finish its recovery",
                             delay=1.0)
        roles.set_password(conn, ADMIN_USER, password, create="SUPERUSER LOGIN")
        for role in connection.fetch_column(
                conn, "SELECT rolname FROM pg_catalog.pg_roles WHERE rolcanlogin "
                      "AND rolname <> ALL(%s)", ([ADMIN_USER, REPLICATION_USER],)):
            roles.drop_binding_role(conn, role)
    finally:
        conn.close()
    ctx.cloud.share_repository(names.stanza(source_id), standby_volume)
    log.info("instance %s: restored from instance %s", ctx.instance_id, source_id)
