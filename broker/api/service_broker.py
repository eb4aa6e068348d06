"""The OSB verbs, translated: parse what the library hands over, ask the domain
(`broker.operations.requests`, `bindings`), answer with the library's types or an
`OsbResponse`. Refusals become HTTP answers through `broker.api.errors.REFUSALS`.

Status codes the spec leaves open, chosen here:
- last_operation with an `operation` of another instance, or unknown: 400.
- Binding last_operation (bindings are synchronous): 200 succeeded for a binding
  that exists, else 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from openbrokerapi.catalog import ServicePlan
from openbrokerapi.service_broker import (
    BindDetails,
    Binding,
    BindState,
    DeprovisionDetails,
    DeprovisionServiceSpec,
    GetBindingSpec,
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

from broker.api.fastquery import CompiledSelect
from broker.api.responses import OsbResponse
from broker.api.validation import current_body, requested_maintenance_version
from broker.catalog import Plan, validate_parameters
from broker.operations import bindings, requests
from broker.operations.refusals import AlreadyGone, Busy, InvalidRequest, NotFound
from broker.operations.requests import PLATFORM_KINDS, plausible_id
from broker.runtime import Runtime
from broker.store.models import (
    BINDING_CREATED,
    DEGRADED,
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
from broker.web.dashboard import dashboard_url

log = logging.getLogger(__name__)

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
    def _accepted(self, accepted: requests.Accepted) -> None:
        if not accepted.queued or self._on_enqueue is None:
            return
        try:
            self._on_enqueue()
        except Exception:  # the worker also polls: a failed wake-up only delays it
            log.exception("could not wake the operation worker")

    def _plan(self, plan_id: str) -> Plan:
        plan = self.plans.plan(plan_id)
        if plan is None:  # validation rejects unknown plans before this
            raise InvalidRequest(f"plan_id {plan_id!r} is not a plan of this broker's catalog")
        return plan

    # --- catalog ---------------------------------------------------------------
    def catalog(self) -> list[Service]:
        return self._services

    # --- provision, update, deprovision ---------------------------------------------
    def provision(self, instance_id: str, details: ProvisionDetails, async_allowed: bool,
                  **kwargs: Any) -> ProvisionedServiceSpec:
        request = requests.NewInstance(
            id=instance_id, service_id=details.service_id, plan=self._plan(details.plan_id),
            organization_guid=details.organization_guid, space_guid=details.space_guid,
            context=details.context or {}, parameters=details.parameters or {},
            maintenance_version=requested_maintenance_version(current_body()))
        accepted = requests.provision(self.store, self.runtime.vault, request, async_allowed)
        self._accepted(accepted)
        url = dashboard_url(self.runtime, instance_id)
        if accepted.operation_id is None:
            return ProvisionedServiceSpec(ProvisionState.IDENTICAL_ALREADY_EXISTS,
                                          dashboard_url=url)
        return ProvisionedServiceSpec(ProvisionState.IS_ASYNC, dashboard_url=url,
                                      operation=accepted.operation_id)

    def update(self, instance_id: str, details: UpdateDetails, async_allowed: bool,
               **kwargs: Any) -> UpdateServiceSpec:
        change = requests.Change(
            instance_id=instance_id, service_id=details.service_id, plan_id=details.plan_id,
            parameters=details.parameters or {},
            maintenance_version=requested_maintenance_version(current_body()))
        accepted = requests.update(self.store, self.plans, change, async_allowed)
        self._accepted(accepted)
        if accepted.operation_id is None:
            return UpdateServiceSpec(is_async=False)
        return UpdateServiceSpec(is_async=True, operation=accepted.operation_id)

    def deprovision(self, instance_id: str, details: DeprovisionDetails, async_allowed: bool,
                    **kwargs: Any) -> DeprovisionServiceSpec:
        accepted = requests.deprovision(self.store, instance_id, async_allowed)
        self._accepted(accepted)
        return DeprovisionServiceSpec(is_async=True, operation=accepted.operation_id)

    # --- last_operation ----------------------------------------------------------
    def operation_status(self, instance_id: str, operation_data: str | None) -> OsbResponse:
        """last_operation: the state of the operation the platform polls."""
        row = None
        if operation_data and plausible_id(operation_data, MAX_OPERATION_ID):
            # The hot path: what platforms poll, with the operation they were given.
            row = self._operation_by_id.first(op_id=operation_data)
        if row is None or row[0] != instance_id:
            row = self._other_operation(instance_id, operation_data)
        _, kind, op_state, description = row
        state = _STATES.get(op_state, OperationState.IN_PROGRESS)
        body: dict[str, Any] = {"state": state.value}
        if description is not None:
            body["description"] = description
        if state == OperationState.IN_PROGRESS:
            return OsbResponse(body, retry_after=RETRY_AFTER_SECONDS)
        if state == OperationState.FAILED and kind in ("update", "deprovision"):
            with self.store.engine.connect() as conn:
                instance_state = conn.execute(_INSTANCE_STATE,
                                              {"instance_id": instance_id}).scalar()
            body["instance_usable"] = instance_state in (READY, DEGRADED, UPDATING)
            if kind == "update":
                body["update_repeatable"] = True
        return OsbResponse(body)

    def _other_operation(self, instance_id: str,
                         operation_data: str | None) -> tuple[Any, ...]:
        """No (matching) `operation`: 404 for an unknown instance, else its latest."""
        with self.store.engine.connect() as conn:
            known = plausible_id(instance_id) and conn.execute(
                _INSTANCE_EXISTS, {"instance_id": instance_id}).first() is not None
            if not known:
                raise NotFound(f"instance {instance_id} does not exist")
            if operation_data:
                raise InvalidRequest(f"operation {operation_data[:80]!r} is not an operation "
                                     f"of instance {instance_id}")
            row = conn.execute(_LATEST_PLATFORM_OPERATION,
                               {"instance_id": instance_id}).first()
        if row is None:
            raise NotFound(f"instance {instance_id} has no operation")
        return tuple(row)

    def last_binding_operation(self, instance_id: str, binding_id: str,
                               operation_data: str | None, service_id: str | None,
                               plan_id: str | None, **kwargs: Any) -> LastOperation:
        # Bindings are made synchronously: a binding that exists has succeeded.
        self._binding_parameters(instance_id, binding_id)
        return LastOperation(OperationState.SUCCEEDED, "bound")

    # --- fetch instance -----------------------------------------------------------
    def instance_details(self, instance_id: str) -> OsbResponse:
        """GET of an instance: its plan, parameters, maintenance_info and attributes."""
        with self.store.session() as s:
            inst = requests.live_instance(s, instance_id)
            if inst is None or inst.state in (PROVISIONING, FAILED):
                raise NotFound(f"instance {instance_id} does not exist (or is still "
                               "being provisioned)")
            platform_ops = requests.unfinished(s, instance_id, PLATFORM_KINDS)
            if platform_ops:
                raise requests.busy(platform_ops[0])
            if inst.state in (UPDATING, DEPROVISIONING):
                raise Busy(f"instance {instance_id} is {inst.state}")
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
            return OsbResponse({
                "service_id": inst.service_id, "plan_id": inst.plan_id,
                "dashboard_url": dashboard_url(self.runtime, instance_id),
                "parameters": dict(inst.parameters or {}), "maintenance_info": maintenance,
                "metadata": {"attributes": {k: v for k, v in attributes.items()
                                            if v is not None}}})

    # --- bindings ------------------------------------------------------------------
    def bind(self, instance_id: str, binding_id: str, details: BindDetails,
             async_allowed: bool, **kwargs: Any) -> Binding:
        plan = self._plan(details.plan_id)
        parameters = details.parameters or {}
        problem = validate_parameters(plan.bind_schema, parameters)
        if problem:
            raise InvalidRequest(problem)
        requests.check_bindable(self.store, instance_id, details.plan_id)
        resource = dict(current_body().get("bind_resource") or {})
        app_guid = details.app_guid or resource.get("app_guid") or None
        result = bindings.create_binding(
            self.runtime, instance_id, binding_id, app_guid=app_guid,
            bind_resource=resource, parameters=parameters)
        state = BindState.SUCCESSFUL_BOUND if result.created else BindState.IDENTICAL_ALREADY_EXISTS
        return Binding(state=state, credentials=result.credentials)

    def unbind(self, instance_id: str, binding_id: str, details: UnbindDetails,
               async_allowed: bool, **kwargs: Any) -> UnbindSpec:
        requests.check_unbindable(self.store, instance_id, binding_id, details.plan_id)
        if not bindings.delete_binding(self.runtime, instance_id, binding_id):
            raise AlreadyGone(f"binding {binding_id} does not exist")
        return UnbindSpec(is_async=False)

    def get_binding(self, instance_id: str, binding_id: str, **kwargs: Any) -> GetBindingSpec:
        parameters = self._binding_parameters(instance_id, binding_id)
        credentials = bindings.get_credentials(self.runtime, instance_id, binding_id)
        if credentials is None:
            raise NotFound(f"binding {binding_id} does not exist")
        return GetBindingSpec(credentials=credentials, parameters=parameters)

    def _binding_parameters(self, instance_id: str, binding_id: str) -> dict[str, Any]:
        """The parameters of this instance's created binding; NotFound without one."""
        with self.store.session() as s:
            row = (s.get(BindingRow, binding_id)
                   if plausible_id(instance_id) and plausible_id(binding_id) else None)
            if row is None or row.instance_id != instance_id or row.state != BINDING_CREATED:
                raise NotFound(f"binding {binding_id} does not exist")
            return dict(row.parameters or {})
