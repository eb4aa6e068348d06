"""Nova's metadata service, as the guest reads it through Neutron's metadata proxy.

The proxy names the instance in `X-Instance-ID`, signed with the shared secret
(`X-Instance-ID-Signature`, HMAC-SHA256). Nova builds the instance's metadata once
and serves it from a cache for `[api] metadata_cache_expiration` seconds (15 by
default): a port attached meanwhile shows up in network_data.json only after that.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time
from typing import Any

from flask import Blueprint, Response, request

from tests.fakes.openstack.state import CloudState, Server
from tests.fakes.openstack.web import json_response

DEFAULT_ROUTE = "0.0.0.0"  # noqa: S104 (a route, not a listening address)


def sign(secret: str, instance_id: str) -> str:
    return hmac.new(secret.encode(), instance_id.encode(), hashlib.sha256).hexdigest()


def network_data(state: CloudState, server: Server) -> dict[str, Any]:
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for i, port_id in enumerate(server.port_ids):
        port = state.ports.get(port_id)
        if port is None:
            continue
        links.append({"id": f"tap{port.id[:11]}", "type": "ovs", "mtu": 1450,
                      "ethernet_mac_address": port.mac_address, "vif_id": port.id})
        for ip in port.fixed_ips:
            subnet = state.subnets[ip["subnet_id"]]
            net = ipaddress.ip_network(subnet.cidr)
            networks.append({
                "id": f"network{i}", "type": "ipv4", "link": f"tap{port.id[:11]}",
                "ip_address": ip["ip_address"], "netmask": str(net.netmask),
                "network_id": port.network_id,
                "routes": [{"network": DEFAULT_ROUTE, "netmask": DEFAULT_ROUTE,
                            "gateway": subnet.gateway_ip}] if i == 0 else [],
                "services": []})
    return {"links": links, "networks": networks, "services": []}


def documents(state: CloudState, server: Server) -> dict[str, Any]:
    """What the metadata service (and a config drive, written once at boot) holds."""
    return {
        "meta_data.json": {"uuid": server.id, "name": server.name,
                           "hostname": server.name, "launch_index": 0,
                           "availability_zone": server.zone, "project_id":
                           server.project_id, "meta": dict(server.metadata),
                           "devices": []},
        "network_data.json": network_data(state, server),
        "user_data": server.user_data,
    }


def blueprint(state: CloudState) -> Blueprint:
    bp = Blueprint("metadata", __name__)
    cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def instance_data() -> dict[str, Any]:
        instance_id = request.headers.get("X-Instance-ID", "")
        signature = request.headers.get("X-Instance-ID-Signature", "")
        if not instance_id or not hmac.compare_digest(
                signature, sign(state.metadata_secret, instance_id)):
            raise PermissionError
        now = time.monotonic()
        with state.locked():
            hit = cache.get(instance_id)
            if hit is not None and now - hit[0] < state.metadata_cache_expiration:
                return hit[1]
            server = state.servers.get(instance_id)
            if server is None:
                raise LookupError
            data = documents(state, server)
            if state.metadata_cache_expiration > 0:
                cache[instance_id] = (now, data)
            return data

    @bp.get("/openstack/latest/<item>")
    def item(item: str) -> Response:
        try:
            data = instance_data()
        except PermissionError:
            return Response(b"403 Forbidden", status=403)
        except LookupError:
            return Response(b"404 Not Found", status=404)
        if item not in data:
            return Response(b"404 Not Found", status=404)
        if item == "user_data":
            raw = data[item]
            return Response(base64.b64decode(raw) if raw else b"", status=200 if raw else 404,
                            mimetype="application/octet-stream")
        return json_response(data[item])


    return bp
