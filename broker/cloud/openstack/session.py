"""What every part of the OpenStack driver shares: connections, options, retried calls
and bounded waits (calls.py), and reading a server (fencing needs it too)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from openstack import exceptions as os_exc

from broker.catalog import Catalog, NetworkSettings
from broker.cloud.base import Cloud
from broker.cloud.openstack import calls
from broker.cloud.openstack.calls import RetryPolicy, wait_for
from broker.cloud.openstack.options import OpenStackOptions

if TYPE_CHECKING:
    from broker.cloud.openstack.fencing import Fencer
    from broker.cloud.openstack.networks import PlanNetwork

log = logging.getLogger("broker.cloud.openstack")

T = TypeVar("T")


class Session(Cloud):
    """The state the driver's parts share; OpenStackCloud (driver.py) sets it up."""

    conn: Any
    admin_conn: Any                       # None: admin-only steps use `conn`
    catalog: Catalog
    options: OpenStackOptions
    admin_cidr: str | None
    app_cidr: str | None                  # for plans that name no app_cidrs
    policy: RetryPolicy
    fencer: Fencer
    lock: threading.Lock
    network_cache: dict[NetworkSettings, PlanNetwork]
    flavor_ids: dict[str, str]
    image_ids: dict[str, str]

    def close(self) -> None:
        for conn in (self.conn, self.admin_conn):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing is best effort
                    log.debug("closing an OpenStack connection failed", exc_info=False)

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

    def get_or_none(self, what: str, fn: Callable[[], T]) -> T | None:
        def attempt() -> T | None:
            try:
                return fn()
            except os_exc.NotFoundException:
                return None
        return self.call(what, attempt)

    def delete_quietly(self, what: str, fn: Callable[[], Any]) -> None:
        def attempt() -> None:
            with contextlib.suppress(os_exc.NotFoundException):
                fn()
        self.call(what, attempt)

    def raw_server(self, server_id: str, *, conn: Any = None) -> Any:
        compute = (conn or self.conn).compute
        server = self.get_or_none(f"reading server {server_id}",
                                   lambda: compute.get_server(server_id))
        if server is not None and (server.status or "").upper() == "DELETED":
            return None
        return server

