"""`python -m broker cloud check | orphans [--delete] [--yes]`.

- check: does the cloud fit the catalog (credentials, flavors, images, zones,
  volume types, networks, security groups)? One line per problem; exit 1 if any
  problem is not a warning.
- orphans: resources tagged as the broker's whose instance is not live in the state
  store (a crash, a failed cleanup, a restored database). `--delete` removes them,
  servers first, after a confirmation (or `--yes`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from broker.cloud.base import TAG_INSTANCE, Cloud, CloudError
from broker.config import ConfigError
from broker.runtime import Runtime
from broker.store.models import Instance

WARNING = "warning:"
# Servers go first: they hold the ports and volumes.
_ORDER = {"server": 0, "port": 1, "volume": 2, "server_group": 3, "security_group": 4}


@dataclass(frozen=True)
class Orphan:
    kind: str
    id: str
    name: str
    instance_id: str


def _checking_cloud(runtime: Runtime) -> tuple[Cloud | None, list[str]]:
    """The driver, connected but not refusing to start over the catalog's problems."""
    try:
        if runtime.settings.cloud == "openstack":
            from broker.cloud.openstack import OpenStackCloud

            return OpenStackCloud.from_settings(runtime.settings, runtime.catalog,
                                                validate=False), []
        return runtime.cloud, []
    except (ConfigError, CloudError) as exc:
        return None, [str(exc)]


def check(runtime: Runtime) -> int:
    cloud, problems = _checking_cloud(runtime)
    if cloud is not None:
        try:
            problems = cloud.check()
        except CloudError as exc:
            problems = [str(exc)]
        finally:
            if cloud is not runtime._cloud:
                cloud.close()
    name = runtime.settings.cloud
    if not problems:
        print(f"cloud {name}: every plan fits the cloud")
        return 0
    for problem in problems:
        print(problem)
    failing = [p for p in problems if not p.startswith(WARNING)]
    print(f"cloud {name}: {len(failing)} problem(s), "
          f"{len(problems) - len(failing)} warning(s)")
    return 1 if failing else 0


def live_instance_ids(runtime: Runtime) -> set[str]:
    with runtime.store.session() as s:
        return set(s.scalars(select(Instance.id).where(Instance.deleted_at.is_(None))))


def find_orphans(runtime: Runtime, cloud: Cloud) -> list[Orphan]:
    # Listed from the cloud first: an instance made meanwhile is then in the store.
    found: list[Orphan] = [
        Orphan(r.kind, r.id, r.name, r.tags.get(TAG_INSTANCE, "")) for r in cloud.find_resources()
    ]
    finder: Any = getattr(cloud, "find_security_groups", None)
    if finder is not None:
        found += [Orphan("security_group", g.id, g.name, g.tags.get(TAG_INSTANCE, ""))
                  for g in finder()]
    live = live_instance_ids(runtime)
    orphans = [o for o in found if o.instance_id not in live]
    return sorted(orphans, key=lambda o: (_ORDER.get(o.kind, 9), o.instance_id, o.name))


def _deleter(cloud: Cloud, kind: str) -> Callable[[str], None]:
    if kind == "server":
        return cloud.delete_server
    if kind == "port":
        return cloud.delete_port
    if kind == "volume":
        return cloud.delete_volume
    if kind == "server_group":
        return cloud.delete_server_group
    delete: Any = getattr(cloud, "delete_security_group", None)
    if kind == "security_group" and delete is not None:
        return lambda item_id: delete(item_id, if_unused=True)
    raise CloudError(f"cannot delete a {kind}")


def orphans(runtime: Runtime, delete: bool, assume_yes: bool) -> int:
    try:
        cloud = runtime.cloud
        found = find_orphans(runtime, cloud)
    except (ConfigError, CloudError) as exc:
        print(f"cannot list the cloud's resources: {exc}", file=sys.stderr)
        return 1
    if not found:
        print("no orphans: every resource tagged as the broker's belongs to a live instance")
        return 0
    header = ("KIND", "ID", "NAME", "INSTANCE")
    rows = [(o.kind, o.id, o.name, o.instance_id or "?") for o in found]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(col.ljust(widths[i]) for i, col in enumerate(row)).rstrip())
    if not delete:
        print(f"{len(found)} orphan(s); delete them with `python -m broker cloud orphans "
              "--delete`")
        return 0
    if not assume_yes:
        try:
            answer = input(f"Delete these {len(found)} resource(s)? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    failed = 0
    for o in found:
        try:
            _deleter(cloud, o.kind)(o.id)
            print(f"deleted {o.kind} {o.name or o.id}")
        except CloudError as exc:
            failed += 1
            print(f"could not delete {o.kind} {o.name or o.id}: {exc}", file=sys.stderr)
    if failed:
        print(f"{failed} resource(s) not deleted; run the command again", file=sys.stderr)
        return 1
    return 0
