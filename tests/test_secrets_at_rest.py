"""Secrets at rest: after a provision and a bind on a SQLite state store, no plaintext
secret is anywhere in the store's files (the database, its -wal and -shm), and each
encrypted column, decrypted with the broker's vault, holds the very secret PostgreSQL
and the TLS certificates use."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.pg.names import ADMIN_USER, REPLICATION_USER
from broker.store.models import Binding, Node
from harness.env import failover_env
from harness.workflows import app_tls, connect_as_admin, deprovision, instance, provision
from harness.writer import app_credentials

pytestmark = pytest.mark.e2e


def store_files(base: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(base.glob("broker.sqlite3*"))}


def pem_fragments(pem: str) -> list[str]:
    """The whole PEM and each full base64 line of its body: any of them on disk leaks it."""
    lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    return [pem, *(line for line in lines if len(line) >= 32)]


def scram_matches(verifier: str, password: str) -> bool:
    """Does a pg_authid SCRAM-SHA-256 verifier belong to `password` (RFC 5802/7677)?"""
    method, _, rest = verifier.partition("$")
    iterations_salt, _, keys = rest.partition("$")
    iterations, _, salt = iterations_salt.partition(":")
    stored_key, _, server_key = keys.partition(":")
    assert method == "SCRAM-SHA-256", verifier[:20]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                 int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    return (hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)
            and server == base64.b64decode(server_key))


def public_key_pem(key_or_cert_pem: str, *, private: bool) -> bytes:
    if private:
        key = serialization.load_pem_private_key(key_or_cert_pem.encode(), password=None)
        public = key.public_key()
    else:
        public = x509.load_pem_x509_certificate(key_or_cert_pem.encode()).public_key()
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def test_no_plaintext_secret_in_the_sqlite_store_and_each_column_decrypts() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha")
        creds = app_credentials(env, instance_id, "app-1")
        vault = env.runtime.vault
        inst = instance(env.runtime, instance_id)
        with env.runtime.store.session() as s:
            binding = s.get(Binding, "app-1")
            assert binding is not None
            nodes = list(s.query(Node).filter(Node.instance_id == instance_id))

        admin_password = vault.decrypt(inst.admin_password_enc)
        replication_password = vault.decrypt(inst.replication_password_enc)
        binding_password = vault.decrypt(binding.password_enc)
        assert inst.tls_ca_key_enc and inst.tls_ca_cert
        ca_key = vault.decrypt(inst.tls_ca_key_enc)
        node_keys = [vault.decrypt(n.tls_key_enc) for n in nodes if n.tls_key_enc]
        assert len(node_keys) == 2

        # The binding's password is what the app got, and it logs in through the service
        # address; the admin password logs in as the admin; the replication role's
        # verifier on the primary is the one of the decrypted password.
        assert binding_password == creds["password"]
        login: dict[str, Any] = {
            "host": creds["host"], "port": creds["port"], "user": creds["username"],
            "password": binding_password, "dbname": creds["name"], "sslmode": creds["sslmode"],
            "connect_timeout": 5, **app_tls(creds)}
        conn = psycopg2.connect(**login)
        conn.close()
        primary = inst.primary()
        assert primary is not None and primary.management_address
        conn = connect_as_admin(env.runtime, inst, primary.management_address, "postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN "
                            "(%s, %s, %s)", (ADMIN_USER, REPLICATION_USER,
                                             creds["username"]))
                verifiers = dict(cur.fetchall())
        finally:
            conn.close()
        assert scram_matches(verifiers[ADMIN_USER], admin_password)
        assert scram_matches(verifiers[REPLICATION_USER], replication_password)
        assert scram_matches(verifiers[creds["username"]], binding_password)
        assert not scram_matches(verifiers[REPLICATION_USER], admin_password)

        # The CA's key is the key of the instance's CA certificate, each node's key the
        # key of its certificate.
        assert public_key_pem(ca_key, private=True) == \
            public_key_pem(inst.tls_ca_cert, private=False)
        for node in nodes:
            assert node.tls_cert and node.tls_key_enc
            assert public_key_pem(vault.decrypt(node.tls_key_enc), private=True) == \
                public_key_pem(node.tls_cert, private=False)

        # No secret in any of the store's files, read while the broker holds the store
        # open (the WAL is there) and again once it let go of it (checkpointed).
        secrets = {"admin password": [admin_password],
                   "replication password": [replication_password],
                   "binding password": [binding_password],
                   "CA private key": pem_fragments(ca_key),
                   **{f"node key {i}": pem_fragments(k) for i, k in enumerate(node_keys)}}
        for moment in ("open", "closed"):
            files = store_files(env.base)
            if moment == "open":
                assert {"broker.sqlite3", "broker.sqlite3-wal"} <= set(files), sorted(files)
                assert len(files["broker.sqlite3-wal"]) > 0
            for name, content in files.items():
                for what, fragments in secrets.items():
                    for fragment in fragments:
                        assert fragment.encode() not in content, f"{what} in plaintext in {name}"
            # The scan can find what it looks for: the public CA certificate is stored.
            assert any(pem_fragments(inst.tls_ca_cert)[1].encode() in c for c in files.values())
            env.runtime.store.dispose()

        deprovision(env.runtime, env.engine, instance_id)
