"""The object storage path (OpenStack: Swift's S3 API or Ceph RGW) against an
S3-compatible server on this machine (moto, over TLS verified with its own CA): WAL and
backups go to the bucket, none to the host's directory, and a restore from it gives
exactly the rows committed by its time."""

from __future__ import annotations

import dataclasses

from broker.backup import names
from harness.backups import primary_archiver, repository, switch_and_wait_archived
from harness.env import failover_env
from harness.s3 import moto_s3, object_keys
from harness.workflows import finish, make_engine, provision
from harness.writer import app_credentials
from tests.test_backup_operations import request_backup
from tests.test_backup_restore import restore, stamped_rows, write_rows


def test_archiving_backups_and_restore_through_s3() -> None:
    with failover_env() as env:
        env.cloud.ensure_network()
        with moto_s3(env.cloud.broker_address) as s3:
            runtime = dataclasses.replace(env.runtime, settings=dataclasses.replace(
                env.runtime.settings, backup_s3=s3))
            engine = make_engine(runtime)
            source = provision(runtime, engine, "standalone")
            creds = app_credentials(env, source)
            write_rows(creds, range(1, 6))
            wal = switch_and_wait_archived(runtime, source)
            prefix = f"pgha/{names.stanza(source)}/"
            keys = object_keys(s3, prefix)
            assert any(f"/archive/{names.stanza(source)}/15-1/" in k and wal in k for k in keys)
            assert not repository(env.cloud, source).exists()  # nothing on the host
            finish(engine, request_backup(runtime, source))
            assert any("/backup/" in k and k.endswith("backup.manifest")
                       for k in object_keys(s3, prefix))
            write_rows(creds, range(6, 30))
            rows = stamped_rows(creds)
            target = rows[20]
            copy, op_id = restore(runtime, "standalone", {"restore_from": source,
                                                         "point_in_time": target.isoformat()})
            assert op_id is not None
            finish(engine, op_id)
            got = set(stamped_rows(app_credentials(env, copy, f"app-{copy}")))
            assert got == {i for i, at in rows.items() if at < target}
            # The copy archives into a repository of its own, in the bucket too, from
            # its first push on (its stanza exists before its server starts).
            assert primary_archiver(runtime, copy).failed_count == 0
            switch_and_wait_archived(runtime, copy)
            assert object_keys(s3, f"pgha/{names.stanza(copy)}/archive/")
