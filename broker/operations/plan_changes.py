"""Which plan changes an instance supports, and why the others are not allowed."""

from __future__ import annotations

from broker.catalog import Plan

SUPPORTED = ("ha to ha-sync and back (replication mode), standalone to ha or ha-sync (adds a "
             "standby), ha or ha-sync to standalone (removes the standby)")


def plan_change_refusal(current: Plan, target: Plan) -> str | None:
    """None when the broker can move an instance from `current` to `target`, else why not."""
    if current.id == target.id:
        return None
    if target.raw.get("plan_updateable") is False or current.raw.get("plan_updateable") is False:
        return f"plan {current.name} cannot be changed to {target.name}: plan not updateable"
    a, b = current.cloud, target.cloud
    if a.nodes != b.nodes:
        return None  # add or remove the standby
    if a.nodes == 2 and a.replication != b.replication:
        return None  # switch the replication mode in place
    return (f"changing plan {current.name} to {target.name} is not supported: the only "
            f"changes are {SUPPORTED}")
