"""`python -m broker cloud check | orphans [--delete] [--yes]`.

- check: does the cloud fit the catalog (credentials, flavors, images, zones,
  volume types, networks, security groups)? One line per problem; exit 1 if any
  problem is not a warning. Also, per plan, how many more instances the project's
  quotas allow.
- orphans: resources tagged as the broker's whose instance is not live in the state
  store (a crash, a failed cleanup, a restored database). `--delete` removes them,
  servers first, after a confirmation (or `--yes`).
"""

from __future__ import annotations

import sys

from sqlalchemy import select

from broker.cloud import make_cloud
from broker.cloud.base import TAG_INSTANCE, Cloud, CloudError, CloudResource, ResourceKind
from broker.config import ConfigError
from broker.runtime import Runtime
from broker.store.models import Instance

WARNING = "warning:"
# Servers go first: they hold the ports and volumes.
_ORDER: dict[ResourceKind, int] = {"server": 0, "port": 1, "volume": 2, "server_group": 3,
                                   "security_group": 4}


def check(runtime: Runtime) -> int:
    problems: list[str] = []
    room: list[str] = []
    try:
        # Its own driver, connected but not refusing to start over the catalog's problems.
        cloud = make_cloud(runtime.settings, runtime.catalog, validate=False)
    except (ConfigError, CloudError) as exc:
        problems = [str(exc)]
    else:
        try:
            problems = cloud.check()
            room = capacity(cloud)
        except CloudError as exc:
            problems = [str(exc)]
        finally:
            cloud.close()
    name = runtime.settings.cloud
    for line in room:
        print(line)
    if not problems:
        print(f"cloud {name}: every plan fits the cloud")
        return 0
    for problem in problems:
        print(problem)
    failing = [p for p in problems if not p.startswith(WARNING)]
    print(f"cloud {name}: {len(failing)} problem(s), "
          f"{len(problems) - len(failing)} warning(s)")
    return 1 if failing else 0


def capacity(cloud: Cloud) -> list[str]:
    """How many instances of each plan the quotas allow; a warning if unreadable."""
    try:
        return cloud.capacity()
    except CloudError as exc:
        return [f"{WARNING} cannot read the project's quotas: {exc}"]


def live_instance_ids(runtime: Runtime) -> set[str]:
    with runtime.store.session() as s:
        return set(s.scalars(select(Instance.id).where(Instance.deleted_at.is_(None))))


def find_orphans(runtime: Runtime, cloud: Cloud) -> list[CloudResource]:
    # Listed from the cloud first: an instance made meanwhile is then in the store.
    found = cloud.find_resources()
    live = live_instance_ids(runtime)
    orphans = [r for r in found if r.tags.get(TAG_INSTANCE, "") not in live]
    return sorted(orphans, key=lambda r: (_ORDER[r.kind], r.tags.get(TAG_INSTANCE, ""), r.name))


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
    rows = [(o.kind, o.id, o.name, o.tags.get(TAG_INSTANCE) or "?") for o in found]
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
            cloud.delete_resource(o)
            print(f"deleted {o.kind} {o.name or o.id}")
        except CloudError as exc:
            failed += 1
            print(f"could not delete {o.kind} {o.name or o.id}: {exc}", file=sys.stderr)
    if failed:
        print(f"{failed} resource(s) not deleted; run the command again", file=sys.stderr)
        return 1
    return 0
