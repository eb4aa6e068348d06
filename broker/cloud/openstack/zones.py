"""Which availability zones can take a new server: Nova's zone list, read briefly cached.

Nova's default policies let any project member read the plain list
(GET /os-availability-zone); it marks a zone unavailable only when every service in
it is disabled (an operator took the zone out), whatever the heartbeats say: a zone
whose hypervisors all died without being disabled is still "available" there. Only
the detailed list (/detail, admin-only) carries each host's nova-compute service,
`available` (its heartbeat counts up and it is not forced down) and `active`
(enabled). So with the admin connection a zone can take a server while one compute
service there is both, which is what Nova's scheduler (ComputeFilter) asks; member-only,
a dead zone shows as a create that fails with "No valid host" (the rebuild then
waits for the zone, see servers.py).

The answer is cached ZONE_CACHE_SECONDS: rebuilds and every engine's return-home
check ask often. A failed read is logged and tried again after ERROR_RETRY_SECONDS;
meanwhile the last answer stands for up to STALE_LIMIT_SECONDS, then "can't tell"
(available): an API hiccup never makes a zone look dead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.cloud.base import CloudError
from broker.cloud.openstack import calls
from broker.cloud.openstack.calls import RetryPolicy

if TYPE_CHECKING:
    from broker.cloud.openstack.session import Session

log = logging.getLogger("broker.cloud.openstack")

ZONE_CACHE_SECONDS = 5.0
ERROR_RETRY_SECONDS = 5.0
STALE_LIMIT_SECONDS = 60.0
ONE_ATTEMPT = RetryPolicy(budget=0.0)  # a stale answer beats a worker stuck retrying


def zone_is_up(zone: Any, *, detailed: bool) -> bool:
    """One entry of Nova's list: can its zone take a server?"""
    if not (zone.state or {}).get("available"):
        return False
    if not detailed:
        return True
    return any(service.get("available") and service.get("active")
               for services in (zone.hosts or {}).values()
               for binary, service in (services or {}).items() if binary == "nova-compute")


class ZoneStates:
    """The zones' availability as one driver last read it."""

    def __init__(self, cloud: Session, clock: Callable[[], float] = time.monotonic) -> None:
        self.cloud = cloud
        self.clock = clock
        self.lock = threading.Lock()
        self.known: dict[str, bool] | None = None
        self.read_at = 0.0
        self.failed_at: float | None = None
        self.detailed = cloud.admin_conn is not None

    def available(self, zone: str) -> bool:
        with self.lock:
            now = self.clock()
            fresh = self.known is not None and now - self.read_at < ZONE_CACHE_SECONDS
            retry_due = self.failed_at is None or now - self.failed_at >= ERROR_RETRY_SECONDS
            if not fresh and retry_due:
                self.refresh(now)
            if self.known is None or now - self.read_at > STALE_LIMIT_SECONDS:
                return True  # can't tell: a create in a dead zone fails on its own
            return self.known.get(zone, False)  # not listed: no service there at all

    def refresh(self, now: float) -> None:
        try:
            self.known = self.read()
        except CloudError as exc:
            self.failed_at = now
            age = f"the answer read {now - self.read_at:.0f} s ago stands" \
                if self.known is not None and now - self.read_at <= STALE_LIMIT_SECONDS \
                else "every zone counts as available until a read succeeds"
            log.warning("cannot tell which availability zones are up (%s): %s; trying "
                        "again in %.0f s", exc, age, ERROR_RETRY_SECONDS)
            return
        self.read_at = now
        self.failed_at = None

    def read(self) -> dict[str, bool]:
        if self.detailed:
            try:
                return self.listing(self.cloud.admin_conn, detailed=True)
            except CloudError as exc:
                if "not allowed" not in str(exc):
                    raise
                log.warning("the admin connection may not read Nova's detailed zone list "
                            "(%s): using the plain list, which cannot tell a zone whose "
                            "hosts died", exc)
                self.detailed = False
        return self.listing(self.cloud.conn, detailed=False)

    def listing(self, conn: Any, *, detailed: bool) -> dict[str, bool]:
        found = calls.call("listing availability zones",
                           lambda: list(conn.compute.availability_zones(details=detailed)),
                           ONE_ATTEMPT)
        return {str(z.name): zone_is_up(z, detailed=detailed) for z in found}
