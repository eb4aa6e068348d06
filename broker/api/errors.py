"""The API's own error type: a status code, an OSB error code and a sentence.

Raised anywhere while handling a request; a handler registered on the library's
blueprint (it sees it before the library's catch-all turns it into a 500) turns
it into the OSB error body ``{"error": ..., "description": ...}``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from flask import Response, jsonify

# Error codes the OSB spec defines; the platform acts on these.
ASYNC_REQUIRED = "AsyncRequired"
CONCURRENCY_ERROR = "ConcurrencyError"
MAINTENANCE_INFO_CONFLICT = "MaintenanceInfoConflict"
REQUIRES_APP = "RequiresApp"

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


def generic_code(status: int) -> str:
    return _GENERIC.get(status) or HTTPStatus(status).phrase.replace(" ", "")


class ApiError(Exception):
    """An answer other than success; `description` is shown to the platform's user."""

    def __init__(self, status: int, description: str, error: str | None = None,
                 **extra: Any) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.error = error or generic_code(status)
        self.extra = extra


def bad_request(description: str) -> ApiError:
    return ApiError(400, description)


def concurrency_error(description: str) -> ApiError:
    return ApiError(422, description, CONCURRENCY_ERROR)


def async_required(what: str) -> ApiError:
    return ApiError(422, f"{what} is asynchronous: send accepts_incomplete=true",
                    ASYNC_REQUIRED)


def error_response(status: int, description: str, error: str | None = None,
                   **extra: Any) -> tuple[Response, int]:
    body = {"error": error or generic_code(status), "description": description, **extra}
    return jsonify(body), status


def api_error_response(exc: ApiError) -> tuple[Response, int]:
    return error_response(exc.status, exc.description, exc.error, **exc.extra)
