"""Releasing a data volume from a server: through Nova while it can, then Cinder.

Nova answers 409 to a volume detach for a server in ERROR, and for one whose compute
service it counts down. For a server confirmed off (or in ERROR) the release then
goes through Cinder: delete the attachment, and if that does not help, an admin
force-detach. Never a status reset alone: the backend could keep exporting the disk.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from openstack import exceptions as os_exc

from broker.cloud.base import CloudError, TransientCloudError
from broker.cloud.openstack.calls import WaitTimeout, log, report
from broker.cloud.openstack.hosts import ComputeHosts, host_counted_down, powered_off

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud
    from broker.cloud.openstack.options import OpenStackOptions


class VolumeRelease:
    def __init__(self, cloud: OpenStackCloud, hosts: ComputeHosts) -> None:
        self.cloud = cloud
        self.hosts = hosts

    @property
    def options(self) -> OpenStackOptions:
        return self.cloud.options

    def detach_volume(self, volume_id: str, server_id: str, *, force: bool) -> None:
        cloud = self.cloud
        volume = cloud.raw_volume(volume_id)
        if volume is None:
            return
        name = volume.name or volume_id

        def attachments() -> list[dict[str, Any]]:
            current = cloud.raw_volume(volume_id)
            if current is None:
                return []
            return [a for a in current.attachments or [] if a.get("server_id") == server_id]

        def released() -> bool | None:
            return True if not attachments() else None

        if not attachments():
            return
        server = self.hosts.read(server_id)
        if server is not None:
            # Positive evidence that nothing writes any more: Nova confirmed the power-off
            # (or the server is in ERROR). A host Nova counts down is not: its VMs may
            # still run (nova-compute or its message bus down).
            off = powered_off(server) or (server.status or "").upper() == "ERROR"
            if not off and (force or host_counted_down(server)):
                raise CloudError(f"refusing to force volume {name} off server "
                                 f"{server.name or server_id}, which may be running: "
                                 "fence it first (stop, or delete once its host is down)")
            if not host_counted_down(server) \
                    and self._nova_detach(server, volume, name) == "detaching":
                try:
                    cloud.wait(f"volume {name} to be released by server {server_id}",
                               released, self.options.detach_timeout)
                    return
                except WaitTimeout:
                    if not force:
                        raise TransientCloudError(
                            f"volume {name} is still attached to server {server_id} after "
                            f"{self.options.detach_timeout:.0f} s") from None
            # Nova answered 409 (or would) for a server confirmed off or in ERROR: its
            # compute service is down, or ERROR is not a state it detaches from.
        elif not force:
            raise CloudError(f"volume {name} is still attached to deleted server "
                             f"{server_id}: Nova cannot release it; detach it with force")

        # Nova cannot (or did not) release it: Cinder's side, never a status reset alone.
        report(f"volume {name} is stuck in-use on server {server_id}: deleting its Cinder "
               "attachment")
        storage = cloud.conn.block_storage
        for attachment in attachments():
            attachment_id = attachment.get("attachment_id")
            if not attachment_id:
                continue
            try:
                cloud.call(f"deleting the attachment of volume {name}",
                           partial(storage.delete_attachment, attachment_id,
                                   ignore_missing=True))
            except CloudError as exc:
                log.warning("%s", exc)
        try:
            cloud.wait(f"volume {name} to be released", released,
                       self.options.detach_timeout, quiet=True)
            return
        except WaitTimeout:
            pass
        report(f"volume {name} is still attached: Cinder force-detach (admin)")
        admin_storage = cloud.admin().block_storage
        for attachment in attachments():
            try:
                cloud.call(f"force-detaching volume {name}",
                           partial(admin_storage.detach_volume, volume,
                                   attachment.get("attachment_id"), force=True))
            except CloudError as exc:
                log.warning("%s", exc)
        try:
            cloud.wait(f"volume {name} to be released", released,
                       self.options.detach_timeout, quiet=True)
        except WaitTimeout:
            raise CloudError(
                f"volume {name} is still attached to server {server_id} after deleting its "
                "attachment and a force-detach: an operator must clean it up (openstack "
                "volume attachment delete / cinder force-detach)") from None

    def _nova_detach(self, server: Any, volume: Any, name: str) -> str:
        """"detaching" once Nova accepted the detach; "refused" when Nova answers 409 for
        a server confirmed off or in ERROR. Other conflicts (a task runs) are retried."""
        cloud = self.cloud

        def attempt() -> str:
            try:
                # Resources, not ids: the SDK would otherwise have to guess which is which.
                cloud.conn.compute.delete_volume_attachment(server, volume,
                                                            ignore_missing=True)
                return "detaching"
            except os_exc.ConflictException:
                current = self.hosts.read(server.id)
                if current is None or powered_off(current) \
                        or (current.status or "").upper() == "ERROR":
                    return "refused"
                raise
        return cloud.call(f"detaching volume {name} from server {server.name or server.id}",
                          attempt)
