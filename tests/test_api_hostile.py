"""The HTTP edge under attack, over real sockets against real broker processes.

Two processes per module: `python -m broker serve` (werkzeug's server, bounded: two
threads and a two-second request deadline here) and `python -m broker web`
(gunicorn). Each attack is sent to the process as a client would send it, and the
test asserts what the attacker sees (status, OSB error body, how long the socket
stays open) and what lands in the process's log (one line per record, no raw
control byte).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.cloud.local import LocalCloud
from harness.machine import (
    assert_no_users_left,
    cloud_users,
    free_port,
    list_interfaces,
    list_namespaces,
    pg_bin_dir,
    world_traversable_tmpdir,
)
from tests.support.api import (
    API_VERSION,
    PASSWORD,
    auth_header,
    broker_env,
    originating_identity,
    write_test_catalog,
)
from tests.support.pg import StateServer

ROOT = Path(__file__).resolve().parent.parent
SERVE_THREADS = 2
SERVE_TIMEOUT = 2.0
MIB = 1024 * 1024
SERVICE_ID = "1cca2857-72b8-400e-be1b-41e15a71eb63"
PLAN_ID = "0b9c3229-0c1c-42a0-af83-020c16ec0142"  # ha-sync
# Where a line of the log may start: a broker record, a gunicorn error record, a
# gunicorn access record. A forged record would start like the first.
RECORD_START = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |"
                          rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] |"
                          rb"127\.0\.0\.1 \")")
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]")
FORGED = "2026-01-01 00:00:00,000 INFO MainProcess broker.api: FORGED by the client"


# --- the processes ------------------------------------------------------------------------
@dataclass
class Broker:
    name: str
    port: int
    log_path: Path

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int, settle: float = 0.3) -> bytes:
        time.sleep(settle)  # the record is written after the answer
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()


def _start(name: str, command: str, extra: dict[str, str],
           state_url: str | None = None) -> Iterator[Broker]:
    root = world_traversable_tmpdir(f"pgha-hostile-{name}-")
    env = broker_env(state_url or f"sqlite:///{root / 'state.sqlite3'}", root / "state",
                     write_test_catalog(root))
    port = free_port()
    log_path = root / "broker.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", command], cwd=ROOT,
        env={**os.environ, **env, "PORT": str(port), "BROKER_LISTEN": "127.0.0.1", **extra},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _exchange(port, b"GET /health HTTP/1.0\r\n\r\n",
                        tolerate_refusal=True).status != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker {command} did not start: "
                                   + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        yield Broker(name, port, log_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if "BROKER_LOCAL_BRIDGE" in extra:
            _destroy_local_cloud(root / "state", extra)
        shutil.rmtree(root)


def _destroy_local_cloud(state_dir: Path, extra: dict[str, str]) -> None:
    """serve made its local cloud's bridge at start, and the requests that were valid
    provisioned real instances on it: all of it goes with the test."""
    cloud = LocalCloud(state_dir / "local-cloud", ipaddress.IPv4Network(
        extra["BROKER_LOCAL_NETWORK"]), extra["BROKER_LOCAL_BRIDGE"], pg_bin=pg_bin_dir())
    namespaces, interfaces = set(cloud.namespaces()), set(cloud.interface_names())
    users = cloud_users(cloud)
    cloud.destroy_everything()
    assert not namespaces & list_namespaces(), "namespaces left behind"
    assert not interfaces & list_interfaces(), "interfaces left behind"
    assert_no_users_left(cloud, users)


@pytest.fixture(scope="module")
def serve_broker() -> Iterator[Broker]:
    yield from _start("serve", "serve", {
        "BROKER_SERVE_THREADS": str(SERVE_THREADS), "BROKER_SERVE_TIMEOUT": str(SERVE_TIMEOUT),
        # Never touched (no instance exists), but kept away from a real local cloud's.
        "BROKER_LOCAL_BRIDGE": "pghahostile", "BROKER_LOCAL_NETWORK": "10.213.250.0/24"})


@pytest.fixture(scope="module")
def web_broker(pg_state_server: StateServer) -> Iterator[Broker]:
    """On PostgreSQL, as `web` runs in production (serve has SQLite, its default)."""
    yield from _start("web", "web", {"WEB_CONCURRENCY": "1", "BROKER_WEB_THREADS": "2"},
                      pg_state_server.create_database())


@pytest.fixture(params=["serve", "web"])
def broker(request: pytest.FixtureRequest) -> Broker:
    found: Broker = request.getfixturevalue(f"{request.param}_broker")
    return found


# --- a client that sends exactly what it is given ----------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _read_answer(sock: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(lines[0].split()[1]), headers, body[:length])


def _exchange(port: int, request: bytes, *, timeout: float = 10,
              tolerate_refusal: bool = False) -> Answer:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            return _read_answer(sock)
    except ConnectionRefusedError:
        if not tolerate_refusal:
            raise
        return Answer(0, {}, b"")


def _request(method: str, path: str, *, body: bytes | None = None, auth: bool = True,
             content_type: str = "application/json", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: broker", "Connection: close",
             f"X-Broker-API-Version: {API_VERSION}"]
    if auth:
        lines.append(f"Authorization: {auth_header()}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def assert_osb_error(answer: Answer, status: int, error: str | None = None) -> str:
    assert answer.status == status, (answer.status, answer.body[:500])
    body = answer.json()
    assert set(body) >= {"error", "description"}, body
    assert isinstance(body["description"], str) and body["description"]
    assert isinstance(body["error"], str) and " " not in body["error"]
    assert b"Traceback" not in answer.body and PASSWORD.encode() not in answer.body
    if error is not None:
        assert body["error"] == error, body
    description: str = body["description"]
    return description


def assert_one_line_per_record(log: bytes) -> None:
    assert log, "nothing was logged"
    assert RAW_CONTROL.search(log) is None, RAW_CONTROL.search(log)
    text = log.decode("utf-8")  # strict: no undecodable byte reached the log either
    assert not re.search("[\x80-\x9f\u2028\u2029]", text), text
    for line in log.splitlines():
        assert RECORD_START.match(line), line


# --- log forging --------------------------------------------------------------------------
def test_unauthenticated_path_cannot_forge_a_log_line(broker: Broker) -> None:
    """`%0a` and `%1b` (and NEL, U+2028, an undecodable byte) in the path of a request
    without credentials: 401, and the log keeps one line per record."""
    forged = FORGED.replace(" ", "%20")
    paths = [f"/v2/service_instances/x%0a{forged}%1b[2J%1b]0;pwned%07",
             f"/v2/catalog%0d%0a{forged}%c2%85%e2%80%a8%ff%00"]
    offset = broker.log_size()
    for path in paths:
        assert_osb_error(_exchange(broker.port, _request("GET", path, auth=False)),
                         401, "Unauthorized")
    # The same with raw bytes in the request line (no percent-encoding at all), as
    # far as the server lets them through.
    raw = f"GET /v2/catalog\x1b[2J\x1b]0;pwned\x07{forged} HTTP/1.1\r\nHost: b\r\n\r\n"
    answer = _exchange(broker.port, raw.encode("latin-1"))
    assert answer.status in (400, 401), answer
    log = broker.log_since(offset)
    assert_one_line_per_record(log)
    # The payload is there, escaped inside the record of its own request.
    assert b"FORGED" in log
    for line in log.splitlines():
        assert not line.startswith(b"2026-01-01"), line
    if broker.name == "serve":  # gunicorn's access log shows the path undecoded
        assert rb"\x0a2026-01-01" in log and rb"\x1b[2J" in log


# --- unparsable bodies and identities: 400 (401 without credentials), never 500 -----------
def _provision_body(**context: Any) -> dict[str, Any]:
    return {"service_id": SERVICE_ID, "plan_id": PLAN_ID, "organization_guid": "org",
            "space_guid": "space", "context": {"platform": "cloudfoundry", **context}}


def _inside(raw: str | bytes) -> bytes:
    """A provision body that is fine but for `raw`, the value of one context field."""
    hole = json.dumps(_provision_body(attack="HOLE")).encode()
    return hole.replace(b'"HOLE"', raw if isinstance(raw, bytes) else raw.encode())


BODIES = {
    "nested arrays": b"[" * 100_000,
    "nested objects": b'{"a":' * 50_000,
    "nested inside context": _inside("[" * 50_000 + "]" * 50_000),
    "33 levels": _inside("[" * 31 + "]" * 31),
    "invalid UTF-8": _inside(b'"\xff\xfe"'),
    "lone surrogate": _inside('"\\ud800"'),
    "4301-digit integer": _inside("1" * 4301),
    "1e999999": _inside("1e999999"),
    "NaN": _inside("NaN"),
    "Infinity": _inside("-Infinity"),
    "array body": b"[]",
    "string body": b'"x"',
    "number body": b"42",
    "null body": b"null",
    "empty body": b"",
    "truncated": json.dumps(_provision_body()).encode()[:-1],
}


@pytest.mark.parametrize("case", BODIES)
def test_unparsable_body_is_a_400(broker: Broker, case: str) -> None:
    body = BODIES[case]
    paths = [("PUT", "/v2/service_instances/i-1?accepts_incomplete=true"),
             ("PATCH", "/v2/service_instances/i-1?accepts_incomplete=true"),
             ("PUT", "/v2/service_instances/i-1/service_bindings/b-1")]
    offset = broker.log_size()
    for method, path in paths:
        assert_osb_error(_exchange(broker.port, _request(method, path, body=body)),
                         400, "BadRequest")
        assert_osb_error(_exchange(broker.port, _request(method, path, body=body, auth=False)),
                         401, "Unauthorized")
    assert_one_line_per_record(broker.log_since(offset))


def test_odd_but_valid_json_is_accepted(broker: Broker) -> None:
    """The strict parser refuses nothing JSON allows that the broker can keep: control
    characters and NUL in strings, the largest integers, 32 levels, a surrogate pair."""
    body = _inside('{"text": "\\u0000\\n\\u001b\\u2028\\ud83d\\ude00", '
                   f'"big": {"9" * 4300}, "float": 1e308, '
                   f'"deep": {"[" * 29 + "]" * 29}}}')
    iid = f"odd-{broker.name}"
    created = _exchange(broker.port, _request(
        "PUT", f"/v2/service_instances/{iid}?accepts_incomplete=true", body=body))
    assert created.status == 202, created
    polled = _exchange(broker.port, _request(
        "GET", f"/v2/service_instances/{iid}/last_operation"))
    assert polled.status == 200, polled


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IDENTITIES = {
    # gunicorn refuses header lines over 8190 bytes: 5000 levels fit, and are plenty.
    "nested arrays": b"[" * 5000,
    "nested objects": b'{"a":' * 1000,
    "deep but closed": b'{"a":' + b"[" * 40 + b"]" * 40 + b"}",
    "invalid UTF-8": b'{"user_id": "\xff"}',
    "not an object": b'["user"]',
    "NaN": b'{"user_id": NaN}',
    "huge number": b'{"user_id": ' + b"9" * 4301 + b"}",
}
MALFORMED = {"not base64": "cloudfoundry !!not*base64!!", "no value": "cloudfoundry",
             **{case: f"cloudfoundry {_b64(value)}" for case, value in IDENTITIES.items()}}


@pytest.mark.parametrize("case", MALFORMED)
def test_unparsable_originating_identity_is_a_400(broker: Broker, case: str) -> None:
    identity = MALFORMED[case]
    offset = broker.log_size()
    for method, path in [("GET", "/v2/catalog"),
                         ("GET", "/v2/service_instances/i-1/last_operation")]:
        answer = _exchange(broker.port, _request(
            method, path, X_Broker_API_Originating_Identity=identity))
        assert "X-Broker-API-Originating-Identity" in assert_osb_error(answer, 400,
                                                                       "BadRequest")
        answer = _exchange(broker.port, _request(
            method, path, auth=False, X_Broker_API_Originating_Identity=identity))
        assert_osb_error(answer, 401, "Unauthorized")
    # A good one still passes, and is logged decoded (reads at DEBUG, so the
    # logged one is a read that fails: an unknown instance's last_operation).
    good = _exchange(broker.port, _request(
        "GET", "/v2/catalog", X_Broker_API_Originating_Identity=originating_identity("u-7")))
    assert good.status == 200
    unknown = _exchange(broker.port, _request(
        "GET", "/v2/service_instances/i-1/last_operation",
        X_Broker_API_Originating_Identity=originating_identity("u-8")))
    assert unknown.status in (404, 410)
    log = broker.log_since(offset)
    assert_one_line_per_record(log)
    assert b'cloudfoundry {"user_id":"u-8"}' in log


@pytest.mark.parametrize("value", [b"cloudfoundry \x01e30=", b"cloudfoundry e30=\x7f",
                                   b"cloudfoundry \x00e30="])
def test_identity_the_http_parser_refuses_is_an_osb_400(broker: Broker, value: bytes) -> None:
    """A control character in the header: the server's own parser refuses it (gunicorn
    before the app sees it), and the answer still has the OSB error shape."""
    request = _request("GET", "/v2/catalog")[:-2] + (
        b"X-Broker-API-Originating-Identity: " + value + b"\r\n\r\n")
    description = assert_osb_error(_exchange(broker.port, request), 400, "BadRequest")
    assert "originating-identity" in description.lower()


def test_request_line_too_long_is_an_osb_error(broker: Broker) -> None:
    answer = _exchange(broker.port, _request("GET", "/v2/catalog?x=" + "a" * 70000))
    assert 400 <= answer.status < 500
    assert_osb_error(answer, answer.status)


# --- the body limit -----------------------------------------------------------------------
def _send_all(sock: socket.socket, parts: Iterator[bytes], sent: list[int]) -> None:
    """From a thread: push `parts` until done or the broker closes the connection."""
    try:
        for part in parts:
            sock.sendall(part)
            sent[0] += len(part)
    except OSError:
        pass


def _big_body_answer(port: int, head: bytes, parts: Iterator[bytes]) -> tuple[Answer, int]:
    """Send `head`, then `parts` from a thread while reading the answer; returns the
    answer and how many body bytes the broker let the client push."""
    sent = [0]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head)
        sender = threading.Thread(target=_send_all, args=(sock, parts, sent), daemon=True)
        sender.start()
        answer = _read_answer(sock)
        # Then the broker closes, or stops reading: the sender stops either way.
        deadline = time.monotonic() + 10
        while sender.is_alive() and time.monotonic() < deadline:
            sender.join(0.2)
        if sender.is_alive():
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(5)
    return answer, sent[0]


def _zeros(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"0" * min(size, total - start)


def _chunked(total: int) -> Iterator[bytes]:
    for part in _zeros(total):
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def test_body_over_one_mib_is_a_413_without_reading_it(broker: Broker) -> None:
    path = "/v2/service_instances/i-big?accepts_incomplete=true"
    declared = _request("PUT", path)[:-2] + b"Content-Type: application/json\r\n"
    # Content-Length of 2 MiB: refused from the header, before the body is sent.
    head = declared + f"Content-Length: {2 * MIB}\r\n\r\n".encode()
    answer, _ = _big_body_answer(broker.port, head, iter([]))
    assert "larger than" in assert_osb_error(answer, 413)
    # Without credentials, 401 comes first (and the body is not read either).
    unauthenticated = head.replace(f"Authorization: {auth_header()}\r\n".encode(), b"")
    answer, _ = _big_body_answer(broker.port, unauthenticated, iter([]))
    assert_osb_error(answer, 401, "Unauthorized")
    # Chunked (no Content-Length): refused once 1 MiB has arrived.
    head = declared + b"Transfer-Encoding: chunked\r\n\r\n"
    answer, _ = _big_body_answer(broker.port, head, _chunked(2 * MIB))
    assert_osb_error(answer, 413)
    # Broken chunk framing is the client's fault too.
    answer, _ = _big_body_answer(broker.port, head, iter([b"zz\r\nabc\r\n0\r\n\r\n"]))
    assert_osb_error(answer, 400)
    # Exactly 1 MiB with a Content-Length is within the limit (a 400: it is no JSON).
    head = declared + f"Content-Length: {MIB}\r\n\r\n".encode()
    answer, _ = _big_body_answer(broker.port, head, _zeros(MIB))
    assert_osb_error(answer, 400, "BadRequest")


def test_a_60_mb_body_is_not_read(broker: Broker) -> None:
    """413 at once, and little more is read (werkzeug's server alone drained up to
    10 GB after the answer, to spare the client a reset)."""
    total = 60 * MIB
    head = _request("PUT", "/v2/service_instances/i-60?accepts_incomplete=true")[:-2] \
        + f"Content-Type: application/json\r\nContent-Length: {total}\r\n\r\n".encode()
    answer, sent = _big_body_answer(broker.port, head, _zeros(total))
    assert_osb_error(answer, 413)
    # What the broker read (about 1.25 MiB at most) plus the kernel's socket buffers.
    assert sent < total / 3, sent


# --- serve: bounded threads, deadlines ----------------------------------------------------
HALF_REQUEST = (b"PUT /v2/service_instances/slow?accepts_incomplete=true HTTP/1.1\r\n"
                b"Host: broker\r\nContent-Type: application/json\r\n")


def _closed_after(sock: socket.socket, started: float, limit: float) -> float:
    """Seconds from `started` until the broker closed `sock` (fails after `limit`)."""
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the broker kept a half-sent request open for over {limit} s")
    return time.monotonic() - started


def _health_time(port: int) -> float:
    started = time.monotonic()
    answer = _exchange(port, b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
                       timeout=30)
    assert answer.status == 200
    return time.monotonic() - started


def test_slow_loris_is_cut_off_and_does_not_block_others(serve_broker: Broker) -> None:
    port = serve_broker.port
    # One half-sent request: the other thread serves everyone else meanwhile.
    with socket.create_connection(("127.0.0.1", port)) as slow:
        started = time.monotonic()
        slow.sendall(HALF_REQUEST)
        time.sleep(0.2)
        for _ in range(5):
            _health_time(port)
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):  # all answered while it was still open
            slow.recv(1)
        slow.setblocking(True)
        closed = _closed_after(slow, started, SERVE_TIMEOUT + 5)
    assert SERVE_TIMEOUT - 0.5 < closed < SERVE_TIMEOUT + 2, closed

    # As many as there are threads, one of them trickling a byte every half second
    # (an idle timeout would never fire): the others wait, for one deadline at most.
    offset = serve_broker.log_size()
    stop = threading.Event()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(SERVE_THREADS)]
    try:
        started = time.monotonic()
        for sock in sockets:
            sock.sendall(HALF_REQUEST)

        def trickle() -> None:
            try:
                while not stop.wait(0.5):
                    sockets[0].sendall(b"X")
            except OSError:
                pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(0.2)
        waited = _health_time(port)
        assert waited < SERVE_TIMEOUT + 2, waited
        for sock in sockets:
            closed = _closed_after(sock, started, SERVE_TIMEOUT + 5)
            assert closed < SERVE_TIMEOUT + 2, closed
        stop.set()
        trickler.join(5)
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
    assert_one_line_per_record(serve_broker.log_since(offset))
    _health_time(port)


@pytest.mark.parametrize(("name", "value"), [("BROKER_SERVE_THREADS", "0"),
                                             ("BROKER_SERVE_THREADS", "many"),
                                             ("BROKER_SERVE_TIMEOUT", "-1")])
def test_serve_refuses_bad_limits(tmp_path: Path, name: str, value: str) -> None:
    out = subprocess.run([sys.executable, "-m", "broker", "serve"], capture_output=True,
                         text=True, cwd=ROOT, check=False, timeout=60, env={
                             "PATH": "/usr/bin:/bin", "BROKER_USERNAME": "u",
                             "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": str(tmp_path),
                             name: value})
    assert out.returncode == 2, out.stderr
    assert name in out.stderr
    assert "Traceback" not in out.stderr
