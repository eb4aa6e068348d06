"""A real PostgreSQL server on loopback for the broker's state store (tests and
benchmarks): run as the postgres OS user, fsync off, removed by `stop()`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid

import psycopg2

from harness.machine import free_port, pg_bin_dir, world_traversable_tmpdir

PG_USER = os.environ.get("BROKER_PG_USER", "postgres")


def _as_pg_user(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    user = pwd.getpwnam(PG_USER)

    def demote() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          preexec_fn=demote if os.geteuid() == 0 else None)


class StateServer:
    def __init__(self) -> None:
        self.bin = pg_bin_dir()
        self.root = world_traversable_tmpdir("pgha-statestore-")
        self.data = self.root / "data"
        self.port = free_port()
        self.password = uuid.uuid4().hex
        user = pwd.getpwnam(PG_USER)
        if os.geteuid() == 0:
            os.chown(self.root, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        _as_pg_user([f"{self.bin}/initdb", "-D", str(self.data), "-U", "postgres", "-N",
                     "-A", "scram-sha-256", f"--pwfile={pwfile}"])
        pwfile.unlink()
        _as_pg_user([f"{self.bin}/pg_ctl", "-D", str(self.data), "-w", "-l",
                     str(self.root / "log"), "-o",
                     f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                     f"-c unix_socket_directories={self.root} -c fsync=off "
                     "-c max_connections=200", "start"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"state_{uuid.uuid4().hex[:10]}"
        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            _as_pg_user([f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate",
                         "-w", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
