"""Where a standby goes when an availability zone is down, and how it comes back.

A standby's home is the plan's zone that is not the primary's. A rebuild builds it
there when the cloud says that zone can take a server (`Cloud.zone_available`);
while it cannot, the rebuild uses the plan's first live fallback zone
(`cloud.fallback_zones` in the catalog) if it has one, and otherwise waits: it tries
again every ZONE_RETRY seconds, and its description and the instance's state reason
say what it waits for. A standby in a fallback zone returns home once its zone is up
again: the engines look for such instances (at most every HOMING_INTERVAL seconds)
and queue a rebuild into the home zone for each idle one.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import sqlalchemy.exc
from sqlalchemy import select

from broker.catalog import Catalog
from broker.cloud.base import Cloud
from broker.operations import queue, rows
from broker.operations.engine import Context, Engine, RetryLater, on_idle
from broker.operations.params import RebuildParams
from broker.operations.promotion import REBUILD, derived_id, set_state
from broker.store.db import Store
from broker.store.models import DEGRADED, READY, Instance, Operation

log = logging.getLogger(__name__)

ZONE_RETRY = 5.0
HOMING_INTERVAL = 5.0
RETURN_HOME = "return-home"


def home_zone(ctx: Context) -> str:
    """The zone the instance's standby belongs in: the plan's other zone."""
    return rows.other_zone(ctx.plan(), rows.primary_node(ctx).availability_zone)


def standby_zone(ctx: Context) -> str:
    """The home zone if it can take a server now, else a live fallback zone; else the
    rebuild waits (RetryLater) with a description that says for what."""
    home = home_zone(ctx)
    if ctx.cloud.zone_available(home):
        return home
    plan = ctx.plan()
    primary_zone = rows.primary_node(ctx).availability_zone
    for zone in plan.cloud.fallback_zones:
        if zone != primary_zone and ctx.cloud.zone_available(zone):
            log.warning("instance %s: zone %s is down, rebuilding the standby in the "
                        "fallback zone %s", ctx.instance_id, home, zone)
            return zone
    wait_for_zone(ctx, home, "no fallback zone is up" if plan.cloud.fallback_zones
                  else "the plan has no fallback zone")


def wait_for_zone(ctx: Context, zone: str, why: str) -> NoReturn:
    reason = (f"waiting for availability zone {zone} to come back (no host there is up; "
              f"{why}); trying again every {ZONE_RETRY:.0f} s")
    ctx.progress(reason)
    set_state(ctx, DEGRADED, f"no standby: {reason}")
    raise RetryLater(reason, delay=ZONE_RETRY)


def queue_returns_home(store: Store, cloud: Cloud, catalog: Catalog) -> list[str]:
    """Queue a rebuild into its home zone for every idle, ready instance whose standby
    is in a fallback zone while its home zone is up; returns the operation ids. The id
    derives from the standby's node id, so two engines queue it once."""
    queued: list[str] = []
    with_fallback = [plan.id for service in catalog.services for plan in service.plans
                     if plan.cloud.fallback_zones]
    if not with_fallback:
        return queued  # no plan has fallback zones: no standby is ever away from home
    with store.session() as s:
        candidates = list(s.scalars(select(Instance).where(Instance.state == READY)
                                    .where(Instance.plan_id.in_(with_fallback))))
        for inst in candidates:
            plan = catalog.plan(inst.plan_id)
            primary = inst.primary()
            standby = inst.standby()
            if plan is None or not plan.cloud.fallback_zones or primary is None \
                    or standby is None \
                    or standby.availability_zone in plan.cloud.availability_zones:
                continue
            home = rows.other_zone(plan, primary.availability_zone)
            if queue.busy_with(s, inst.id) is not None or not cloud.zone_available(home):
                continue
            op_id = derived_id(standby.id, RETURN_HOME)
            if s.get(Operation, op_id) is not None:
                continue
            params = RebuildParams(replace_node_id=standby.id, failover_id=None,
                                   cause=f"returning the standby to its zone {home}")
            s.add(queue.new_operation(inst.id, REBUILD, params=params, op_id=op_id,
                                      description=f"queued: returning the standby to {home}"))
            queued.append(op_id)
    if queued:
        log.info("queued the return of %d standby(s) to their zone", len(queued))
    return queued


@on_idle(HOMING_INTERVAL)
def try_queue_returns_home(engine: Engine) -> None:
    """queue_returns_home, where losing a race to another engine is no failure."""
    try:
        queued = queue_returns_home(engine.store, engine.cloud, engine.catalog)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        log.debug("return home not queued this time: %s", exc.__class__.__name__)
        return
    if queued:
        engine.wake()
