"""Nova servers: create, show, delete, actions, interfaces and volume attachments."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.metadata import documents
from tests.fakes.openstack.state import (
    CloudState,
    Port,
    Server,
    Volume,
    iso,
    new_id,
    nova_error,
)
from tests.fakes.openstack.web import (
    base,
    empty,
    is_admin,
    json_response,
    lock_for,
    nova_microversion,
    project,
)


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("servers", __name__)
    locked = lock_for(state)

    # --- Nova: servers ------------------------------------------------------------------
    def server_json(s: Server) -> dict[str, Any]:
        addresses: dict[str, list[dict[str, Any]]] = {}
        for port_id in s.port_ids:
            port = state.ports.get(port_id)
            if port is None:
                continue
            net = state.networks[port.network_id]
            for ip in port.fixed_ips:
                addresses.setdefault(net.name, []).append(
                    {"addr": ip["ip_address"], "version": 4, "OS-EXT-IPS:type": "fixed",
                     "OS-EXT-IPS-MAC:mac_addr": port.mac_address})
        host_status = state.host_status(s)
        out: dict[str, Any] = {
            "id": s.id, "name": s.name, "status": state.server_status(s),
            "tenant_id": s.project_id, "user_id": "u-broker", "metadata": dict(s.metadata),
            "hostId": (s.host or "")[::-1], "image": {"id": s.image_id},
            "flavor": {"original_name": state.flavors[s.flavor_id].name,
                       "vcpus": 1, "ram": 1, "disk": 1, "ephemeral": 0, "swap": 0,
                       "extra_specs": {}},
            "created": iso(s.created), "updated": iso(s.updated), "addresses": addresses,
            "accessIPv4": "", "accessIPv6": "", "progress": 0,
            "config_drive": "True" if s.config_drive is not None else "",
            "key_name": None, "locked": False, "description": None, "tags": [],
            "OS-DCF:diskConfig": "MANUAL", "OS-EXT-AZ:availability_zone": s.zone,
            "OS-EXT-STS:task_state": s.task_state, "OS-EXT-STS:vm_state": s.vm_state,
            "OS-EXT-STS:power_state": s.power_state,
            "OS-SRV-USG:launched_at": None, "OS-SRV-USG:terminated_at": None,
            "os-extended-volumes:volumes_attached": [
                {"id": v, "delete_on_termination": False} for v in s.volume_ids],
            "security_groups": [{"name": "default"}],
            "server_groups": [s.group_id] if s.group_id else [],
            "links": [{"rel": "self", "href": f"{base()}/compute/v2.1/servers/{s.id}"}],
        }
        if s.fault:
            out["fault"] = s.fault
        if is_admin():  # os-extended-server-attributes: admin-only by default
            out["OS-EXT-SRV-ATTR:host"] = s.host
            out["OS-EXT-SRV-ATTR:hypervisor_hostname"] = s.host
        # Since 2.16, and only where policy allows (admin-only by default).
        if nova_microversion() >= (2, 16) and state.shows_host_status(s, is_admin()):
            out["host_status"] = host_status
        return out

    def get_server(server_id: str) -> Server:
        server = state.servers.get(server_id)
        if server is None or server.project_id != project():
            raise nova_error(404, f"Instance {server_id} could not be found.")
        return server

    @bp.get("/compute/v2.1/servers")
    @bp.get("/compute/v2.1/servers/detail")
    @locked
    def servers() -> Response:
        name = request.args.get("name")
        found = [s for s in state.servers.values() if s.project_id == project()
                 and (name is None or re.search(name, s.name))]
        if request.path.endswith("/detail"):
            return json_response({"servers": [server_json(s) for s in found]})
        return json_response({"servers": [{"id": s.id, "name": s.name, "links": []}
                                          for s in found]})

    @bp.get("/compute/v2.1/servers/<server_id>")
    @locked
    def server(server_id: str) -> Response:
        return json_response({"server": server_json(get_server(server_id))})

    @bp.post("/compute/v2.1/servers")
    @locked
    def create_server() -> Response:
        body = request.get_json(force=True)
        spec = body.get("server") or {}
        hints = body.get("OS-SCH-HNT:scheduler_hints") or body.get("os:scheduler_hints") or {}
        name = spec.get("name")
        if not name:
            raise nova_error(400, "Invalid input for field/attribute name.")
        if spec.get("flavorRef") not in state.flavors:
            raise nova_error(400, f"Flavor {spec.get('flavorRef')} could not be found.")
        bdms = spec.get("block_device_mapping_v2") or []
        image_id = spec.get("imageRef") or next(
            (b.get("uuid") for b in bdms if b.get("source_type") == "image"), None)
        if image_id not in state.images:
            raise nova_error(400, f"Image {image_id} could not be found.")
        zone = spec.get("availability_zone") or state.zones[0]
        # Nova validates against the zones with an enabled service (the plain list).
        if zone not in state.zones or not state.zone_enabled(zone):
            raise nova_error(400, "The requested availability zone is not available")
        user_data = spec.get("user_data")
        if user_data is not None:
            if len(user_data) > 65535:
                raise nova_error(400, "Invalid input for field/attribute user_data. "
                                      "Value: " + user_data[:4000] + " is too long")
            try:
                base64.b64decode(user_data, validate=True)
            except Exception:
                raise nova_error(400, "Invalid input for field/attribute user_data. Value: "
                                 + user_data + ". 'user_data' is not a 'base64'") from None
        metadata = spec.get("metadata") or {}
        for key, value in metadata.items():
            if len(key) > 255 or len(str(value)) > 255:
                raise nova_error(400, "Invalid input for field/attribute metadata.")
        group_id = hints.get("group")
        if group_id is not None and group_id not in state.server_groups:
            raise nova_error(400, f"Invalid server group {group_id}")
        ports: list[Port] = []
        for net in spec.get("networks") or []:
            port = state.ports.get(net.get("port", ""))
            if port is None:
                raise nova_error(400, f"Port id {net.get('port')} could not be found.")
            if port.device_id:
                raise nova_error(409, f"Port {port.id} is still in use.")
            ports.append(port)
        volumes: list[Volume] = []
        for bdm in bdms:
            if bdm.get("source_type") != "volume":
                continue
            volume = state.volumes.get(bdm.get("uuid", ""))
            if volume is None:
                raise nova_error(400, f"Block Device Mapping is Invalid: failed to get "
                                      f"volume {bdm.get('uuid')}.")
            if volume.status != "available":
                raise nova_error(400, f"Block Device Mapping is Invalid: volume "
                                      f"{volume.id} status must be 'available'")
            if volume.zone != zone:
                raise nova_error(400, "Block Device Mapping is Invalid: the volume is in "
                                      "another availability zone (cross_az_attach=False).")
            volumes.append(volume)
        state.check_instance_quota(project(), state.flavors[spec["flavorRef"]])
        group = state.server_groups.get(group_id or "")
        if group is not None and len(group.members) >= state.quotas["server_group_members"]:
            raise nova_error(403, "Quota exceeded, too many servers in group")
        s = Server(id=new_id(), name=name, project_id=project(), zone=zone,
                   flavor_id=spec["flavorRef"], image_id=image_id,
                   metadata={k: str(v) for k, v in metadata.items()}, user_data=user_data,
                   group_id=group_id, port_ids=[p.id for p in ports],
                   volume_ids=[v.id for v in volumes])
        if spec.get("config_drive") in (True, "true", "True"):
            # Written at spawn from what the server has then; never updated after.
            s.config_drive = documents(state, s)
        state.servers[s.id] = s
        for volume in volumes:
            volume.status = "reserved"
        state.boot(s)
        return json_response({"server": {"id": s.id, "adminPass": "not-used",
                                 "OS-DCF:diskConfig": "MANUAL", "security_groups": [],
                                 "links": []}}, 202)

    @bp.delete("/compute/v2.1/servers/<server_id>")
    @locked
    def delete_server(server_id: str) -> Response:
        state.delete_server(get_server(server_id))
        return empty(204)

    @bp.post("/compute/v2.1/servers/<server_id>/action")
    @locked
    def server_action(server_id: str) -> Response:
        s = get_server(server_id)
        body = request.get_json(force=True)
        if "os-stop" in body:
            state.stop(s)
        elif "os-start" in body:
            state.start(s)
        elif "forceDelete" in body:  # allowed in any state (deferred-delete extension)
            state.delete_server(s, force=True)
        else:
            raise nova_error(400, f"unsupported action {list(body)}")
        return empty(202)

    def interface_json(port: Port) -> dict[str, Any]:
        return {"port_id": port.id, "net_id": port.network_id, "mac_addr": port.mac_address,
                "port_state": port.status, "fixed_ips": list(port.fixed_ips), "tag": None}

    @bp.get("/compute/v2.1/servers/<server_id>/os-interface")
    @locked
    def interfaces(server_id: str) -> Response:
        s = get_server(server_id)
        return json_response({"interfaceAttachments": [interface_json(state.ports[p])
                                               for p in s.port_ids if p in state.ports]})

    @bp.post("/compute/v2.1/servers/<server_id>/os-interface")
    def attach_interface(server_id: str) -> Response:
        body = request.get_json(force=True).get("interfaceAttachment") or {}
        with state.locked():
            port = state.attach_interface(get_server(server_id), body.get("port_id", ""))
            if port is not None:
                return json_response({"interfaceAttachment": interface_json(port)})
        # A synchronous RPC call to a dead compute host: it waits, then times out.
        time.sleep(state.rpc_response_timeout)
        raise nova_error(500, "Unexpected API Error. Please report this at "
                              "http://bugs.launchpad.net/nova/ and attach the Nova API log "
                              "if possible.\n<class 'oslo_messaging.exceptions."
                              "MessagingTimeout'>")

    @bp.delete("/compute/v2.1/servers/<server_id>/os-interface/<port_id>")
    @locked
    def detach_interface(server_id: str, port_id: str) -> Response:
        state.detach_interface(get_server(server_id), port_id)
        return empty(202)

    @bp.get("/compute/v2.1/servers/<server_id>/os-volume_attachments")
    @locked
    def volume_attachments(server_id: str) -> Response:
        s = get_server(server_id)
        return json_response({"volumeAttachments": [
            {"id": v, "volumeId": v, "serverId": s.id, "device": "/dev/vdb"}
            for v in s.volume_ids]})

    @bp.delete("/compute/v2.1/servers/<server_id>/os-volume_attachments/<volume_id>")
    @locked
    def detach_server_volume(server_id: str, volume_id: str) -> Response:
        state.detach_volume(get_server(server_id), volume_id)
        return empty(202)

    return bp
