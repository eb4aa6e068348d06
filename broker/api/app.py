"""The WSGI app: openbrokerapi's blueprint, our hooks, and GET /health."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, jsonify
from openbrokerapi import api as osb
from openbrokerapi.auth import NoneBrokerAuthenticator
from openbrokerapi.helper import to_json_response
from openbrokerapi.response import CatalogResponse
from sqlalchemy import text

from broker import web
from broker.api import hooks
from broker.api.responses import install_views
from broker.api.service_broker import PgHaServiceBroker
from broker.runtime import Runtime

log = logging.getLogger("broker.api")

# The largest body accepted (413 beyond): OSB bodies are a few KiB, parameters included.
MAX_BODY = 1024 * 1024


def create_app(runtime: Runtime, *, on_enqueue: Callable[[], None] | None = None,
               process_metrics: bool = False) -> Flask:
    """The broker's Flask app; `on_enqueue` is called after an operation was queued;
    `process_metrics`: `/metrics` includes this process's worker metrics (`serve`)."""
    # The library dumps every header (Authorization included) at DEBUG: keep it quiet.
    logging.getLogger("openbrokerapi.request_filter").setLevel(logging.INFO)
    app = Flask("broker.api")
    # Refused from Content-Length before reading, or once a chunked body passes it.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    service_broker = PgHaServiceBroker(runtime, on_enqueue=on_enqueue)
    # Authentication is ours (constant time, before the version check): the
    # library's own filter is a no-op.
    blueprint = osb.get_blueprint(service_broker, None, logging.getLogger("broker.api.osb"),
                                  authenticator=NoneBrokerAuthenticator())
    hooks.install(app, blueprint, runtime)
    app.register_blueprint(blueprint)
    _render_catalog_once(app, service_broker)
    install_views(app, last_operation=service_broker.operation_status,
                  get_instance=service_broker.instance_details)
    web.install(app, runtime, process_metrics=process_metrics)

    @app.get("/health")
    def health() -> tuple[Response, int]:
        """Liveness for the platform: no auth, no secrets, only whether the store answers."""
        try:
            with runtime.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("health: the state store is unreachable (%s)", type(exc).__name__)
            return jsonify({"status": "unavailable", "state_store": "unreachable"}), 503
        return jsonify({"status": "ok", "state_store": "reachable"}), 200

    return app


def _render_catalog_once(app: Flask, service_broker: PgHaServiceBroker) -> None:
    """The catalog cannot change while the process runs: serialise it once.

    The library's view rebuilds the JSON from the object tree on every GET (about
    half a millisecond); this keeps its filters and swaps only the rendering, with
    the very bytes the library would send.
    """
    with app.app_context():
        body = to_json_response(CatalogResponse(service_broker.catalog())).get_data()

    def catalog() -> Response:
        return app.response_class(body, mimetype="application/json")

    app.view_functions["open_broker.catalog"] = catalog


def make_wsgi_app() -> Flask:
    """For `gunicorn 'broker.api.app:make_wsgi_app()'`: settings and logging as `broker
    web` sets them up (the schema must already be upgraded: `python -m broker db upgrade`)."""
    import sys

    from gunicorn.arbiter import Arbiter

    from broker.config import ConfigError, load_settings
    from broker.logs import setup_logging
    from broker.runtime import build_runtime

    try:
        settings = load_settings()
    except ConfigError as exc:
        # One line naming the variable; this exit status makes gunicorn stop ("App
        # failed to load") instead of booting workers that fail the same way.
        print(f"broker: {exc}", file=sys.stderr)
        raise SystemExit(Arbiter.APP_LOAD_ERROR) from None
    setup_logging(settings.log_level)
    return create_app(build_runtime(settings, upgrade=False))
