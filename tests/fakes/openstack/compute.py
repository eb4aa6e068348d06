"""Nova beyond servers: version discovery, flavors, zones, compute services
(admin-only by default policy) and server groups."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import (
    CloudState,
    ServerGroup,
    iso,
    new_id,
    nova_error,
    wall,
)
from tests.fakes.openstack.web import (
    NOVA_MAX,
    base,
    empty,
    json_response,
    lock_for,
    nova_microversion,
    project,
    require_admin,
)


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("compute", __name__)
    locked = lock_for(state)

    def nova_version() -> dict[str, Any]:
        return {"id": "v2.1", "status": "CURRENT", "version": NOVA_MAX, "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": f"{base()}/compute/v2.1/"}]}

    @bp.get("/compute")
    @bp.get("/compute/")
    def compute_root() -> Response:
        return json_response({"versions": [nova_version()]})

    @bp.get("/compute/v2.1")
    @bp.get("/compute/v2.1/")
    def compute_v21() -> Response:
        return json_response({"version": nova_version()})

    # --- Nova: flavors, zones, services ---------------------------------------------------
    def flavor_json(f: Any) -> dict[str, Any]:
        return {"id": f.id, "name": f.name, "vcpus": f.vcpus, "ram": f.ram, "disk": f.disk,
                "OS-FLV-EXT-DATA:ephemeral": 0, "swap": "", "rxtx_factor": 1.0,
                "os-flavor-access:is_public": True, "OS-FLV-DISABLED:disabled": False,
                "description": None, "extra_specs": dict(f.extra_specs),
                "links": [{"rel": "self", "href": f"{base()}/compute/v2.1/flavors/{f.id}"}]}

    @bp.get("/compute/v2.1/flavors")
    @bp.get("/compute/v2.1/flavors/detail")
    @locked
    def flavors() -> Response:
        return json_response({"flavors": [flavor_json(f) for f in state.flavors.values()]})

    @bp.get("/compute/v2.1/flavors/<flavor_id>")
    @locked
    def flavor(flavor_id: str) -> Response:
        if flavor_id not in state.flavors:
            raise nova_error(404, f"Flavor {flavor_id} could not be found.")
        return json_response({"flavor": flavor_json(state.flavors[flavor_id])})

    @bp.get("/compute/v2.1/flavors/<flavor_id>/os-extra_specs")
    @locked
    def flavor_specs(flavor_id: str) -> Response:
        if flavor_id not in state.flavors:
            raise nova_error(404, f"Flavor {flavor_id} could not be found.")
        return json_response({"extra_specs": dict(state.flavors[flavor_id].extra_specs)})

    # Nova's availability_zone.py: the plain list (any member) marks a zone available
    # while one of its services is enabled, whatever its heartbeat; /detail (admin)
    # lists the enabled services per host, each `available` (heartbeat counted up,
    # not forced down) and `active`. The internal zone (conductor, scheduler) shows in
    # /detail only.
    @bp.get("/compute/v2.1/os-availability-zone")
    @locked
    def compute_zones() -> Response:
        listed = [(z, state.zone_enabled(z)) for z in state.zones]
        return json_response({"availabilityZoneInfo": [
            {"zoneName": z, "zoneState": {"available": up}, "hosts": None}
            for up in (True, False) for z, known in listed if known is up]})

    @bp.get("/compute/v2.1/os-availability-zone/detail")
    @locked
    def compute_zones_detail() -> Response:
        require_admin("os_compute_api:os-availability-zone:detail")
        updated = iso(wall()).replace("Z", "")
        found: list[dict[str, Any]] = [{
            "zoneName": "internal", "zoneState": {"available": True},
            "hosts": {"controller": {
                binary: {"available": True, "active": True, "updated_at": updated}
                for binary in ("nova-conductor", "nova-scheduler")}}}]
        for up in (True, False):
            for zone in (z for z in state.zones if state.zone_enabled(z) is up):
                hosts = {h.name: {"nova-compute": {
                    "available": state.service_up(h), "active": True,
                    "updated_at": service_json(h)["updated_at"]}}
                    for h in state.hosts.values() if h.zone == zone and not h.disabled}
                found.append({"zoneName": zone, "zoneState": {"available": up},
                              "hosts": hosts if up else None})
        return json_response({"availabilityZoneInfo": found})

    def service_json(host: Any) -> dict[str, Any]:
        up = state.service_up(host)
        beat = host.died_wall if not host.alive else wall()
        return {"id": host.service_id, "binary": "nova-compute", "host": host.name,
                "zone": host.zone, "status": "disabled" if host.disabled else "enabled",
                "state": "up" if up else "down", "updated_at": iso(beat).replace("Z", ""),
                "disabled_reason": None, "forced_down": host.forced_down}

    @bp.get("/compute/v2.1/os-services")
    @locked
    def services() -> Response:
        require_admin("os_compute_api:os-services:list")
        host = request.args.get("host")
        binary = request.args.get("binary")
        found = [service_json(h) for h in state.hosts.values()
                 if host in (None, h.name) and binary in (None, "nova-compute")]
        return json_response({"services": found})

    @bp.put("/compute/v2.1/os-services/<service_id>")
    @locked
    def update_service(service_id: str) -> Response:
        require_admin("os_compute_api:os-services:update")
        host = next((h for h in state.hosts.values() if h.service_id == service_id), None)
        if host is None:
            raise nova_error(404, f"Service {service_id} could not be found.")
        body = request.get_json(force=True)
        if "forced_down" in body:
            host.forced_down = bool(body["forced_down"])
        if "status" in body:
            host.disabled = body["status"] == "disabled"
        return json_response({"service": service_json(host)})

    # --- Nova: server groups --------------------------------------------------------------
    def group_json(grp: Any) -> dict[str, Any]:
        out = {"id": grp.id, "name": grp.name, "members": list(grp.members),
               "project_id": grp.project_id, "user_id": "u-broker"}
        if nova_microversion() >= (2, 64):
            out.update(policy=grp.policy, rules={})
        else:
            out.update(policies=[grp.policy], metadata={})
        return out

    @bp.get("/compute/v2.1/os-server-groups")
    @locked
    def server_groups() -> Response:
        return json_response({"server_groups": [group_json(x) for x in state.server_groups.values()
                                        if x.project_id == project()]})

    @bp.post("/compute/v2.1/os-server-groups")
    @locked
    def create_server_group() -> Response:
        body = request.get_json(force=True).get("server_group") or {}
        version = nova_microversion()
        # 2.64 replaced the `policies` list with `policy` (+ `rules`); soft policies: 2.15.
        key, other = ("policy", "policies") if version >= (2, 64) else ("policies", "policy")
        if other in body:
            raise nova_error(400, "Invalid input for field/attribute server_group. "
                                  f"Additional properties are not allowed ('{other}')")
        policy = body.get(key)
        if isinstance(policy, list):
            policy = policy[0] if len(policy) == 1 else None
        allowed = ["anti-affinity", "affinity"]
        if version >= (2, 15):
            allowed += ["soft-anti-affinity", "soft-affinity"]
        if policy not in allowed:
            raise nova_error(400, f"Invalid input for field/attribute {key}.")
        if state.over_quota("server_groups", project()):
            raise nova_error(403, "Quota exceeded, too many server groups.")
        grp = ServerGroup(id=new_id(), name=body.get("name", ""), policy=policy,
                          project_id=project())
        state.server_groups[grp.id] = grp
        return json_response({"server_group": group_json(grp)})

    @bp.get("/compute/v2.1/os-server-groups/<group_id>")
    @locked
    def server_group(group_id: str) -> Response:
        grp = state.server_groups.get(group_id)
        if grp is None:
            raise nova_error(404, f"Instance group {group_id} could not be found.")
        return json_response({"server_group": group_json(grp)})

    @bp.delete("/compute/v2.1/os-server-groups/<group_id>")
    @locked
    def delete_server_group(group_id: str) -> Response:
        if state.server_groups.pop(group_id, None) is None:
            raise nova_error(404, f"Instance group {group_id} could not be found.")
        return empty(204)

    # --- Nova: quotas (a project reader may read its own) ----------------------------------
    @bp.get("/compute/v2.1/os-quota-sets/<project_id>")
    @bp.get("/compute/v2.1/os-quota-sets/<project_id>/detail")
    @locked
    def quota_set(project_id: str) -> Response:
        if project_id != project():
            require_admin("os_compute_api:os-quota-sets:show")
        used = state.usage(project_id)
        keys = ("instances", "cores", "ram", "server_groups", "server_group_members")
        if request.path.endswith("/detail"):
            found: dict[str, Any] = {
                k: {"limit": state.quotas[k], "in_use": used.get(k, 0), "reserved": 0}
                for k in keys}
        else:
            found = {k: state.quotas[k] for k in keys}
        return json_response({"quota_set": {"id": project_id, **found}})

    return bp
