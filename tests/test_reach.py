"""`attach_port` trusts an address once PostgreSQL answers there, not once something
accepts TCP: a proxy on the default route or a stale NAT entry accepts for an address
nobody holds, and the failover would then tell apps to come while nothing serves."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from broker.cloud.base import CloudError
from broker.cloud.reach import wait_reachable
from tests.support.pg import StateServer


@pytest.fixture
def http_listener() -> Iterator[int]:
    """A loopback server that accepts every connection and answers like HTTP."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_listener_that_is_not_postgres_does_not_count(http_listener: int) -> None:
    with pytest.raises(CloudError, match="something else than PostgreSQL answered"):
        wait_reachable("127.0.0.1", port=http_listener, timeout=0.5)


def test_nothing_listening_fails_with_the_address_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:  # a port nobody listens on after
        port = held.getsockname()[1]
    with pytest.raises(CloudError, match=r"did not bring up 127\.0\.0\.1: .* within 0 s"):
        wait_reachable("127.0.0.1", port=port, timeout=0.3)


def test_postgres_answers(pg_state_server: StateServer) -> None:
    wait_reachable("127.0.0.1", port=pg_state_server.port, timeout=5)
