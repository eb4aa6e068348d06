"""An S3-compatible server on this machine, at the HTTP boundary like the OpenStack
fake: moto's S3 in server mode (harness/s3_server.py), over TLS with a certificate
of a CA made for it (so that pgBackRest verifies it with `repo1-storage-ca-file`),
listening where the local cloud's nodes reach the host (the bridge address), with
one bucket."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.config import S3Settings
from harness.machine import free_port

ROOT = Path(__file__).resolve().parent.parent

BUCKET = "pgha-backups"
KEY, SECRET = "testing-key", "testing-secret"  # moto accepts any


def _certificates(address: str, directory: Path) -> str:
    """A CA and a server certificate for `address`; the CA's PEM."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test S3 CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName(address)]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    (directory / "ca.crt").write_text(ca_pem)
    return ca_pem


@contextlib.contextmanager
def moto_s3(address: str) -> Iterator[S3Settings]:
    """moto's S3 on https://ADDRESS:PORT with a bucket; its settings for the broker."""
    directory = Path(tempfile.mkdtemp(prefix="pgha-s3-"))
    port = free_port()
    ca_pem = _certificates(address, directory)
    log = open(directory / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "harness.s3_server", address, str(port),
                             str(directory / "server.crt"), str(directory / "server.key")],
                            stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection((address, port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start: "
                                   + (directory / "moto.log").read_text(errors="replace"))
            time.sleep(0.1)
        client(address, port, directory / "ca.crt").create_bucket(Bucket=BUCKET)
        yield S3Settings(endpoint=address, port=port, bucket=BUCKET, region="us-east-1",
                         uri_style="path", key=KEY, secret=SECRET, ca_pem=ca_pem)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def client(address: str, port: int, ca_file: Path | str) -> Any:
    return boto3.client("s3", endpoint_url=f"https://{address}:{port}",
                        aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                        region_name="us-east-1", verify=str(ca_file))


def object_keys(s3: S3Settings, prefix: str) -> list[str]:
    """Every key under `prefix` in the bucket (verified against the settings' CA)."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca:
        ca.write(s3.ca_pem)
        ca.flush()
        s3_client = client(s3.endpoint, s3.port, ca.name)
        keys: list[str] = []
        pages = s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=s3.bucket, Prefix=prefix)
        for page in pages:
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys


def create_bucket(s3: S3Settings, name: str) -> S3Settings:
    """Another bucket on the same server; its settings."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca:
        ca.write(s3.ca_pem)
        ca.flush()
        client(s3.endpoint, s3.port, ca.name).create_bucket(Bucket=name)
    return dataclasses.replace(s3, bucket=name)
