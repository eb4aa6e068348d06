"""What a platform's request may do to an instance, decided once for every caller.

Provision, update, deprovision and switchover never do their long work here: each
either queues an Operation (a worker runs it), answers that nothing is to be done,
or raises a `Refused` saying why not. The API translates these to OSB answers; the
CLI's `instances switchover` goes through the same switchover preconditions.

Repeated requests: an identical provision, update or deprovision while its operation
runs answers with that operation (202, as the spec requires); a provision of an id
that was deprovisioned, or whose provisioning failed, is a conflict (ids are never
reused).

The platform knows nothing of the broker's own work (failover, rebuild, certificate
rotation...): a deprovision during it is accepted and queued behind it. The engine
lets a failover finish and pre-empts the kinds whose workflow says a deprovision may
(`Workflow.deprovision_preempts`); the platform's own operations still answer
ConcurrencyError, since the platform does not send a DELETE while one it started runs.
A backup is the exception: the platform's own (`{"backup": true}`) or the schedule's,
it may take hours, so binds and unbinds go on meanwhile and a deprovision stops it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker import crypto
from broker.catalog import Catalog, Plan, validate_parameters
from broker.crypto import Vault
from broker.operations import backup, queue, restore
from broker.operations.params import UpdateParams
from broker.operations.plan_changes import plan_change_refusal
from broker.operations.refusals import (
    AlreadyGone,
    AsyncRequired,
    Busy,
    Conflict,
    InvalidRequest,
    MaintenanceMismatch,
    NotAllowed,
    UnknownInstance,
)
from broker.operations.update import TRANSIENT_PARAMETERS
from broker.store.db import Store
from broker.store.models import (
    DEGRADED,
    DEPROVISIONED,
    DEPROVISIONING,
    FAILED,
    PROVISIONING,
    READY,
    Instance,
    Operation,
)

log = logging.getLogger(__name__)

# Operations the platform asks for; the monitor's own (failover, rebuild...) are
# not what a platform polls when it sends no `operation`.
PLATFORM_KINDS = ("provision", "update", "switchover", "deprovision", backup.KIND)
# Those that hold a bind, an unbind or a deprovision back. Not a backup: it may take
# hours, binds go on meanwhile and a deprovision stops it (deprovision.stop_backups).
BLOCKING_KINDS = tuple(kind for kind in PLATFORM_KINDS if kind != backup.KIND)
# Column size of the state store's ids (instances.id, bindings.id, guids).
MAX_ID_LENGTH = 128


@dataclass(frozen=True)
class Accepted:
    """A request the broker took: `operation_id` None when it is done already or changes
    nothing, else the operation to poll; `queued` when that operation is new."""

    operation_id: str | None = None
    queued: bool = False


@dataclass(frozen=True)
class NewInstance:
    """A provision request, its plan and parameters already known to be the catalog's."""

    id: str
    service_id: str
    plan: Plan
    organization_guid: str
    space_guid: str
    context: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    maintenance_version: str | None = None


def plausible_id(value: str | None, max_length: int = MAX_ID_LENGTH) -> bool:
    """Could this string be an id we stored? (Never query with NULs or huge strings.)"""
    return value is not None and 0 < len(value) <= max_length and value.isprintable()


def live_instance(session: Session, instance_id: str) -> Instance | None:
    """The instance unless unknown or deprovisioned."""
    if not plausible_id(instance_id):
        return None
    inst = session.get(Instance, instance_id)
    if inst is None or inst.state == DEPROVISIONED or inst.deleted_at is not None:
        return None
    return inst


def unfinished(session: Session, instance_id: str,
               kinds: tuple[str, ...] | None = None) -> list[Operation]:
    return queue.unfinished_for(session, instance_id, kinds=kinds)


def _latest(session: Session, instance_id: str, kind: str) -> Operation | None:
    query = (select(Operation)
             .where(Operation.instance_id == instance_id)
             .where(Operation.kind == kind)
             .order_by(Operation.created_at.desc())
             .limit(1))
    return session.scalars(query).first()


def busy(op: Operation) -> Busy:
    return Busy(f"another operation is in progress on this instance: {op.kind} "
                f"({op.description})")


def _check_version(plan: Plan, version: str | None, hint: str = "") -> None:
    if version is not None and version != plan.maintenance_version:
        raise MaintenanceMismatch(f"maintenance_info.version {version!r} does not match plan "
                                  f"{plan.name} ({plan.maintenance_version}){hint}")


# --- provision -----------------------------------------------------------------------
def provision(store: Store, vault: Vault, request: NewInstance,
              accepts_incomplete: bool) -> Accepted:
    """Queue the provisioning of a new instance, or answer a repeated request."""
    problem = validate_parameters(request.plan.provision_schema, request.parameters)
    if problem:
        raise InvalidRequest(problem)
    _check_version(request.plan, request.maintenance_version, ": refresh the catalog")
    try:
        return _provision(store, vault, request, accepts_incomplete)
    except IntegrityError:
        # Two identical PUTs raced: the other one inserted first; answer as a repeat.
        return _provision(store, vault, request, accepts_incomplete)


def _provision(store: Store, vault: Vault, request: NewInstance,
               accepts_incomplete: bool) -> Accepted:
    plan = request.plan
    with store.session() as s:
        inst = s.get(Instance, request.id)
        if inst is not None:
            return _provision_again(s, inst, request, accepts_incomplete)
        if not accepts_incomplete:
            raise AsyncRequired("provisioning")
        restore.check_request(s, service_id=request.service_id,
                              organization_guid=request.organization_guid,
                              parameters=request.parameters)
        s.add(Instance(
            id=request.id, service_id=request.service_id, plan_id=plan.id,
            organization_guid=request.organization_guid, space_guid=request.space_guid,
            context=request.context, parameters=request.parameters,
            maintenance_version=plan.maintenance_version, state=PROVISIONING,
            replication=plan.cloud.replication,
            admin_password_enc=vault.encrypt(crypto.new_password()),
            replication_password_enc=vault.encrypt(crypto.new_password()),
        ))
        s.flush()  # the instance row first: operations reference it
        op = queue.new_operation(request.id, "provision", description="queued: provisioning")
        s.add(op)
        op_id = op.id
    log.info("instance %s: provision queued (plan %s, operation %s)", request.id,
             plan.name, op_id)
    return Accepted(op_id, queued=True)


def _provision_again(s: Session, inst: Instance, request: NewInstance,
                     accepts_incomplete: bool) -> Accepted:
    if inst.state == DEPROVISIONED:
        raise Conflict(f"instance {inst.id} was deprovisioned; an instance id is never "
                       "reused: create the instance with a new id")
    identical = (inst.service_id == request.service_id and inst.plan_id == request.plan.id
                 and inst.organization_guid == request.organization_guid
                 and inst.space_guid == request.space_guid
                 and (inst.parameters or {}) == request.parameters)
    if not identical:
        raise Conflict(f"instance {inst.id} already exists with other attributes")
    if inst.state == DEPROVISIONING:
        raise Conflict(f"instance {inst.id} is being deprovisioned")
    op = _latest(s, inst.id, "provision")
    if op is not None and queue.is_unfinished(op.state):
        if not accepts_incomplete:
            raise AsyncRequired("provisioning")
        return Accepted(op.id)
    if inst.state in (PROVISIONING, FAILED):
        reason = inst.state_reason or (op.description if op else "unknown")
        raise Conflict(f"instance {inst.id} failed to provision ({reason}); "
                       "deprovision it and create a new one")
    return Accepted()


# --- update and switchover -------------------------------------------------------------
def _require_idle(s: Session, inst: Instance, doing: str) -> None:
    ops = unfinished(s, inst.id)
    if ops:
        raise busy(ops[0])
    if inst.state not in (READY, DEGRADED):
        raise NotAllowed(f"instance {inst.id} cannot {doing} while {inst.state}"
                         + (f": {inst.state_reason}" if inst.state_reason else ""))


def _require_standby(inst: Instance) -> None:
    if inst.replication == "none":
        raise NotAllowed(f"instance {inst.id} has no standby to switch over to: its plan "
                         "has a single node")
    if inst.standby() is None or inst.primary() is None:
        raise NotAllowed(f"instance {inst.id} has no standby to switch over to right now"
                         + (f" ({inst.state_reason})" if inst.state_reason else "")
                         + "; try again once it is rebuilt")


def queue_switchover(s: Session, inst: Instance) -> Operation:
    """The switchover's preconditions (the API's and the CLI's), then its operation."""
    _require_idle(s, inst, "switch over")
    _require_standby(inst)
    op = queue.new_operation(inst.id, "switchover", description="queued: switchover")
    s.add(op)
    return op


@dataclass(frozen=True)
class Change:
    """An update request: `plan_id` None keeps the plan."""

    instance_id: str
    service_id: str
    plan_id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    maintenance_version: str | None = None


def update(store: Store, catalog: Catalog, change: Change, accepts_incomplete: bool) -> Accepted:
    """Queue an update or a switchover; Accepted() when the request changes nothing."""
    with store.session() as s:
        inst = live_instance(s, change.instance_id)
        if inst is None:
            raise UnknownInstance(f"instance {change.instance_id} does not exist")
        if change.service_id != inst.service_id:
            raise InvalidRequest(f"service_id {change.service_id!r} is not the service of "
                                 f"instance {inst.id}")
        repeated = _same_update(s, inst, change)
        if repeated is not None:
            if not accepts_incomplete:
                raise AsyncRequired("an update")
            return Accepted(repeated.id)
        _require_idle(s, inst, "be updated")
        current = catalog.plan(inst.plan_id)
        if current is None:
            raise NotAllowed(f"the plan of instance {inst.id} is no longer in the catalog")
        target = catalog.plan(change.plan_id) if change.plan_id else current
        if target is None:  # the API's validation refuses unknown plans before this
            raise InvalidRequest(f"plan_id {change.plan_id!r} is not a plan of this broker's "
                                 "catalog")
        op = _update_operation(s, inst, current, target, change, accepts_incomplete)
        if op is None:
            return Accepted()
        s.add(op)
        op_id, kind = op.id, op.kind
    log.info("instance %s: %s queued (operation %s)", change.instance_id, kind, op_id)
    return Accepted(op_id, queued=True)


def _same_update(s: Session, inst: Instance, change: Change) -> Operation | None:
    """The unfinished update or switchover this very request queued before, if any (a
    platform re-sends a PATCH whose answer it did not get)."""
    ops = unfinished(s, inst.id, ("update", "switchover"))
    if not ops:
        return None
    op = ops[0]
    if op.kind == "switchover":
        return op if change.parameters == {"switchover": True} and (
            change.plan_id in (None, inst.plan_id)) else None
    queued = UpdateParams.load(op.params)
    wanted_version = change.maintenance_version or queued.maintenance_version
    plan_id = change.plan_id or inst.plan_id
    same = (queued.plan_id == plan_id and queued.parameters == change.parameters
            and queued.maintenance_version == wanted_version)
    return op if same else None


def _update_operation(s: Session, inst: Instance, current: Plan, target: Plan, change: Change,
                      accepts_incomplete: bool) -> Operation | None:
    """The operation an update needs, or None when it changes nothing."""
    plan_change = target.id != current.id
    parameters, version = change.parameters, change.maintenance_version
    problem = validate_parameters(target.update_schema, parameters)
    if problem:
        raise InvalidRequest(problem)
    _check_version(target, version)
    if parameters.get("switchover") is True:
        if plan_change:
            raise NotAllowed("a switchover cannot be combined with a plan change: "
                             "change the plan, then ask for the switchover")
        if set(parameters) != {"switchover"}:
            raise NotAllowed("a switchover must be requested alone "
                             "(parameters: {\"switchover\": true})")
        _require_standby(inst)
        if not accepts_incomplete:
            raise AsyncRequired("a switchover")
        return queue.new_operation(inst.id, "switchover", description="queued: switchover")
    if parameters.get("backup") is True:
        if plan_change or set(parameters) != {"backup"}:
            raise NotAllowed("a backup must be requested alone "
                             "(parameters: {\"backup\": true})")
        if not accepts_incomplete:
            raise AsyncRequired("a backup")
        return backup.new_backup(inst.id, "full", cause="requested by the platform")
    refusal = plan_change_refusal(current, target)
    if refusal:
        raise NotAllowed(refusal)
    changes = {k: v for k, v in parameters.items() if k not in TRANSIENT_PARAMETERS}
    new_version = (target.maintenance_version if plan_change or version is not None
                   else inst.maintenance_version)
    stored = inst.parameters or {}
    if not plan_change and {**stored, **changes} == stored \
            and new_version == inst.maintenance_version:
        return None
    if not accepts_incomplete:
        raise AsyncRequired("an update")
    return queue.new_operation(inst.id, "update", description="queued: update",
                               params=UpdateParams(plan_id=target.id, parameters=changes,
                                                   maintenance_version=new_version))


# --- deprovision -------------------------------------------------------------------------
def deprovision(store: Store, instance_id: str, accepts_incomplete: bool) -> Accepted:
    """Queue the deprovisioning, or answer with the one already running."""
    with store.session() as s:
        inst = live_instance(s, instance_id)
        if inst is None:
            raise AlreadyGone(f"instance {instance_id} does not exist (or was deprovisioned)")
        ops = unfinished(s, instance_id)
        running = next((op for op in ops if op.kind == "deprovision"), None)
        if running is not None:
            if not accepts_incomplete:
                raise AsyncRequired("deprovisioning")
            return Accepted(running.id)
        platform = [op for op in ops if op.kind in BLOCKING_KINDS]
        if platform:
            raise busy(platform[0])
        if not accepts_incomplete:
            raise AsyncRequired("deprovisioning")
        backups = [op for op in ops if op.kind in queue.BACKGROUND_KINDS]
        others = [op for op in ops if op.kind not in queue.BACKGROUND_KINDS]
        behind = (f" (after the {others[0].kind} in progress)" if others
                  else " (stopping the backup in progress)" if backups else "")
        op = queue.new_operation(instance_id, "deprovision",
                                 description=f"queued: deprovisioning{behind}")
        s.add(op)
        op_id = op.id
    log.info("instance %s: deprovision queued%s (operation %s)", instance_id, behind, op_id)
    return Accepted(op_id, queued=True)


# --- bindings: what needs no node is refused before one is reached ------------------------
def _require_plan(inst: Instance, plan_id: str) -> None:
    if plan_id != inst.plan_id:
        raise InvalidRequest(f"plan_id {plan_id!r} is not the plan of instance {inst.id}")


def check_bindable(store: Store, instance_id: str, plan_id: str) -> None:
    with store.session() as s:
        inst = live_instance(s, instance_id)
        if inst is None:
            raise UnknownInstance(f"instance {instance_id} does not exist")
        _require_plan(inst, plan_id)
        ops = unfinished(s, instance_id, BLOCKING_KINDS)
        if ops:
            raise busy(ops[0])
        if inst.state == FAILED:
            raise NotAllowed(f"instance {instance_id} failed to provision: "
                             f"{inst.state_reason or 'see last_operation'}")
        if inst.state not in (READY, DEGRADED):
            raise Busy(f"instance {instance_id} is {inst.state}")


def check_unbindable(store: Store, instance_id: str, binding_id: str, plan_id: str) -> None:
    with store.session() as s:
        inst = live_instance(s, instance_id)
        if inst is None or not plausible_id(binding_id):
            raise AlreadyGone(f"binding {binding_id} does not exist")
        _require_plan(inst, plan_id)
        ops = unfinished(s, instance_id, BLOCKING_KINDS)
        if ops:
            raise busy(ops[0])
