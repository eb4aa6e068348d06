"""TLS for an instance: its own CA, made by the broker, and one certificate per node.

Every node certificate carries as IP SANs the instance's service address and the
node's own management address: apps verify the host (`sslmode=verify-full`) through
the service address, which a failover moves to another node, and the broker and the
standby's replication connection verify the management address. Keys are EC P-256.

The same certificate is the node's identity towards pgBackRest's TLS server of a peer
(a backup taken from the standby): pgBackRest 2.45 matches the host it connects to
only against DNS SANs (IP SANs are ignored), so each address is also a DNS SAN of its
own text, and the certificate may authenticate a client (clientAuth) as well as a
server. libpq matches either SAN.

The CA's private key is stored encrypted (the Vault), like the passwords; the public
PEMs are plain columns so that `instances show` prints expiries without a connection.

libpq reads `sslrootcert` from a file only: `ca_file` writes the CA PEM once into a
private (0700) cache directory, named by the PEM's hash, atomically.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import config
from broker.guest import bootstrap

CA_DAYS = 3650
# Certificates start a little in the past: a node's clock may lag the broker's.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: str
    key_pem: str
    expires_at: datetime
    # Milliseconds since the epoch: the guest bootstrap keeps the newest material on
    # disk, since a reboot replays the node's first-boot config.
    issued_at: int


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issued_at(previous: int) -> int:
    return max(time.time_ns() // 1_000_000, previous + 1)


def new_ca(instance_id: str, *, days: float = CA_DAYS) -> Issued:
    key = _new_key()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pgha CA {instance_id}"[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(_cert_pem(cert), _key_pem(key), cert.not_valid_after_utc, _issued_at(0))


def issue_node_cert(ca_cert_pem: str, ca_key_pem: str, *, node_id: str,
                    addresses: list[str], days: float, previous_issued_at: int = 0) -> Issued:
    """A server certificate for one node, valid for `addresses` (IPs), signed by the CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ips = list(dict.fromkeys(ipaddress.ip_address(a) for a in addresses if a))
    if not ips:
        raise ValueError("a node certificate needs at least one address")
    key = _new_key()
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    bootstrap.node_common_name(node_id))]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ip) for ip in ips] + [x509.DNSName(str(ip)) for ip in ips]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(_cert_pem(cert), _key_pem(key), cert.not_valid_after_utc,
                  _issued_at(previous_issued_at))


def _load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def expires_at(pem: str) -> datetime:
    return _load(pem).not_valid_after_utc


def addresses(pem: str) -> set[str]:
    """The IP SANs of a certificate."""
    san = _load(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)}


def due_for_renewal(expiry: datetime | None, window: timedelta) -> bool:
    return expiry is not None and expiry - datetime.now(UTC) <= window


# --- the CA as a file, for libpq ---------------------------------------------------------
_files: dict[str, str] = {}
_files_lock = threading.Lock()


def cache_dir() -> Path:
    """Private to this OS user: nobody else may swap the CA the broker trusts."""
    path = config.ca_cache_dir(os.environ)  # checked at start, like every setting
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        path.chmod(0o700)
        if path.stat().st_uid != os.geteuid():
            raise PermissionError(f"{path} belongs to another user")
    return path


def ca_file(pem: str) -> str:
    """The path of a file holding `pem` (written once, atomically; reused after)."""
    digest = hashlib.sha256(pem.encode()).hexdigest()
    with _files_lock:
        known = _files.get(digest)
        if known is not None and os.path.exists(known):
            return known
        directory = cache_dir()
        path = directory / f"{digest}.pem"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ca-")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(pem)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        _files[digest] = str(path)
        return str(path)
