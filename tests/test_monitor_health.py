"""The health probe against a real PostgreSQL server: what it reads from a live
primary, and how it tells a dead, a hanging and an alive-but-refusing server apart."""

from __future__ import annotations

import socket

from broker.pg import probe
from harness.machine import free_port
from tests.support.pg import StateServer


def test_live_primary(pg_state_server: StateServer) -> None:
    seen = probe.probe("127.0.0.1", pg_state_server.password, port=pg_state_server.port,
                        timeout=3.0)
    assert seen.ok and seen.error is None
    assert seen.in_recovery is False
    assert seen.lsn is not None and seen.lsn > 0
    assert seen.replicas == ()


def test_refused_is_down() -> None:
    seen = probe.probe("127.0.0.1", "x", port=free_port(), timeout=1.0)
    assert (seen.outcome, seen.error) == ("down", "connection refused")


def test_a_server_that_never_answers_costs_the_deadline_only() -> None:
    # The kernel completes the TCP handshake (listen backlog) but nothing ever answers:
    # what a frozen PostgreSQL looks like.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        seen = probe.probe("127.0.0.1", "x", port=port, timeout=0.3)
    assert (seen.outcome, seen.error) == ("down", "no answer within 0.3 s")


def test_wrong_password_means_alive(pg_state_server: StateServer) -> None:
    seen = probe.probe("127.0.0.1", "wrong", port=pg_state_server.port, timeout=3.0)
    assert seen.outcome == "answering"
    assert "wrong" not in (seen.error or "")
