"""Whether the guest has brought an address up: PostgreSQL accepts TCP on it.

A cloud's "attached" (Neutron's port ACTIVE, a link in a namespace) concerns its
switch, not the guest: the NIC agent in the guest still has to configure the address.
Both drivers' `attach_port` return only once this succeeds."""

from __future__ import annotations

import socket
import time

from broker.cloud.base import CloudError

POSTGRES_PORT = 5432
REACH_TIMEOUT = 60.0  # a hot-plugged NIC's add event, the agent, ARP on the path
RETRY_PAUSE = 0.02


def wait_reachable(address: str, *, port: int = POSTGRES_PORT,
                   timeout: float | None = None) -> None:
    """Until a TCP connection to `address`:`port` succeeds; CloudError after `timeout`
    (REACH_TIMEOUT by default)."""
    timeout = REACH_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(1.0, left))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise CloudError(f"the guest did not bring up {address}: PostgreSQL there "
                                 f"did not accept a connection within {timeout:.0f} s "
                                 f"({exc.strerror or type(exc).__name__})") from None
        time.sleep(RETRY_PAUSE)
