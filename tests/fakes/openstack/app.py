"""The fake's HTTP face: one Flask app, one blueprint per service (identity.py,
compute.py, servers.py, network.py, volume.py, image.py, metadata.py).

The real openstacksdk talks to this over loopback, so the wire format (version
discovery, resource keys, error bodies, status codes) follows the real APIs closely
enough for the SDK's own parsing, microversion negotiation and error mapping. This
module holds what every request goes through: fault injection, authentication and
the request record.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request

from tests.fakes.openstack import compute, identity, image, metadata, network, servers, volume
from tests.fakes.openstack.identity import USERS
from tests.fakes.openstack.state import ApiError, CloudState, FaultRule, Recorded
from tests.fakes.openstack.web import json_response

__all__ = ["USERS", "make_app"]

_UNAUTHENTICATED = ("/compute", "/compute/v2.1", "/network", "/volume", "/volume/v3", "/image")


def _fault_response(rule: FaultRule) -> Response:
    payload = rule.body or {"error": {"code": rule.status, "message": "injected fault"}}
    return json_response(payload, rule.status or 500)


def make_app(state: CloudState) -> Flask:
    app = Flask("fake-openstack")
    tokens: dict[str, dict[str, Any]] = {}

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
        if rule is not None and rule.applied:
            g.fault_after = rule  # the request is carried out; its answer is lost
        elif rule is not None:
            if rule.delay:
                time.sleep(rule.delay)
            if rule.status is not None:
                return _fault_response(rule)
        if request.path.startswith(("/identity", "/openstack")) \
                or request.path.rstrip("/") in _UNAUTHENTICATED:
            return None
        if re.fullmatch(r"/volume/v3/[0-9a-f]+/?", request.path):
            return None
        token = tokens.get(request.headers.get("X-Auth-Token", ""))
        if token is None:
            return json_response({"error": {"code": 401, "message": "The request you have "
                                            "made requires authentication.",
                                            "title": "Unauthorized"}}, 401)
        g.user = token
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        rule: FaultRule | None = getattr(g, "fault_after", None)
        if rule is not None and response.status_code < 400:
            # Applied, then failed: a 500 after the change, or an answer that comes
            # too late (the client's timeout) for the client to see.
            if rule.delay:
                time.sleep(rule.delay)
            if rule.status is not None:
                response = _fault_response(rule)
        rec = getattr(g, "rec", None)
        if rec is not None:
            rec.status = response.status_code
        response.headers["x-openstack-request-id"] = f"req-{uuid.uuid4()}"
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return json_response(exc.body, exc.status)

    app.register_blueprint(identity.blueprint(state, tokens))
    app.register_blueprint(compute.blueprint(state))
    app.register_blueprint(servers.blueprint(state))
    app.register_blueprint(network.blueprint(state))
    app.register_blueprint(volume.blueprint(state))
    app.register_blueprint(image.blueprint(state))
    app.register_blueprint(metadata.blueprint(state))
    return app
