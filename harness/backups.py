"""What tests and benchmarks do with an instance's backup repository in the local
cloud: run pgBackRest as a node's own OS user with the node's configuration, list the
WAL the repository holds, wait until a WAL file is archived."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

from broker.backup import names
from broker.backup.archiver import ArchiverStatus, archiver_status
from broker.cloud.local import LocalCloud
from broker.guest.bootstrap import BACKUP_CONF, BACKUP_DIR, BACKUP_PASSFILE, PGBACKREST
from broker.runtime import Runtime
from broker.store.models import Node
from harness.waiting import eventually
from harness.workflows import connect_as_admin, instance


def node_user(cloud: LocalCloud, node: Node) -> pwd.struct_passwd:
    assert node.volume_id
    return pwd.getpwnam(cloud.volume_user(node.volume_id))


def node_volume(cloud: LocalCloud, node: Node) -> Path:
    assert node.server_id
    server = cloud.get_server(node.server_id)
    assert server is not None
    return Path(server.details["data_dir"]).parent


def pgbackrest(cloud: LocalCloud, node: Node, instance_id: str, *args: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """pgBackRest run as the node's PostgreSQL user with the node's own configuration,
    on the stanza of `instance_id`."""
    user = node_user(cloud, node)
    base = node_volume(cloud, node) / BACKUP_DIR
    return subprocess.run([PGBACKREST, f"--config={base / BACKUP_CONF}",
                           f"--stanza={names.stanza(instance_id)}", *args],
                          user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C",
                               "PGPASSFILE": str(base / BACKUP_PASSFILE)})


def repository(cloud: LocalCloud, instance_id: str) -> Path:
    return cloud.repositories.path(names.stanza(instance_id))


def archived_files(cloud: LocalCloud, instance_id: str) -> list[str]:
    """The WAL (and history) file names the repository holds, without pgBackRest's
    checksum and compression suffixes, sorted."""
    archive = repository(cloud, instance_id) / "archive" / names.stanza(instance_id)
    found = set()
    for path in archive.glob("*-*/**/*"):
        if path.is_file():
            found.add(path.name.split("-", 1)[0].split(".gz")[0].split(".lz4")[0])
    return sorted(found)


def switch_and_wait_archived(runtime: Runtime, instance_id: str, timeout: float = 60) -> str:
    """Close the primary's current WAL file and wait until the archiver pushed it: its name."""
    primary = instance(runtime, instance_id).primary()
    assert primary is not None and primary.management_address
    inst = instance(runtime, instance_id)
    conn = connect_as_admin(runtime, inst, primary.management_address, dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:  # some WAL first: a switch with none does nothing
            cur.execute("SELECT pg_catalog.pg_logical_emit_message(false, 'pgha', 'x')")
            cur.execute("SELECT pg_catalog.pg_walfile_name(pg_catalog.pg_switch_wal())")
            wal = str(cur.fetchone()[0])
        eventually(lambda: (archiver_status(conn).last_archived_wal or "") >= wal,
                   f"{wal} archived", timeout)
    finally:
        conn.close()
    return wal


def primary_archiver(runtime: Runtime, instance_id: str) -> ArchiverStatus:
    """What the instance's primary reports in pg_stat_archiver."""
    inst = instance(runtime, instance_id)
    primary = inst.primary()
    assert primary is not None and primary.management_address
    conn = connect_as_admin(runtime, inst, primary.management_address, dbname="postgres")
    try:
        return archiver_status(conn)
    finally:
        conn.close()
