"""What Nova says about a server's compute host: whether it counts the host down,
whether the server is powered off, and (with BROKER_OPENSTACK_FORCE_DOWN and admin
credentials) the host's nova-compute service, its heartbeat, and forcing it down."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from openstack import exceptions as os_exc

from broker.cloud.openstack.calls import log, report

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud


def host_counted_down(server: Any) -> bool:
    """Nova no longer hears the server's compute host (or it was forced down)."""
    return ((server.status or "").upper() == "UNKNOWN"
            or (server.host_status or "").upper() in ("UNKNOWN", "DOWN"))


def is_stopped(server: Any) -> bool:
    return (server.status or "").upper() == "SHUTOFF" and not server.task_state


def powered_off(server: Any) -> bool:
    """Nova confirmed the power-off (vm_state survives a host counted down, status not)."""
    return is_stopped(server) or (
        (server.vm_state or "").lower() == "stopped" and not server.task_state)


class Heartbeat:
    """How long a compute service's `updated_at` has stayed the same, on OUR clock
    (Nova's timestamps are compared with each other only: no clock skew)."""

    def __init__(self) -> None:
        self.value: object = None
        self.since = time.monotonic()

    def frozen_for(self, updated_at: object) -> float:
        now = time.monotonic()
        if updated_at != self.value:
            self.value = updated_at
            self.since = now
        return now - self.since

class ComputeHosts:
    """The nova-compute service behind a server (admin)."""

    def __init__(self, cloud: OpenStackCloud) -> None:
        self.cloud = cloud
        self._warned_no_admin = False

    def compute_service(self, server_id: str) -> Any:
        """The nova-compute service of the server's host; None if not visible to us."""
        admin = self.cloud.admin()

        def attempt() -> Any:
            try:
                server = admin.compute.get_server(server_id)
                host = server.compute_host
                if not host:
                    return None
                found = list(admin.compute.services(host=host, binary="nova-compute"))
                return found[0] if found else None
            except (os_exc.ForbiddenException, os_exc.NotFoundException):
                if not self._warned_no_admin:
                    self._warned_no_admin = True
                    log.warning("BROKER_OPENSTACK_FORCE_DOWN is on but the credentials "
                                "cannot read compute services (admin needed): the broker "
                                "waits for Nova to count dead hosts down by itself")
                return None
        return self.cloud.call(f"reading the compute service of server {server_id}", attempt)

    def host_silent(self, server_id: str, heartbeat: Heartbeat) -> Any:
        """The compute service, if it has sent no heartbeat for `force_down_after`."""
        service = self.compute_service(server_id)
        if service is None or service.is_forced_down:
            return None
        if (service.state or "").lower() == "down":
            return service
        if heartbeat.frozen_for(service.updated_at) >= self.cloud.options.force_down_after:
            return service
        return None

    def force_down(self, service: Any, name: str) -> None:
        host = service.host
        report(f"the compute host of server {name} ({host}) has sent no heartbeat for "
               f"{self.cloud.options.force_down_after:.0f} s: forcing its nova-compute service "
               "down (BROKER_OPENSTACK_FORCE_DOWN). After repairing the host an operator "
               f"runs: openstack compute service set --up {host} nova-compute")
        admin = self.cloud.admin()
        self.cloud.call(f"forcing the compute service of host {host} down",
                        lambda: admin.compute.update_service_forced_down(
                            service, host=host, binary="nova-compute", forced=True))
