"""The `local_cloud` fixture: a LocalCloud on its own bridge and private /24 for one
test, torn down and checked for leftovers (`harness.machine.make_local_cloud`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.cloud.local import LocalCloud
from harness.machine import make_local_cloud


@pytest.fixture
def local_cloud() -> Iterator[LocalCloud]:
    with make_local_cloud() as cloud:
        yield cloud
