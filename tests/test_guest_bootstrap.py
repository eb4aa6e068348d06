"""The guest bootstrap's pure parts (its real runs are in test_local_cloud.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.guest import bootstrap
from broker.guest.bootstrap import GuestConfig
from broker.pg import connection, tls
from harness.machine import free_port, pg_bin_dir, world_traversable_tmpdir
from tests.support.pg import PG_USER

SECRET = "s3cret'pw:x"


def config(**changes: object) -> GuestConfig:
    base = GuestConfig(instance_id="i", node_id="n1", role="standby", admin_password=SECRET,
                       replication_password=SECRET, application_name="node_n1",
                       primary_address="10.0.0.2", slot_name="slot_n1",
                       admin_cidrs=("10.0.0.1",), peer_addresses=("10.0.0.2", "10.0.0.3"),
                       settings={"work_mem": "8MB", "log_line_prefix": "%m it's"})
    return GuestConfig.from_json(GuestConfig(**{**base.__dict__, **changes}).to_json())


def test_config_round_trips_through_json() -> None:
    c = config()
    assert GuestConfig.from_json(c.to_json()) == c
    assert c.peer_addresses == ("10.0.0.2", "10.0.0.3")


def test_rendered_conf_quotes_values_and_never_holds_a_password() -> None:
    text = bootstrap.render_conf(config(), passfile="/v/replication.pgpass")
    assert "log_line_prefix = '%m it''s'" in text
    assert "primary_conninfo = 'host=10.0.0.2 port=5432 user=pgha_replicator " \
           "passfile=/v/replication.pgpass application_name=node_n1" in text
    assert "primary_slot_name = 'slot_n1'" in text
    assert SECRET not in text
    with pytest.raises(bootstrap.BootstrapError, match="setting name"):
        bootstrap.render_conf(config(settings={"x = 1\nfsync": "off"}), passfile="/p")


def test_rendered_conf_serves_tls_and_the_standby_verifies_its_primary() -> None:
    text = bootstrap.render_conf(config(), passfile="/v/replication.pgpass", tls_dir="/v/tls")
    for line in ("ssl = 'on'", "ssl_cert_file = '/v/tls/server.crt'",
                 "ssl_key_file = '/v/tls/server.key'", "ssl_ca_file = '/v/tls/ca.crt'",
                 "ssl_min_protocol_version = 'TLSv1.2'"):
        assert line in text.splitlines()
    assert "sslmode=verify-full sslrootcert=/v/tls/ca.crt" in text
    assert "ssl" not in bootstrap.render_conf(config(), passfile="/p")  # a node made before TLS


@pytest.fixture
def volume() -> Iterator[Path]:
    """A volume root owned by the PostgreSQL user, as the bootstrap hands it over."""
    root = world_traversable_tmpdir("pgha-guest-")
    user = pwd.getpwnam(PG_USER)
    os.chown(root, user.pw_uid, user.pw_gid)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def as_node_user(work: Callable[[], object]) -> None:
    """Run `work` as the bootstrap does on the volume: dropped to the PostgreSQL user."""
    assert bootstrap.run_as_user(pwd.getpwnam(PG_USER), lambda: (work(), None)[1]) == 0


def test_tls_files_are_private_and_a_replayed_config_never_brings_older_ones_back(
        volume: Path) -> None:
    ca = tls.new_ca("i")
    first = tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id="n1", addresses=["10.0.0.2"],
                                days=1)
    boot = config(data_dir=str(volume / "data"), run_as=PG_USER, tls_ca_cert=ca.cert_pem,
                  tls_cert=first.cert_pem, tls_key=first.key_pem,
                  tls_issued_at=first.issued_at)
    as_node_user(lambda: bootstrap.write_tls(boot))
    directory = volume / "tls"  # beside the data directory: never in a base backup
    assert directory.stat().st_mode & 0o777 == 0o700
    for name in ("ca.crt", "server.crt", "server.key", "issued_at"):
        info = (directory / name).stat()
        assert info.st_mode & 0o777 == 0o600 and info.st_uid == pwd.getpwnam(PG_USER).pw_uid
    assert (directory / "server.key").read_text() == first.key_pem

    # The broker rotated the certificate since; a reboot replays the first-boot config.
    rotated = tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id="n1",
                                  addresses=["10.0.0.2"], days=1,
                                  previous_issued_at=first.issued_at)
    newer = config(**{**boot.__dict__, "tls_cert": rotated.cert_pem, "tls_key": rotated.key_pem,
                      "tls_issued_at": rotated.issued_at})
    as_node_user(lambda: bootstrap.write_tls(newer))
    as_node_user(lambda: bootstrap.write_tls(boot))
    assert (directory / "server.crt").read_text() == rotated.cert_pem
    assert (directory / "server.key").read_text() == rotated.key_pem
    # A config without TLS (made before it) leaves the node's files alone.
    assert bootstrap.write_tls(config(data_dir=str(volume / "data"))) == directory
    assert bootstrap.write_tls(config(data_dir=str(volume / "other" / "data"))) is None


def test_own_tls_files_replace_those_the_broker_put_in_an_old_data_directory(
        volume: Path) -> None:
    """A server resurrected on the volume of a node made before TLS (whose certificate
    the broker once put in the data directory) serves its own certificate."""
    data = volume / "data"
    data.mkdir()
    (data / "postgresql.conf").write_text("")
    (data / "postgresql.auto.conf").write_text(
        "work_mem = '8MB'\nssl = 'on'\nssl_cert_file = '/old/pgha-tls-server.crt'\n")
    for name in ("server.crt", "server.key", "ca.crt", "issued_at"):
        (data / f"pgha-tls-{name}").write_text("old")
    subprocess.run(["chown", "-R", f"{PG_USER}:", str(data)], check=True)
    ca = tls.new_ca("i")
    cert = tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id="n1", addresses=["10.0.0.2"],
                               days=1)
    node = config(role="primary", data_dir=str(data), run_as=PG_USER, tls_ca_cert=ca.cert_pem,
                  tls_cert=cert.cert_pem, tls_key=cert.key_pem, tls_issued_at=cert.issued_at)
    as_node_user(lambda: bootstrap.write_config(node, bootstrap.write_tls(node)))
    assert (data / "postgresql.auto.conf").read_text() == "work_mem = '8MB'\n"
    assert not list(data.glob("pgha-tls-*"))
    assert f"ssl_cert_file = '{volume}/tls/server.crt'" in (data / "pgha.conf").read_text()
    rules = [line.split()[0] for line in (data / "pg_hba.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert set(rules) == {"hostssl", "local"}  # local: the superuser on its own socket


def test_a_zombie_or_a_foreign_process_is_not_a_live_postmaster(tmp_path: Path) -> None:
    assert not bootstrap.process_is_live_postgres(os.getpid(), str(tmp_path))
    child = subprocess.Popen(["true"], cwd=tmp_path)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline  # exited but not reaped: a zombie keeps its pid
        time.sleep(0.001)
    assert not bootstrap.process_is_live_postgres(child.pid, str(tmp_path))
    child.wait()
    sleeper = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        assert bootstrap.process_is_live_postgres(sleeper.pid, str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()


def run_main(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", bootstrap.__file__, str(path)],
                          capture_output=True, text=True, check=False, timeout=60)


def test_failures_exit_non_zero_with_a_plain_message(tmp_path: Path) -> None:
    bad = tmp_path / "guest.json"
    bad.write_text("{not json")
    result = run_main(bad)
    assert result.returncode == 2 and "cannot read config" in result.stderr

    no_pg = tmp_path / "no-pg.json"
    no_pg.write_text(config(pg_bin=str(tmp_path / "nowhere"), run_as="root").to_json())
    result = run_main(no_pg)
    assert result.returncode == 1
    assert "PostgreSQL binaries not found" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_refuses_work_as_root_where_the_postgresql_user_could_swap_paths() -> None:
    """Everything the PostgreSQL user writes must lie below the mount point, and root
    touches the mount point and the socket directory only below directories of its own."""
    with pytest.raises(bootstrap.BootstrapError, match="not below mount_point"):
        bootstrap.check_placement(config(mount_point="/v", data_dir="/elsewhere/data"))
    with pytest.raises(bootstrap.BootstrapError, match="not below mount_point"):
        bootstrap.check_placement(config(mount_point="/v", data_dir="/v/data",
                                         log_file="/var/log/pg.log"))
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = world_traversable_tmpdir("pgha-guest-")
    try:
        theirs = root / "theirs"
        theirs.mkdir()
        user = pwd.getpwnam(PG_USER)
        os.chown(theirs, user.pw_uid, user.pw_gid)
        conf = root / "guest.json"
        conf.write_text(config(role="primary", mount_point=str(theirs / "vol"),
                               data_dir=str(theirs / "vol" / "data"),
                               socket_dir=str(root / "run"), pg_bin=pg_bin_dir(),
                               run_as=PG_USER).to_json())
        result = run_main(conf)
        assert result.returncode == 1
        assert f"{theirs} (above {theirs / 'vol'}) is not root's alone" in result.stderr
        assert not (theirs / "vol").exists()
    finally:
        shutil.rmtree(root)


@pytest.mark.e2e
def test_openstack_path_formats_mounts_initialises_and_reruns() -> None:
    """The path a VM takes: a blank data volume (a loop device here) is formatted and
    mounted, PostgreSQL initialised and started; a second run changes nothing.
    (Run in the root namespaces, since `ip netns exec` would hide the mount; PostgreSQL
    listens on loopback only.)"""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    root = world_traversable_tmpdir("pgha-guest-")
    image = root / "volume.img"
    with image.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    mount = root / "mnt"
    conf = root / "guest.json"
    guest = config(role="primary", volume_device=device, volume_is_new=True,
                   mount_point=str(mount),
                   data_dir=str(mount / "data"), socket_dir=str(root / "run"),
                   pg_bin=pg_bin_dir(), run_as=PG_USER, log_file=str(mount / "pg.log"),
                   port=free_port(), settings={"listen_addresses": "127.0.0.1"},
                   admin_cidrs=("127.0.0.1",))
    try:
        conf.write_text(guest.to_json())
        conf.chmod(0o600)
        for _ in range(2):
            result = subprocess.run([sys.executable, "-I", bootstrap.__file__, str(conf)],
                                    capture_output=True, text=True, check=False, timeout=120)
            assert result.returncode == 0, result.stderr + result.stdout
            assert SECRET not in result.stdout + result.stderr
            # The broker's later pg_hba wins over the first boot's peers.
            (mount / "data" / "pg_hba.conf").write_text(
                "# rewritten by the broker\nhost all postgres 127.0.0.1/32 scram-sha-256\n")
        assert "already running" in result.stdout  # the second run only reloads
        assert (mount / "data" / "pg_hba.conf").read_text().startswith(
            "# rewritten by the broker")
        for path in (mount, root / "run"):  # the PostgreSQL user's alone
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam(PG_USER).pw_uid, 0o700)
        assert f"{device} {mount} ext4" in Path("/proc/self/mounts").read_text()
        assert (mount / "data" / "PG_VERSION").exists()
        conn = connection.connect("127.0.0.1", SECRET, port=guest.port)
        conn.close()
    finally:
        subprocess.run([f"{pg_bin_dir()}/pg_ctl", "-D", str(mount / "data"), "-m", "immediate",
                        "stop"], user=PG_USER, capture_output=True, check=False)
        subprocess.run(["umount", str(mount)], check=False)
        subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(root)
    assert str(mount) not in Path("/proc/self/mounts").read_text()
    assert str(image) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                            text=True, check=False).stdout


@pytest.mark.e2e
def test_a_volume_not_created_new_is_never_formatted() -> None:
    """A resurrected node's volume that shows no filesystem (a device that is not the
    data volume yet, a damaged superblock) is left alone: the bootstrap refuses, naming
    it, rather than format what may be the instance's only copy of its data."""
    root = world_traversable_tmpdir("pgha-guest-")
    image = root / "volume.img"
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    mount = root / "mnt"
    conf = root / "guest.json"
    guest = config(role="primary", volume_device=device, volume_is_new=False,
                   mount_point=str(mount), data_dir=str(mount / "data"),
                   socket_dir=str(root / "run"), pg_bin=pg_bin_dir(), run_as=PG_USER,
                   log_file=str(mount / "pg.log"), port=free_port())
    try:
        conf.write_text(guest.to_json())
        conf.chmod(0o600)
        result = subprocess.run([sys.executable, "-I", bootstrap.__file__, str(conf)],
                                capture_output=True, text=True, check=False, timeout=120)
        assert result.returncode != 0
        assert f"data volume {device} has no filesystem" in result.stderr
        assert "refusing to format" in result.stderr
        probe = subprocess.run(["blkid", "-p", device], capture_output=True, check=False)
        assert probe.returncode == 2  # still no signature: nothing was written
        assert str(mount) not in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(root)
