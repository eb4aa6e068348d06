"""The one table from domain refusals to HTTP answers: every refusal the domain can
raise has its documented status and OSB error code, and reaches the platform as an
OSB error body with its sentence, whichever route raised it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from broker.api import create_app
from broker.api.errors import REFUSALS, refusal_error
from broker.operations import bindings, refusals
from broker.operations.refusals import Refused
from broker.runtime import Runtime
from tests.support.api import broker_env, make_runtime, osb_headers, write_test_catalog

# Status and OSB `error` of each refusal, as the OSB spec and the broker document them.
DOCUMENTED: dict[type[Refused], tuple[int, str]] = {
    refusals.InvalidRequest: (400, "BadRequest"),
    refusals.NotFound: (404, "NotFound"),
    refusals.Conflict: (409, "Conflict"),
    refusals.AlreadyGone: (410, "Gone"),
    refusals.UnknownInstance: (422, "UnprocessableEntity"),
    refusals.NotAllowed: (422, "UnprocessableEntity"),
    refusals.Busy: (422, "ConcurrencyError"),
    refusals.MaintenanceMismatch: (422, "MaintenanceInfoConflict"),
    refusals.AsyncRequired: (422, "AsyncRequired"),
    # Raised by bindings, answered as their kind.
    bindings.BindingConflict: (409, "Conflict"),
    bindings.InstanceNotReady: (422, "ConcurrencyError"),
    bindings.InstanceUnknown: (422, "UnprocessableEntity"),
}


def _every_refusal() -> list[type[Refused]]:
    found: list[type[Refused]] = []
    pending = list(Refused.__subclasses__())
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return sorted(found, key=lambda kind: kind.__name__)


def _instance(kind: type[Refused]) -> Refused:
    return kind("printing") if kind is refusals.AsyncRequired else kind(f"{kind.__name__} here")


def test_every_refusal_is_documented_and_in_the_table() -> None:
    kinds = _every_refusal()
    assert set(kinds) == set(DOCUMENTED)
    assert set(REFUSALS) <= set(kinds)
    for kind in kinds:
        error = refusal_error(_instance(kind))
        assert (error.status, error.error) == DOCUMENTED[kind], kind
        assert error.description == str(_instance(kind))


def test_a_refusal_outside_the_table_is_not_answered_silently() -> None:
    with pytest.raises(TypeError, match="Refused"):
        refusal_error(Refused("no kind"))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    runtime: Runtime = make_runtime(broker_env(f"sqlite:///{tmp_path / 'state.sqlite3'}",
                                               tmp_path / "state", write_test_catalog(tmp_path)))
    app = create_app(runtime)

    @app.get("/v2/refusal/<name>")
    def refuse(name: str) -> str:
        raise _instance(next(k for k in _every_refusal() if k.__name__ == name))

    try:
        yield app
    finally:
        runtime.store.dispose()


@pytest.mark.parametrize("kind", _every_refusal(), ids=lambda kind: kind.__name__)
def test_a_refusal_reaches_the_platform_as_an_osb_error(app: Flask, kind: type[Refused]) -> None:
    response = app.test_client().get(f"/v2/refusal/{kind.__name__}", headers=osb_headers())
    status, code = DOCUMENTED[kind]
    assert response.status_code == status
    assert response.is_json
    assert response.get_json() == {"error": code, "description": str(_instance(kind))}
