"""Ports: made with the instance's security group, hot-plugged into a server, deleted
with their group."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from openstack import exceptions as os_exc

from broker.cloud.base import (
    TAG_INSTANCE,
    CloudError,
    Port,
    PortNic,
    TransientCloudError,
)
from broker.cloud.openstack.calls import WaitTimeout, log
from broker.cloud.openstack.networks import Networks
from broker.cloud.openstack.resources import (
    from_neutron_tags,
    managed,
    port_record,
    to_neutron_tags,
)
from broker.cloud.reach import wait_reachable


class Ports(Networks):
    """Neutron ports of the OpenStackCloud."""

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
        net = self.plan_network(self.network_settings(tags))
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
        port = self.get_or_none(f"reading port {port_id}",
                                 lambda: self.conn.network.get_port(port_id))
        return port_record(port) if port is not None else None

    def port_nic(self, port_id: str) -> PortNic:
        network = self.conn.network
        raw = self.get_or_none(f"reading port {port_id}", lambda: network.get_port(port_id))
        if raw is None or not raw.fixed_ips:
            raise CloudError(f"port {port_id} does not exist or has no fixed IP")
        fixed = raw.fixed_ips[0]
        subnet = self.call(f"reading subnet {fixed['subnet_id']}",
                           lambda: network.get_subnet(fixed["subnet_id"]))
        net = self.call(f"reading network {raw.network_id}",
                        lambda: network.get_network(raw.network_id))
        return PortNic(mac=raw.mac_address, address=fixed["ip_address"],
                       prefix_length=ipaddress.ip_network(subnet.cidr).prefixlen,
                       gateway=subnet.gateway_ip or "", mtu=int(net.mtu or 0))

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
            raw = self.get_or_none(f"reading port {port_id}",
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
        # ACTIVE concerns the virtual switch: the guest's NIC agent configures the address.
        if self.options.reach_timeout > 0:
            wait_reachable(port.address, timeout=self.options.reach_timeout)

    def detach_port(self, port_id: str, server_id: str) -> None:
        """Returns only once Neutron shows the port unbound. FenceError if it never is:
        the old server may still hold the address, so it must not move."""
        self.fencer.detach_port(port_id, server_id)

    def delete_port(self, port_id: str) -> None:
        raw = self.get_or_none(f"reading port {port_id}",
                                lambda: self.conn.network.get_port(port_id))
        if raw is None:
            return
        self.delete_quietly(f"deleting port {raw.name or port_id}",
                             lambda: self.conn.network.delete_port(port_id,
                                                                   ignore_missing=True))
        tags = from_neutron_tags(raw.tags)
        instance_id = tags.get(TAG_INSTANCE)
        if instance_id:
            # The group goes with its last port (Neutron refuses while one uses it).
            purpose = "service" if (raw.name or "").endswith("-service") else "management"
            group = self.find_security_group(
                self.security_group_name(instance_id, purpose, tags))
            if group is not None:
                self.delete_security_group(group.id, if_unused=True)

