"""Nova servers and server groups: booted with the guest bootstrap as user-data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from broker.cloud.base import (
    CloudError,
    NoValidHost,
    Server,
    ServerSpec,
    TransientCloudError,
)
from broker.cloud.openstack import calls
from broker.cloud.openstack.calls import WaitTimeout, report
from broker.cloud.openstack.resources import (
    META_MANAGEMENT_ADDRESS,
    managed,
    server_record,
)
from broker.cloud.openstack.userdata import (
    NOVA_USER_DATA_LIMIT,
    encode_user_data,
    render_user_data,
)
from broker.cloud.openstack.volumes import Volumes


class Servers(Volumes):
    """Nova servers and server groups of the OpenStackCloud."""

    # --- server groups ----------------------------------------------------------------------
    def ensure_server_group(self, name: str, tags: dict[str, str]) -> str | None:
        compute = self.conn.compute

        def find_or_create() -> Any:
            found = sorted((g for g in compute.server_groups() if g.name == name),
                           key=lambda g: g.id)
            if found:
                return found[0]
            # The zones keep the nodes apart. Soft anti-affinity (Nova 2.15+) also prefers
            # distinct hypervisors, yet lets a replacement boot on the only eligible host
            # of a zone while its fenced (SHUTOFF) predecessor is still a group member.
            return compute.create_server_group(name=name, policy="soft-anti-affinity")

        group = self.call(f"creating server group {name}", find_or_create)
        return str(group.id)

    def delete_server_group(self, group_id: str) -> None:
        self.delete_quietly(f"deleting server group {group_id}",
                             lambda: self.conn.compute.delete_server_group(
                                 group_id, ignore_missing=True))

    # --- servers -------------------------------------------------------------------------
    def _find_server(self, name: str) -> Any:
        found = [s for s in self.conn.compute.servers(details=True, name=f"^{name}$")
                 if s.name == name and (s.status or "").upper() != "DELETED"]
        found.sort(key=lambda s: (s.created_at or "", s.id))
        return found[0] if found else None

    def _id_by_name(self, cache: dict[str, str], kind: str, name: str,
                    find: Callable[[], Any]) -> str:
        """A flavor's or an image's id, looked up once per broker process."""
        if name not in cache:
            cache[name] = self.call(f"looking up {kind} {name}", find).id
        return cache[name]

    def volume_device(self, volume_id: str) -> str:
        # KVM/virtio exposes the Cinder volume id (first 20 chars) as the disk serial.
        return self.options.volume_device or f"/dev/disk/by-id/virtio-{volume_id[:20]}"

    def create_server(self, spec: ServerSpec) -> Server:
        tags = managed(spec.tags)
        secrets = (spec.guest.admin_password, spec.guest.replication_password)
        existing = self.call(f"looking for server {spec.name}",
                             lambda: self._find_server(spec.name))
        if existing is not None:
            if (existing.status or "").upper() not in ("ERROR", "SOFT_DELETED"):
                report(f"server {spec.name} exists already: adopting it")
                return self._wait_active(existing.id, spec.name, spec.availability_zone)
            report(f"server {spec.name} exists in {existing.status}: deleting it to boot it "
                   "again")
            self.delete_server(existing.id)

        volume = self.raw_volume(spec.volume_id)
        if volume is None:
            raise CloudError(f"volume {spec.volume_id} for server {spec.name} does not exist")
        attached = [a.get("server_id") for a in volume.attachments or []]
        if attached:
            raise CloudError(f"volume {volume.name or volume.id} is attached to server "
                             f"{', '.join(map(str, attached))}: cannot boot {spec.name} with it")
        if volume.status != "available":
            volume = self.wait_volume(volume.id, volume.name or volume.id, {"available"})
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
        text = render_user_data(guest)
        user_data = encode_user_data(text)
        if len(user_data) > NOVA_USER_DATA_LIMIT:
            raise CloudError(f"the user-data for {spec.name} is {len(user_data)} bytes "
                             f"(base64); Nova accepts {NOVA_USER_DATA_LIMIT}")
        image_id = self._id_by_name(self.image_ids, "image", spec.image,
                                    lambda: self.conn.image.find_image(
                                        spec.image, ignore_missing=False))
        metadata = {**tags, META_MANAGEMENT_ADDRESS: port.address}
        attrs: dict[str, Any] = {
            "name": spec.name,
            "flavor_id": self._id_by_name(self.flavor_ids, "flavor", spec.flavor,
                                          lambda: self.conn.compute.find_flavor(
                                              spec.flavor, ignore_missing=False)),
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

        try:
            server = self.call(f"creating server {spec.name}", find_or_create,
                               secrets=(*secrets, user_data))
        except CloudError as exc:
            if "availability zone is not available" in str(exc):
                # Every compute service there is disabled: wait for the zone.
                raise NoValidHost(str(exc)) from None
            raise
        report(f"server {spec.name} is booting in {spec.availability_zone}")
        return self._wait_active(server.id, spec.name, spec.availability_zone)

    def _wait_active(self, server_id: str, name: str, zone: str) -> Server:
        def probe() -> Any:
            server = self.raw_server(server_id)
            if server is None:
                raise CloudError(f"server {name} disappeared while booting")
            if (server.status or "").upper() == "BUILD" and not self.zone_available(zone):
                # Scheduled before Nova counted the zone's hosts down: on a dead host it
                # never boots. Give it up; callers wait for the zone or go elsewhere.
                report(f"zone {zone} went down while server {name} was building: "
                       "deleting it")
                self.delete_server(server_id)
                raise NoValidHost(f"server {name} could not boot: zone {zone} went down "
                                  "while it was building")
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
                hint = (" (no enabled compute host in the zone fits: check the zone's "
                        "capacity and the flavor's aggregate)")
            report(f"server {name} failed to boot: {reason}; deleting it")
            self.delete_server(server_id)
            if hint:  # no live host in the zone now: callers wait for it (a rebuild does)
                raise NoValidHost(f"server {name} failed to boot: {reason}{hint}")
            raise CloudError(f"server {name} failed to boot: {reason}{hint}")
        return server_record(server)

    def get_server(self, server_id: str) -> Server | None:
        # Through the admin connection when there is one: only it sees host_status.
        server = self.fencer.hosts.read(server_id)
        return server_record(server) if server is not None else None

    def stop_server(self, server_id: str) -> None:
        self.fencer.stop_server(server_id)

    def delete_server(self, server_id: str) -> None:
        self.fencer.delete_server(server_id, timeout=self.options.delete_timeout,
                                  fencing=False)

