"""Answers other than success: the API's own refusals and the table of the domain's.

`ApiError` is what the API's request checks raise (a status, an OSB error code and a
sentence). The domain's refusals (`broker.operations.refusals`) get their status and
code from `REFUSALS`, the one table from domain errors to HTTP answers; their
message is the description. Handlers registered on the library's blueprint (they
see an error before the library's catch-all turns it into a 500) render either as
the OSB error body ``{"error": ..., "description": ...}``.
"""

from __future__ import annotations

from http import HTTPStatus

from flask import Response, jsonify

from broker.operations import refusals
from broker.operations.refusals import Refused

# Error codes the OSB spec defines; the platform acts on these.
ASYNC_REQUIRED = "AsyncRequired"
CONCURRENCY_ERROR = "ConcurrencyError"
MAINTENANCE_INFO_CONFLICT = "MaintenanceInfoConflict"

# Generic codes (one camel-case word, as the spec asks) for everything else.
_GENERIC = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Gone",
    412: "PreconditionFailed",
    415: "UnsupportedMediaType",
    422: "UnprocessableEntity",
    500: "InternalError",
    501: "NotImplemented",
    503: "ServiceUnavailable",
}

# Each domain refusal → (HTTP status, OSB error code). Choices the spec leaves open:
# a change or bind of an unknown instance is 422 (the spec lists no 404 for them); a
# provision of an id that was deprovisioned or failed is 409 (ids are never reused).
REFUSALS: dict[type[Refused], tuple[int, str]] = {
    refusals.InvalidRequest: (400, "BadRequest"),
    refusals.NotFound: (404, "NotFound"),
    refusals.Conflict: (409, "Conflict"),
    refusals.AlreadyGone: (410, "Gone"),
    refusals.UnknownInstance: (422, "UnprocessableEntity"),
    refusals.NotAllowed: (422, "UnprocessableEntity"),
    refusals.Busy: (422, CONCURRENCY_ERROR),
    refusals.MaintenanceMismatch: (422, MAINTENANCE_INFO_CONFLICT),
    refusals.AsyncRequired: (422, ASYNC_REQUIRED),
}


def generic_code(status: int) -> str:
    return _GENERIC.get(status) or HTTPStatus(status).phrase.replace(" ", "")


class ApiError(Exception):
    """An answer other than success; `description` is shown to the platform's user."""

    def __init__(self, status: int, description: str, error: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.error = error or generic_code(status)


def bad_request(description: str) -> ApiError:
    return ApiError(400, description)


def refusal_error(exc: Refused) -> ApiError:
    """The answer to a domain refusal, from the nearest class of it in `REFUSALS`."""
    for kind in type(exc).__mro__:
        if kind in REFUSALS:
            status, code = REFUSALS[kind]
            return ApiError(status, str(exc), code)
    raise TypeError(f"no answer for the refusal {type(exc).__name__}")


def error_response(status: int, description: str,
                   error: str | None = None) -> tuple[Response, int]:
    return jsonify({"error": error or generic_code(status), "description": description}), status


def api_error_response(exc: ApiError) -> tuple[Response, int]:
    return error_response(exc.status, exc.description, exc.error)
