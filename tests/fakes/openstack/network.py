"""Neutron: networks, subnets, ports, tags and security groups."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import (
    PROJECT_ID,
    CloudState,
    Port,
    iso,
    neutron_error,
)
from tests.fakes.openstack.web import (
    base,
    empty,
    is_admin,
    json_response,
    lock_for,
    project,
)


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("network", __name__)
    locked = lock_for(state)

    @bp.get("/network")
    @bp.get("/network/")
    def network_root() -> Response:
        return json_response({"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
            {"rel": "self", "href": f"{base()}/network/v2.0/"}]}]})

    # --- Neutron ----------------------------------------------------------------------
    @bp.get("/network/v2.0/extensions")
    def extensions() -> Response:
        return json_response({"extensions": [
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
        return json_response({key: [i for i in items if matches(i)]})

    @bp.get("/network/v2.0/networks")
    @locked
    def networks() -> Response:
        return listing("networks", [net_json(n) for n in state.networks.values()])

    @bp.get("/network/v2.0/networks/<net_id>")
    @locked
    def network(net_id: str) -> Response:
        if net_id not in state.networks:
            raise neutron_error(404, "NetworkNotFound", f"Network {net_id} could not be found.")
        return json_response({"network": net_json(state.networks[net_id])})

    @bp.get("/network/v2.0/subnets")
    @locked
    def subnets() -> Response:
        return listing("subnets", [subnet_json(s) for s in state.subnets.values()])

    @bp.get("/network/v2.0/subnets/<subnet_id>")
    @locked
    def subnet(subnet_id: str) -> Response:
        if subnet_id not in state.subnets:
            raise neutron_error(404, "SubnetNotFound", f"Subnet {subnet_id} could not be found.")
        return json_response({"subnet": subnet_json(state.subnets[subnet_id])})

    def get_port(port_id: str) -> Port:
        port = state.ports.get(port_id)
        if port is None or (port.project_id != project() and not is_admin()):
            raise neutron_error(404, "PortNotFound", f"Port {port_id} could not be found.")
        return port

    @bp.get("/network/v2.0/ports")
    @locked
    def ports() -> Response:
        return listing("ports", [port_json(p) for p in state.ports.values()
                                 if p.project_id == project()])

    @bp.post("/network/v2.0/ports")
    @locked
    def create_port() -> Response:
        body = request.get_json(force=True).get("port") or {}
        return json_response({"port": port_json(state.create_port(body, project()))}, 201)

    @bp.get("/network/v2.0/ports/<port_id>")
    @locked
    def port(port_id: str) -> Response:
        return json_response({"port": port_json(get_port(port_id))})

    @bp.put("/network/v2.0/ports/<port_id>")
    @locked
    def update_port(port_id: str) -> Response:
        p = get_port(port_id)
        body = request.get_json(force=True).get("port") or {}
        for key in ("name", "description"):
            if key in body:
                setattr(p, key, body[key])
        if "security_groups" in body:
            p.security_groups = list(body["security_groups"])
        return json_response({"port": port_json(p)})

    @bp.delete("/network/v2.0/ports/<port_id>")
    @locked
    def delete_port(port_id: str) -> Response:
        p = get_port(port_id)
        if p.device_id and p.device_id in state.servers:
            state.unbind_port(p, state.servers[p.device_id])
        del state.ports[p.id]
        state.hooks.port_deleted(p)
        return empty(204)

    @bp.put("/network/v2.0/<kind>/<item_id>/tags")
    @locked
    def set_tags(kind: str, item_id: str) -> Response:
        tags = list(request.get_json(force=True).get("tags") or [])
        if kind == "ports":
            get_port(item_id).tags = tags
        elif kind == "security-groups" and item_id in state.security_groups:
            state.security_groups[item_id].tags = tags
        else:
            raise neutron_error(404, "NotFound", f"{kind} {item_id} could not be found.")
        return json_response({"tags": tags})

    @bp.get("/network/v2.0/security-groups")
    @locked
    def security_groups() -> Response:
        return listing("security_groups", [sg_json(x) for x in state.security_groups.values()
                                           if x.project_id == project()])

    @bp.get("/network/v2.0/security-groups/<sg_id>")
    @locked
    def security_group(sg_id: str) -> Response:
        if sg_id not in state.security_groups:
            raise neutron_error(404, "SecurityGroupNotFound",
                                f"Security group {sg_id} does not exist")
        return json_response({"security_group": sg_json(state.security_groups[sg_id])})

    @bp.post("/network/v2.0/security-groups")
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
        return json_response({"security_group": sg_json(sg)}, 201)

    @bp.delete("/network/v2.0/security-groups/<sg_id>")
    @locked
    def delete_security_group(sg_id: str) -> Response:
        state.delete_security_group(sg_id)
        return empty(204)

    @bp.get("/network/v2.0/security-group-rules")
    @locked
    def security_group_rules() -> Response:
        rules = [r for sg in state.security_groups.values() for r in sg.rules]
        return listing("security_group_rules", rules)

    @bp.post("/network/v2.0/security-group-rules")
    @locked
    def create_security_group_rule() -> Response:
        body = request.get_json(force=True).get("security_group_rule") or {}
        sg = state.security_groups.get(body.get("security_group_id", ""))
        if sg is None:
            raise neutron_error(404, "SecurityGroupNotFound", "Security group does not exist")
        if state.over_quota("security_group_rules", project()):
            raise neutron_error(409, "OverQuota",
                                "Quota exceeded for resources: ['security_group_rule'].")
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
        return json_response({"security_group_rule": rule}, 201)

    @bp.get("/network/v2.0/quotas/<project_id>/details")
    @locked
    def quota_details(project_id: str) -> Response:
        if project_id != project() and not is_admin():
            raise neutron_error(403, "PolicyNotAuthorized",
                                "rule:get_quota is disallowed by policy")
        used = state.usage(project_id)
        keys = (("port", "ports"), ("security_group", "security_groups"),
                ("security_group_rule", "security_group_rules"))
        return json_response({"quota": {
            name: {"limit": state.quotas[key], "used": used.get(key, 0), "reserved": 0}
            for name, key in keys}})

    return bp
