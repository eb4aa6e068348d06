"""Request checks the library skips: bodies, ids, catalog references (→ 400).

`check_request()` runs as a `before_request` hook after authentication and the
version check, before the library parses anything, so a bad request gets a 400
that names the field instead of the library's TypeError text (or a 500). The
checked body is kept on `flask.g.osb_body` for the service broker, which needs
fields the library drops (`maintenance_info`).
"""

from __future__ import annotations

from typing import Any

from flask import g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from broker.api import jsonbody
from broker.api.errors import bad_request
from broker.catalog import Catalog, Plan
from broker.operations.requests import MAX_ID_LENGTH, plausible_id


def current_body() -> dict[str, Any]:
    """The checked JSON body of this request ({} when it has none)."""
    body: dict[str, Any] = g.get("osb_body") or {}
    return body


def requested_maintenance_version(body: dict[str, Any]) -> str | None:
    """`maintenance_info.version` of a body; a maintenance_info without one counts as absent."""
    info = body.get("maintenance_info")
    if isinstance(info, dict):
        version = info.get("version")
        if isinstance(version, str):
            return version
    return None


def _json_object() -> dict[str, Any]:
    wanted = "the request body must be a JSON object, sent with Content-Type: application/json"
    if not request.is_json:
        raise bad_request(wanted)
    try:
        # Over the app's MAX_CONTENT_LENGTH this raises RequestEntityTooLarge (413)...
        data = request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception as exc:
        # The server's parser failing on what the client sent (gunicorn raises its own
        # ParseException for a bad chunk size): the client's fault, not the broker's.
        raise bad_request(f"the request body could not be read ({type(exc).__name__})") \
            from None
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # ...but a chunked body werkzeug cuts at the limit without a word.
        raise RequestEntityTooLarge()
    try:
        body = jsonbody.loads(data)
    except jsonbody.UnparsableJson as exc:
        raise bad_request(f"{wanted}; this one is not JSON the broker accepts: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(wanted)
    return body


def _string(body: dict[str, Any], key: str, *, required: bool,
            where: str = "") -> str | None:
    value = body.get(key)
    name = f"{where}{key}"
    if value is None:
        if required:
            raise bad_request(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    if required and not value.strip():
        raise bad_request(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise bad_request(f"{name} must be at most {MAX_ID_LENGTH} printable characters")
    return value


def _object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"{key} must be a JSON object")
    return value


def _plan(catalog: Catalog, service_id: str | None, plan_id: str | None,
          *, plan_required: bool = True) -> Plan | None:
    if service_id is None:
        raise bad_request("service_id is required")
    if catalog.service(service_id) is None:
        raise bad_request(f"service_id {service_id!r} is not a service of this broker's catalog")
    if plan_id is None:
        if plan_required:
            raise bad_request("plan_id is required")
        return None
    plan = catalog.plan(plan_id)
    if plan is None:
        raise bad_request(f"plan_id {plan_id!r} is not a plan of this broker's catalog")
    if plan.service_id != service_id:
        raise bad_request(f"plan_id {plan_id!r} ({plan.name}) is not a plan of service "
                          f"{service_id!r}")
    return plan


def _maintenance_info(body: dict[str, Any]) -> None:
    info = _object(body, "maintenance_info")
    if info is not None and "version" in info and not isinstance(info["version"], str):
        raise bad_request("maintenance_info.version must be a string")


def _guid(body: dict[str, Any], context: dict[str, Any] | None, key: str) -> None:
    top = _string(body, key, required=False)
    inner = _string(context, key, required=False, where="context.") if context else None
    if top is None and inner is None:
        raise bad_request(f"{key} is required")
    if top is not None and inner is not None and top != inner:
        raise bad_request(f"{key} and context.{key} differ")
    value = top if top is not None else inner
    if value is None or not value.strip():
        raise bad_request(f"{key} must not be empty")


def _new_id(name: str, value: str | None) -> None:
    if not plausible_id(value):
        raise bad_request(f"{name} must be 1 to {MAX_ID_LENGTH} printable characters")


def check_provision(catalog: Catalog) -> dict[str, Any]:
    _new_id("instance_id", (request.view_args or {}).get("instance_id"))
    body = _json_object()
    _plan(catalog, _string(body, "service_id", required=True),
          _string(body, "plan_id", required=True))
    context = _object(body, "context")
    _guid(body, context, "organization_guid")
    _guid(body, context, "space_guid")
    _object(body, "parameters")
    _maintenance_info(body)
    return body


def check_update(catalog: Catalog) -> dict[str, Any]:
    body = _json_object()
    _plan(catalog, _string(body, "service_id", required=True),
          _string(body, "plan_id", required=False), plan_required=False)
    _object(body, "context")
    _object(body, "parameters")
    _object(body, "previous_values")
    _maintenance_info(body)
    return body


def check_bind(catalog: Catalog) -> dict[str, Any]:
    _new_id("binding_id", (request.view_args or {}).get("binding_id"))
    body = _json_object()
    service_id = _string(body, "service_id", required=True)
    _plan(catalog, service_id, _string(body, "plan_id", required=True))
    _string(body, "app_guid", required=False)
    resource = _object(body, "bind_resource")
    if resource is not None:
        _string(resource, "app_guid", required=False, where="bind_resource.")
        route = _string(resource, "route", required=False, where="bind_resource.")
        service = catalog.service(service_id or "")
        # A route binding is for a route service, which the catalog must declare
        # (`requires: [route_forwarding]`); answering with database credentials
        # would hand them to a route.
        if route is not None and service is not None \
                and "route_forwarding" not in (service.raw.get("requires") or []):
            raise bad_request(f"bind_resource.route: service {service.name} is not a route "
                              "service (its catalog entry does not require route_forwarding); "
                              "bind it to an app or create a service key instead")
    _object(body, "context")
    _object(body, "parameters")
    return body


def check_delete_query(catalog: Catalog) -> None:
    """Deprovision and unbind: `service_id` and `plan_id` query parameters are required."""
    args = request.args
    missing = [k for k in ("service_id", "plan_id") if not args.get(k)]
    if missing:
        raise bad_request(f"query parameter{'s' if len(missing) > 1 else ''} "
                          f"{' and '.join(missing)} required")
    _plan(catalog, args["service_id"], args["plan_id"])


_CHECKS = {
    "open_broker.provision": check_provision,
    "open_broker.update": check_update,
    "open_broker.bind": check_bind,
}
_DELETES = ("open_broker.deprovision", "open_broker.unbind")


def check_request(catalog: Catalog) -> None:
    endpoint = request.endpoint
    check = _CHECKS.get(endpoint or "")
    if check is not None:
        g.osb_body = check(catalog)
    elif endpoint in _DELETES:
        check_delete_query(catalog)
