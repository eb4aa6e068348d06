"""The HTTP server of `serve`: werkzeug's, bounded.

`serve` is one process that also runs the operation worker and the monitor as
threads, so the server must be an object in that process: werkzeug's threaded
server (no new dependency, already what `serve` used), with what it lacks and
gunicorn gives `web`:
- at most `threads` connections handled at once; further ones wait in the listen
  backlog (the accept loop blocks on a semaphore), never one thread each;
- each connection's whole request must arrive within `timeout` seconds (a deadline,
  not an idle timeout, so a client trickling a byte at a time is cut off too), and
  each write gets `timeout` seconds: a slow-loris client holds a thread for at most
  that long;
- at most `MAX_BODY` + `_MAX_HEAD` bytes are read from a connection: werkzeug drains
  an unread body after the answer (so that a client sees its 413, not a reset), and
  this stops it there instead of reading a 60 MB body to its end;
- what the HTTP parser refuses before the app sees it (a request line or header
  too long, a malformed header block) is answered in the OSB error shape, not
  http.server's HTML page.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from broker.api.app import MAX_BODY
from broker.api.errors import generic_code

log = logging.getLogger("broker.api.server")

# Request line and headers: http.server reads at most 64 KiB a line.
_MAX_HEAD = 256 * 1024


class _DeadlineReader(io.RawIOBase):
    """The socket's reading side, with a deadline and a byte budget (then EOF)."""

    def __init__(self, sock: socket.socket, deadline: float, budget: int,
                 write_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._budget = budget
        self._write_timeout = write_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._budget <= 0:
            return 0
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        view = memoryview(buffer)[:self._budget]
        self._sock.settimeout(left)
        try:
            count = self._sock.recv_into(view)
        finally:
            self._sock.settimeout(self._write_timeout)
        self._budget -= count
        return count


class _Handler(WSGIRequestHandler):
    # `timeout` is set per server (a subclass): StreamRequestHandler applies it to the
    # socket, so it bounds every write.

    def setup(self) -> None:
        super().setup()
        timeout = self.timeout
        assert timeout is not None
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, time.monotonic() + timeout, MAX_BODY + _MAX_HEAD, timeout))


    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        body = json.dumps({"error": generic_code(code),
                           "description": message or explain or HTTPStatus(code).phrase})
        data = body.encode()
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)


class ApiServer(ThreadedWSGIServer):
    """werkzeug's threaded server with bounded threads, deadlines and reads."""

    def __init__(self, host: str, port: int, app: Any, *, threads: int,
                 timeout: float) -> None:
        handler = type("ApiHandler", (_Handler,), {"timeout": timeout})
        super().__init__(host, port, app, handler=handler)
        self._slots = threading.BoundedSemaphore(threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()  # all busy: the next connection waits in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the traceback to stderr, past the log's escaping.
        log.exception("connection from %s failed", client_address)
