"""Node certificates as identities towards pgBackRest's TLS server (`pgbackrest server`),
the transport a backup taken from the standby needs between the nodes: the real
pgBackRest 2.45, on loopback.

A peer of the instance (a certificate of the instance's CA whose CN the server admits
for the stanza) reaches the repository; the server is verified by its address; the
node's own certificate, another instance's certificate and a request for another
stanza are refused."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.pg import tls

ADDRESS = "127.0.0.1"
STANZA = "pgha-test-a"
START_TIMEOUT = 45.0
COMMAND_TIMEOUT = 60.0


@dataclass
class Server:
    """A running `pgbackrest server` for instance A's standby, and A's CA."""

    base: Path
    port: int
    ca: tls.Issued
    repo: Path


def _write(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _identity(base: Path, name: str, issued: tls.Issued) -> tuple[Path, Path]:
    return (_write(base / f"{name}.crt", issued.cert_pem),
            _write(base / f"{name}.key", issued.key_pem))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, "pgbackrest server exited at start"
        with socket.socket() as s:
            if s.connect_ex((ADDRESS, port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"pgbackrest server not listening after {START_TIMEOUT:.0f} s")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="pgha-test-tls-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        ca = tls.new_ca("instance-a")
        standby = tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id="a-standby",
                                      addresses=[ADDRESS], days=1)
        cert, key = _identity(base, "standby", standby)
        ca_file = _write(base / "ca.crt", ca.cert_pem)
        repo = base / "repo"
        repo.mkdir(mode=0o700)
        _write(repo / "marker", "")
        (base / "log").mkdir(mode=0o700)
        port = _free_port()
        conf = _write(base / "server.conf", "\n".join([
            "[global]", f"log-path={base / 'log'}", "log-level-file=off",
            f"tls-server-address={ADDRESS}", f"tls-server-port={port}",
            f"tls-server-ca-file={ca_file}", f"tls-server-cert-file={cert}",
            f"tls-server-key-file={key}",
            # Only the primary's node certificate, and only for the instance's stanza.
            f"tls-server-auth=pgha node a-primary={STANZA}", ""]))
        process = subprocess.Popen(["pgbackrest", f"--config={conf}", "server"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(port, process)
        yield Server(base, port, ca, repo)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=COMMAND_TIMEOUT)
        shutil.rmtree(base)


def list_repository(server: Server, client: tls.Issued, *, name: str,
                    ca_pem: str | None = None, stanza: str = STANZA,
                    host: str = ADDRESS) -> subprocess.CompletedProcess[str]:
    """`pgbackrest repo-ls` through the server, as the holder of `client`."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=server.base))
    cert, key = _identity(work, name, client)
    ca_file = _write(work / "ca.crt", ca_pem or server.ca.cert_pem)
    return subprocess.run(
        ["pgbackrest", "--config=/dev/null", f"--log-path={work}", "--log-level-file=off",
         f"--stanza={stanza}", f"--repo1-path={server.repo}",
         f"--repo1-host={host}", "--repo1-host-type=tls",
         f"--repo1-host-port={server.port}", f"--repo1-host-ca-file={ca_file}",
         f"--repo1-host-cert-file={cert}", f"--repo1-host-key-file={key}", "repo-ls"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def node_cert(ca: tls.Issued, node_id: str, address: str = ADDRESS) -> tls.Issued:
    return tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id=node_id,
                               addresses=[address], days=1)


def test_the_primary_reaches_its_standby_s_pgbackrest_server(server: Server) -> None:
    result = list_repository(server, node_cert(server.ca, "a-primary"), name="primary")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["marker"]


def test_the_server_is_verified_by_its_address_and_ca(server: Server) -> None:
    # The same server dialled by another spelling of its address (inet_aton's): its
    # certificate does not name it, and pgBackRest refuses it.
    by_name = list_repository(server, node_cert(server.ca, "a-primary"), name="by-name",
                              host="127.1")
    assert by_name.returncode != 0
    assert "unable to find hostname '127.1'" in by_name.stderr, by_name.stderr
    # A client that trusts another CA refuses the server's certificate.
    other_ca = tls.new_ca("instance-a-impostor")
    mitm = list_repository(server, node_cert(server.ca, "a-primary"), name="mitm",
                           ca_pem=other_ca.cert_pem)
    assert mitm.returncode != 0
    assert "unable to verify certificate" in mitm.stderr, mitm.stderr


def test_only_the_admitted_peer_and_stanza_pass(server: Server) -> None:
    itself = list_repository(server, node_cert(server.ca, "a-standby"), name="self")
    assert itself.returncode != 0 and "access denied" in itself.stderr, itself.stderr
    other_stanza = list_repository(server, node_cert(server.ca, "a-primary"),
                                   name="other-stanza", stanza="pgha-test-b")
    assert other_stanza.returncode != 0 and "access denied" in other_stanza.stderr, \
        other_stanza.stderr


def test_another_instance_cannot_reach_the_server(server: Server) -> None:
    # Instance B's node, with a certificate of B's own CA bearing the very CN and
    # address A's server admits: refused by the TLS handshake (unknown CA).
    instance_b = tls.new_ca("instance-b")
    result = list_repository(server, node_cert(instance_b, "a-primary"), name="b-node",
                             ca_pem=server.ca.cert_pem)
    assert result.returncode != 0
    assert "unknown ca" in result.stderr and "marker" not in result.stdout, result.stderr
