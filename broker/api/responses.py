"""Answers the library's response classes cannot carry, rendered explicitly.

openbrokerapi's views build their bodies from fixed classes: last_operation has no
`instance_usable`/`update_repeatable` and no Retry-After, a fetched instance no
`maintenance_info`/`metadata`. For these two endpoints the broker returns an
`OsbResponse` and `install_views` swaps the library's view for one that renders it;
the blueprint's request filters and error handlers stay in force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request


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
