"""Cinder volumes: made in a zone, replaced when they go into error, deleted once
detached."""

from __future__ import annotations

from typing import Any

from broker.cloud.base import (
    CloudError,
    TransientCloudError,
    Volume,
)
from broker.cloud.openstack.calls import WaitTimeout, report
from broker.cloud.openstack.ports import Ports
from broker.cloud.openstack.resources import (
    managed,
    volume_record,
)


class Volumes(Ports):
    """Cinder volumes of the OpenStackCloud."""

    # --- volumes -------------------------------------------------------------------------
    def raw_volume(self, volume_id: str) -> Any:
        volume = self.get_or_none(f"reading volume {volume_id}",
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
            volume = self.wait_volume(volume.id, name, {"available", "in-use", "error"})
            if volume.status != "error":
                return volume_record(volume)
            # A volume in error can never be used: replace it.
            report(f"volume {name} went into error (storage backend); making it again")
            self.delete_volume(volume.id)
        raise CloudError(f"volume {name} ({size_gb} GB in {availability_zone}) went into "
                         "error three times: the storage backend cannot create it "
                         "(check the volume type, the zone and the backend's capacity)")

    def wait_volume(self, volume_id: str, name: str, states: set[str]) -> Any:
        def probe() -> Any:
            volume = self.raw_volume(volume_id)
            if volume is None:
                raise CloudError(f"volume {name} disappeared")
            return volume if volume.status in states else None
        try:
            return self.wait(f"volume {name} to be {' or '.join(sorted(states))}", probe,
                             self.options.volume_timeout)
        except WaitTimeout as exc:
            raise TransientCloudError(str(exc)) from None

    def get_volume(self, volume_id: str) -> Volume | None:
        volume = self.raw_volume(volume_id)
        return volume_record(volume) if volume is not None else None

    def detach_volume(self, volume_id: str, server_id: str, *, force: bool = False) -> None:
        self.fencer.volumes.detach_volume(volume_id, server_id, force=force)

    def delete_volume(self, volume_id: str) -> None:
        volume = self.raw_volume(volume_id)
        if volume is None:
            return
        name = volume.name or volume_id
        ghosts = [a.get("server_id") for a in volume.attachments or []
                  if a.get("server_id") and self.raw_server(a["server_id"]) is None]
        for server_id in ghosts:
            # Attached to a server that no longer exists (a local delete that did not
            # reach the storage backend): only Cinder can let go of it.
            self.fencer.volumes.detach_volume(volume_id, server_id, force=True)
        if ghosts:
            volume = self.raw_volume(volume_id)
            if volume is None:
                return
        if volume.attachments:
            servers = ", ".join(a.get("server_id", "?") for a in volume.attachments)
            raise CloudError(f"volume {name} is still attached to server {servers}: "
                             "detach it first")
        if volume.status not in ("available", "error", "error_restoring", "error_extending",
                                 "deleting"):
            volume = self.wait_volume(volume_id, name, {"available", "error"})
        if volume.status != "deleting":
            self.delete_quietly(f"deleting volume {name}",
                                 lambda: self.conn.block_storage.delete_volume(volume_id))

        def gone() -> bool | None:
            current = self.raw_volume(volume_id)
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

