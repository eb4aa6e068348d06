"""What every service of the fake shares: JSON answers, the caller's token, policy
checks, the state lock, and the microversion the client asked for."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Response, g, request

from tests.fakes.openstack.state import CloudState, nova_error

NOVA_MAX = "2.90"
CINDER_MAX = "3.70"


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json",
                    headers=headers or {})


def empty(status: int) -> Response:
    return Response(b"", status=status)


def base() -> str:
    return request.host_url.rstrip("/")


def is_admin() -> bool:
    return "admin" in g.user["roles"]


def project() -> str:
    return str(g.user["project_id"])


def require_admin(policy: str) -> None:
    if not is_admin():
        raise nova_error(403, f"Policy doesn't allow {policy} to be performed.")


def microversion(service: str, default: str) -> tuple[int, int]:
    """The microversion requested for `service` ("compute", "volume"), as (major, minor).

    Like Nova and Cinder: `OpenStack-API-Version: compute 2.64` (or the legacy
    X-OpenStack-Nova-API-Version header); no header means the service's minimum."""
    wanted = None
    for value in request.headers.getlist("OpenStack-API-Version"):
        kind, _, number = value.strip().partition(" ")
        if kind == service:
            wanted = number.strip()
    if wanted is None and service == "compute":
        wanted = request.headers.get("X-OpenStack-Nova-API-Version")
    if not wanted:
        wanted = default
    if wanted == "latest":
        wanted = NOVA_MAX if service == "compute" else CINDER_MAX
    major, _, minor = wanted.partition(".")
    return int(major), int(minor or 0)


def nova_microversion() -> tuple[int, int]:
    return microversion("compute", "2.1")


def lock_for(state: CloudState) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """A view decorator: run the due tasks and the view under the state's lock."""
    def locked(fn: Callable[..., Response]) -> Callable[..., Response]:
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            with state.locked():
                return fn(*args, **kwargs)
        wrapper.__name__ = fn.__name__
        return wrapper
    return locked
