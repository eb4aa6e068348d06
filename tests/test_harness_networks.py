"""Tests on two pytest-xdist workers never choose the same private /24: each cloud makes
its bridge only when it first needs it, so `ip addr` alone cannot tell a worker what the
other has just chosen (CI once failed on exactly that)."""

from __future__ import annotations

import pytest

from harness import machine


def _chosen(monkeypatch: pytest.MonkeyPatch, worker: str, times: int) -> set[str]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    return {str(machine.free_test_network()) for _ in range(times)}


def test_two_workers_choose_from_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    first = _chosen(monkeypatch, "gw0", 60)
    second = _chosen(monkeypatch, "gw1", 60)
    assert first and second and not first & second


def test_one_worker_does_not_hand_out_a_network_twice_in_a_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # None of them has a bridge yet: only the worker's own memory keeps them apart.
    assert len(_chosen(monkeypatch, "gw0", 20)) == 20
