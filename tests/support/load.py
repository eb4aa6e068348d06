"""The `ha_under_load` fixture: an ha-sync instance in its own failover environment,
an app writing to it through the service address and the worker's engine and monitor
running (`harness.scenarios.under_write_load`; parametrize it indirectly with another
plan name). Teardown stops the monitor, then the writer, then checks for leftovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.env import FailoverEnv, failover_env
from harness.scenarios import UnderLoad, under_write_load


@pytest.fixture
def ha_under_load(request: pytest.FixtureRequest) -> Iterator[UnderLoad[FailoverEnv]]:
    plan: str = getattr(request, "param", "ha-sync")
    with failover_env() as env, under_write_load(env, plan) as load:
        yield load
