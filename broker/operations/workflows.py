"""Every workflow of the broker, registered with the engine by `install()`."""

from __future__ import annotations

from broker.operations import (
    backup,
    certs,
    deprovision,
    failover,
    provision,
    rebuild,
    resurrect,
    switchover,
    update,
)
from broker.operations.engine import Workflow, register, registered

ALL = (provision.WORKFLOW, update.WORKFLOW, deprovision.WORKFLOW, certs.WORKFLOW,
       failover.WORKFLOW, switchover.WORKFLOW, switchover.HOME_WORKFLOW, rebuild.WORKFLOW,
       resurrect.WORKFLOW, backup.WORKFLOW, backup.SCHEDULED_WORKFLOW)


def install() -> dict[str, Workflow]:
    """Register every workflow (again: harmless); returns kind → workflow."""
    for workflow in ALL:
        register(workflow)
    return registered()
