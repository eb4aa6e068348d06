"""TLS as an app, an attacker and an operator see it, on real instances.

- An app with a binding's credentials verifies the host (`verify-full`, the binding's
  CA written to a file) through the service address, before and after a failover.
- Nothing travels in cleartext: apps, replication and the superuser are refused
  without TLS; another instance's CA and a name that is not in the certificate fail.
- The standby replicates over TLS.
- `rotate-certs` serves new certificates without a restart (and a reboot keeps them);
  it upgrades an instance made before TLS, whose old binding keeps connecting.
- The monitor renews certificates that enter their renewal window.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from cryptography import x509

from broker.cli import instances as cli
from broker.config import TlsSettings
from broker.operations import bindings, node_create
from broker.operations.certs import KIND as ROTATE
from broker.pg import connection, probe, tls, tls_files
from broker.runtime import Runtime
from broker.store.models import Instance, Node
from harness.env import FailoverEnv, background, failover_env
from harness.faults import kill_server
from harness.machine import pg_bin_dir
from harness.scenarios import fail_primary
from harness.waiting import eventually, operations, settled
from harness.workflows import finish, instance, make_engine, provision
from harness.writer import Writer, app_credentials

pytestmark = pytest.mark.e2e

SSL_REQUEST = struct.pack("!II", 8, 80877103)


def served_certificate(host: str, port: int = 5432) -> x509.Certificate:
    """The certificate a server presents, read the way libpq starts TLS."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S", f"{host} does not speak TLS"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def ca_on_disk(env: FailoverEnv, pem: str, name: str = "root.crt") -> str:
    """What an app does with `ca_certificate`: libpq reads the CA from a file."""
    path = env.base / name
    path.write_text(pem)
    return str(path)


def over_tls(conn: Any) -> bool:
    """The session works and runs over TLS (as libpq reports it)."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    used = bool(conn.info.ssl_in_use)
    conn.close()
    return used


def app(creds: dict[str, Any], **params: Any) -> Any:
    return psycopg2.connect(creds["uri"], connect_timeout=3, **params)


def superuser(runtime: Runtime, inst: Instance, node: Node, **params: Any) -> Any:
    assert node.management_address is not None
    return psycopg2.connect(host=node.management_address, user="postgres", dbname="postgres",
                            password=runtime.vault.decrypt(inst.admin_password_enc),
                            connect_timeout=3, **params)


def query(runtime: Runtime, inst: Instance, node: Node, text: str) -> list[tuple[Any, ...]]:
    assert node.management_address is not None
    conn = connection.connect(node.management_address,
                              runtime.vault.decrypt(inst.admin_password_enc),
                              ca_pem=inst.ca_for(node))
    try:
        with conn.cursor() as cur:
            cur.execute(text)
            return list(cur.fetchall())
    finally:
        conn.close()


def replication_over_tls(runtime: Runtime, inst: Instance) -> list[tuple[Any, ...]]:
    primary = inst.primary()
    assert primary is not None
    return query(runtime, inst, primary,
                 "SELECT r.application_name, s.ssl FROM pg_stat_replication r "
                 "JOIN pg_stat_ssl s USING (pid)")


def replicate_from(env: FailoverEnv, inst: Instance, node: Node, conninfo: str
                   ) -> subprocess.CompletedProcess[str]:
    """A replication connection to the primary from `node`'s own namespace (the only
    place pg_hba lets replication in from)."""
    primary = inst.primary()
    assert primary is not None and node.server_id is not None
    return subprocess.run(
        ["ip", "netns", "exec", env.cloud.namespace(node.server_id), f"{pg_bin_dir()}/psql",
         f"host={primary.management_address} user=pgha_replicator dbname=replication "
         f"replication=true connect_timeout=3 {conninfo}", "-Atc", "IDENTIFY_SYSTEM"],
        env={"PATH": "/usr/bin:/bin",
             "PGPASSWORD": env.runtime.vault.decrypt(inst.replication_password_enc)},
        capture_output=True, text=True, timeout=30, check=False)


def test_apps_verify_the_service_address_before_and_after_a_failover() -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha-sync")
        other_id = provision(env.runtime, env.engine, "standalone")
        inst = instance(env.runtime, instance_id)
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and standby is not None and inst.tls_ca_cert

        # Each node's certificate names the service address and the node's own address.
        for node in (primary, standby):
            assert node.tls_cert is not None
            assert tls.addresses(node.tls_cert) == {inst.service_address,
                                                    node.management_address}
        shown = cli.describe_instance(env.runtime, instance_id)
        assert shown is not None and shown["ca_expires_at"]
        assert all(n["certificate_expires_at"] for n in shown["nodes"])

        creds = app_credentials(env, instance_id)
        assert creds["uri"].endswith("/appdb?sslmode=verify-full")
        assert creds["jdbcUrl"].endswith("&ssl=true&sslmode=verify-full")
        assert creds["sslmode"] == "verify-full"
        assert creds["ca_certificate"] == inst.tls_ca_cert
        root = ca_on_disk(env, creds["ca_certificate"])
        assert over_tls(app(creds, sslrootcert=root))

        # No cleartext: not for apps, not for the superuser, not for replication.
        attempts: list[Callable[[], Any]] = [
            lambda: app(creds, sslmode="disable"),
            lambda: superuser(env.runtime, inst, primary, sslmode="disable")]
        for attempt in attempts:
            with pytest.raises(psycopg2.OperationalError, match="no encryption"):
                attempt()
        plain = replicate_from(env, inst, standby, "sslmode=disable")
        assert plain.returncode != 0 and "no encryption" in plain.stderr
        verified = replicate_from(env, inst, standby, f"sslmode=verify-full sslrootcert={root}")
        assert verified.returncode == 0, verified.stderr

        # Another instance's CA does not vouch for this one; nor does this CA for a name
        # that is not in the certificate (hostaddr: same server, another name checked).
        other = instance(env.runtime, other_id)
        assert other.tls_ca_cert and other.tls_ca_cert != inst.tls_ca_cert
        with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
            app(creds, sslrootcert=ca_on_disk(env, other.tls_ca_cert, "other.crt"))
        # The broker verifies its nodes too; a certificate it cannot verify means the
        # server is up (never a reason to fail over).
        password = env.runtime.vault.decrypt(inst.admin_password_enc)
        assert primary.management_address is not None
        assert probe.probe(primary.management_address, password, timeout=3,
                           ca_pem=inst.tls_ca_cert).ok
        refused = probe.probe(primary.management_address, password, timeout=3,
                              ca_pem=other.tls_ca_cert)
        assert refused.outcome == "answering" and "certificate verify failed" in (
            refused.error or "")
        for name in ("db.example.com", standby.management_address):
            with pytest.raises(psycopg2.OperationalError, match="does not match host name"):
                app(creds, sslrootcert=root, host=name, hostaddr=inst.service_address)
        assert over_tls(app(creds, sslrootcert=root, host=primary.management_address,
                            hostaddr=inst.service_address))

        # The standby streams over TLS and verifies its primary.
        assert replication_over_tls(env.runtime, inst) == [(standby.application_name, True)]
        [(conninfo,)] = query(env.runtime, inst, standby, "SHOW primary_conninfo")
        assert "sslmode=verify-full sslrootcert=" in conninfo

        # A failover moves the service address: apps still verify it.
        writer = Writer(creds)
        writer.start()
        try:
            with background(env):
                outcome = fail_primary(env, instance_id, creds, writer,
                                       lambda cloud, sid: kill_server(cloud, sid, links_down=True))
        finally:
            writer.stop()
        assert outcome.acked > 0 and not outcome.lost
        after = instance(env.runtime, instance_id)
        new_primary, new_standby = after.primary(), after.standby()
        assert new_primary is not None and new_standby is not None
        assert new_primary.id == standby.id and after.service_address == inst.service_address
        assert over_tls(app(creds, sslrootcert=root))
        assert new_primary.tls_cert is not None
        assert served_certificate(after.service_address or "").serial_number == \
            serial(new_primary.tls_cert)
        # The rebuilt standby got its own certificate and replicates over TLS.
        assert new_standby.tls_cert is not None
        assert tls.addresses(new_standby.tls_cert) == {after.service_address,
                                                       new_standby.management_address}
        assert replication_over_tls(env.runtime, after) == [(new_standby.application_name,
                                                             True)]
        assert operations(env, instance_id, ROTATE) == []  # nothing was due


def _serials(inst: Instance) -> dict[str, int]:
    return {n.id: served_certificate(n.management_address or "").serial_number
            for n in inst.live_nodes()}


def _start_times(runtime: Runtime, inst: Instance) -> dict[str, Any]:
    return {n.id: query(runtime, inst, n, "SELECT pg_postmaster_start_time()")[0][0]
            for n in inst.live_nodes()}


def test_rotate_certs_serves_new_certificates_without_a_restart(
        capsys: pytest.CaptureFixture[str]) -> None:
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "ha")
        creds = app_credentials(env, instance_id)
        root = ca_on_disk(env, creds["ca_certificate"])
        before = instance(env.runtime, instance_id)
        serials, started = _serials(before), _start_times(env.runtime, before)

        assert cli.rotate_certs(env.runtime, instance_id) == 0
        assert "rotation queued" in capsys.readouterr().out
        [op] = operations(env, instance_id, ROTATE)
        finish(env.engine, op.id)

        after = instance(env.runtime, instance_id)
        rotated = _serials(after)
        assert all(rotated[n] != serials[n] for n in serials), "the old certificates are served"
        assert rotated == {n.id: serial(n.tls_cert or "") for n in after.live_nodes()}
        assert _start_times(env.runtime, after) == started  # reloaded, never restarted
        assert after.tls_ca_cert == before.tls_ca_cert
        assert over_tls(app(creds, sslrootcert=root))  # the binding did not change
        assert cli.show_instance(env.runtime, instance_id, as_json=False) == 0
        shown = capsys.readouterr().out
        for node in after.live_nodes():
            assert node.tls_expires_at is not None
            expiry = tls.expires_at(node.tls_cert or "").isoformat(timespec="milliseconds")
            assert f"certificate expires {expiry}" in shown
        assert cli.rotate_certs(env.runtime, "no-such-instance") == 1
        assert "rotate-certs refused: no instance" in capsys.readouterr().err

        # A reboot replays the node's first-boot config: the newer files stay.
        standby = after.standby()
        assert standby is not None and standby.server_id is not None
        env.cloud.stop_server(standby.server_id)
        env.cloud.start_server(standby.server_id)
        assert served_certificate(standby.management_address or "").serial_number == \
            rotated[standby.id]
        eventually(lambda: settled(env, instance_id), "the standby streaming again")
        assert replication_over_tls(env.runtime, after) == [(standby.application_name, True)]


def test_rotate_certs_upgrades_an_instance_made_before_tls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with failover_env() as env:
        # Nodes booted the way the broker did before TLS: no CA, no certificate.
        monkeypatch.setattr(node_create, "node_certificate", lambda ctx, node_id: None)
        instance_id = provision(env.runtime, env.engine, "ha")
        monkeypatch.undo()
        old = instance(env.runtime, instance_id)
        assert old.tls_ca_cert is None
        old_creds = app_credentials(env, instance_id)
        assert "sslmode" not in old_creds["uri"] and "ca_certificate" not in old_creds
        assert not over_tls(app(old_creds))
        started = _start_times(env.runtime, old)

        assert cli.rotate_certs(env.runtime, instance_id) == 0
        [op] = operations(env, instance_id, ROTATE)
        finish(env.engine, op.id)

        inst = instance(env.runtime, instance_id)
        assert inst.tls_ca_cert and all(n.tls_cert for n in inst.live_nodes())
        assert _start_times(env.runtime, inst) == started
        # The old binding's credentials still work (libpq prefers TLS), now encrypted;
        # cleartext is refused.
        assert over_tls(app(old_creds))
        with pytest.raises(psycopg2.OperationalError, match="no encryption"):
            app(old_creds, sslmode="disable")
        # Its credentials as the platform fetches them now ask for verify-full.
        creds = bindings.get_credentials(env.runtime, instance_id, "app")
        assert creds is not None and creds["ca_certificate"] == inst.tls_ca_cert
        assert over_tls(app(creds, sslrootcert=ca_on_disk(env, inst.tls_ca_cert)))
        # Replication went TLS too, verifying the primary.
        standby = inst.standby()
        assert standby is not None
        eventually(lambda: replication_over_tls(env.runtime, inst) ==
                   [(standby.application_name, True)], "replication over TLS")
        [(conninfo,)] = query(env.runtime, inst, standby, "SHOW primary_conninfo")
        assert "sslmode=verify-full" in conninfo


def test_certificates_are_renewed_before_they_expire() -> None:
    with failover_env() as env:
        runtime = dataclasses.replace(
            env.runtime, settings=dataclasses.replace(
                env.runtime.settings, tls=TlsSettings(cert_days=1, renew_days=2)))
        instance_id = provision(runtime, make_engine(runtime), "standalone")
        first = instance(runtime, instance_id).primary()
        assert first is not None and first.tls_cert is not None and first.tls_expires_at
        assert tls.expires_at(first.tls_cert) < tls.expires_at(
            instance(runtime, instance_id).tls_ca_cert or "")
        with background(env, runtime):
            eventually(lambda: [op.state for op in operations(env, instance_id, ROTATE)]
                       == ["succeeded"], "the monitor renewing the certificate", 60)
            time.sleep(3)  # several more checks: a renewal is not repeated at once
        [op] = operations(env, instance_id, ROTATE)
        assert "expires within 2 days" in (op.params or {}).get("cause", "")
        renewed = instance(runtime, instance_id).primary()
        assert renewed is not None and renewed.id == first.id and renewed.tls_cert
        assert serial(renewed.tls_cert) != serial(first.tls_cert)
        assert served_certificate(renewed.management_address or "").serial_number == \
            serial(renewed.tls_cert)


def test_ca_file_is_private_and_written_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pem = tls.new_ca("x").cert_pem
    path = Path(tls.ca_file(pem))
    assert path.read_text() == pem and path.parent.stat().st_mode & 0o777 == 0o700
    mtime = path.stat().st_mtime_ns
    assert Path(tls.ca_file(pem)) == path and path.stat().st_mtime_ns == mtime


def test_an_expired_certificate_is_replaced_by_the_monitor() -> None:
    """Renewal failed for the whole window and a certificate expired: nothing verifies
    the node any more, yet the broker still replaces it (the server proven by SCRAM
    channel binding instead)."""
    with failover_env() as env:
        instance_id = provision(env.runtime, env.engine, "standalone")
        inst = instance(env.runtime, instance_id)
        node = inst.primary()
        assert node is not None and node.management_address and inst.tls_ca_cert
        assert inst.tls_ca_key_enc and inst.service_address
        # The node serves (and the store records) a certificate about to expire.
        short = tls.issue_node_cert(inst.tls_ca_cert, env.runtime.vault.decrypt(
            inst.tls_ca_key_enc), node_id=node.id, days=3 / 86400,
            addresses=[inst.service_address, node.management_address])
        password = env.runtime.vault.decrypt(inst.admin_password_enc)
        conn = connection.connect(node.management_address, password, ca_pem=inst.tls_ca_cert)
        tls_files.install_tls(conn, ca_pem=inst.tls_ca_cert, cert_pem=short.cert_pem,
                              key_pem=short.key_pem, issued_at=short.issued_at)
        conn.close()
        with env.runtime.store.session() as s:
            row = s.get(Node, node.id)
            assert row is not None
            row.tls_cert, row.tls_expires_at = short.cert_pem, short.expires_at
        assert eventually(lambda: probe.probe(
            node.management_address or "", password, timeout=3,
            ca_pem=inst.tls_ca_cert).outcome == "answering", "the certificate expiring", 15)

        with background(env):
            eventually(lambda: [op.state for op in operations(env, instance_id, ROTATE)]
                       == ["succeeded"], "the monitor replacing it", 60)
        renewed = instance(env.runtime, instance_id).primary()
        assert renewed is not None and renewed.tls_cert and renewed.tls_expires_at
        assert serial(renewed.tls_cert) != serial(short.cert_pem)
        assert probe.probe(node.management_address, password, timeout=3,
                           ca_pem=inst.tls_ca_cert).ok
