"""Does the cloud fit the catalog? One sentence per problem, for start-up and the CLI.

Lines starting with "warning:" do not stop the broker; every other line does.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from openstack import exceptions as os_exc

from broker.cloud.openstack.calls import classify

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud

T = TypeVar("T")
WARNING = "warning: "


def blocking(problems: list[str]) -> list[str]:
    return [p for p in problems if not p.startswith(WARNING)]


class _Failed(Exception):
    pass


def check_cloud(cloud: OpenStackCloud) -> list[str]:
    problems: list[str] = []
    conn = cloud.conn
    cache: dict[tuple[str, str], Any] = {}

    def ask(what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            verdict = classify(exc)
            if verdict is None:
                raise
            problems.append(f"{what}: {verdict.text}")
            raise _Failed() from None

    def find(kind: str, name: str, fn: Callable[..., Any]) -> Any:
        """The resource, None when it does not exist, False when the lookup failed."""
        key = (kind, name)
        if key not in cache:
            def lookup() -> Any:
                try:
                    return fn(name, ignore_missing=False)
                except os_exc.NotFoundException:
                    return None
            try:
                cache[key] = ask(f"looking up {kind} {name!r}", lookup)
            except _Failed:
                cache[key] = False
        return cache[key]

    try:
        ask("authenticating to OpenStack", conn.authorize)
        compute_zones = ask("listing compute availability zones", lambda: {
            z.name for z in conn.compute.availability_zones()
            if (z.state or {}).get("available", True)})
        volume_zones = ask("listing volume availability zones", lambda: {
            z.name for z in conn.block_storage.availability_zones()})
        volume_types = ask("listing volume types", lambda: {
            value for t in conn.block_storage.types() for value in (t.name, t.id)})
    except _Failed:
        return problems

    net = conn.network
    for service in cloud.catalog.services:
        for plan in service.plans:
            where = f"plan {plan.name!r}"
            c = plan.cloud
            flavor = find("flavor", c.flavor,
                          conn.compute.find_flavor)
            if flavor is None:
                problems.append(f"{where}: flavor {c.flavor!r} does not exist")
            image = find("image", c.image,
                         conn.image.find_image)
            if image is None:
                problems.append(f"{where}: image {c.image!r} does not exist")
            elif image:
                if (image.status or "active") != "active":
                    problems.append(f"{where}: image {c.image!r} is {image.status}, not active")
                shutdown = (image.properties or {}).get("os_shutdown_timeout")
                if shutdown is None:
                    shutdown = getattr(image, "os_shutdown_timeout", None)
                if str(shutdown) != "0":
                    problems.append(
                        f"{WARNING}{where}: image {c.image!r} has no os_shutdown_timeout=0: "
                        "fencing a hung guest waits for Nova's shutdown_timeout (60 s) "
                        "before the hard power-off")
            for zone in c.availability_zones:
                if zone not in compute_zones:
                    problems.append(f"{where}: availability zone {zone!r} is not a compute "
                                    f"zone (there are: {', '.join(sorted(compute_zones))})")
                if zone not in volume_zones:
                    problems.append(f"{where}: availability zone {zone!r} is not a volume "
                                    f"zone (there are: {', '.join(sorted(volume_zones))})")
            if c.volume_type and c.volume_type not in volume_types:
                problems.append(f"{where}: volume type {c.volume_type!r} does not exist")
            n = c.network
            if not n.management_network:
                problems.append(f"{where}: network.management_network is not set")
            elif find("network", n.management_network, net.find_network) is None:
                problems.append(f"{where}: network {n.management_network!r} does not exist")
            service_net = None
            if n.service_network:
                service_net = find("network", n.service_network, net.find_network)
                if service_net is None:
                    problems.append(f"{where}: network {n.service_network!r} does not exist")
            if n.service_subnet:
                subnet = find("subnet", n.service_subnet, net.find_subnet)
                if subnet is None:
                    problems.append(f"{where}: subnet {n.service_subnet!r} does not exist")
                elif subnet and service_net and subnet.network_id != service_net.id:
                    problems.append(f"{where}: subnet {n.service_subnet!r} is not on network "
                                    f"{n.service_network!r}")
            elif not n.service_network:
                problems.append(f"{where}: set network.service_subnet (or service_network) "
                                "for the service port")
            for group in n.security_groups:
                if find("security group", group, net.find_security_group) is None:
                    problems.append(f"{where}: security group {group!r} does not exist")
            for cidr in n.app_cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    problems.append(f"{where}: app CIDR {cidr!r} is not a network address")
            if not n.app_cidrs and not n.security_groups:
                problems.append(f"{where}: neither network.app_cidrs nor "
                                "network.security_groups is set: no app could reach port 5432")

    if not cloud.admin_cidr:
        problems.append("BROKER_ADMIN_CIDR is not set: the nodes' security groups must let "
                        "the broker reach PostgreSQL (e.g. the broker's egress address/32)")
    hook = cloud.options.fence_hook
    if hook and not (os.path.isfile(hook) and os.access(hook, os.X_OK)):
        problems.append(f"BROKER_OPENSTACK_FENCE_HOOK {hook!r} is not an executable file")
    if cloud.admin_conn is not None:
        try:
            list(cloud.admin_conn.compute.services(binary="nova-compute"))
        except os_exc.ForbiddenException:
            problems.append("BROKER_OPENSTACK_ADMIN_CLOUD cannot read compute services "
                            "(admin role needed): host status and the fencing hook do "
                            "not work")
        except Exception as exc:
            verdict = classify(exc)
            if verdict is None:
                raise
            problems.append(f"reading compute services: {verdict.text}")
    return problems
