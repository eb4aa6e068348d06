"""Flask hooks that close openbrokerapi 4.7.3's gaps without forking it.

Order on every request but GET /health (app-level hooks run before the
blueprint's own filters):
1. basic auth, compared in constant time → 401 before anything else;
2. X-Broker-API-Version: missing → 400, malformed or not 2.x with x ≥ 13 → 412
   (the library answers 500 for a non-numeric version);
3. X-Broker-API-Originating-Identity, when sent, must be `platform base64(JSON
   object)` → else 400;
4. body, ids and catalog references checked → 400 naming the field; a body over
   the app's MAX_CONTENT_LENGTH → 413.
After the view: echo X-Broker-API-Request-Identity and log one line per request with
the decoded originating identity (never the Authorization header): at INFO for
changes, requests that carry an identity and failures; at DEBUG for routine
polls without one (catalog, last_operation), which the access log also has.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from broker.api import jsonbody
from broker.api.errors import ApiError, api_error_response, error_response, refusal_error
from broker.api.validation import check_request
from broker.operations.refusals import Refused
from broker.runtime import Runtime

log = logging.getLogger("broker.api")

VERSION_HEADER = "X-Broker-API-Version"
IDENTITY_HEADER = "X-Broker-API-Originating-Identity"
REQUEST_ID_HEADER = "X-Broker-API-Request-Identity"
MIN_MINOR = 13
_VERSION = re.compile(r"^2\.([0-9]{1,4})$")
# The status page is reached by its URL's own secret (broker/web/dashboard.py).
_UNAUTHENTICATED = frozenset({"health", "dashboard"})
# Basic auth only: Prometheus sends no OSB headers.
_AUTH_ONLY = frozenset({"metrics"})
_MAX_LOGGED = 300
_MAX_PLATFORM = 64


class BasicAuth:
    """The broker's one credential pair, checked in constant time."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def accepts(self) -> bool:
        auth = request.authorization
        if auth is None or auth.type != "basic":
            return False
        user = (auth.username or "").encode("utf-8", "surrogateescape")
        password = (auth.password or "").encode("utf-8", "surrogateescape")
        # Both comparisons always run: the time taken says nothing about which failed.
        user_ok = hmac.compare_digest(user, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        return user_ok and password_ok


def check_version() -> tuple[Response, int] | None:
    raw = request.headers.get(VERSION_HEADER)
    if raw is None or not raw.strip():
        return error_response(400, f"the {VERSION_HEADER} header is required (e.g. 2.17)")
    match = _VERSION.match(raw.strip())
    if match is None or int(match.group(1)) < MIN_MINOR:
        shown = raw.strip()[:40]
        return error_response(412, f"{VERSION_HEADER} {shown!r} is not supported: this "
                              f"broker speaks 2.{MIN_MINOR} and later 2.x versions")
    return None


def parse_identity(header: str) -> tuple[str, dict[str, Any]]:
    """X-Broker-API-Originating-Identity as (platform, object); ValueError saying why not."""
    platform, _, value = header.strip().partition(" ")
    if not platform or len(platform) > _MAX_PLATFORM or not platform.isprintable():
        raise ValueError(f"the platform must be 1 to {_MAX_PLATFORM} printable characters")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the value after the platform is not base64") from None
    try:
        decoded = jsonbody.loads(raw)
    except jsonbody.UnparsableJson as exc:
        raise ValueError(f"the decoded value is not JSON the broker accepts: {exc}") from None
    if not isinstance(decoded, dict):
        raise ValueError("the decoded value is not a JSON object")
    return platform, decoded


def check_identity() -> tuple[Response, int] | None:
    header = request.headers.get(IDENTITY_HEADER)
    if not header:
        return None
    try:
        g.identity = parse_identity(header)
    except ValueError as exc:
        return error_response(400, f"{IDENTITY_HEADER} must be `platform base64(JSON "
                              f"object)`: {exc}")
    return None


def describe_identity(header: str | None) -> str:
    """`platform {json}` from X-Broker-API-Originating-Identity, for the log line."""
    if not header:
        return "-"
    try:
        platform, decoded = g.get("identity") or parse_identity(header)
    except ValueError:
        return "(undecodable)"
    text = json.dumps(decoded, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{platform} {text[:_MAX_LOGGED]}"


def install(app: Flask, blueprint: Blueprint, runtime: Runtime) -> None:
    """Register the hooks on `app` (before it registers `blueprint`) and on `blueprint`."""
    auth = BasicAuth(runtime.settings.username, runtime.settings.password)
    catalog = runtime.catalog

    @app.before_request
    def authenticate_then_check() -> Any:
        g.started = time.perf_counter()
        if request.endpoint in _UNAUTHENTICATED:
            return None
        if not auth.accepts():
            response, status = error_response(401, "missing or wrong broker credentials")
            response.headers["WWW-Authenticate"] = 'Basic realm="pgha-broker"'
            return response, status
        if request.endpoint in _AUTH_ONLY:
            return None
        refused = check_version() or check_identity()
        if refused is not None:
            return refused
        try:
            check_request(catalog)
        except ApiError as exc:
            return api_error_response(exc)
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        # A value with a control character cannot be a response header (werkzeug
        # raises): such an id is not echoed.
        if request_id and request_id.isprintable():
            response.headers[REQUEST_ID_HEADER] = request_id
        if request.endpoint in _UNAUTHENTICATED:
            return response
        identity = request.headers.get(IDENTITY_HEADER)
        # Every change and every failure at INFO, with who asked; reads (catalog,
        # last_operation polls, fetches) at DEBUG: they are most requests, change
        # nothing, and the access log has them too.
        level = logging.INFO if (request.method != "GET"
                                 or response.status_code >= 400) else logging.DEBUG
        if log.isEnabledFor(level):
            started = g.get("started")
            elapsed = (time.perf_counter() - started) * 1000 if started else 0.0
            log.log(level, "%s %s -> %d (%.1f ms) identity=%s request=%s", request.method,
                    request.full_path.rstrip("?")[:_MAX_LOGGED], response.status_code, elapsed,
                    describe_identity(identity), (request_id or "-")[:_MAX_LOGGED])
        return response

    # The blueprint's own catch-all (Exception → 500) is found before any app-level
    # handler, so ours go on the blueprint itself; the app gets them for other routes.
    def handle_api_error(exc: ApiError) -> tuple[Response, int]:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.description)
        return api_error_response(exc)

    def handle_refusal(exc: Refused) -> tuple[Response, int]:
        return api_error_response(refusal_error(exc))

    def handle_http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        description = exc.description or "request failed"
        if isinstance(exc, RequestEntityTooLarge):
            description = (f"the request body is larger than the broker accepts "
                           f"({request.max_content_length} bytes)")
        response, _ = error_response(status, description)
        response.status_code = status
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    def handle_unexpected(exc: Exception) -> tuple[Response, int]:
        # The stack goes to the log, never into the answer.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal error in the broker; see its log")

    for target in (blueprint, app):
        target.register_error_handler(ApiError, handle_api_error)
        target.register_error_handler(Refused, handle_refusal)
        target.register_error_handler(HTTPException, handle_http_error)
        # Replaces the library's catch-all, whose body has no `error` field.
        target.register_error_handler(Exception, handle_unexpected)
