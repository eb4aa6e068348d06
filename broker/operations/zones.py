"""Where a standby goes when an availability zone is down, and how it comes back.

A standby's home is the plan's zone that is not the primary's. A rebuild builds it
there when the cloud says that zone can take a server (`Cloud.zone_available`);
while it cannot, the rebuild uses the plan's first live fallback zone
(`cloud.fallback_zones` in the catalog) if it has one, and otherwise waits: it tries
again every ZONE_RETRY seconds, and its description and the instance's state reason
say what it waits for. When the chosen zone dies before the new server boots, the
rebuild moves the new standby to a live fallback zone (`refuge`, `move_new_standby`)
or waits the same way. A standby in a fallback zone returns home once its zone is up
again: the engines look for such instances (at most every HOMING_INTERVAL seconds)
and queue a rebuild into the home zone for each idle one.

A primary in a fallback zone (a failover promoted a standby that was there) returns
too, when the plan says so (`cloud.primary_returns_home`, on by default): once the
instance is idle and ready, its standby sits in one of the plan's zones, that zone is
up and the standby has every commit (ha-sync: it is the synchronous standby; ha: the
monitor last saw it within CAUGHT_UP_BYTES), the engines queue the switchover
workflow as HOME_KIND. Apps see what a switchover does: writes pause for about a
second and sessions reconnect to the same address. It is tried once per primary node
(the operation id derives from it): a refused or failed one is not repeated, an
operator can run `instances switchover`. The old primary is then replaced by a
standby built like any other (in the plan's zone, or a fallback one while that is down).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import sqlalchemy.exc
from sqlalchemy import select

from broker.catalog import Catalog, Plan
from broker.cloud.base import Cloud
from broker.operations import queue, rows
from broker.operations.engine import Context, Engine, RetryLater, on_idle
from broker.operations.params import RebuildParams
from broker.operations.promotion import REBUILD, derived_id, set_state
from broker.operations.switchover import HOME_KIND
from broker.store.db import Store
from broker.store.models import DEGRADED, READY, Instance, Operation

log = logging.getLogger(__name__)

ZONE_RETRY = 5.0
HOMING_INTERVAL = 5.0
RETURN_HOME = "return-home"
PRIMARY_HOME = "primary-home"
CAUGHT_UP_BYTES = 1024 * 1024  # ha: lag the monitor may last have seen (the switchover
                               # itself waits for the rest, writes stopped)


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


def refuge(ctx: Context, zone: str) -> str | None:
    """When the zone a rebuild chose died before its server booted: a live fallback
    zone for it, or None (no such zone, or `zone` is up again: try it once more)."""
    if ctx.cloud.zone_available(zone):
        return None
    primary_zone = rows.primary_node(ctx).availability_zone
    return next((z for z in ctx.plan().cloud.fallback_zones
                 if z not in (zone, primary_zone) and ctx.cloud.zone_available(z)), None)


def move_new_standby(ctx: Context, node_id: str, zone: str) -> None:
    """Give up the new standby's volume in its dead zone (it has no server yet) and
    make the node one of `zone`; the caller makes its volume and server there. A rerun
    after a crash in between ends the same way (the volume is made again, and given
    up again, in the dead zone)."""
    node = rows.get_node(ctx, node_id)
    log.warning("instance %s: zone %s died before the new standby booted there: moving "
                "it to the fallback zone %s", ctx.instance_id, node.availability_zone, zone)
    ctx.progress(f"zone {node.availability_zone} is down: building the standby in the "
                 f"fallback zone {zone}")
    if node.volume_id:
        ctx.cloud.delete_volume(node.volume_id)
    rows.update_node(ctx, node_id, availability_zone=zone, volume_id=None)


def wait_for_zone(ctx: Context, zone: str, why: str) -> NoReturn:
    reason = (f"waiting for availability zone {zone} to come back (no host there is up; "
              f"{why}); trying again every {ZONE_RETRY:.0f} s")
    # The instance first: whoever reads the operation's words finds the instance's too.
    set_state(ctx, DEGRADED, f"no standby: {reason}")
    ctx.progress(reason)
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


def primary_ready_to_return(inst: Instance, plan: Plan, cloud: Cloud) -> str | None:
    """The zone a switchover would bring the primary back to, or None: not away from
    the plan's zones, no standby there in sync, or its zone down."""
    primary, standby = inst.primary(), inst.standby()
    if not plan.cloud.primary_returns_home or primary is None or standby is None:
        return None
    zones = plan.cloud.availability_zones
    if primary.availability_zone in zones or standby.availability_zone not in zones:
        return None
    if inst.replication == "sync":
        caught_up = inst.sync_standby_node_id == standby.id
    else:
        caught_up = inst.last_lag_bytes is not None and inst.last_lag_bytes <= CAUGHT_UP_BYTES
    if not caught_up or not cloud.zone_available(standby.availability_zone):
        return None
    return standby.availability_zone


def queue_primaries_home(store: Store, cloud: Cloud, catalog: Catalog) -> list[str]:
    """Queue a switchover (HOME_KIND) for every idle, ready instance whose primary is in
    a fallback zone while a caught-up standby sits in one of the plan's zones; returns
    the operation ids. The id derives from the primary's node id: queued once."""
    queued: list[str] = []
    plans = [plan for service in catalog.services for plan in service.plans
             if plan.cloud.fallback_zones and plan.cloud.primary_returns_home]
    if not plans:
        return queued
    with store.session() as s:
        candidates = list(s.scalars(select(Instance).where(Instance.state == READY)
                                    .where(Instance.plan_id.in_([p.id for p in plans]))))
        for inst in candidates:
            plan = catalog.plan(inst.plan_id)
            primary = inst.primary()
            if plan is None or primary is None or queue.busy_with(s, inst.id) is not None:
                continue
            op_id = derived_id(primary.id, PRIMARY_HOME)
            if s.get(Operation, op_id) is not None:
                continue  # tried once for this primary already
            home = primary_ready_to_return(inst, plan, cloud)
            if home is None:
                continue
            log.info("instance %s: the primary is in the fallback zone %s and its standby "
                     "in %s is caught up: queueing a switchover to bring the primary back "
                     "(apps reconnect once)", inst.id, primary.availability_zone, home)
            s.add(queue.new_operation(
                inst.id, HOME_KIND, op_id=op_id,
                description=f"queued: switchover to bring the primary back from the fallback "
                            f"zone {primary.availability_zone} to {home}"))
            queued.append(op_id)
    return queued


@on_idle(HOMING_INTERVAL)
def try_queue_returns_home(engine: Engine) -> None:
    """queue_returns_home and queue_primaries_home, where losing a race to another
    engine is no failure."""
    queued: list[str] = []
    for find in (queue_returns_home, queue_primaries_home):
        try:
            queued += find(engine.store, engine.cloud, engine.catalog)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            log.debug("return home not queued this time: %s", exc.__class__.__name__)
    if queued:
        engine.wake()
