"""Import this module to register every workflow with the engine."""

from __future__ import annotations

import importlib
import importlib.util

from broker.operations import certs, deprovision, provision, update

# failover/switchover/rebuild/resurrect live in their own module (issue 3); register
# them when it is there.
if importlib.util.find_spec("broker.operations.failover") is not None:
    importlib.import_module("broker.operations.failover")

__all__ = ["certs", "deprovision", "provision", "update"]
