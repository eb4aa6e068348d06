"""Serving metrics: the text exposition of some collectors, behind the broker's basic auth.

`web` and `serve` answer `GET /metrics` on the API's own port (broker/web/metrics.py);
a `worker` has no HTTP server, so with BROKER_METRICS_PORT set it serves its own
`/metrics` on BROKER_METRICS_LISTEN (loopback by default), one endpoint per process.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from broker.metrics import instruments

log = logging.getLogger("broker.metrics")

# Seconds a scrape connection may take to send its request (a slow client is cut off).
REQUEST_TIMEOUT = 10.0


class Exposition(Collector):
    """Several collectors exposed as one (a registry takes each collector only once)."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()

    def render(self) -> bytes:
        return generate_latest(self)


def credentials_match(header: str | None, username: str, password: str) -> bool:
    """An `Authorization: Basic` header against the broker's credentials, in constant time."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, given = base64.b64decode(value.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    # Both comparisons always run: the time taken says nothing about which failed.
    user_ok = hmac.compare_digest(user, username.encode())
    password_ok = hmac.compare_digest(given, password.encode())
    return user_ok and password_ok


def serve_metrics(listen: str, port: int, username: str, password: str,
                  stop: threading.Event) -> ThreadingHTTPServer:
    """A worker's `/metrics` (its in-process instruments) in a daemon thread until `stop`."""
    exposition = Exposition([instruments.REGISTRY])

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def do_GET(self) -> None:
            if not credentials_match(self.headers.get("Authorization"), username, password):
                self._answer(401, b"missing or wrong broker credentials\n", "text/plain",
                             {"WWW-Authenticate": 'Basic realm="pgha-broker"'})
            elif self.path.split("?", 1)[0] != "/metrics":
                self._answer(404, b"not found\n", "text/plain")
            else:
                self._answer(200, exposition.render(), CONTENT_TYPE_LATEST)

        def _answer(self, status: int, body: bytes, content_type: str,
                    headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds would flood the log

    server = ThreadingHTTPServer((listen, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def stop_when_asked() -> None:
        stop.wait()
        server.shutdown()
        server.server_close()

    threading.Thread(target=stop_when_asked, name="metrics-stop", daemon=True).start()
    log.info("metrics served on http://%s:%d/metrics (basic auth)", listen, server.server_port)
    return server
