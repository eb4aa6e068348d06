"""Glance v2: images (read-only)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import (
    CloudState,
    iso,
    wall,
)
from tests.fakes.openstack.web import (
    base,
    json_response,
    lock_for,
)


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("image", __name__)
    locked = lock_for(state)


    @bp.get("/image")
    @bp.get("/image/")
    def image_root() -> Response:
        return json_response({"versions": [{"id": "v2.16", "status": "CURRENT", "links": [
            {"rel": "self", "href": f"{base()}/image/v2/"}]}]}, 300)

    # --- Glance ----------------------------------------------------------------------
    def image_json(image: Any) -> dict[str, Any]:
        out = {"id": image.id, "name": image.name, "status": image.status,
               "visibility": "public", "disk_format": "qcow2", "container_format": "bare",
               "min_disk": 0, "min_ram": 0, "size": 1024, "tags": [],
               "created_at": iso(wall()), "updated_at": iso(wall()),
               "self": f"/v2/images/{image.id}", "file": f"/v2/images/{image.id}/file",
               "schema": "/v2/schemas/image"}
        out.update(image.properties)
        return out

    @bp.get("/image/v2/images")
    @locked
    def images() -> Response:
        name = request.args.get("name")
        found = [image_json(i) for i in state.images.values() if name in (None, i.name)]
        return json_response({"images": found, "first": "/v2/images",
                              "schema": "/v2/schemas/images"})

    @bp.get("/image/v2/images/<image_id>")
    @locked
    def image(image_id: str) -> Response:
        if image_id not in state.images:
            return json_response({"message": "Not Found", "code": "404 Not Found"}, 404)
        return json_response(image_json(state.images[image_id]))

    return bp
