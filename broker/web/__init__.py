"""Pages and endpoints of `web` beside the OSB API: `/metrics` and each instance's
status page (`/dashboard/<instance id>/<token>`). `install` adds their routes."""

from __future__ import annotations

from flask import Flask

from broker.runtime import Runtime
from broker.web import dashboard, metrics


def install(app: Flask, runtime: Runtime, *, process_metrics: bool) -> None:
    """Add the routes; `process_metrics`: this process also runs the worker (`serve`),
    so its `/metrics` includes the monitor's in-process metrics."""
    metrics.install(app, runtime, process_metrics=process_metrics)
    dashboard.install(app, runtime)
