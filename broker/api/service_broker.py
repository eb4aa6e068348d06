"""The OSB verbs, translated to the state store: rows and queued operations.

Long work (provision, update, switchover, deprovision) is never done here: the
API inserts an Operation row and the worker runs it. Bindings are synchronous
and delegated to `broker.operations.bindings`.

Status codes the spec leaves open, chosen here:
- PATCH or bind on an instance the broker does not know (or deprovisioned): 422
  (the spec document lists no 404 for these).
- last_operation with an `operation` of another instance, or unknown: 400.
- A provision PUT for an id that was deprovisioned, or whose provisioning failed:
  409 with the reason (ids are never reused).
- Binding last_operation (bindings are synchronous): 200 succeeded for a binding
  that exists, else 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import g
from openbrokerapi.catalog import ServicePlan
from openbrokerapi.service_broker import (
    BindDetails,
    Binding,
    BindState,
    DeprovisionDetails,
    DeprovisionServiceSpec,
    GetBindingSpec,
    GetInstanceDetailsSpec,
    LastOperation,
    OperationState,
    ProvisionDetails,
    ProvisionedServiceSpec,
    ProvisionState,
    Service,
    ServiceBroker,
    UnbindDetails,
    UnbindSpec,
    UpdateDetails,
    UpdateServiceSpec,
)
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker import crypto
from broker.api.errors import (
    MAINTENANCE_INFO_CONFLICT,
    ApiError,
    async_required,
    bad_request,
    concurrency_error,
)
from broker.api.fastquery import CompiledSelect
from broker.api.plans import plan_change_refusal
from broker.api.validation import current_body, plausible_id, requested_maintenance_version
from broker.catalog import Plan, validate_parameters
from broker.operations import bindings, queue
from broker.operations.params import UpdateParams
from broker.runtime import Runtime
from broker.store.models import (
    BINDING_CREATED,
    DEGRADED,
    DEPROVISIONED,
    DEPROVISIONING,
    FAILED,
    OP_FAILED,
    PROVISIONING,
    READY,
    SUCCEEDED,
    UPDATING,
    Instance,
    Operation,
)
from broker.store.models import (
    Binding as BindingRow,
)

log = logging.getLogger(__name__)

# Operations the platform asked for; the monitor's own (failover, rebuild...) are
# not what a platform polls when it sends no `operation`.
PLATFORM_KINDS = ("provision", "update", "switchover", "deprovision")
# Seconds a platform should wait before polling an unfinished operation again.
RETRY_AFTER_SECONDS = 2
# Operation ids are uuid4 strings (operations.id is 64 characters).
MAX_OPERATION_ID = 64

_STATES = {SUCCEEDED: OperationState.SUCCEEDED, OP_FAILED: OperationState.FAILED}

_OPERATION_BY_ID = (select(Operation.instance_id, Operation.kind, Operation.state,
                           Operation.description)
                    .where(Operation.id == bindparam("op_id")))
_LATEST_PLATFORM_OPERATION = (select(Operation.instance_id, Operation.kind, Operation.state,
                                     Operation.description)
                              .where(Operation.instance_id == bindparam("instance_id"))
                              .where(Operation.kind.in_(PLATFORM_KINDS))
                              .order_by(Operation.created_at.desc())
                              .limit(1))
_INSTANCE_EXISTS = select(Instance.id).where(Instance.id == bindparam("instance_id"))
_INSTANCE_STATE = select(Instance.state).where(Instance.id == bindparam("instance_id"))


def _latest(session: Session, instance_id: str, kinds: tuple[str, ...]) -> Operation | None:
    query = (select(Operation)
             .where(Operation.instance_id == instance_id)
             .where(Operation.kind.in_(kinds))
             .order_by(Operation.created_at.desc())
             .limit(1))
    return session.scalars(query).first()


def _busy(op: Operation) -> ApiError:
    return concurrency_error(f"another operation is in progress on this instance: {op.kind} "
                             f"({op.description})")


def _live_instance(session: Session, instance_id: str) -> Instance | None:
    """The instance unless unknown or deprovisioned."""
    if not plausible_id(instance_id):
        return None
    inst = session.get(Instance, instance_id)
    if inst is None or inst.state == DEPROVISIONED:
        return None
    return inst


class PgHaServiceBroker(ServiceBroker):  # type: ignore[misc]
    """openbrokerapi's ServiceBroker over the broker's runtime (catalog, store, vault)."""

    def __init__(self, runtime: Runtime, on_enqueue: Callable[[], None] | None = None) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.plans = runtime.catalog
        self._on_enqueue = on_enqueue
        self._operation_by_id = CompiledSelect(runtime.store.engine, _OPERATION_BY_ID)
        document = runtime.catalog.osb()
        self._services = [
            Service(**{**svc, "plans": [ServicePlan(**plan) for plan in svc["plans"]]})
            for svc in document["services"]
        ]

    # --- helpers ---------------------------------------------------------------
    def _enqueued(self) -> None:
        if self._on_enqueue is not None:
            try:
                self._on_enqueue()
            except Exception:  # the worker also polls: a failed wake-up only delays it
                log.exception("could not wake the operation worker")

    def _plan(self, plan_id: str) -> Plan:
        plan = self.plans.plan(plan_id)
        if plan is None:  # validation rejects unknown plans before this
            raise bad_request(f"plan_id {plan_id!r} is not a plan of this broker's catalog")
        return plan

    # --- catalog ---------------------------------------------------------------
    def catalog(self) -> list[Service]:
        return self._services

    # --- provision ---------------------------------------------------------------
    def provision(self, instance_id: str, details: ProvisionDetails, async_allowed: bool,
                  **kwargs: Any) -> ProvisionedServiceSpec:
        plan = self._plan(details.plan_id)
        parameters = details.parameters or {}
        problem = validate_parameters(plan.provision_schema, parameters)
        if problem:
            raise bad_request(problem)
        version = requested_maintenance_version(current_body())
        if version is not None and version != plan.maintenance_version:
            raise ApiError(422, f"maintenance_info.version {version!r} does not match plan "
                           f"{plan.name} ({plan.maintenance_version}): refresh the catalog",
                           MAINTENANCE_INFO_CONFLICT)
        try:
            spec = self._provision(instance_id, details, plan, parameters, async_allowed)
        except IntegrityError:
            # Two identical PUTs raced: the other one inserted first; answer as a repeat.
            spec = self._provision(instance_id, details, plan, parameters, async_allowed)
        if spec.state == ProvisionState.IS_ASYNC:
            self._enqueued()
        return spec

    def _provision(self, instance_id: str, details: ProvisionDetails, plan: Plan,
                   parameters: dict[str, Any], async_allowed: bool) -> ProvisionedServiceSpec:
        vault = self.runtime.vault
        with self.store.session() as s:
            inst = s.get(Instance, instance_id)
            if inst is not None:
                return self._provision_again(s, inst, details, parameters, async_allowed)
            if not async_allowed:
                raise async_required("provisioning")
            inst = Instance(
                id=instance_id, service_id=details.service_id, plan_id=plan.id,
                organization_guid=details.organization_guid, space_guid=details.space_guid,
                context=details.context or {}, parameters=parameters,
                maintenance_version=plan.maintenance_version, state=PROVISIONING,
                replication=plan.cloud.replication,
                admin_password_enc=vault.encrypt(crypto.new_password()),
                replication_password_enc=vault.encrypt(crypto.new_password()),
            )
            s.add(inst)
            s.flush()  # the instance row first: operations reference it
            op = queue.new_operation(instance_id, "provision", description="queued: provisioning")
            s.add(op)
            op_id = op.id
        log.info("instance %s: provision queued (plan %s, operation %s)", instance_id,
                 plan.name, op_id)
        return ProvisionedServiceSpec(ProvisionState.IS_ASYNC, operation=op_id)

    def _provision_again(self, s: Session, inst: Instance, details: ProvisionDetails,
                         parameters: dict[str, Any],
                         async_allowed: bool) -> ProvisionedServiceSpec:
        if inst.state == DEPROVISIONED:
            raise ApiError(409, f"instance {inst.id} was deprovisioned; an instance id is "
                           "never reused: create the instance with a new id")
        identical = (inst.service_id == details.service_id and inst.plan_id == details.plan_id
                     and inst.organization_guid == details.organization_guid
                     and inst.space_guid == details.space_guid
                     and (inst.parameters or {}) == parameters)
        if not identical:
            raise ApiError(409, f"instance {inst.id} already exists with other attributes")
        if inst.state == DEPROVISIONING:
            raise ApiError(409, f"instance {inst.id} is being deprovisioned")
        provision = _latest(s, inst.id, ("provision",))
        if provision is not None and queue.is_unfinished(provision.state):
            if not async_allowed:
                raise async_required("provisioning")
            return ProvisionedServiceSpec(ProvisionState.IS_ASYNC, operation=provision.id)
        if inst.state in (PROVISIONING, FAILED):
            reason = inst.state_reason or (provision.description if provision else "unknown")
            raise ApiError(409, f"instance {inst.id} failed to provision ({reason}); "
                           "deprovision it and create a new one")
        return ProvisionedServiceSpec(ProvisionState.IDENTICAL_ALREADY_EXISTS)

    # --- update ------------------------------------------------------------------
    def update(self, instance_id: str, details: UpdateDetails, async_allowed: bool,
               **kwargs: Any) -> UpdateServiceSpec:
        body = current_body()
        with self.store.session() as s:
            inst = _live_instance(s, instance_id)
            if inst is None:
                raise ApiError(422, f"instance {instance_id} does not exist")
            if details.service_id != inst.service_id:
                raise bad_request(f"service_id {details.service_id!r} is not the service of "
                                  f"instance {instance_id}")
            unfinished = queue.unfinished_for(s, instance_id)
            if unfinished:
                raise _busy(unfinished[0])
            if inst.state not in (READY, DEGRADED):
                raise ApiError(422, f"instance {instance_id} cannot be updated while "
                               f"{inst.state}" + (f": {inst.state_reason}"
                                                  if inst.state_reason else ""))
            current = self.plans.plan(inst.plan_id)
            if current is None:
                raise ApiError(422, f"the plan of instance {instance_id} is no longer in "
                               "the catalog")
            target = self._plan(details.plan_id) if details.plan_id else current
            op = self._update_operation(inst, current, target, details.parameters or {},
                                        requested_maintenance_version(body), async_allowed)
            if op is None:
                return UpdateServiceSpec(is_async=False)
            s.add(op)
            op_id, kind = op.id, op.kind
        log.info("instance %s: %s queued (operation %s)", instance_id, kind, op_id)
        self._enqueued()
        return UpdateServiceSpec(is_async=True, operation=op_id)

    def _update_operation(self, inst: Instance, current: Plan, target: Plan,
                          parameters: dict[str, Any], version: str | None,
                          async_allowed: bool) -> Operation | None:
        """The operation an update needs, or None when it changes nothing."""
        plan_change = target.id != current.id
        problem = validate_parameters(target.update_schema, parameters)
        if problem:
            raise bad_request(problem)
        if version is not None and version != target.maintenance_version:
            raise ApiError(422, f"maintenance_info.version {version!r} does not match plan "
                           f"{target.name} ({target.maintenance_version})",
                           MAINTENANCE_INFO_CONFLICT)
        if parameters.get("switchover") is True:
            if plan_change:
                raise ApiError(422, "a switchover cannot be combined with a plan change: "
                               "change the plan, then ask for the switchover")
            if set(parameters) != {"switchover"}:
                raise ApiError(422, "a switchover must be requested alone "
                               "(parameters: {\"switchover\": true})")
            if not current.cloud.is_ha:
                raise ApiError(422, f"a switchover needs a standby: plan {current.name} has "
                               "none")
            if inst.standby() is None:
                raise ApiError(422, "a switchover needs a standby and this instance has none "
                               "right now" + (f" ({inst.state_reason})" if inst.state_reason
                                              else "") + "; try again once it is rebuilt")
            if not async_allowed:
                raise async_required("a switchover")
            return queue.new_operation(inst.id, "switchover", description="queued: switchover")
        refusal = plan_change_refusal(current, target)
        if refusal:
            raise ApiError(422, refusal)
        changes = {k: v for k, v in parameters.items() if k != "switchover"}
        new_version = (target.maintenance_version if plan_change or version is not None
                       else inst.maintenance_version)
        stored = inst.parameters or {}
        if not plan_change and {**stored, **changes} == stored \
                and new_version == inst.maintenance_version:
            return None
        if not async_allowed:
            raise async_required("an update")
        return queue.new_operation(inst.id, "update", description="queued: update",
                                   params=UpdateParams(plan_id=target.id, parameters=changes,
                                                       maintenance_version=new_version))

    # --- deprovision -------------------------------------------------------------
    def deprovision(self, instance_id: str, details: DeprovisionDetails, async_allowed: bool,
                    **kwargs: Any) -> DeprovisionServiceSpec:
        with self.store.session() as s:
            inst = _live_instance(s, instance_id)
            if inst is None:
                raise ApiError(410, f"instance {instance_id} does not exist (or was "
                               "deprovisioned)")
            unfinished = queue.unfinished_for(s, instance_id)
            running = next((op for op in unfinished if op.kind == "deprovision"), None)
            if running is not None:
                if not async_allowed:
                    raise async_required("deprovisioning")
                return DeprovisionServiceSpec(is_async=True, operation=running.id)
            if unfinished:
                raise _busy(unfinished[0])
            if not async_allowed:
                raise async_required("deprovisioning")
            op = queue.new_operation(instance_id, "deprovision",
                                     description="queued: deprovisioning")
            s.add(op)
            op_id = op.id
        log.info("instance %s: deprovision queued (operation %s)", instance_id, op_id)
        self._enqueued()
        return DeprovisionServiceSpec(is_async=True, operation=op_id)

    # --- last_operation ----------------------------------------------------------
    def last_operation(self, instance_id: str, operation_data: str | None,
                       service_id: str | None, plan_id: str | None,
                       **kwargs: Any) -> LastOperation:
        row = None
        if operation_data and plausible_id(operation_data, MAX_OPERATION_ID):
            # The hot path: what platforms poll, with the operation they were given.
            row = self._operation_by_id.first(op_id=operation_data)
        if row is None or row[0] != instance_id:
            row = self._other_operation(instance_id, operation_data)
        _, kind, op_state, description = row
        state = _STATES.get(op_state, OperationState.IN_PROGRESS)
        if state == OperationState.IN_PROGRESS:
            g.retry_after = RETRY_AFTER_SECONDS
        elif state == OperationState.FAILED and kind in ("update", "deprovision"):
            with self.store.engine.connect() as conn:
                instance_state = conn.execute(_INSTANCE_STATE,
                                              {"instance_id": instance_id}).scalar()
            extra: dict[str, Any] = {
                "instance_usable": instance_state in (READY, DEGRADED, UPDATING)}
            if kind == "update":
                extra["update_repeatable"] = True
            g.extra_body = extra
        return LastOperation(state, description)

    def _other_operation(self, instance_id: str,
                         operation_data: str | None) -> tuple[Any, ...]:
        """No (matching) `operation`: 404 for an unknown instance, else its latest."""
        with self.store.engine.connect() as conn:
            known = plausible_id(instance_id) and conn.execute(
                _INSTANCE_EXISTS, {"instance_id": instance_id}).first() is not None
            if not known:
                raise ApiError(404, f"instance {instance_id} does not exist")
            if operation_data:
                raise bad_request(f"operation {operation_data[:80]!r} is not an operation "
                                  f"of instance {instance_id}")
            row = conn.execute(_LATEST_PLATFORM_OPERATION,
                               {"instance_id": instance_id}).first()
        if row is None:
            raise ApiError(404, f"instance {instance_id} has no operation")
        return tuple(row)

    def last_binding_operation(self, instance_id: str, binding_id: str,
                               operation_data: str | None, service_id: str | None,
                               plan_id: str | None, **kwargs: Any) -> LastOperation:
        # Bindings are made synchronously: a binding that exists has succeeded.
        with self.store.session() as s:
            row = (s.get(BindingRow, binding_id)
                   if plausible_id(instance_id) and plausible_id(binding_id) else None)
            if row is None or row.instance_id != instance_id or row.state != BINDING_CREATED:
                raise ApiError(404, f"binding {binding_id} does not exist")
        return LastOperation(OperationState.SUCCEEDED, "bound")

    # --- fetch instance -----------------------------------------------------------
    def get_instance(self, instance_id: str, **kwargs: Any) -> GetInstanceDetailsSpec:
        with self.store.session() as s:
            inst = _live_instance(s, instance_id)
            if inst is None or inst.state in (PROVISIONING, FAILED):
                raise ApiError(404, f"instance {instance_id} does not exist (or is still "
                               "being provisioned)")
            platform_ops = [op for op in queue.unfinished_for(s, instance_id)
                            if op.kind in PLATFORM_KINDS]
            if platform_ops:
                raise _busy(platform_ops[0])
            if inst.state in (UPDATING, DEPROVISIONING):
                raise concurrency_error(f"instance {instance_id} is {inst.state}")
            plan = self.plans.plan(inst.plan_id)
            nodes = [{"node": n.id, "role": n.role, "zone": n.availability_zone,
                      "state": n.state} for n in inst.live_nodes()]
            attributes: dict[str, Any] = {"state": inst.state, "service_address":
                                          inst.service_address, "port": 5432,
                                          "replication": inst.replication, "nodes": nodes}
            if plan is not None:
                attributes["plan"] = plan.name
            maintenance: dict[str, Any] = {"version": inst.maintenance_version or ""}
            if plan is not None and inst.maintenance_version == plan.maintenance_version:
                description = (plan.raw.get("maintenance_info") or {}).get("description")
                if description:
                    maintenance["description"] = description
            g.extra_body = {"maintenance_info": maintenance, "metadata": {
                "attributes": {k: v for k, v in attributes.items() if v is not None}}}
            return GetInstanceDetailsSpec(service_id=inst.service_id, plan_id=inst.plan_id,
                                          parameters=dict(inst.parameters or {}))

    # --- bindings ------------------------------------------------------------------
    def _bindable(self, instance_id: str) -> None:
        """Refuse early what needs no node: unknown instance, unfinished operations."""
        with self.store.session() as s:
            inst = _live_instance(s, instance_id)
            if inst is None:
                raise ApiError(422, f"instance {instance_id} does not exist")
            platform_ops = [op for op in queue.unfinished_for(s, instance_id)
                            if op.kind in PLATFORM_KINDS]
            if platform_ops:
                raise _busy(platform_ops[0])
            if inst.state == FAILED:
                raise ApiError(422, f"instance {instance_id} failed to provision: "
                               f"{inst.state_reason or 'see last_operation'}")
            if inst.state not in (READY, DEGRADED):
                raise concurrency_error(f"instance {instance_id} is {inst.state}")

    def bind(self, instance_id: str, binding_id: str, details: BindDetails,
             async_allowed: bool, **kwargs: Any) -> Binding:
        plan = self._plan(details.plan_id)
        parameters = details.parameters or {}
        problem = validate_parameters(plan.bind_schema, parameters)
        if problem:
            raise bad_request(problem)
        self._bindable(instance_id)
        body = current_body()
        resource = dict(body.get("bind_resource") or {})
        app_guid = details.app_guid or resource.get("app_guid") or None
        try:
            result = bindings.create_binding(
                self.runtime, instance_id, binding_id, app_guid=app_guid,
                bind_resource=resource, parameters=parameters)
        except bindings.BindingConflict as exc:
            raise ApiError(409, str(exc) or f"binding {binding_id} exists with other "
                           "attributes") from None
        except bindings.InstanceNotReady as exc:
            raise concurrency_error(str(exc) or f"instance {instance_id} is busy") from None
        except bindings.InstanceUnknown:
            raise ApiError(422, f"instance {instance_id} does not exist") from None
        state = BindState.SUCCESSFUL_BOUND if result.created else BindState.IDENTICAL_ALREADY_EXISTS
        return Binding(state=state, credentials=result.credentials)

    def unbind(self, instance_id: str, binding_id: str, details: UnbindDetails,
               async_allowed: bool, **kwargs: Any) -> UnbindSpec:
        gone = ApiError(410, f"binding {binding_id} does not exist")
        with self.store.session() as s:
            inst = _live_instance(s, instance_id)
            if inst is None or not plausible_id(binding_id):
                raise gone
            platform_ops = [op for op in queue.unfinished_for(s, instance_id)
                            if op.kind in PLATFORM_KINDS]
            if platform_ops:
                raise _busy(platform_ops[0])
        try:
            deleted = bindings.delete_binding(self.runtime, instance_id, binding_id)
        except bindings.InstanceNotReady as exc:
            raise concurrency_error(str(exc) or f"instance {instance_id} is busy") from None
        except bindings.InstanceUnknown:
            raise gone from None
        if not deleted:
            raise gone
        return UnbindSpec(is_async=False)

    def get_binding(self, instance_id: str, binding_id: str, **kwargs: Any) -> GetBindingSpec:
        missing = ApiError(404, f"binding {binding_id} does not exist")
        with self.store.session() as s:
            if not plausible_id(instance_id) or not plausible_id(binding_id):
                raise missing
            row = s.get(BindingRow, binding_id)
            if row is None or row.instance_id != instance_id or row.state != BINDING_CREATED:
                raise missing
            parameters = dict(row.parameters or {})
        try:
            credentials = bindings.get_credentials(self.runtime, instance_id, binding_id)
        except bindings.InstanceUnknown:
            credentials = None
        if credentials is None:
            raise missing
        return GetBindingSpec(credentials=credentials, parameters=parameters)
