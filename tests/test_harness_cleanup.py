"""The failover harness leaves nothing behind, even when its state store cannot be
reached (a benchmark or test started with a wrong state URL)."""

from __future__ import annotations

import os
import tempfile

import pytest
import sqlalchemy.exc

from harness.env import failover_env


def _harness_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("pgha-fo-")}


def test_an_unreachable_state_store_leaves_no_directory() -> None:
    before = _harness_dirs()
    # Port 1 on loopback: nothing listens there, the connect is refused at once.
    with pytest.raises(sqlalchemy.exc.OperationalError), \
            failover_env("postgresql://nobody:none@127.0.0.1:1/none"):
        pass
    assert _harness_dirs() - before == set()
