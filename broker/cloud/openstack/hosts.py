"""What Nova says about a server's compute host, and the operator's fencing hook.

Nova's default policies show a server's `host_status` to admins only, and a
server's `status` never reflects its host: with member-only credentials the broker
cannot tell a dead hypervisor from a live one. So the host's state is read only
through the admin connection (BROKER_OPENSTACK_ADMIN_CLOUD), when there is one.

A compute service is forced down only after the operator's fencing hook
(BROKER_OPENSTACK_FENCE_HOOK: IPMI power-off, Masakari, ...) confirmed that the host
is off; Nova's API reference warns that forcing a host down without fencing it
"will likely result in the corruption of VMs on that host". A service Nova already
counts down is never forced.
"""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING, Any

from openstack import exceptions as os_exc

from broker.cloud.openstack.calls import log, report

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud


def host_counted_down(server: Any) -> bool:
    """Nova no longer hears the server's compute host, or it was forced down.

    Only a server read with rights to see `host_status` can say so; to others
    (Nova's default policy) this is always False."""
    return (server.host_status or "").upper() in ("UNKNOWN", "DOWN")


def is_stopped(server: Any) -> bool:
    return (server.status or "").upper() == "SHUTOFF" and not server.task_state


def is_soft_deleted(server: Any) -> bool:
    return (server.status or "").upper() == "SOFT_DELETED"


def powered_off(server: Any) -> bool:
    """Nova confirmed the power-off (vm_state and no task left)."""
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
    """Servers as the admin connection sees them, and their nova-compute services."""

    def __init__(self, cloud: OpenStackCloud) -> None:
        self.cloud = cloud

    def read(self, server_id: str) -> Any:
        """The server, with `host_status` when an admin connection is configured."""
        return self.cloud.raw_server(server_id, conn=self.cloud.admin_conn)

    def compute_service(self, server_id: str) -> Any:
        """The nova-compute service of the server's host; None if not visible to us."""
        admin = self.cloud.admin_conn
        if admin is None:
            return None

        def attempt() -> Any:
            try:
                host = admin.compute.get_server(server_id).compute_host
                if not host:
                    return None
                found = list(admin.compute.services(host=host, binary="nova-compute"))
                return found[0] if found else None
            except os_exc.NotFoundException:
                return None
        return self.cloud.call(f"reading the compute service of server {server_id}", attempt)

    def silent_service(self, server_id: str, heartbeat: Heartbeat) -> Any:
        """The server's compute service if its heartbeat has been frozen for
        `fence_hook_after` (or Nova counts it down); None otherwise or if not visible."""
        service = self.compute_service(server_id)
        if service is None:
            return None
        if service.is_forced_down or (service.state or "").lower() == "down":
            return service
        if heartbeat.frozen_for(service.updated_at) >= self.cloud.options.fence_hook_after:
            return service
        return None

    def fence(self, service: Any, name: str) -> bool:
        """Run the fencing hook on the service's host; once it confirmed the host off,
        force the service down (unless Nova counts it down already)."""
        if not self.run_hook(service.host, name):
            return False
        if service.is_forced_down or (service.state or "").lower() == "down":
            report(f"Nova counts host {service.host} down already: not forcing it")
            return True
        report(f"the fencing hook confirmed host {service.host} off: forcing its "
               "nova-compute service down. After repairing the host an operator runs: "
               f"openstack compute service set --up {service.host} nova-compute")
        admin = self.cloud.admin_conn
        self.cloud.call(f"forcing the compute service of host {service.host} down",
                        lambda: admin.compute.update_service_forced_down(
                            service, host=service.host, binary="nova-compute", forced=True))
        return True

    def run_hook(self, host: str, name: str) -> bool:
        hook = self.cloud.options.fence_hook
        assert hook is not None
        report(f"the compute host of server {name} ({host}) has sent no heartbeat for "
               f"{self.cloud.options.fence_hook_after:.0f} s: running the fencing hook")
        try:
            done = subprocess.run([hook, host], stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, check=False,
                                  timeout=self.cloud.options.fence_hook_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("the fencing hook for host %s failed: %s", host, exc)
            return False
        if done.returncode != 0:
            log.warning("the fencing hook for host %s exited %s: %s", host, done.returncode,
                        (done.stderr or done.stdout).strip()[-500:])
            return False
        return True
