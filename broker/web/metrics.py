"""`GET /metrics` on the API's port, behind the broker's basic auth (broker/api/hooks.py
checks it, and skips the OSB version header that Prometheus does not send)."""

from __future__ import annotations

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST

from broker.metrics import instruments
from broker.metrics.endpoint import Exposition
from broker.metrics.store import StoreCollector
from broker.runtime import Runtime

ENDPOINT = "metrics"


def install(app: Flask, runtime: Runtime, *, process_metrics: bool) -> None:
    collectors = [StoreCollector(runtime.store, runtime.catalog)]
    exposition = Exposition([*collectors, instruments.REGISTRY] if process_metrics
                            else collectors)

    def metrics() -> Response:
        return Response(exposition.render(), content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", ENDPOINT, metrics, methods=["GET"])
