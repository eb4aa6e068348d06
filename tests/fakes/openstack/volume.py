"""Cinder v3: volumes, actions, attachments, types and zones."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import (
    CloudState,
    Volume,
    cinder_error,
    iso,
    wall,
)
from tests.fakes.openstack.web import (
    CINDER_MAX,
    base,
    empty,
    is_admin,
    json_response,
    lock_for,
    project,
)


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("volume", __name__)
    locked = lock_for(state)

    def cinder_version() -> dict[str, Any]:
        return {"id": "v3.0", "status": "CURRENT", "version": CINDER_MAX,
                "min_version": "3.0", "updated": "2023-08-31T00:00:00Z",
                "links": [{"rel": "self", "href": f"{base()}/volume/v3/"}]}

    @bp.get("/volume")
    @bp.get("/volume/")
    def volume_root() -> Response:
        return json_response({"versions": [cinder_version()]}, 300)

    @bp.get("/volume/v3")
    @bp.get("/volume/v3/")
    @bp.get("/volume/v3/<project_id>")
    @bp.get("/volume/v3/<project_id>/")
    def volume_v3(project_id: str = "") -> Response:
        return json_response({"versions": [cinder_version()]})
    # --- Cinder ----------------------------------------------------------------------
    cinder = "/volume/v3/<project_id>"

    def volume_json(v: Volume) -> dict[str, Any]:
        return {"id": v.id, "name": v.name, "size": v.size, "availability_zone": v.zone,
                "status": v.status, "volume_type": v.volume_type, "metadata": dict(v.metadata),
                "attachments": [{"id": v.id, "attachment_id": a.id, "volume_id": v.id,
                                 "server_id": a.server_id, "host_name": a.host_name,
                                 "device": a.device, "attached_at": iso(a.attached_at)}
                                for a in v.attachments],
                "bootable": "false", "encrypted": False, "multiattach": False,
                "description": v.description, "created_at": iso(v.created_at),
                "updated_at": iso(wall()), "user_id": "u-broker",
                "os-vol-tenant-attr:tenant_id": v.project_id, "links": []}

    def get_volume(volume_id: str) -> Volume:
        v = state.volumes.get(volume_id)
        if v is None or (v.project_id != project() and not is_admin()):
            raise cinder_error(404, f"Volume {volume_id} could not be found.")
        return v

    @bp.get(f"{cinder}/volumes")
    @bp.get(f"{cinder}/volumes/detail")
    @locked
    def volumes(project_id: str) -> Response:
        name = request.args.get("name")
        status = request.args.get("status")
        meta_raw = request.args.get("metadata")
        meta: dict[str, str] = {}
        if meta_raw:
            try:
                meta = json.loads(meta_raw)
            except ValueError:
                import ast

                meta = ast.literal_eval(meta_raw)
        found = [v for v in state.volumes.values() if v.project_id == project()
                 and name in (None, v.name) and status in (None, v.status)
                 and all(v.metadata.get(k) == str(val) for k, val in meta.items())]
        return json_response({"volumes": [volume_json(v) for v in found]})

    @bp.post(f"{cinder}/volumes")
    @locked
    def create_volume(project_id: str) -> Response:
        body = request.get_json(force=True).get("volume") or {}
        return json_response({"volume": volume_json(state.create_volume(body, project()))}, 202)

    @bp.get(f"{cinder}/volumes/<volume_id>")
    @locked
    def volume(project_id: str, volume_id: str) -> Response:
        return json_response({"volume": volume_json(get_volume(volume_id))})

    @bp.delete(f"{cinder}/volumes/<volume_id>")
    @locked
    def delete_volume(project_id: str, volume_id: str) -> Response:
        v = get_volume(volume_id)
        if v.status not in ("available", "error", "error_restoring", "error_extending") \
                or v.attachments:
            raise cinder_error(400, "Invalid volume: Volume status must be available or "
                                    "error or error_restoring or error_extending or "
                                    "error_managing and must not be migrating, attached, "
                                    "belong to a group, have snapshots or be disassociated "
                                    "from snapshots after volume transfer.")
        v.status = "deleting"

        def gone() -> None:
            if state.volumes.pop(v.id, None) is not None:
                state.hooks.volume_deleted(v)

        state.schedule(None, f"delete volume {v.id}", gone)
        return empty(202)

    @bp.post(f"{cinder}/volumes/<volume_id>/action")
    @locked
    def volume_action(project_id: str, volume_id: str) -> Response:
        v = get_volume(volume_id)
        body = request.get_json(force=True)
        if "os-force_detach" in body:
            if not is_admin():
                raise cinder_error(403, "Policy doesn't allow "
                                        "volume_extension:volume_admin_actions:force_detach "
                                        "to be performed.")
            attachment_id = (body["os-force_detach"] or {}).get("attachment_id")
            for a in [a for a in v.attachments if attachment_id in (None, a.id)]:
                state.release_volume(v, a.server_id)
            for s in state.servers.values():
                if v.id in s.volume_ids and not any(a.server_id == s.id
                                                    for a in v.attachments):
                    s.volume_ids.remove(v.id)
            return empty(202)
        if "os-reset_status" in body:
            if not is_admin():
                raise cinder_error(403, "Policy doesn't allow reset_status.")
            v.status = body["os-reset_status"].get("status", v.status)
            return empty(202)
        raise cinder_error(400, f"unsupported action {list(body)}")

    def attachment_json(v: Volume, a: Any) -> dict[str, Any]:
        return {"id": a.id, "volume_id": v.id, "instance": a.server_id,
                "status": "attached", "attach_mode": "rw", "attached_at": iso(a.attached_at),
                "detached_at": None, "connection_info": None}

    @bp.get(f"{cinder}/attachments")
    @bp.get(f"{cinder}/attachments/detail")
    @locked
    def attachments(project_id: str) -> Response:
        vid = request.args.get("volume_id")
        found = [attachment_json(v, a) for v in state.volumes.values()
                 if v.project_id == project() and vid in (None, v.id) for a in v.attachments]
        return json_response({"attachments": found})

    @bp.delete(f"{cinder}/attachments/<attachment_id>")
    @locked
    def delete_attachment(project_id: str, attachment_id: str) -> Response:
        for v in state.volumes.values():
            for a in v.attachments:
                if a.id == attachment_id and v.project_id == project():
                    if v.attachment_delete_fails:
                        raise cinder_error(500, "Unable to terminate volume connection: "
                                                "backend error.")
                    state.release_volume(v, a.server_id)
                    server = state.servers.get(a.server_id)
                    if server is not None and v.id in server.volume_ids:
                        server.volume_ids.remove(v.id)
                    return json_response({"attachments": []})
        raise cinder_error(404, f"Attachment {attachment_id} could not be found.")

    @bp.get(f"{cinder}/types")
    @locked
    def volume_types(project_id: str) -> Response:
        return json_response({"volume_types": [{"id": i, "name": n, "is_public": True,
                                        "extra_specs": {}, "description": None}
                                       for n, i in state.volume_types.items()]})

    @bp.get(f"{cinder}/types/<type_id>")
    @locked
    def volume_type(project_id: str, type_id: str) -> Response:
        for name, tid in state.volume_types.items():
            if type_id in (tid, name):
                return json_response({"volume_type": {"id": tid, "name": name, "is_public": True,
                                              "extra_specs": {}, "description": None}})
        raise cinder_error(404, f"Volume type {type_id} could not be found.")

    @bp.get(f"{cinder}/os-availability-zone")
    @locked
    def volume_zones(project_id: str) -> Response:
        return json_response({"availabilityZoneInfo": [
            {"zoneName": z, "zoneState": {"available": True}} for z in state.volume_zones]})

    @bp.get(f"{cinder}/os-quota-sets/<target>")
    @locked
    def quota_set(project_id: str, target: str) -> Response:
        if target != project() and not is_admin():
            raise cinder_error(403, "Policy doesn't allow volume_extension:quotas:show to be "
                                    "performed.")
        used = state.usage(target)
        usage = request.args.get("usage", "").lower() in ("true", "1")
        found = {k: ({"limit": state.quotas[k], "in_use": used.get(k, 0), "reserved": 0,
                      "allocated": 0} if usage else state.quotas[k])
                 for k in ("volumes", "gigabytes")}
        return json_response({"quota_set": {"id": target, **found}})

    return bp
