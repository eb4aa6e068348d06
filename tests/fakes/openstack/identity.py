"""Keystone v3: version discovery, password tokens and the service catalog."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import (
    PROJECT_ID,
    CloudState,
    iso,
    new_id,
    wall,
)
from tests.fakes.openstack.web import (
    base,
    json_response,
)

USERS = {
    # name: (password, roles, project)
    "broker": ("broker-secret", ["member", "reader"], ("pgha", PROJECT_ID)),
    "admin": ("admin-secret", ["admin", "member", "reader"], ("pgha", PROJECT_ID)),
}


def blueprint(state: CloudState, tokens: dict[str, dict[str, Any]]) -> Blueprint:
    bp = Blueprint("identity", __name__)

    # --- Keystone v3 ---------------------------------------------------------------
    def identity_version() -> dict[str, Any]:
        return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": f"{base()}/identity/v3/"}],
                "media-types": [{"base": "application/json",
                                 "type": "application/vnd.openstack.identity-v3+json"}]}

    @bp.get("/identity")
    @bp.get("/identity/")
    def identity_root() -> Response:
        return json_response({"versions": {"values": [identity_version()]}}, 300)

    @bp.get("/identity/v3")
    @bp.get("/identity/v3/")
    def identity_v3() -> Response:
        return json_response({"version": identity_version()})

    def catalog() -> list[dict[str, Any]]:
        def entry(kind: str, name: str, url: str) -> dict[str, Any]:
            return {"type": kind, "name": name, "id": new_id(), "endpoints": [
                {"id": new_id(), "interface": iface, "region": "RegionOne",
                 "region_id": "RegionOne", "url": url}
                for iface in ("public", "internal")]}
        b = base()
        return [
            entry("identity", "keystone", f"{b}/identity"),
            entry("compute", "nova", f"{b}/compute/v2.1"),
            entry("network", "neutron", f"{b}/network"),
            entry("volumev3", "cinderv3", f"{b}/volume/v3/{PROJECT_ID}"),
            entry("image", "glance", f"{b}/image"),
        ]

    @bp.post("/identity/v3/auth/tokens")
    def issue_token() -> Response:
        body = request.get_json(force=True)
        ident = body["auth"]["identity"]
        user = ident.get("password", {}).get("user", {})
        known = USERS.get(user.get("name", ""))
        if known is None or known[0] != user.get("password"):
            return json_response({"error": {"code": 401, "message": "The request you have made "
                                    "requires authentication.", "title": "Unauthorized"}}, 401)
        _, roles, (project_name, project_id) = known
        token_id = uuid.uuid4().hex
        now = wall()
        tokens[token_id] = {"user": user["name"], "roles": roles, "project_id": project_id}
        token = {
            "methods": ["password"], "issued_at": iso(now),
            "expires_at": iso(now + timedelta(hours=1)),
            "user": {"id": f"u-{user['name']}", "name": user["name"],
                     "domain": {"id": "default", "name": "Default"}},
            "project": {"id": project_id, "name": project_name,
                        "domain": {"id": "default", "name": "Default"}},
            "roles": [{"id": f"r-{r}", "name": r} for r in roles],
            "catalog": catalog(),
        }
        return json_response({"token": token}, 201, {"X-Subject-Token": token_id})

    return bp
