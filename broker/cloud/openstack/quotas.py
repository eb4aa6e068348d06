"""How many more instances of each plan the project's quotas allow.

Read with the broker's own (member) credentials: Nova's, Neutron's and Cinder's
default policies let a project reader see its own quotas and usage. What one
instance costs is documented in docs/openstack.md ("Quotas").
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from broker.catalog import Plan

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud

# Default egress rules Neutron puts in every new group, plus "nodes reach each other"
# (PostgreSQL and pgBackRest's TLS server) and "the broker reaches PostgreSQL".
_NODES_GROUP_RULES = 5


def plan_cost(plan: Plan, vcpus: int, ram_mb: int) -> dict[str, int]:
    """What one instance of the plan holds: nodes, their ports and volumes, the
    service port, one server group and the nodes' security group (the service port's
    group is one per plan, shared by its instances)."""
    nodes = plan.cloud.nodes
    return {"instances": nodes, "cores": nodes * vcpus, "ram": nodes * ram_mb,
            "server_groups": 1, "security_groups": 1,
            "security_group_rules": _NODES_GROUP_RULES, "ports": nodes + 1,
            "volumes": nodes, "gigabytes": nodes * plan.cloud.volume_size_gb}


def replacement_cost(plan: Plan, vcpus: int, ram_mb: int) -> dict[str, int]:
    """A rebuild or a resurrect holds one more server, port and volume for a while."""
    return {"instances": 1, "cores": vcpus, "ram": ram_mb, "ports": 1, "volumes": 1,
            "gigabytes": plan.cloud.volume_size_gb}


def read_quotas(cloud: OpenStackCloud) -> dict[str, tuple[int, int]]:
    """resource -> (limit, in use); a limit of -1 means unlimited."""
    conn = cloud.conn
    project = conn.current_project_id

    def get(adapter: Any, path: str) -> Any:
        return cloud.call(f"reading quotas ({path})",
                          lambda: adapter.get(path, raise_exc=True).json())

    out: dict[str, tuple[int, int]] = {}
    nova = get(conn.compute, f"/os-quota-sets/{project}/detail")["quota_set"]
    for key in ("instances", "cores", "ram", "server_groups", "server_group_members"):
        if isinstance(nova.get(key), dict):
            out[key] = (int(nova[key]["limit"]), int(nova[key]["in_use"]))
    neutron = get(conn.network, f"/quotas/{project}/details")["quota"]
    for key, name in (("port", "ports"), ("security_group", "security_groups"),
                      ("security_group_rule", "security_group_rules")):
        if isinstance(neutron.get(key), dict):
            out[name] = (int(neutron[key]["limit"]), int(neutron[key]["used"]))
    cinder = get(conn.block_storage, f"/os-quota-sets/{project}?usage=true")["quota_set"]
    for key in ("volumes", "gigabytes"):
        if isinstance(cinder.get(key), dict):
            out[key] = (int(cinder[key]["limit"]), int(cinder[key]["in_use"]))
    return out


def instances_that_fit(quotas: dict[str, tuple[int, int]], cost: dict[str, int],
                       reserve: dict[str, int]) -> tuple[int | None, str | None]:
    """How many instances fit beside a reserve for one replacement; None: unlimited.
    Also the resource that limits it."""
    best: int | None = None
    limited_by = None
    for resource, each in cost.items():
        limit, used = quotas.get(resource, (-1, 0))
        if limit < 0 or each <= 0:
            continue
        fit = max(0, (limit - used - reserve.get(resource, 0)) // each)
        if best is None or fit < best:
            best, limited_by = fit, resource
    return best, limited_by


def capacity(cloud: OpenStackCloud) -> list[str]:
    """One line per plan: how many more instances the quotas allow."""
    quotas = read_quotas(cloud)
    lines = []
    group_members = quotas.get("server_group_members", (-1, 0))[0]
    for service in cloud.catalog.services:
        for plan in service.plans:
            flavor = cloud.call(f"looking up flavor {plan.cloud.flavor}",
                                partial(cloud.conn.compute.find_flavor, plan.cloud.flavor,
                                        ignore_missing=False))
            cost = plan_cost(plan, int(flavor.vcpus), int(flavor.ram))
            fit, limit = instances_that_fit(
                quotas, cost, replacement_cost(plan, int(flavor.vcpus), int(flavor.ram)))
            each = ", ".join(f"{n} {r}" for r, n in cost.items())
            if fit is None:
                lines.append(f"plan {plan.name}: no quota limits it (each instance: {each})")
            else:
                lines.append(f"plan {plan.name}: {fit} more instance(s) fit, limited by "
                             f"{limit} {quotas[limit or ''][1]}/{quotas[limit or ''][0]} "
                             f"(each instance: {each}; one replacement node kept free)")
            if 0 <= group_members < plan.cloud.nodes + 1:
                lines.append(f"plan {plan.name}: server_group_members quota "
                             f"{group_members} leaves no room for a replacement node")
    return lines
