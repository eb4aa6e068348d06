"""Object storage per plan and its expiry, against moto's S3 on this machine over TLS:
a plan's `cloud.backups.object_storage` puts its repositories in a bucket of its own,
a restore reads the source's repository where it was put (across plans, and after a
catalog change), and a deleted instance's objects leave the bucket after its restore
window or on `broker backups delete`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import pytest

from broker.backup import names, records
from broker.backup.schedule import Scheduler
from broker.catalog import Catalog, ObjectStorage, Plan
from broker.cli import backups as backups_cli
from broker.config import S3Settings
from broker.runtime import Runtime
from broker.store.models import utcnow
from harness.backups import switch_and_wait_archived
from harness.env import FailoverEnv, failover_env
from harness.s3 import create_bucket, moto_s3, object_keys
from harness.workflows import deprovision, finish, make_engine, provision
from harness.writer import app_credentials
from tests.test_backup_operations import request_backup
from tests.test_backup_restore import restore, stamped_rows, write_rows


@contextlib.contextmanager
def s3_env() -> Iterator[tuple[FailoverEnv, S3Settings, Runtime]]:
    """A failover environment whose broker keeps repositories in moto's bucket."""
    with failover_env() as env:
        env.cloud.ensure_network()
        with moto_s3(env.cloud.broker_address) as s3:
            yield env, s3, dataclasses.replace(env.runtime, settings=dataclasses.replace(
                env.runtime.settings, backup_s3=s3))


def test_expired_and_deleted_repositories_leave_the_bucket(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A deleted instance's repository stays in the bucket for its restore window; after
    it the schedule deletes every object under its prefix, and `broker backups delete`
    does so at once; another instance's objects stay."""
    with s3_env() as (_env, s3, runtime):
        engine = make_engine(runtime)
        expiring, purged, kept = (provision(runtime, engine, "standalone")
                                  for _ in range(3))
        for instance_id in (expiring, purged, kept):
            finish(engine, request_backup(runtime, instance_id))
        for instance_id in (expiring, purged):
            deprovision(runtime, engine, instance_id)

        def keys(instance_id: str) -> list[str]:
            return object_keys(s3, f"pgha/{names.stanza(instance_id)}/")

        assert all(keys(i) for i in (expiring, purged, kept))
        window = timedelta(days=runtime.catalog.plan_by_name(
            "standalone").cloud.backups.retention_days)
        Scheduler(runtime, now=lambda: utcnow() + window - timedelta(hours=1)).tick()
        assert keys(expiring), "deleted before the end of its restore window"
        capsys.readouterr()
        assert backups_cli.delete_backups(runtime, purged, assume_yes=True) == 0
        assert "deleted" in capsys.readouterr().out
        assert not keys(purged)
        assert keys(expiring) and keys(kept)
        Scheduler(runtime, now=lambda: utcnow() + window + timedelta(hours=1)).tick()
        assert not keys(expiring)
        assert backups_cli.list_backups(runtime, expiring, as_json=False) == 1
        assert "no backups" in capsys.readouterr().out
        assert keys(kept), "another instance's repository was touched"
        with runtime.store.session() as s:
            assert not records.backups(s, expiring) and not records.backups(s, purged)


def _with_storage(catalog: Catalog, plan_name: str, storage: ObjectStorage) -> Catalog:
    """The catalog with one plan's `cloud.backups.object_storage` set."""
    def changed(plan: Plan) -> Plan:
        if plan.name != plan_name:
            return plan
        backups = dataclasses.replace(plan.cloud.backups, object_storage=storage)
        return dataclasses.replace(plan, cloud=dataclasses.replace(plan.cloud, backups=backups))

    return dataclasses.replace(catalog, services=tuple(
        dataclasses.replace(service, plans=tuple(changed(p) for p in service.plans))
        for service in catalog.services))


def test_a_plans_own_bucket_and_restores_from_where_the_source_was_put() -> None:
    """Plan `ha` keeps its repositories in a bucket of its own (the catalog's
    object_storage over the environment's); a restore of a `standalone` instance (the
    environment's bucket) into `ha` reads the source's bucket and archives into its own.
    After the catalog moves `standalone` to a third bucket, the source still archives
    where it was put, and a restore still finds its backups there."""
    with s3_env() as (env, s3, runtime):
        ha_bucket = create_bucket(s3, "pgha-plan-ha")
        elsewhere = create_bucket(s3, "pgha-elsewhere")
        runtime = dataclasses.replace(runtime, catalog=_with_storage(
            runtime.catalog, "ha", ObjectStorage(bucket=ha_bucket.bucket, prefix="/ha")))
        catalog = runtime.catalog
        engine = make_engine(runtime)
        source = provision(runtime, engine, "standalone")
        creds = app_credentials(env, source)
        write_rows(creds, range(1, 6))
        finish(engine, request_backup(runtime, source))
        write_rows(creds, range(6, 11))
        copy, op_id = restore(runtime, "ha", {"restore_from": source})
        assert op_id is not None
        finish(engine, op_id)
        got = set(stamped_rows(app_credentials(env, copy, f"app-{copy}")))
        assert got == set(range(1, 11))
        switch_and_wait_archived(runtime, copy)
        assert object_keys(ha_bucket, f"ha/{names.stanza(copy)}/archive/")
        assert not object_keys(s3, f"pgha/{names.stanza(copy)}/")
        # The catalog changes: new standalone instances go elsewhere, the source's
        # repository stays where it is.
        moved = dataclasses.replace(runtime, catalog=_with_storage(
            catalog, "standalone", ObjectStorage(bucket=elsewhere.bucket)))
        engine = make_engine(moved)
        write_rows(creds, range(11, 16))
        wal = switch_and_wait_archived(moved, source)
        assert any(wal in k for k in object_keys(s3, f"pgha/{names.stanza(source)}/archive/"))
        again, op_id = restore(moved, "standalone", {"restore_from": source})
        assert op_id is not None
        finish(engine, op_id)
        assert set(stamped_rows(app_credentials(env, again, f"app-{again}"))) == set(
            range(1, 16))
        assert object_keys(elsewhere, f"pgha/{names.stanza(again)}/")
        assert not object_keys(elsewhere, f"pgha/{names.stanza(source)}/")
