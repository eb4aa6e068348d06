"""Plans resolved to Neutron networks, and the per-instance security groups (rules kept exact)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import partial
from typing import Any

from openstack import exceptions as os_exc

from broker.catalog import NetworkSettings
from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    TAG_PLAN,
    CloudError,
)
from broker.cloud.openstack.resources import (
    NAME_PREFIX,
    belongs,
    from_neutron_tags,
    name_instance,
    to_neutron_tags,
)
from broker.cloud.openstack.session import Session
from broker.guest import bootstrap

PG_PORT = 5432
BACKUP_SERVER_PORT = bootstrap.BACKUP_SERVER_PORT  # pgBackRest's TLS server on every node


@dataclass(frozen=True)
class PlanNetwork:
    """A plan's network settings, resolved to ids."""

    management_network_id: str
    service_network_id: str
    service_subnet_id: str
    service_subnet_cidr: str
    service_gateway: str | None
    security_group_ids: tuple[str, ...]
    app_cidrs: tuple[str, ...]


@dataclass(frozen=True)
class SecurityGroupRecord:
    id: str
    name: str
    tags: dict[str, str]


def _rule_key(rule: dict[str, Any]) -> tuple[Any, ...]:
    return (rule.get("direction"), rule.get("ether_type"), rule.get("protocol"),
            rule.get("port_range_min"), rule.get("port_range_max"),
            rule.get("remote_ip_prefix"), rule.get("remote_group_id"))


def _existing_rule_key(rule: Any) -> tuple[Any, ...]:
    return _rule_key({"direction": rule.direction, "ether_type": rule.ether_type,
                      "protocol": rule.protocol, "port_range_min": rule.port_range_min,
                      "port_range_max": rule.port_range_max,
                      "remote_ip_prefix": rule.remote_ip_prefix,
                      "remote_group_id": rule.remote_group_id})


class Networks(Session):
    """Networks and security groups of the OpenStackCloud."""

    # --- plans -> networks ---------------------------------------------------------------
    def network_settings(self, tags: dict[str, str]) -> NetworkSettings:
        plan_id = tags.get(TAG_PLAN)
        if plan_id:
            plan = self.catalog.plan(plan_id)
            if plan is None:
                raise CloudError(f"plan {plan_id} is not in the catalog")
            return plan.cloud.network
        distinct = {p.cloud.network for s in self.catalog.services for p in s.plans}
        if len(distinct) == 1:
            return next(iter(distinct))
        raise CloudError("the catalog's plans use different networks: the port's tags must "
                         f"name its plan ({TAG_PLAN})")

    def plan_network(self, settings: NetworkSettings) -> PlanNetwork:
        with self.lock:
            cached = self.network_cache.get(settings)
        if cached is not None:
            return cached
        net = self.conn.network
        if not settings.management_network:
            raise CloudError("the plan has no network.management_network")
        management = self.call(
            f"looking up network {settings.management_network}",
            lambda: net.find_network(settings.management_network, ignore_missing=False))
        if settings.service_subnet:
            subnet = self.call(f"looking up subnet {settings.service_subnet}",
                               lambda: net.find_subnet(settings.service_subnet,
                                                       ignore_missing=False))
        else:
            service_net = self.call(
                f"looking up network {settings.service_network}",
                lambda: net.find_network(settings.service_network or
                                         settings.management_network, ignore_missing=False))
            subnets = list(self.call("listing subnets",
                                     lambda: list(net.subnets(network_id=service_net.id))))
            if not subnets:
                raise CloudError(f"network {service_net.name} has no subnet for service ports")
            subnet = subnets[0]
        groups = tuple(
            self.call(f"looking up security group {g}",
                      partial(net.find_security_group, g, ignore_missing=False)).id
            for g in settings.security_groups)
        resolved = PlanNetwork(
            management_network_id=management.id, service_network_id=subnet.network_id,
            service_subnet_id=subnet.id, service_subnet_cidr=subnet.cidr,
            service_gateway=subnet.gateway_ip or None, security_group_ids=groups,
            app_cidrs=settings.app_cidrs)
        with self.lock:
            self.network_cache[settings] = resolved
        return resolved

    # --- security groups ---------------------------------------------------------------------
    def _group_rules(self, purpose: str, group_id: str, app_cidrs: tuple[str, ...]
                     ) -> list[dict[str, Any]]:
        def tcp(port: int = PG_PORT, **extra: Any) -> dict[str, Any]:
            return {"direction": "ingress", "protocol": "tcp", "port_range_min": port,
                    "port_range_max": port, "remote_ip_prefix": None,
                    "remote_group_id": None, "ether_type": "IPv4", **extra}

        def cidr(value: str) -> dict[str, Any]:
            network = ipaddress.ip_network(value, strict=False)  # as Neutron stores it
            return tcp(remote_ip_prefix=str(network),
                       ether_type="IPv6" if network.version == 6 else "IPv4")

        rules = []
        if purpose == "management":
            # Replication, base backups and backups from the standby (pgBackRest's TLS
            # server): only between the instance's own nodes.
            rules.append(tcp(remote_group_id=group_id))
            rules.append(tcp(BACKUP_SERVER_PORT, remote_group_id=group_id))
        else:
            rules += [cidr(c) for c in app_cidrs]
        if self.admin_cidr:
            rules.append(cidr(self.admin_cidr))  # the broker itself
        return rules

    def find_security_group(self, name: str) -> Any:
        found = [g for g in self.conn.network.security_groups(name=name) if g.name == name]
        return sorted(found, key=lambda g: g.id)[0] if found else None

    @staticmethod
    def security_group_name(instance_id: str, purpose: str, tags: dict[str, str]) -> str:
        """The service port's rules (app CIDRs, the broker) depend on the plan only: one
        group per plan keeps the quota cost at one group per instance (Neutron's default
        quota is 10 groups). The nodes' group names itself in its rule: per instance."""
        plan_id = tags.get(TAG_PLAN)
        if purpose == "service" and plan_id:
            return f"{NAME_PREFIX}plan-{plan_id}-apps"
        return f"{NAME_PREFIX}{instance_id}-{'service' if purpose == 'service' else 'nodes'}"

    def ensure_security_group(self, instance_id: str, purpose: str,
                              app_cidrs: tuple[str, ...], tags: dict[str, str]) -> str:
        """The group for a service port (per plan) or for the nodes (per instance),
        rules kept exact."""
        name = self.security_group_name(instance_id, purpose, tags)
        per_plan = not name.endswith(("-service", "-nodes"))
        # A plan's group carries no instance tag: no instance's teardown or orphan
        # sweep takes it; it goes with the plan's last service port.
        group_tags = to_neutron_tags({TAG_PLAN: tags[TAG_PLAN]} if per_plan
                                     else {TAG_INSTANCE: instance_id, TAG_MANAGED: "true"})
        owner = f"plan {tags.get(TAG_PLAN)}" if per_plan else instance_id
        net = self.conn.network

        def find_or_create() -> Any:
            group = self.find_security_group(name)
            if group is None:
                what = ("PostgreSQL from the app CIDRs" if purpose == "service"
                        else "replication between the instance's nodes")
                group = net.create_security_group(
                    name=name, description=f"pgha {owner}: {what} (made by the broker)")
            if not set(group_tags) <= set(group.tags or []):
                net.set_tags(group, sorted(set(group.tags or []) | set(group_tags)))
            return group

        group = self.call(f"creating security group {name}", find_or_create)
        wanted = {_rule_key(r): r for r in self._group_rules(purpose, group.id, app_cidrs)}
        existing = list(self.call(f"listing the rules of {name}", lambda: list(
            net.security_group_rules(security_group_id=group.id))))
        have = {_existing_rule_key(r): r for r in existing if r.direction == "ingress"}
        for key, rule in wanted.items():
            if key in have:
                continue

            def create(rule: dict[str, Any] = rule) -> None:
                try:
                    net.create_security_group_rule(security_group_id=group.id, **rule)
                except os_exc.ConflictException as exc:
                    if "exists" not in str(exc.details or "").lower():
                        raise
            self.call(f"adding a rule to {name}", create)
        for key, stale in have.items():
            if key not in wanted:
                self.delete_quietly(f"removing a stale rule from {name}",
                                     partial(net.delete_security_group_rule, stale))
        return str(group.id)

    def find_security_groups(self, instance_id: str | None = None) -> list[SecurityGroupRecord]:
        """The broker's per-instance security groups (not in find_resources' kinds)."""
        groups = self.call("listing security groups",
                           lambda: list(self.conn.network.security_groups()))
        out = []
        for g in groups:
            tags = from_neutron_tags(g.tags)
            if not belongs(tags, g.name, instance_id, by_name=True):
                continue
            if TAG_INSTANCE not in tags:
                tags = {TAG_INSTANCE: name_instance(g.name) or "", TAG_MANAGED: "true"}
            out.append(SecurityGroupRecord(id=g.id, name=g.name or "", tags=tags))
        return out

    def delete_security_group(self, group_id: str, *, if_unused: bool = False) -> None:
        def attempt() -> None:
            try:
                self.conn.network.delete_security_group(group_id, ignore_missing=True)
            except os_exc.ConflictException:
                if not if_unused:
                    raise
        self.call(f"deleting security group {group_id}", attempt,
                  retry_conflicts=not if_unused)

