"""Fencing on OpenStack: make sure an old primary can no longer serve, then free its port.

The ladder (docs/openstack.md, "Failover on OpenStack", says the same to operators):

1. With an admin connection, Nova's `host_status` says whether it counts the
   server's compute host down: then go to 3. (Nova's default policy shows it to
   admins only; member-only credentials start at 2 whatever the host's state.)
2. Ask Nova to stop the server and wait up to `stop_timeout` for SHUTOFF. A crashed
   guest on a live hypervisor (kernel panic) ends here within seconds: the server
   is fenced, and its port detaches normally. A dead hypervisor accepts the stop
   and never carries it out.
3. No SHUTOFF (the hypervisor does not answer), ERROR, or a host counted down: fence
   by deleting the server. On a live host Nova deletes it at once. On a dead host
   the delete is ignored until Nova counts the compute service down (its
   `service_down_time`, 60 s by default); the broker repeats the delete until then,
   and Nova's "local delete" then unbinds the ports and the volume attachments.
   With an operator's fencing hook (BROKER_OPENSTACK_FENCE_HOOK, admin connection),
   once the host's heartbeat has been frozen for `fence_hook_after` the hook powers
   the host off; only after it confirmed (exit 0) is the compute service forced
   down, so Nova local-deletes at once instead of after `service_down_time`.
   A SOFT_DELETED server (deferred delete) is force-deleted.
4. Nothing of that within `host_down_timeout`: FenceError. The failover stops there;
   the service port stays where it is; nothing is promoted.

`detach_port` returns only once Neutron shows the port unbound; it never reports a
port free while Neutron still binds it to the old server.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from openstack import exceptions as os_exc

from broker.cloud.base import CloudError, FenceError, TransientCloudError
from broker.cloud.openstack.calls import WaitTimeout, log, report
from broker.cloud.openstack.hosts import (
    ComputeHosts,
    Heartbeat,
    host_counted_down,
    is_soft_deleted,
    is_stopped,
    powered_off,
)
from broker.cloud.openstack.volume_release import VolumeRelease

if TYPE_CHECKING:
    from broker.cloud.openstack.driver import OpenStackCloud
    from broker.cloud.openstack.options import OpenStackOptions


class TransientFenceError(FenceError, TransientCloudError):
    """Fencing could not be confirmed because OpenStack itself did not answer."""


class _CannotStop(Exception):
    """Nova refuses a stop in this state (paused, rescued, ...): delete instead."""


class Fencer:
    def __init__(self, cloud: OpenStackCloud) -> None:
        self.cloud = cloud
        self.hosts = ComputeHosts(cloud)
        self.volumes = VolumeRelease(cloud, self.hosts)

    @property
    def options(self) -> OpenStackOptions:
        return self.cloud.options

    # --- stop ---------------------------------------------------------------------------
    def stop_server(self, server_id: str) -> None:
        try:
            self._stop(server_id)
        except FenceError:
            raise
        except TransientCloudError as exc:
            raise TransientFenceError(f"could not fence server {server_id}: {exc}") from None
        except CloudError as exc:
            raise FenceError(f"could not fence server {server_id}: {exc}") from None

    def _stop(self, server_id: str) -> None:
        server = self.hosts.read(server_id)
        if server is None:
            report(f"server {server_id} is gone: nothing runs there any more")
            return
        name = server.name or server_id
        heartbeat = Heartbeat() if self.options.fence_hook else None
        if host_counted_down(server):
            reason = "Nova counts its compute host down"
        elif is_stopped(server):
            report(f"server {name} is stopped (SHUTOFF): fenced")
            return
        elif is_soft_deleted(server):
            reason = "it is soft-deleted (deferred delete)"
        elif (server.status or "").upper() == "ERROR":
            reason = "it is in ERROR"
        else:
            outcome = self._stop_and_wait(server_id, name, heartbeat)
            if outcome in ("stopped", "gone"):
                report(f"server {name} is {outcome}: fenced")
                return
            reason = {
                "host-down": "Nova counts its compute host down",
                "error": "it went into ERROR",
                "cannot-stop": "Nova cannot stop it in its current state",
                "host-silent": "its compute host sends no heartbeat",
            }.get(outcome, f"it did not power off within {self.options.stop_timeout:.0f} s")
        if not self._delete_until_gone(server_id, name, self.options.host_down_timeout,
                                       heartbeat, why=reason):
            host_hint = ""
            if not self.options.fence_hook:
                host_hint = (" If that host is really off, an operator can run `openstack "
                             "compute service set --down <host> nova-compute` (or configure "
                             "a fencing hook, BROKER_OPENSTACK_FENCE_HOOK).")
            raise FenceError(
                f"could not fence server {name}: {reason}, and Nova has not deleted it "
                f"within {self.options.host_down_timeout:.0f} s (its compute host is not "
                "counted down). The old primary may still run: no promotion, the service "
                f"address stays where it is.{host_hint}")

    def _stop_and_wait(self, server_id: str, name: str, heartbeat: Heartbeat | None) -> str:
        compute = self.cloud.conn.compute

        def attempt() -> None:
            try:
                compute.stop_server(server_id)
            except os_exc.NotFoundException:
                return
            except os_exc.ConflictException:
                current = self.hosts.read(server_id)
                if current is None or is_stopped(current) or host_counted_down(current) \
                        or current.task_state == "powering-off":
                    return
                if current.task_state:
                    raise  # another task runs: retried with backoff
                raise _CannotStop() from None

        try:
            self.cloud.call(f"stopping server {name}", attempt)
        except _CannotStop:
            return "cannot-stop"
        except TransientCloudError as exc:
            log.warning("stopping server %s: %s", name, exc)
            return "no-stop"

        def probe() -> str | None:
            current = self.hosts.read(server_id)
            if current is None:
                return "gone"
            if host_counted_down(current):
                return "host-down"
            if is_stopped(current):
                return "stopped"
            if (current.status or "").upper() == "ERROR":
                return "error"
            if heartbeat is not None \
                    and self.hosts.silent_service(server_id, heartbeat) is not None:
                return "host-silent"
            return None

        try:
            return self.cloud.wait(f"server {name} to power off (SHUTOFF)", probe,
                                   self.options.stop_timeout)
        except WaitTimeout:
            return "timeout"

    # --- delete ---------------------------------------------------------------------------
    def delete_server(self, server_id: str, *, timeout: float, fencing: bool) -> None:
        server = self.cloud.raw_server(server_id)
        if server is None:
            return
        name = server.name or server_id
        if not self._delete_until_gone(server_id, name, timeout, None, why=None):
            raise TransientCloudError(
                f"server {name} is still being deleted after {timeout:.0f} s: its compute "
                "host does not answer; Nova finishes once it counts the host down")

    def _delete_until_gone(self, server_id: str, name: str, timeout: float,
                           heartbeat: Heartbeat | None, *, why: str | None) -> bool:
        if why is not None:
            report(f"fencing server {name} by deleting it ({why}); on a dead host Nova does "
                   "this only once it counts the compute service down; waiting up to "
                   f"{timeout:.0f} s")
        else:
            report(f"deleting server {name}")
        deadline = time.monotonic() + timeout
        resend_every = max(2.0 * self.options.poll_max_interval, 1.0)
        last_sent: float | None = None
        delay = self.options.poll_interval
        hook_ran = False
        said_down = False
        while True:
            server = self.hosts.read(server_id)
            if server is None:
                report(f"server {name} is deleted")
                return True
            now = time.monotonic()
            down = host_counted_down(server)
            if down and not said_down:
                said_down = True
                last_sent = None  # a delete now is Nova's local delete
                report(f"Nova counts the compute host of server {name} down: deleting it "
                       "without the host (ports and volume are released)")
            if heartbeat is not None and not hook_ran and not down:
                service = self.hosts.silent_service(server_id, heartbeat)
                if service is not None:
                    hook_ran = True  # once: a hook that did not confirm is not retried
                    if self.hosts.fence(service, name):
                        last_sent = None
            if last_sent is None or now - last_sent >= resend_every:
                # Repeated on purpose: Nova ignores a second delete while the first is
                # cast to a host that is still counted up, and local-deletes once it's not.
                self._send_delete(server, name)
                last_sent = time.monotonic()
                continue
            if now >= deadline:
                return False
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(self.options.poll_max_interval, delay * 1.5)

    def _send_delete(self, server: Any, name: str) -> None:
        compute = self.cloud.conn.compute
        if is_soft_deleted(server):
            # Deferred delete (reclaim_instance_interval): another DELETE changes nothing
            # and the server keeps its ports and volume; forceDelete ends it.
            report(f"server {name} is soft-deleted: force-deleting it")

            def force() -> None:
                with contextlib.suppress(os_exc.NotFoundException):
                    compute.get_server(server.id).force_delete(compute)
            self.cloud.call(f"force-deleting server {name}", force)
            return
        self.cloud.call(f"deleting server {name}",
                        lambda: compute.delete_server(server, ignore_missing=True))

    # --- the service port -------------------------------------------------------------------
    def detach_port(self, port_id: str, server_id: str) -> None:
        cloud = self.cloud
        port = cloud.get_port(port_id)
        if port is None or not port.device_id:
            return
        name = port.name or port_id
        if port.device_id != server_id:
            raise CloudError(f"port {name} is bound to server {port.device_id}, "
                             f"not to {server_id}")

        def unbound() -> bool | None:
            current = cloud.get_port(port_id)
            if current is None or current.device_id != server_id:
                return True
            return None

        def shows_unbound(where: str) -> bool:
            try:
                cloud.wait(f"Neutron to show port {name} unbound{where}", unbound,
                           self.options.detach_timeout)
            except WaitTimeout:
                return False
            report(f"port {name} is unbound")
            return True

        server = self.hosts.read(server_id)
        if server is not None and host_counted_down(server) and not powered_off(server):
            raise FenceError(
                f"port {name} is bound to server {server.name or server_id}, whose compute "
                "host Nova counts down, and the server was never confirmed stopped: fence "
                "it first (stop_server deletes it, which releases the port)")
        if server is not None and not host_counted_down(server):
            self._request_detach(port_id, name, server_id)
            if shows_unbound(f" from server {server_id}"):
                return
            server = self.hosts.read(server_id)
        if server is None:
            if shows_unbound(""):  # Nova's delete unbinds it; give Neutron a moment
                return
        # Powered off, yet its host never detaches (it died after the stop, or was forced
        # down): deleting the stopped server is safe, and the only thing that frees the port.
        elif powered_off(server) and self._delete_until_gone(
                server_id, server.name or server_id, self.options.host_down_timeout, None,
                why="it is stopped but its host does not detach") and shows_unbound(""):
            return
        raise FenceError(
            f"port {name} is still bound to server {server_id}: its hypervisor does not "
            "carry out the detach. The service address stays where it is; fencing the "
            "server (stop_server, which deletes it once Nova counts its host down) "
            "releases the port")

    def _request_detach(self, port_id: str, name: str, server_id: str) -> None:
        cloud = self.cloud

        def attempt() -> None:
            try:
                cloud.conn.compute.delete_server_interface(port_id, server=server_id,
                                                           ignore_missing=False)
            except os_exc.NotFoundException:
                return  # Nova no longer lists it; Neutron follows
            except os_exc.ConflictException:
                current = self.hosts.read(server_id)
                if current is None or host_counted_down(current):
                    return  # the wait that follows decides
                raise  # a task runs on the server: retried

        cloud.call(f"detaching port {name} from server {server_id}", attempt)
