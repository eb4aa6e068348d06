"""Answers the library's response classes cannot carry, rendered explicitly.

openbrokerapi's views build their bodies from fixed classes: last_operation has no
`instance_usable`/`update_repeatable` and no Retry-After, a fetched instance no
`maintenance_info`/`metadata`. For these two endpoints the broker returns an
`OsbResponse` and `install_views` swaps the library's view for one that renders it;
the blueprint's request filters and error handlers stay in force.

A binding's answer (bind and fetch) has no `endpoints` in the library's classes:
`install_views` wraps those two views to add the service address and port that the
credentials name, which is what the spec's `endpoints` describes (the network
destination an app needs to reach, e.g. for its security groups).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, make_response, request


@dataclass(frozen=True)
class OsbResponse:
    body: dict[str, Any]
    status: int = 200
    retry_after: int | None = field(default=None)  # seconds, for a poll of unfinished work

    def render(self) -> Response:
        response = jsonify(self.body)
        response.status_code = self.status
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


def install_views(app: Flask, *, last_operation: Callable[[str, str | None], OsbResponse],
                  get_instance: Callable[[str], OsbResponse]) -> None:
    """Replace the library's last_operation and fetch-instance views (after the
    blueprint is registered)."""

    def last_operation_view(instance_id: str) -> Response:
        return last_operation(instance_id, request.args.get("operation")).render()

    def get_instance_view(instance_id: str) -> Response:
        return get_instance(instance_id).render()

    app.view_functions["open_broker.last_operation"] = last_operation_view
    app.view_functions["open_broker.get_instance"] = get_instance_view
    for endpoint in ("open_broker.bind", "open_broker.get_binding"):
        app.view_functions[endpoint] = _with_endpoints(app.view_functions[endpoint])


def binding_endpoints(credentials: dict[str, Any]) -> list[dict[str, Any]]:
    """OSB `endpoints` of a binding: its service address and port, over TCP."""
    return [{"host": str(credentials["hostname"]), "ports": [str(credentials["port"])],
             "protocol": "tcp"}]


def _with_endpoints(view: Callable[..., Any]) -> Callable[..., Any]:
    def view_with_endpoints(**kwargs: Any) -> Any:
        response = make_response(view(**kwargs))
        if response.status_code in (200, 201):
            body = response.get_json(silent=True)
            credentials = body.get("credentials") if isinstance(body, dict) else None
            if isinstance(body, dict) and isinstance(credentials, dict) \
                    and "hostname" in credentials:
                body["endpoints"] = binding_endpoints(credentials)
                response.set_data(json.dumps(body))
        return response

    return view_with_endpoints
