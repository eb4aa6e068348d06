"""Process entry points: `serve` (all in one), `web` (gunicorn), `worker`."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from flask import Flask

from broker.config import ConfigError, Settings
from broker.runtime import Runtime, build_runtime

log = logging.getLogger("broker")


class Background:
    """The operation worker and the monitor, as threads sharing one stop event."""

    def __init__(self, runtime: Runtime) -> None:
        from broker.monitor.loop import Monitor
        from broker.operations import workflows
        from broker.operations.engine import Engine

        self.stop = threading.Event()
        workflows.install()
        self.engine = Engine(runtime.store, runtime.cloud, runtime.vault, runtime.catalog,
                             runtime.settings)
        self.monitor = Monitor(runtime, self.engine)
        self._threads = [
            threading.Thread(target=self.engine.loop, args=(self.stop,), name="worker",
                             daemon=True),
            threading.Thread(target=self.monitor.run, args=(self.stop,), name="monitor",
                             daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def shutdown(self, timeout: float = 8.0) -> None:
        # Cloud Foundry kills ~10 s after SIGTERM: a step cut short is resumed by the
        # next worker, because every step is idempotent.
        self.stop.set()
        self.engine.wake()
        for thread in self._threads:
            thread.join(timeout / len(self._threads))


def _on_term(stop: threading.Event, extra: Any = None) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()
        if extra is not None:
            threading.Thread(target=extra, daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _check_cloud(runtime: Runtime) -> None:
    # Building the driver checks its prerequisites (root and PostgreSQL binaries for
    # `local`, reachable credentials for `openstack`) and stops here with a message.
    cloud = runtime.cloud
    log.info("cloud driver: %s", cloud.name)


def serve(settings: Settings) -> int:
    """Everything in one process: the embedded default."""
    from broker.api.app import create_app
    from broker.api.server import ApiServer

    threads, timeout = settings.server.serve_threads, settings.server.serve_timeout
    runtime = build_runtime(settings)
    _check_cloud(runtime)
    background = Background(runtime)
    app = create_app(runtime, on_enqueue=background.engine.wake, process_metrics=True)
    listen = settings.server.listen or "127.0.0.1"
    server = ApiServer(listen, settings.port, app, threads=threads, timeout=timeout)
    _on_term(background.stop, server.shutdown)
    background.start()
    log.info("broker serving the OSB API on http://%s:%d (cloud %s, state %s, %d threads, "
             "%.0f s per request)", listen, settings.port, settings.cloud,
             "sqlite" if settings.is_sqlite else "postgresql", threads, timeout)
    try:
        server.serve_forever()
    finally:
        background.shutdown()
        runtime.store.dispose()
    return 0


def worker(settings: Settings) -> int:
    """Operations and monitor; run several for HA, they share work through leases."""
    runtime = build_runtime(settings)
    _check_cloud(runtime)
    background = Background(runtime)
    _on_term(background.stop)
    observability = settings.observability
    if observability.metrics_port is not None:
        from broker.metrics.endpoint import serve_metrics

        try:
            serve_metrics(observability.metrics_listen, observability.metrics_port,
                          settings.username, settings.password, background.stop)
        except OSError as exc:
            raise ConfigError(f"BROKER_METRICS_PORT: cannot listen on "
                              f"{observability.metrics_listen}:{observability.metrics_port}"
                              f" ({exc.strerror or exc})") from None
    background.start()
    log.info("worker running (cloud %s)", settings.cloud)
    background.stop.wait()
    background.shutdown()
    runtime.store.dispose()
    return 0


def web(settings: Settings) -> int:
    """The API under gunicorn; each gunicorn worker builds its own runtime after fork."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.glogging import Logger

    from broker.logs import one_line_handlers

    build_runtime(settings).store.dispose()  # upgrade the schema once, before forking

    class _OneLineLogger(Logger):  # type: ignore[misc]
        """gunicorn's error and access logs, escaped like the broker's own."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            one_line_handlers(self.error_log)
            one_line_handlers(self.access_log)

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            server = settings.server
            listen = server.listen or "0.0.0.0"  # noqa: S104 - CF routes here
            host = f"[{listen}]" if ":" in listen else listen
            options = {
                "bind": f"{host}:{settings.port}",
                "workers": server.web_workers,
                "worker_class": "broker.api.gunicorn_worker.JsonErrorWorker",
                "threads": server.web_threads,
                "timeout": 60,
                "graceful_timeout": 8,
                "accesslog": "-",
                # No headers in the access log: Authorization must never be written.
                "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(L)ss',
                "logger_class": _OneLineLogger,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            from broker.api.app import create_app

            return create_app(build_runtime(settings, upgrade=False))

    _App().run()
    return 0
