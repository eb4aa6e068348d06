"""Whether the guest has brought an address up: PostgreSQL answers on it.

A cloud's "attached" (Neutron's port ACTIVE, a link in a namespace) concerns its
switch, not the guest: the NIC agent in the guest still has to configure the address.
Both drivers' `attach_port` return only once this succeeds."""

from __future__ import annotations

import socket
import struct
import time

from broker.cloud.base import CloudError

POSTGRES_PORT = 5432
REACH_TIMEOUT = 60.0  # a hot-plugged NIC's add event, the agent, ARP on the path
RETRY_PAUSE = 0.02
# PostgreSQL's SSLRequest: a server answers one byte, "S" or "N", before any
# authentication. An accepted TCP connection alone proves little: a middlebox (a proxy
# on the default route, a stale NAT) can accept for an address nobody holds.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def answers_like_postgres(sock: socket.socket) -> bool:
    sock.sendall(SSL_REQUEST)
    return sock.recv(1) in (b"S", b"N")


def wait_reachable(address: str, *, port: int = POSTGRES_PORT,
                   timeout: float | None = None) -> None:
    """Until PostgreSQL at `address`:`port` answers an SSLRequest; CloudError after
    `timeout` (REACH_TIMEOUT by default)."""
    timeout = REACH_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((address, port),
                                          timeout=max(0.1, min(1.0, left))) as sock:
                if answers_like_postgres(sock):
                    return
                why = "something else than PostgreSQL answered"
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            raise CloudError(f"the guest did not bring up {address}: PostgreSQL there "
                             f"did not answer within {timeout:.0f} s ({why})")
        time.sleep(RETRY_PAUSE)
