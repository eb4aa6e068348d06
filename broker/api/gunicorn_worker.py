"""gunicorn's threaded worker, answering the requests it refuses itself in the OSB shape.

gunicorn refuses some requests before the app sees them (a header with a control
character, a request line or header block too long, a bad chunk) and answers with an
HTML page. A platform parses every 4xx as `{"error": ..., "description": ...}`:
this worker writes that instead, with the same status and reason.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from broker.api.errors import generic_code


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    body = json.dumps({"error": generic_code(status),
                       "description": message or reason}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class JsonErrorWorker(ThreadWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        # `handle_error` is gunicorn's one caller of `util.write_error` (27.x); it
        # runs in this worker process only.
        util.write_error = write_json_error
        super().init_process()
