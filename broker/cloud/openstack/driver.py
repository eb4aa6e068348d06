"""The OpenStack cloud: openstacksdk behind the broker's small Cloud interface.

Every create first looks for a resource with the same name (adoption after a crash,
retries after a 5xx whose request may have gone through); every delete of something
gone returns quietly; every wait is bounded and reported (see calls.py). Fencing
lives in fencing.py (compute-host status in hosts.py), configuration checks in checks.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from broker.catalog import Catalog, NetworkSettings, Plan
from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    CloudResource,
)
from broker.cloud.openstack import calls
from broker.cloud.openstack.calls import RetryPolicy
from broker.cloud.openstack.networks import PlanNetwork
from broker.cloud.openstack.options import OpenStackOptions
from broker.cloud.openstack.resources import (
    META_MANAGEMENT_ADDRESS,
    belongs,
    from_neutron_tags,
    group_name_instance,
    name_instance,
    ours,
    resource,
)
from broker.cloud.openstack.servers import Servers
from broker.cloud.openstack.zones import ZoneStates
from broker.config import Settings


class OpenStackCloud(Servers):
    """The Cloud interface over Nova, Neutron and Cinder, one concern per base class:
    networks.py, ports.py, volumes.py, servers.py (session.py: what they share)."""

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
        self.lock = threading.Lock()
        self.network_cache: dict[NetworkSettings, PlanNetwork] = {}
        self.flavor_ids: dict[str, str] = {}
        self.image_ids: dict[str, str] = {}
        from broker.cloud.openstack.fencing import Fencer

        self.fencer = Fencer(self)
        self.zone_states = ZoneStates(self)

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

    # --- addresses -----------------------------------------------------------------------
    def admin_cidrs(self) -> tuple[str, ...]:
        return (self.admin_cidr,) if self.admin_cidr else ()

    def app_cidrs(self, plan: Plan) -> tuple[str, ...]:
        if plan.cloud.network.app_cidrs:
            return tuple(plan.cloud.network.app_cidrs)
        return (self.app_cidr,) if self.app_cidr else ()

    def zone_available(self, availability_zone: str) -> bool:
        # Nova's zone list (zones.py): with the admin connection, a zone with no live,
        # enabled compute host is down; member-only, a zone whose services are all
        # disabled.
        return self.zone_states.available(availability_zone)

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

    def capacity(self) -> list[str]:
        from broker.cloud.openstack.quotas import capacity

        return capacity(self)
