"""The fake's HTTP face: Keystone v3, Nova, Neutron, Cinder v3 and Glance routes.

The real openstacksdk talks to this over loopback, so the wire format (version
discovery, resource keys, error bodies, status codes) follows the real APIs closely
enough for the SDK's own parsing, microversion negotiation and error mapping.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask, Response, g, request

from tests.fakes.openstack.state import (
    PROJECT_ID,
    ApiError,
    CloudState,
    Port,
    Recorded,
    Server,
    Volume,
    cinder_error,
    iso,
    neutron_error,
    new_id,
    nova_error,
    wall,
)

NOVA_MAX = "2.90"
CINDER_MAX = "3.70"

USERS = {
    # name: (password, roles, project)
    "broker": ("broker-secret", ["member", "reader"], ("pgha", PROJECT_ID)),
    "admin": ("admin-secret", ["admin", "member", "reader"], ("pgha", PROJECT_ID)),
}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json",
                    headers=headers or {})


def _empty(status: int) -> Response:
    return Response(b"", status=status)


def make_app(state: CloudState) -> Flask:
    app = Flask("fake-openstack")
    tokens: dict[str, dict[str, Any]] = {}

    def base() -> str:
        return request.host_url.rstrip("/")

    # --- plumbing: faults, auth, recording ----------------------------------------
    @app.before_request
    def _before() -> Response | None:
        try:
            body = request.get_json(silent=True)
        except Exception:
            body = None
        rec = Recorded(method=request.method, path=request.path,
                       query={k: v for k, v in request.args.items()}, body=body,
                       headers={k: v for k, v in request.headers.items()
                                if k.lower().startswith("openstack-api-version")})
        g.rec = rec
        with state.lock:
            state.requests.append(rec)
            rule = next((f for f in state.faults if f.matches(request.method, request.path)),
                        None)
            if rule is not None:
                rule.hits += 1
        if rule is not None:
            if rule.delay:
                time.sleep(rule.delay)
            if rule.status is not None:
                payload = rule.body or {"error": {"code": rule.status,
                                                  "message": "injected fault"}}
                return _json(payload, rule.status)
        if request.path.startswith("/identity") or request.path.rstrip("/") in (
                "/compute", "/compute/v2.1", "/network", "/volume", "/volume/v3", "/image"):
            return None
        if re.fullmatch(r"/volume/v3/[0-9a-f]+/?", request.path):
            return None
        token = tokens.get(request.headers.get("X-Auth-Token", ""))
        if token is None:
            return _json({"error": {"code": 401, "message": "The request you have made "
                                    "requires authentication.", "title": "Unauthorized"}}, 401)
        g.user = token
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        rec = getattr(g, "rec", None)
        if rec is not None:
            rec.status = response.status_code
        response.headers["x-openstack-request-id"] = f"req-{uuid.uuid4()}"
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _json(exc.body, exc.status)

    def is_admin() -> bool:
        return "admin" in g.user["roles"]

    def project() -> str:
        return str(g.user["project_id"])

    def require_admin(policy: str) -> None:
        if not is_admin():
            raise nova_error(403, f"Policy doesn't allow {policy} to be performed.")

    def locked(fn: Callable[..., Response]) -> Callable[..., Response]:
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            with state.locked():
                return fn(*args, **kwargs)
        wrapper.__name__ = fn.__name__
        return wrapper

    # --- Keystone v3 ---------------------------------------------------------------
    def identity_version() -> dict[str, Any]:
        return {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": f"{base()}/identity/v3/"}],
                "media-types": [{"base": "application/json",
                                 "type": "application/vnd.openstack.identity-v3+json"}]}

    @app.get("/identity")
    @app.get("/identity/")
    def identity_root() -> Response:
        return _json({"versions": {"values": [identity_version()]}}, 300)

    @app.get("/identity/v3")
    @app.get("/identity/v3/")
    def identity_v3() -> Response:
        return _json({"version": identity_version()})

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

    @app.post("/identity/v3/auth/tokens")
    def issue_token() -> Response:
        body = request.get_json(force=True)
        ident = body["auth"]["identity"]
        user = ident.get("password", {}).get("user", {})
        known = USERS.get(user.get("name", ""))
        if known is None or known[0] != user.get("password"):
            return _json({"error": {"code": 401, "message": "The request you have made "
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
        return _json({"token": token}, 201, {"X-Subject-Token": token_id})

    # --- version discovery ---------------------------------------------------------
    def nova_version() -> dict[str, Any]:
        return {"id": "v2.1", "status": "CURRENT", "version": NOVA_MAX, "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": f"{base()}/compute/v2.1/"}]}

    @app.get("/compute")
    @app.get("/compute/")
    def compute_root() -> Response:
        return _json({"versions": [nova_version()]})

    @app.get("/compute/v2.1")
    @app.get("/compute/v2.1/")
    def compute_v21() -> Response:
        return _json({"version": nova_version()})

    @app.get("/network")
    @app.get("/network/")
    def network_root() -> Response:
        return _json({"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
            {"rel": "self", "href": f"{base()}/network/v2.0/"}]}]})

    def cinder_version() -> dict[str, Any]:
        return {"id": "v3.0", "status": "CURRENT", "version": CINDER_MAX,
                "min_version": "3.0", "updated": "2023-08-31T00:00:00Z",
                "links": [{"rel": "self", "href": f"{base()}/volume/v3/"}]}

    @app.get("/volume")
    @app.get("/volume/")
    def volume_root() -> Response:
        return _json({"versions": [cinder_version()]}, 300)

    @app.get("/volume/v3")
    @app.get("/volume/v3/")
    @app.get("/volume/v3/<project_id>")
    @app.get("/volume/v3/<project_id>/")
    def volume_v3(project_id: str = "") -> Response:
        return _json({"versions": [cinder_version()]})

    @app.get("/image")
    @app.get("/image/")
    def image_root() -> Response:
        return _json({"versions": [{"id": "v2.16", "status": "CURRENT", "links": [
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

    @app.get("/image/v2/images")
    @locked
    def images() -> Response:
        name = request.args.get("name")
        found = [image_json(i) for i in state.images.values() if name in (None, i.name)]
        return _json({"images": found, "first": "/v2/images", "schema": "/v2/schemas/images"})

    @app.get("/image/v2/images/<image_id>")
    @locked
    def image(image_id: str) -> Response:
        if image_id not in state.images:
            return _json({"message": "Not Found", "code": "404 Not Found"}, 404)
        return _json(image_json(state.images[image_id]))

    # --- Nova: flavors, zones, services ---------------------------------------------------
    def flavor_json(f: Any) -> dict[str, Any]:
        return {"id": f.id, "name": f.name, "vcpus": f.vcpus, "ram": f.ram, "disk": f.disk,
                "OS-FLV-EXT-DATA:ephemeral": 0, "swap": "", "rxtx_factor": 1.0,
                "os-flavor-access:is_public": True, "OS-FLV-DISABLED:disabled": False,
                "description": None, "extra_specs": dict(f.extra_specs),
                "links": [{"rel": "self", "href": f"{base()}/compute/v2.1/flavors/{f.id}"}]}

    @app.get("/compute/v2.1/flavors")
    @app.get("/compute/v2.1/flavors/detail")
    @locked
    def flavors() -> Response:
        return _json({"flavors": [flavor_json(f) for f in state.flavors.values()]})

    @app.get("/compute/v2.1/flavors/<flavor_id>")
    @locked
    def flavor(flavor_id: str) -> Response:
        if flavor_id not in state.flavors:
            raise nova_error(404, f"Flavor {flavor_id} could not be found.")
        return _json({"flavor": flavor_json(state.flavors[flavor_id])})

    @app.get("/compute/v2.1/flavors/<flavor_id>/os-extra_specs")
    @locked
    def flavor_specs(flavor_id: str) -> Response:
        if flavor_id not in state.flavors:
            raise nova_error(404, f"Flavor {flavor_id} could not be found.")
        return _json({"extra_specs": dict(state.flavors[flavor_id].extra_specs)})

    @app.get("/compute/v2.1/os-availability-zone")
    @app.get("/compute/v2.1/os-availability-zone/detail")
    @locked
    def compute_zones() -> Response:
        return _json({"availabilityZoneInfo": [
            {"zoneName": z, "zoneState": {"available": True}, "hosts": None}
            for z in state.zones]})

    def service_json(host: Any) -> dict[str, Any]:
        up = state.service_up(host)
        beat = host.died_wall if not host.alive else wall()
        return {"id": host.service_id, "binary": "nova-compute", "host": host.name,
                "zone": host.zone, "status": "disabled" if host.disabled else "enabled",
                "state": "up" if up else "down", "updated_at": iso(beat).replace("Z", ""),
                "disabled_reason": None, "forced_down": host.forced_down}

    @app.get("/compute/v2.1/os-services")
    @locked
    def services() -> Response:
        require_admin("os_compute_api:os-services:list")
        host = request.args.get("host")
        binary = request.args.get("binary")
        found = [service_json(h) for h in state.hosts.values()
                 if host in (None, h.name) and binary in (None, "nova-compute")]
        return _json({"services": found})

    @app.put("/compute/v2.1/os-services/<service_id>")
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
        return _json({"service": service_json(host)})

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
            "accessIPv4": "", "accessIPv6": "", "progress": 0, "config_drive": "",
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
        if is_admin():
            out["OS-EXT-SRV-ATTR:host"] = s.host
            out["OS-EXT-SRV-ATTR:hypervisor_hostname"] = s.host
            out["host_status"] = host_status
        elif host_status == "UNKNOWN":
            out["host_status"] = host_status  # the "unknown-only" policy
        return out

    def get_server(server_id: str) -> Server:
        server = state.servers.get(server_id)
        if server is None or server.project_id != project():
            raise nova_error(404, f"Instance {server_id} could not be found.")
        return server

    @app.get("/compute/v2.1/servers")
    @app.get("/compute/v2.1/servers/detail")
    @locked
    def servers() -> Response:
        name = request.args.get("name")
        found = [s for s in state.servers.values() if s.project_id == project()
                 and (name is None or re.search(name, s.name))]
        if request.path.endswith("/detail"):
            return _json({"servers": [server_json(s) for s in found]})
        return _json({"servers": [{"id": s.id, "name": s.name, "links": []} for s in found]})

    @app.get("/compute/v2.1/servers/<server_id>")
    @locked
    def server(server_id: str) -> Response:
        return _json({"server": server_json(get_server(server_id))})

    @app.post("/compute/v2.1/servers")
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
        if zone not in state.zones:
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
        if state.over_quota("instances", project()):
            raise nova_error(403, "Quota exceeded for instances: Requested 1, but already "
                                  f"used {state._count('instances', project())} of "
                                  f"{state.quotas['instances']} instances")
        s = Server(id=new_id(), name=name, project_id=project(), zone=zone,
                   flavor_id=spec["flavorRef"], image_id=image_id,
                   metadata={k: str(v) for k, v in metadata.items()}, user_data=user_data,
                   group_id=group_id, port_ids=[p.id for p in ports],
                   volume_ids=[v.id for v in volumes])
        state.servers[s.id] = s
        for volume in volumes:
            volume.status = "reserved"
        state.boot(s)
        return _json({"server": {"id": s.id, "adminPass": "not-used",
                                 "OS-DCF:diskConfig": "MANUAL", "security_groups": [],
                                 "links": []}}, 202)

    @app.delete("/compute/v2.1/servers/<server_id>")
    @locked
    def delete_server(server_id: str) -> Response:
        state.delete_server(get_server(server_id))
        return _empty(204)

    @app.post("/compute/v2.1/servers/<server_id>/action")
    @locked
    def server_action(server_id: str) -> Response:
        s = get_server(server_id)
        body = request.get_json(force=True)
        if "os-stop" in body:
            state.stop(s)
        elif "os-start" in body:
            state.start(s)
        else:
            raise nova_error(400, f"unsupported action {list(body)}")
        return _empty(202)

    def interface_json(port: Port) -> dict[str, Any]:
        return {"port_id": port.id, "net_id": port.network_id, "mac_addr": port.mac_address,
                "port_state": port.status, "fixed_ips": list(port.fixed_ips), "tag": None}

    @app.get("/compute/v2.1/servers/<server_id>/os-interface")
    @locked
    def interfaces(server_id: str) -> Response:
        s = get_server(server_id)
        return _json({"interfaceAttachments": [interface_json(state.ports[p])
                                               for p in s.port_ids if p in state.ports]})

    @app.post("/compute/v2.1/servers/<server_id>/os-interface")
    @locked
    def attach_interface(server_id: str) -> Response:
        s = get_server(server_id)
        body = request.get_json(force=True).get("interfaceAttachment") or {}
        port = state.attach_interface(s, body.get("port_id", ""))
        return _json({"interfaceAttachment": interface_json(port)})

    @app.delete("/compute/v2.1/servers/<server_id>/os-interface/<port_id>")
    @locked
    def detach_interface(server_id: str, port_id: str) -> Response:
        state.detach_interface(get_server(server_id), port_id)
        return _empty(202)

    @app.get("/compute/v2.1/servers/<server_id>/os-volume_attachments")
    @locked
    def volume_attachments(server_id: str) -> Response:
        s = get_server(server_id)
        return _json({"volumeAttachments": [
            {"id": v, "volumeId": v, "serverId": s.id, "device": "/dev/vdb"}
            for v in s.volume_ids]})

    @app.delete("/compute/v2.1/servers/<server_id>/os-volume_attachments/<volume_id>")
    @locked
    def detach_server_volume(server_id: str, volume_id: str) -> Response:
        state.detach_volume(get_server(server_id), volume_id)
        return _empty(202)

    # --- Nova: server groups --------------------------------------------------------------
    def group_json(grp: Any) -> dict[str, Any]:
        return {"id": grp.id, "name": grp.name, "policy": grp.policy, "rules": {},
                "members": list(grp.members), "project_id": grp.project_id,
                "user_id": "u-broker"}

    @app.get("/compute/v2.1/os-server-groups")
    @locked
    def server_groups() -> Response:
        return _json({"server_groups": [group_json(x) for x in state.server_groups.values()
                                        if x.project_id == project()]})

    @app.post("/compute/v2.1/os-server-groups")
    @locked
    def create_server_group() -> Response:
        from tests.fakes.openstack.state import ServerGroup

        body = request.get_json(force=True).get("server_group") or {}
        if "policies" in body:
            raise nova_error(400, "Invalid input for field/attribute server_group. "
                                  "Additional properties are not allowed ('policies')")
        if body.get("policy") not in ("anti-affinity", "affinity", "soft-anti-affinity"):
            raise nova_error(400, "Invalid input for field/attribute policy.")
        if state.over_quota("server_groups", project()):
            raise nova_error(403, "Quota exceeded, too many server groups.")
        grp = ServerGroup(id=new_id(), name=body.get("name", ""), policy=body["policy"],
                          project_id=project())
        state.server_groups[grp.id] = grp
        return _json({"server_group": group_json(grp)})

    @app.get("/compute/v2.1/os-server-groups/<group_id>")
    @locked
    def server_group(group_id: str) -> Response:
        grp = state.server_groups.get(group_id)
        if grp is None:
            raise nova_error(404, f"Instance group {group_id} could not be found.")
        return _json({"server_group": group_json(grp)})

    @app.delete("/compute/v2.1/os-server-groups/<group_id>")
    @locked
    def delete_server_group(group_id: str) -> Response:
        if state.server_groups.pop(group_id, None) is None:
            raise nova_error(404, f"Instance group {group_id} could not be found.")
        return _empty(204)

    # --- Neutron ----------------------------------------------------------------------
    @app.get("/network/v2.0/extensions")
    def extensions() -> Response:
        return _json({"extensions": [
            {"alias": a, "name": a, "description": a, "updated": "2020-01-01T00:00:00Z",
             "links": []} for a in ("standard-attr-tag", "security-group", "binding")]})

    def net_json(n: Any) -> dict[str, Any]:
        return {"id": n.id, "name": n.name, "status": "ACTIVE", "admin_state_up": True,
                "subnets": [s.id for s in state.subnets.values() if s.network_id == n.id],
                "shared": False, "project_id": PROJECT_ID, "tenant_id": PROJECT_ID,
                "tags": [], "mtu": 1450, "router:external": False}

    def subnet_json(s: Any) -> dict[str, Any]:
        return {"id": s.id, "name": s.name, "network_id": s.network_id, "cidr": s.cidr,
                "gateway_ip": s.gateway_ip, "ip_version": 4, "enable_dhcp": True,
                "project_id": PROJECT_ID, "tenant_id": PROJECT_ID, "tags": [],
                "allocation_pools": [], "dns_nameservers": [], "host_routes": []}

    def port_json(p: Port) -> dict[str, Any]:
        return {"id": p.id, "name": p.name, "network_id": p.network_id,
                "fixed_ips": list(p.fixed_ips), "device_id": p.device_id,
                "device_owner": p.device_owner, "binding:host_id": p.host_id,
                "status": p.status, "security_groups": list(p.security_groups),
                "tags": list(p.tags), "mac_address": p.mac_address, "admin_state_up": True,
                "project_id": p.project_id, "tenant_id": p.project_id,
                "description": p.description, "port_security_enabled": True,
                "allowed_address_pairs": [], "created_at": iso(p.created_at),
                "revision_number": 1}

    def sg_json(sg: Any) -> dict[str, Any]:
        return {"id": sg.id, "name": sg.name, "description": sg.description,
                "project_id": sg.project_id, "tenant_id": sg.project_id,
                "security_group_rules": [dict(r) for r in sg.rules], "tags": list(sg.tags),
                "stateful": True}

    def matches(item: dict[str, Any], skip: tuple[str, ...] = ()) -> bool:
        for key in request.args:
            if key in ("fields", "limit", "marker", "sort_key", "sort_dir", *skip):
                continue
            values = request.args.getlist(key)
            if key == "tags":
                wanted = {t for v in values for t in v.split(",")}
                if not wanted <= set(item.get("tags", [])):
                    return False
                continue
            if key == "tags-any":
                wanted = {t for v in values for t in v.split(",")}
                if not wanted & set(item.get("tags", [])):
                    return False
                continue
            if key not in item:
                continue
            if str(item[key]) not in values and not (
                    isinstance(item[key], bool) and str(item[key]).lower() in values):
                return False
        return True

    def listing(key: str, items: list[dict[str, Any]]) -> Response:
        return _json({key: [i for i in items if matches(i)]})

    @app.get("/network/v2.0/networks")
    @locked
    def networks() -> Response:
        return listing("networks", [net_json(n) for n in state.networks.values()])

    @app.get("/network/v2.0/networks/<net_id>")
    @locked
    def network(net_id: str) -> Response:
        if net_id not in state.networks:
            raise neutron_error(404, "NetworkNotFound", f"Network {net_id} could not be found.")
        return _json({"network": net_json(state.networks[net_id])})

    @app.get("/network/v2.0/subnets")
    @locked
    def subnets() -> Response:
        return listing("subnets", [subnet_json(s) for s in state.subnets.values()])

    @app.get("/network/v2.0/subnets/<subnet_id>")
    @locked
    def subnet(subnet_id: str) -> Response:
        if subnet_id not in state.subnets:
            raise neutron_error(404, "SubnetNotFound", f"Subnet {subnet_id} could not be found.")
        return _json({"subnet": subnet_json(state.subnets[subnet_id])})

    def get_port(port_id: str) -> Port:
        port = state.ports.get(port_id)
        if port is None or (port.project_id != project() and not is_admin()):
            raise neutron_error(404, "PortNotFound", f"Port {port_id} could not be found.")
        return port

    @app.get("/network/v2.0/ports")
    @locked
    def ports() -> Response:
        return listing("ports", [port_json(p) for p in state.ports.values()
                                 if p.project_id == project()])

    @app.post("/network/v2.0/ports")
    @locked
    def create_port() -> Response:
        body = request.get_json(force=True).get("port") or {}
        return _json({"port": port_json(state.create_port(body, project()))}, 201)

    @app.get("/network/v2.0/ports/<port_id>")
    @locked
    def port(port_id: str) -> Response:
        return _json({"port": port_json(get_port(port_id))})

    @app.put("/network/v2.0/ports/<port_id>")
    @locked
    def update_port(port_id: str) -> Response:
        p = get_port(port_id)
        body = request.get_json(force=True).get("port") or {}
        for key in ("name", "description"):
            if key in body:
                setattr(p, key, body[key])
        if "security_groups" in body:
            p.security_groups = list(body["security_groups"])
        return _json({"port": port_json(p)})

    @app.delete("/network/v2.0/ports/<port_id>")
    @locked
    def delete_port(port_id: str) -> Response:
        p = get_port(port_id)
        if p.device_id and p.device_id in state.servers:
            state.unbind_port(p, state.servers[p.device_id])
        del state.ports[p.id]
        state.hooks.port_deleted(p)
        return _empty(204)

    @app.put("/network/v2.0/<kind>/<item_id>/tags")
    @locked
    def set_tags(kind: str, item_id: str) -> Response:
        tags = list(request.get_json(force=True).get("tags") or [])
        if kind == "ports":
            get_port(item_id).tags = tags
        elif kind == "security-groups" and item_id in state.security_groups:
            state.security_groups[item_id].tags = tags
        else:
            raise neutron_error(404, "NotFound", f"{kind} {item_id} could not be found.")
        return _json({"tags": tags})

    @app.get("/network/v2.0/security-groups")
    @locked
    def security_groups() -> Response:
        return listing("security_groups", [sg_json(x) for x in state.security_groups.values()
                                           if x.project_id == project()])

    @app.get("/network/v2.0/security-groups/<sg_id>")
    @locked
    def security_group(sg_id: str) -> Response:
        if sg_id not in state.security_groups:
            raise neutron_error(404, "SecurityGroupNotFound",
                                f"Security group {sg_id} does not exist")
        return _json({"security_group": sg_json(state.security_groups[sg_id])})

    @app.post("/network/v2.0/security-groups")
    @locked
    def create_security_group() -> Response:
        body = request.get_json(force=True).get("security_group") or {}
        if "tags" in body:
            raise neutron_error(400, "HTTPBadRequest", "Unrecognized attribute(s) 'tags'")
        if state.over_quota("security_groups", project()):
            raise neutron_error(409, "OverQuota",
                                "Quota exceeded for resources: ['security_group'].")
        sg = state.add_security_group(body.get("name", ""), body.get("description", ""),
                                      project())
        return _json({"security_group": sg_json(sg)}, 201)

    @app.delete("/network/v2.0/security-groups/<sg_id>")
    @locked
    def delete_security_group(sg_id: str) -> Response:
        state.delete_security_group(sg_id)
        return _empty(204)

    @app.get("/network/v2.0/security-group-rules")
    @locked
    def security_group_rules() -> Response:
        rules = [r for sg in state.security_groups.values() for r in sg.rules]
        return listing("security_group_rules", rules)

    @app.post("/network/v2.0/security-group-rules")
    @locked
    def create_security_group_rule() -> Response:
        body = request.get_json(force=True).get("security_group_rule") or {}
        sg = state.security_groups.get(body.get("security_group_id", ""))
        if sg is None:
            raise neutron_error(404, "SecurityGroupNotFound", "Security group does not exist")
        rule = state._rule(sg.id, body.get("direction", "ingress"),
                           body.get("ethertype", "IPv4"),
                           **{k: body.get(k) for k in ("protocol", "port_range_min",
                                                       "port_range_max", "remote_ip_prefix",
                                                       "remote_group_id")},
                           description=body.get("description", ""))
        same = [r for r in sg.rules if all(r[k] == rule[k] for k in rule
                                           if k not in ("id", "description"))]
        if same:
            raise neutron_error(409, "SecurityGroupRuleExists",
                                f"Security group rule already exists. Rule id is "
                                f"{same[0]['id']}.")
        sg.rules.append(rule)
        return _json({"security_group_rule": rule}, 201)

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

    @app.get(f"{cinder}/volumes")
    @app.get(f"{cinder}/volumes/detail")
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
        return _json({"volumes": [volume_json(v) for v in found]})

    @app.post(f"{cinder}/volumes")
    @locked
    def create_volume(project_id: str) -> Response:
        body = request.get_json(force=True).get("volume") or {}
        return _json({"volume": volume_json(state.create_volume(body, project()))}, 202)

    @app.get(f"{cinder}/volumes/<volume_id>")
    @locked
    def volume(project_id: str, volume_id: str) -> Response:
        return _json({"volume": volume_json(get_volume(volume_id))})

    @app.delete(f"{cinder}/volumes/<volume_id>")
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
        return _empty(202)

    @app.post(f"{cinder}/volumes/<volume_id>/action")
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
            return _empty(202)
        if "os-reset_status" in body:
            if not is_admin():
                raise cinder_error(403, "Policy doesn't allow reset_status.")
            v.status = body["os-reset_status"].get("status", v.status)
            return _empty(202)
        raise cinder_error(400, f"unsupported action {list(body)}")

    def attachment_json(v: Volume, a: Any) -> dict[str, Any]:
        return {"id": a.id, "volume_id": v.id, "instance": a.server_id,
                "status": "attached", "attach_mode": "rw", "attached_at": iso(a.attached_at),
                "detached_at": None, "connection_info": None}

    @app.get(f"{cinder}/attachments")
    @app.get(f"{cinder}/attachments/detail")
    @locked
    def attachments(project_id: str) -> Response:
        vid = request.args.get("volume_id")
        found = [attachment_json(v, a) for v in state.volumes.values()
                 if v.project_id == project() and vid in (None, v.id) for a in v.attachments]
        return _json({"attachments": found})

    @app.delete(f"{cinder}/attachments/<attachment_id>")
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
                    return _json({"attachments": []})
        raise cinder_error(404, f"Attachment {attachment_id} could not be found.")

    @app.get(f"{cinder}/types")
    @locked
    def volume_types(project_id: str) -> Response:
        return _json({"volume_types": [{"id": i, "name": n, "is_public": True,
                                        "extra_specs": {}, "description": None}
                                       for n, i in state.volume_types.items()]})

    @app.get(f"{cinder}/types/<type_id>")
    @locked
    def volume_type(project_id: str, type_id: str) -> Response:
        for name, tid in state.volume_types.items():
            if type_id in (tid, name):
                return _json({"volume_type": {"id": tid, "name": name, "is_public": True,
                                              "extra_specs": {}, "description": None}})
        raise cinder_error(404, f"Volume type {type_id} could not be found.")

    @app.get(f"{cinder}/os-availability-zone")
    @locked
    def volume_zones(project_id: str) -> Response:
        return _json({"availabilityZoneInfo": [
            {"zoneName": z, "zoneState": {"available": True}} for z in state.volume_zones]})

    return app
