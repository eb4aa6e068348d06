"""moto's S3 served over TLS the way a real endpoint closes its connections.

moto's own `moto_server` (werkzeug's development server) answers `Connection: close`,
some responses with no Content-Length, and closes the socket without TLS's
close_notify; OpenSSL 3 clients such as pgBackRest read that as a truncated
response and retry until they give up. Real S3 endpoints (AWS, Swift's S3 API, Ceph
RGW) frame their responses and shut TLS down cleanly, so this server adds the
Content-Length moto leaves out and sends close_notify before closing.

    python -m harness.s3_server HOST PORT CERT_FILE KEY_FILE
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, run_simple


class ClosingHandler(WSGIRequestHandler):
    def finish(self) -> None:
        super().finish()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.request.unwrap()  # close_notify: the response ends here


def framed(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def wrapper(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        answer: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answer["status"], answer["headers"] = status, headers

        body = b"".join(app(environ, capture))
        headers = list(answer["headers"])
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        start_response(answer["status"], headers)
        return [body]
    return wrapper


def main(argv: list[str]) -> int:
    host, port, cert, key = argv
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, int(port), framed(app), threaded=True, ssl_context=(cert, key),
               request_handler=ClosingHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
