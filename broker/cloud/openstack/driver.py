"""The OpenStack cloud: openstacksdk behind the broker's small Cloud interface.

Every create first looks for a resource with the same name (adoption after a crash,
retries after a 5xx whose request may have gone through); every delete of something
gone returns quietly; every wait is bounded and reported (see calls.py). Fencing
lives in fencing.py, configuration checks in checks.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypeVar

from openstack import exceptions as os_exc

from broker.catalog import Catalog, NetworkSettings, Plan
from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    TAG_PLAN,
    Cloud,
    CloudError,
    CloudResource,
    Port,
    Server,
    ServerSpec,
    TransientCloudError,
    Volume,
)
from broker.cloud.openstack import calls
from broker.cloud.openstack.calls import RetryPolicy, WaitTimeout, report, wait_for
from broker.cloud.openstack.options import OpenStackOptions
from broker.cloud.openstack.resources import (
    META_MANAGEMENT_ADDRESS,
    NAME_PREFIX,
    belongs,
    from_neutron_tags,
    group_name_instance,
    managed,
    name_instance,
    ours,
    port_record,
    resource,
    server_record,
    to_neutron_tags,
    volume_record,
)
from broker.cloud.openstack.userdata import (
    NOVA_USER_DATA_LIMIT,
    ServiceRouting,
    encode_user_data,
    render_user_data,
)
from broker.config import Settings

log = logging.getLogger("broker.cloud.openstack")

T = TypeVar("T")
PG_PORT = 5432


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


class OpenStackCloud(Cloud):
    name = "openstack"

    def __init__(self, conn: Any, catalog: Catalog, options: OpenStackOptions, *,
                 admin_conn: Any = None, admin_cidr: str | None = None,
                 app_cidr: str | None = None) -> None:
        self.conn = conn
        self.admin_conn = admin_conn          # None: admin-only steps use `conn`
        self.catalog = catalog
        self.options = options
        self.admin_cidr = admin_cidr
        self.app_cidr = app_cidr              # for plans that name no app_cidrs
        self.policy = RetryPolicy(options.retry_budget, options.retry_base_delay,
                                  options.retry_max_delay)
        self._lock = threading.Lock()
        self._networks: dict[NetworkSettings, PlanNetwork] = {}
        self._flavors: dict[str, str] = {}
        self._images: dict[str, str] = {}
        from broker.cloud.openstack.fencing import Fencer

        self.fencer = Fencer(self)

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog, *,
                      validate: bool = True) -> OpenStackCloud:
        """Connect with openstacksdk's conventions and check the catalog against the cloud.

        Raises ConfigError with a plain sentence when the cloud cannot be reached or
        authenticated, or (validate=True) when a plan names something that is missing."""
        from broker.cloud.openstack.connection import connect_from_env

        options = OpenStackOptions.from_env()
        conn, admin_conn = connect_from_env(options)
        cloud = cls(conn, catalog, options, admin_conn=admin_conn,
                    admin_cidr=settings.admin_cidr, app_cidr=settings.app_cidr)
        if validate:
            from broker.cloud.openstack.checks import blocking

            problems = blocking(cloud.check())
            if problems:
                from broker.config import ConfigError

                cloud.close()
                raise ConfigError("the OpenStack cloud does not fit the catalog:\n  - "
                                  + "\n  - ".join(problems)
                                  + "\n(run `python -m broker cloud check` for the full list)")
        return cloud

    def close(self) -> None:
        for conn in (self.conn, self.admin_conn):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing is best effort
                    log.debug("closing an OpenStack connection failed", exc_info=False)

    # --- addresses -----------------------------------------------------------------------
    def admin_cidrs(self) -> tuple[str, ...]:
        return (self.admin_cidr,) if self.admin_cidr else ()

    def app_cidrs(self, plan: Plan) -> tuple[str, ...]:
        if plan.cloud.network.app_cidrs:
            return tuple(plan.cloud.network.app_cidrs)
        return (self.app_cidr,) if self.app_cidr else ()

    # --- small helpers ---------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], T], *, secrets: tuple[str, ...] = (),
             retry_conflicts: bool = True) -> T:
        return calls.call(what, fn, self.policy, secrets=secrets,
                          retry_conflicts=retry_conflicts)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float, *,
             quiet: bool = False) -> T:
        return wait_for(what, probe, timeout, interval=self.options.poll_interval,
                        max_interval=self.options.poll_max_interval, quiet=quiet)

    def admin(self) -> Any:
        return self.admin_conn if self.admin_conn is not None else self.conn

    def _get_or_none(self, what: str, fn: Callable[[], T]) -> T | None:
        def attempt() -> T | None:
            try:
                return fn()
            except os_exc.NotFoundException:
                return None
        return self.call(what, attempt)

    def _delete_quietly(self, what: str, fn: Callable[[], Any]) -> None:
        def attempt() -> None:
            with contextlib.suppress(os_exc.NotFoundException):
                fn()
        self.call(what, attempt)

    # --- plans -> networks ---------------------------------------------------------------
    def _network_settings(self, tags: dict[str, str]) -> NetworkSettings:
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
        with self._lock:
            cached = self._networks.get(settings)
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
        with self._lock:
            self._networks[settings] = resolved
        return resolved

    # --- security groups ---------------------------------------------------------------------
    def _group_rules(self, purpose: str, group_id: str, app_cidrs: tuple[str, ...]
                     ) -> list[dict[str, Any]]:
        def tcp(**extra: Any) -> dict[str, Any]:
            return {"direction": "ingress", "protocol": "tcp", "port_range_min": PG_PORT,
                    "port_range_max": PG_PORT, "remote_ip_prefix": None,
                    "remote_group_id": None, "ether_type": "IPv4", **extra}

        def cidr(value: str) -> dict[str, Any]:
            network = ipaddress.ip_network(value, strict=False)  # as Neutron stores it
            return tcp(remote_ip_prefix=str(network),
                       ether_type="IPv6" if network.version == 6 else "IPv4")

        rules = []
        if purpose == "management":
            # Replication and base backups: only between the instance's own nodes.
            rules.append(tcp(remote_group_id=group_id))
        else:
            rules += [cidr(c) for c in app_cidrs]
        if self.admin_cidr:
            rules.append(cidr(self.admin_cidr))  # the broker itself
        return rules

    def _find_security_group(self, name: str) -> Any:
        found = [g for g in self.conn.network.security_groups(name=name) if g.name == name]
        return sorted(found, key=lambda g: g.id)[0] if found else None

    def ensure_security_group(self, instance_id: str, purpose: str,
                              app_cidrs: tuple[str, ...], tags: dict[str, str]) -> str:
        """The instance's own group for its service port or its nodes, rules kept exact."""
        suffix = "service" if purpose == "service" else "nodes"
        name = f"{NAME_PREFIX}{instance_id}-{suffix}"
        group_tags = to_neutron_tags({TAG_INSTANCE: instance_id, TAG_MANAGED: "true"})
        net = self.conn.network

        def find_or_create() -> Any:
            group = self._find_security_group(name)
            if group is None:
                what = ("PostgreSQL from the app CIDRs" if purpose == "service"
                        else "replication between the instance's nodes")
                group = net.create_security_group(
                    name=name, description=f"pgha {instance_id}: {what} (made by the broker)")
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
                self._delete_quietly(f"removing a stale rule from {name}",
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

    # --- ports -----------------------------------------------------------------------------
    def _find_port(self, name: str) -> Any:
        found = [p for p in self.conn.network.ports(name=name) if p.name == name]
        if len(found) > 1:
            log.warning("%d ports are named %s; using the oldest", len(found), name)
        found.sort(key=lambda p: (not from_neutron_tags(p.tags), p.created_at or "", p.id))
        return found[0] if found else None

    def create_port(self, name: str, purpose: Literal["management", "service"],
                    tags: dict[str, str]) -> Port:
        tags = managed(tags)
        instance_id = tags.get(TAG_INSTANCE)
        if not instance_id:
            raise CloudError(f"port {name}: tags must name the instance ({TAG_INSTANCE})")
        net = self.plan_network(self._network_settings(tags))
        group_id = self.ensure_security_group(instance_id, purpose, net.app_cidrs, tags)
        wanted_tags = to_neutron_tags(tags)
        network = self.conn.network

        def find_or_create() -> Any:
            port = self._find_port(name)
            if port is None:
                attrs: dict[str, Any] = {
                    "name": name,
                    "description": f"pgha {purpose} port (made by the broker)",
                    "security_group_ids": [group_id, *net.security_group_ids],
                }
                if purpose == "service":
                    attrs["network_id"] = net.service_network_id
                    attrs["fixed_ips"] = [{"subnet_id": net.service_subnet_id}]
                else:
                    attrs["network_id"] = net.management_network_id
                port = network.create_port(**attrs)
            if not set(wanted_tags) <= set(port.tags or []):
                # Neutron tags are set after the create: a crash in between is
                # healed here, and until then the name still finds the port.
                network.set_tags(port, sorted(set(port.tags or []) | set(wanted_tags)))
                port = network.get_port(port.id)
            return port

        port = self.call(f"creating {purpose} port {name}", find_or_create)
        return port_record(port)

    def get_port(self, port_id: str) -> Port | None:
        port = self._get_or_none(f"reading port {port_id}",
                                 lambda: self.conn.network.get_port(port_id))
        return port_record(port) if port is not None else None

    def attach_port(self, port_id: str, server_id: str) -> None:
        port = self.get_port(port_id)
        if port is None:
            raise CloudError(f"port {port_id} does not exist")
        if port.device_id and port.device_id != server_id:
            raise CloudError(f"port {port.name or port_id} is bound to server {port.device_id}: "
                             "refusing to take it from there (detach it first)")
        if port.device_id != server_id:
            def attach() -> None:
                try:
                    self.conn.compute.create_server_interface(server_id, port_id=port_id)
                except os_exc.ConflictException:
                    current = self.get_port(port_id)
                    if current is not None and current.device_id == server_id:
                        return
                    if current is not None and current.device_id:
                        raise CloudError(f"port {port_id} was bound to server "
                                         f"{current.device_id} meanwhile") from None
                    raise  # busy (a task is running on the server): retried
            self.call(f"attaching port {port.name or port_id} to server {server_id}", attach)

        def bound() -> bool | None:
            raw = self._get_or_none(f"reading port {port_id}",
                                    lambda: self.conn.network.get_port(port_id))
            if raw is None:
                raise CloudError(f"port {port_id} disappeared while being attached")
            if raw.device_id and raw.device_id != server_id:
                raise CloudError(f"port {port_id} is bound to server {raw.device_id}")
            return True if raw.device_id == server_id and raw.status == "ACTIVE" else None

        try:
            self.wait(f"port {port.name or port_id} to be ACTIVE on server {server_id}", bound,
                      self.options.detach_timeout)
        except WaitTimeout as exc:
            raise TransientCloudError(str(exc)) from None

    def detach_port(self, port_id: str, server_id: str) -> None:
        """Returns only once Neutron shows the port unbound. FenceError if it never is:
        the old server may still hold the address, so it must not move."""
        self.fencer.detach_port(port_id, server_id)

    def delete_port(self, port_id: str) -> None:
        raw = self._get_or_none(f"reading port {port_id}",
                                lambda: self.conn.network.get_port(port_id))
        if raw is None:
            return
        self._delete_quietly(f"deleting port {raw.name or port_id}",
                             lambda: self.conn.network.delete_port(port_id,
                                                                   ignore_missing=True))
        instance_id = from_neutron_tags(raw.tags).get(TAG_INSTANCE)
        if instance_id:
            # The instance's security group goes with its last port.
            suffix = "service" if (raw.name or "").endswith("-service") else "nodes"
            group = self._find_security_group(f"{NAME_PREFIX}{instance_id}-{suffix}")
            if group is not None:
                self.delete_security_group(group.id, if_unused=True)

    # --- volumes -------------------------------------------------------------------------
    def _raw_volume(self, volume_id: str) -> Any:
        volume = self._get_or_none(f"reading volume {volume_id}",
                                   lambda: self.conn.block_storage.get_volume(volume_id))
        if volume is not None and volume.status == "deleted":
            return None
        return volume

    def _find_volume(self, name: str) -> Any:
        found = [v for v in self.conn.block_storage.volumes(details=True, name=name)
                 if v.name == name and v.status not in ("deleting", "deleted")]
        found.sort(key=lambda v: (v.created_at or "", v.id))
        return found[0] if found else None

    def create_volume(self, name: str, size_gb: int, availability_zone: str,
                      volume_type: str | None, tags: dict[str, str]) -> Volume:
        tags = managed(tags)
        storage = self.conn.block_storage
        for _ in range(3):
            def find_or_create() -> Any:
                volume = self._find_volume(name)
                if volume is None:
                    attrs: dict[str, Any] = {"name": name, "size": size_gb,
                                             "availability_zone": availability_zone,
                                             "metadata": tags,
                                             "description": "pgha data volume"}
                    if volume_type:
                        attrs["volume_type"] = volume_type
                    volume = storage.create_volume(**attrs)
                return volume

            volume = self.call(f"creating volume {name}", find_or_create)
            volume = self._wait_volume(volume.id, name, {"available", "in-use", "error"})
            if volume.status != "error":
                return volume_record(volume)
            # A volume in error can never be used: replace it.
            report(f"volume {name} went into error (storage backend); making it again")
            self.delete_volume(volume.id)
        raise CloudError(f"volume {name} ({size_gb} GB in {availability_zone}) went into "
                         "error three times: the storage backend cannot create it "
                         "(check the volume type, the zone and the backend's capacity)")

    def _wait_volume(self, volume_id: str, name: str, states: set[str]) -> Any:
        def probe() -> Any:
            volume = self._raw_volume(volume_id)
            if volume is None:
                raise CloudError(f"volume {name} disappeared")
            return volume if volume.status in states else None
        try:
            return self.wait(f"volume {name} to be {' or '.join(sorted(states))}", probe,
                             self.options.volume_timeout)
        except WaitTimeout as exc:
            raise TransientCloudError(str(exc)) from None

    def get_volume(self, volume_id: str) -> Volume | None:
        volume = self._raw_volume(volume_id)
        return volume_record(volume) if volume is not None else None

    def detach_volume(self, volume_id: str, server_id: str, *, force: bool = False) -> None:
        self.fencer.detach_volume(volume_id, server_id, force=force)

    def delete_volume(self, volume_id: str) -> None:
        volume = self._raw_volume(volume_id)
        if volume is None:
            return
        name = volume.name or volume_id
        ghosts = [a.get("server_id") for a in volume.attachments or []
                  if a.get("server_id") and self.raw_server(a["server_id"]) is None]
        for server_id in ghosts:
            # Attached to a server that no longer exists (a local delete that did not
            # reach the storage backend): only Cinder can let go of it.
            self.fencer.detach_volume(volume_id, server_id, force=True)
        if ghosts:
            volume = self._raw_volume(volume_id)
            if volume is None:
                return
        if volume.attachments:
            servers = ", ".join(a.get("server_id", "?") for a in volume.attachments)
            raise CloudError(f"volume {name} is still attached to server {servers}: "
                             "detach it first")
        if volume.status not in ("available", "error", "error_restoring", "error_extending",
                                 "deleting"):
            volume = self._wait_volume(volume_id, name, {"available", "error"})
        if volume.status != "deleting":
            self._delete_quietly(f"deleting volume {name}",
                                 lambda: self.conn.block_storage.delete_volume(volume_id))

        def gone() -> bool | None:
            current = self._raw_volume(volume_id)
            if current is None:
                return True
            if current.status == "error_deleting":
                raise CloudError(f"the storage backend could not delete volume {name} "
                                 "(error_deleting): an operator must clean it up")
            return None
        try:
            self.wait(f"volume {name} to be deleted", gone, self.options.volume_timeout)
        except WaitTimeout as exc:
            raise TransientCloudError(str(exc)) from None

    # --- server groups ----------------------------------------------------------------------
    def ensure_server_group(self, name: str, tags: dict[str, str]) -> str | None:
        compute = self.conn.compute

        def find_or_create() -> Any:
            found = sorted((g for g in compute.server_groups() if g.name == name),
                           key=lambda g: g.id)
            if found:
                return found[0]
            # Anti-affinity is per hypervisor; the zones spread the nodes further.
            return compute.create_server_group(name=name, policy="anti-affinity")

        group = self.call(f"creating server group {name}", find_or_create)
        return str(group.id)

    def delete_server_group(self, group_id: str) -> None:
        self._delete_quietly(f"deleting server group {group_id}",
                             lambda: self.conn.compute.delete_server_group(
                                 group_id, ignore_missing=True))

    # --- servers -------------------------------------------------------------------------
    def raw_server(self, server_id: str, *, conn: Any = None) -> Any:
        compute = (conn or self.conn).compute
        server = self._get_or_none(f"reading server {server_id}",
                                   lambda: compute.get_server(server_id))
        if server is not None and (server.status or "").upper() == "DELETED":
            return None
        return server

    def _find_server(self, name: str) -> Any:
        found = [s for s in self.conn.compute.servers(details=True, name=f"^{name}$")
                 if s.name == name and (s.status or "").upper() != "DELETED"]
        found.sort(key=lambda s: (s.created_at or "", s.id))
        return found[0] if found else None

    def _flavor_id(self, flavor: str) -> str:
        if flavor not in self._flavors:
            found = self.call(f"looking up flavor {flavor}", lambda: self.conn.compute.find_flavor(
                flavor, ignore_missing=False))
            self._flavors[flavor] = found.id
        return self._flavors[flavor]

    def _image_id(self, image: str) -> str:
        if image not in self._images:
            found = self.call(f"looking up image {image}", lambda: self.conn.image.find_image(
                image, ignore_missing=False))
            self._images[image] = found.id
        return self._images[image]

    def volume_device(self, volume_id: str) -> str:
        # KVM/virtio exposes the Cinder volume id (first 20 chars) as the disk serial.
        return self.options.volume_device or f"/dev/disk/by-id/virtio-{volume_id[:20]}"

    def _routing(self, tags: dict[str, str], management_address: str | None
                 ) -> ServiceRouting | None:
        try:
            net = self.plan_network(self._network_settings(tags))
        except CloudError as exc:
            log.warning("no source routing for the service NIC: %s", exc)
            return None
        return ServiceRouting(subnet_cidr=net.service_subnet_cidr, gateway=net.service_gateway,
                              management_address=management_address)

    def create_server(self, spec: ServerSpec) -> Server:
        tags = managed(spec.tags)
        secrets = (spec.guest.admin_password, spec.guest.replication_password)
        existing = self.call(f"looking for server {spec.name}",
                             lambda: self._find_server(spec.name))
        if existing is not None:
            if (existing.status or "").upper() != "ERROR":
                report(f"server {spec.name} exists already: adopting it")
                return self._wait_active(existing.id, spec.name)
            report(f"server {spec.name} exists in ERROR: deleting it to boot it again")
            self.delete_server(existing.id)

        volume = self._raw_volume(spec.volume_id)
        if volume is None:
            raise CloudError(f"volume {spec.volume_id} for server {spec.name} does not exist")
        attached = [a.get("server_id") for a in volume.attachments or []]
        if attached:
            raise CloudError(f"volume {volume.name or volume.id} is attached to server "
                             f"{', '.join(map(str, attached))}: cannot boot {spec.name} with it")
        if volume.status != "available":
            volume = self._wait_volume(volume.id, volume.name or volume.id, {"available"})
        if volume.availability_zone and volume.availability_zone != spec.availability_zone:
            raise CloudError(f"volume {volume.name} is in zone {volume.availability_zone}, "
                             f"server {spec.name} in {spec.availability_zone}")
        port = self.get_port(spec.management_port_id)
        if port is None:
            raise CloudError(f"management port {spec.management_port_id} does not exist")
        if port.device_id:
            raise CloudError(f"management port {port.name} is bound to server {port.device_id}")

        guest = spec.guest
        if guest.volume_device is None:
            guest = replace(guest, volume_device=self.volume_device(volume.id))
        text = render_user_data(guest, self._routing(tags, port.address))
        user_data = encode_user_data(text)
        if len(user_data) > NOVA_USER_DATA_LIMIT:
            raise CloudError(f"the user-data for {spec.name} is {len(user_data)} bytes "
                             f"(base64); Nova accepts {NOVA_USER_DATA_LIMIT}")
        image_id = self._image_id(spec.image)
        metadata = {**tags, META_MANAGEMENT_ADDRESS: port.address}
        attrs: dict[str, Any] = {
            "name": spec.name,
            "flavor_id": self._flavor_id(spec.flavor),
            "image_id": image_id,
            "availability_zone": spec.availability_zone,
            "networks": [{"port": spec.management_port_id}],
            "block_device_mapping": [
                {"boot_index": 0, "uuid": image_id, "source_type": "image",
                 "destination_type": "local", "delete_on_termination": True},
                # The data volume outlives the server (resurrect, forensics).
                {"boot_index": -1, "uuid": volume.id, "source_type": "volume",
                 "destination_type": "volume", "delete_on_termination": False},
            ],
            "metadata": metadata,
            "user_data": user_data,
        }
        if spec.server_group_id:
            attrs["scheduler_hints"] = {"group": spec.server_group_id}
        if self.options.config_drive:
            attrs["config_drive"] = True

        def find_or_create() -> Any:
            server = self._find_server(spec.name)
            return server if server is not None else self.conn.compute.create_server(**attrs)

        server = self.call(f"creating server {spec.name}", find_or_create,
                           secrets=(*secrets, user_data))
        report(f"server {spec.name} is booting in {spec.availability_zone}")
        return self._wait_active(server.id, spec.name)

    def _wait_active(self, server_id: str, name: str) -> Server:
        def probe() -> Any:
            server = self.raw_server(server_id)
            if server is None:
                raise CloudError(f"server {name} disappeared while booting")
            return server if (server.status or "").upper() in ("ACTIVE", "ERROR") else None

        try:
            server = self.wait(f"server {name} to become ACTIVE", probe,
                               self.options.boot_timeout)
        except WaitTimeout as exc:
            raise TransientCloudError(str(exc)) from None
        if (server.status or "").upper() == "ERROR":
            fault = (server.fault or {}).get("message") if isinstance(server.fault, dict) else None
            reason = calls.scrub(str(fault or "no reason given"))
            hint = ""
            if "valid host" in reason.lower():
                hint = (" (each node needs its own hypervisor in its zone: anti-affinity; "
                        "check the zone's capacity and the flavor's aggregate)")
            report(f"server {name} failed to boot: {reason}; deleting it")
            self.delete_server(server_id)
            raise CloudError(f"server {name} failed to boot: {reason}{hint}")
        return server_record(server)

    def get_server(self, server_id: str) -> Server | None:
        server = self.raw_server(server_id)
        return server_record(server) if server is not None else None

    def stop_server(self, server_id: str) -> None:
        self.fencer.stop_server(server_id)

    def delete_server(self, server_id: str) -> None:
        self.fencer.delete_server(server_id, timeout=self.options.delete_timeout,
                                  fencing=False)

    # --- housekeeping ----------------------------------------------------------------------
    def find_resources(self, instance_id: str | None = None) -> list[CloudResource]:
        out: list[CloudResource] = []
        servers = self.call("listing servers",
                            lambda: list(self.conn.compute.servers(details=True)))
        for s in servers:
            tags = ours(s.metadata)
            tags.pop(META_MANAGEMENT_ADDRESS, None)
            if belongs(tags, s.name, instance_id):
                out.append(resource("server", s.id, s.name, tags))
        volumes = self.call("listing volumes",
                            lambda: list(self.conn.block_storage.volumes(details=True)))
        for v in volumes:
            tags = ours(v.metadata)
            if v.status != "deleting" and belongs(tags, v.name, instance_id):
                out.append(resource("volume", v.id, v.name, tags))
        ports = self.call("listing ports", lambda: list(self.conn.network.ports()))
        for p in ports:
            tags = from_neutron_tags(p.tags)
            if belongs(tags, p.name, instance_id, by_name=True):
                if TAG_INSTANCE not in tags:
                    tags = {TAG_INSTANCE: name_instance(p.name) or "", TAG_MANAGED: "true"}
                out.append(resource("port", p.id, p.name, tags))
        groups = self.call("listing server groups",
                           lambda: list(self.conn.compute.server_groups()))
        for g in groups:
            owner = group_name_instance(g.name)
            if owner and (instance_id is None or owner == instance_id):
                out.append(resource("server_group", g.id, g.name,
                                    {TAG_INSTANCE: owner, TAG_MANAGED: "true"}))
        out += [resource("security_group", g.id, g.name, g.tags)
                for g in self.find_security_groups(instance_id)]
        return out

    def reporting(self, progress: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
        # Waits on Nova, Neutron and Cinder say what they wait for in last_operation.
        return calls.reporting(progress)

    def check(self) -> list[str]:
        from broker.cloud.openstack.checks import check_cloud

        return check_cloud(self)
