"""`broker backups list [ID]` and `broker backups delete ID`.

`list` shows, for every instance with a backup repository (deleted ones included,
until their repository is purged) or for one: its backups, the restorable window,
how long a deleted instance's backups are kept, and the archiving lag of a live one.
`delete` purges a deleted instance's repository before its time, after a
confirmation (or `--yes`); a live instance's backups are never deleted this way.
"""

from __future__ import annotations

import json
import sys

from sqlalchemy import select

from broker.backup import report, schedule
from broker.runtime import Runtime
from broker.store.models import BackupRepository, Instance


def _instances(runtime: Runtime, instance_id: str | None) -> list[Instance]:
    with runtime.store.session() as s:
        query = select(Instance).join(BackupRepository,
                                      BackupRepository.instance_id == Instance.id)
        if instance_id is not None:
            query = query.where(Instance.id == instance_id)
        found = list(s.scalars(query.where(BackupRepository.purged_at.is_(None))
                               .order_by(Instance.created_at)))
        for inst in found:
            _ = list(inst.nodes)
        return found


def list_backups(runtime: Runtime, instance_id: str | None, as_json: bool) -> int:
    found = _instances(runtime, instance_id)
    if not found:
        print(f"no backups of instance {instance_id}" if instance_id else "no backups")
        return 1 if instance_id else 0
    out = []
    for inst in found:
        entry = report.backups(runtime, inst)
        if not entry["deleted"]:
            entry["archiving"] = report.archiving(runtime, inst)
        out.append(entry)
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    for entry in out:
        state = f"deleted, kept until {entry['keep_until']}" if entry["deleted"] else "live"
        print(f"instance {entry['instance']} ({state})")
        print(f"  restorable  {entry['window'] or 'nothing yet (no backup)'}")
        if "archiving" in entry:
            archiving = entry["archiving"]
            print("  archiving   " + (archiving["summary"] if archiving["reachable"]
                                      else f"unreachable ({archiving['error']})"))
        for b in entry["backups"]:
            print(f"  {b['label']:<34} {b['type']:<5} {b['started_at']} → {b['stopped_at']}")
    return 0


def delete_backups(runtime: Runtime, instance_id: str, assume_yes: bool) -> int:
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        row = s.get(BackupRepository, instance_id)
        if inst is None or row is None or row.purged_at is not None:
            print(f"broker: no backups of instance {instance_id}", file=sys.stderr)
            return 1
        if inst.deleted_at is None:
            print(f"broker: instance {instance_id} is live: its backups are its restore "
                  "window and are not deleted by hand", file=sys.stderr)
            return 1
        stanza = row.stanza
    if not assume_yes:
        try:
            answer = input(f"Delete every backup of deleted instance {instance_id}? It can "
                           "then never be restored. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    if not schedule.purge(runtime, instance_id, stanza):
        print(f"broker: the backups of instance {instance_id} were not deleted (see the log)",
              file=sys.stderr)
        return 1
    print(f"backups of instance {instance_id} deleted")
    return 0
