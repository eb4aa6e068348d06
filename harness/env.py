"""The failover environment: a local cloud whose root is `<state dir>/local-cloud`, so
that a real `python -m broker worker` started with BROKER_STATE_DIR=<state dir> drives
the very same cloud; a state store (SQLite there, or a PostgreSQL URL), a key, a
runtime. Teardown destroys everything and asserts nothing is left. `background` runs
the worker's engine and monitor as threads of this process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.fernet import Fernet

from broker.cloud.local import LocalCloud
from broker.monitor.loop import Monitor
from broker.operations.engine import Engine
from broker.runtime import Runtime
from harness.faults import heal_partitions, thaw_everything
from harness.machine import (
    assert_no_users_left,
    cloud_users,
    free_test_network,
    list_interfaces,
    list_namespaces,
    pg_bin_dir,
    postgres_processes_under,
    world_traversable_tmpdir,
)
from harness.workflows import make_engine, make_runtime

ROOT = Path(__file__).resolve().parent.parent


class HasRuntime(Protocol):
    """What the app and waiting helpers need of an environment: its runtime (the
    failover environment, or one on the OpenStack fake)."""

    @property
    def runtime(self) -> Runtime: ...


class HasEngine(HasRuntime, Protocol):
    """An environment that also runs whole operations in this process."""

    @property
    def engine(self) -> Engine: ...


@dataclass
class FailoverEnv:
    base: Path                  # BROKER_STATE_DIR
    cloud: LocalCloud
    state_url: str
    key: str
    runtime: Runtime
    engine: Engine
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update({
            "BROKER_STATE_DIR": str(self.base), "DATABASE_URL": self.state_url,
            "BROKER_ENCRYPTION_KEY": self.key, "BROKER_LOCAL_NETWORK": str(self.cloud.network),
            "BROKER_LOCAL_BRIDGE": self.cloud.bridge, "BROKER_PG_BIN": self.cloud.pg_bin,
            "BROKER_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def start_worker(self, log_name: str, **extra: str) -> subprocess.Popen[bytes]:
        """A real `python -m broker worker` (engine + monitor) on this store and cloud."""
        log = open(self.base / f"{log_name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "broker", "worker"], cwd=ROOT,
                                env=self.worker_env(**extra), stdout=log, stderr=log)
        log.close()
        self.workers.append(proc)
        return proc

    def worker_log(self, log_name: str) -> str:
        path = self.base / f"{log_name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_workers(self) -> None:
        keep = os.environ.get("FAILOVER_KEEP_LOGS")
        if keep:  # for a human debugging a run: copy the workers' logs out first
            for path in self.base.glob("*.log"):
                shutil.copy(path, Path(keep) / f"{self.base.name}-{path.name}")
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


@contextlib.contextmanager
def failover_env(state_url: str | None = None) -> Iterator[FailoverEnv]:
    if os.geteuid() != 0:
        import pytest

        pytest.skip("the local cloud needs root")
    base = world_traversable_tmpdir("pgha-fo-")
    cloud = LocalCloud(base / "local-cloud", free_test_network(), f"pgf{os.urandom(4).hex()}",
                       pg_bin=pg_bin_dir())
    key = Fernet.generate_key().decode()
    url = state_url or f"sqlite:///{base / 'broker.sqlite3'}"
    try:
        runtime = make_runtime(url, key, cloud)
    except BaseException:  # a state store that cannot be reached: leave no directory
        shutil.rmtree(base, ignore_errors=True)
        raise
    env = FailoverEnv(base=base, cloud=cloud, state_url=url, key=key, runtime=runtime,
                      engine=make_engine(runtime))
    try:
        yield env
    finally:
        env.stop_workers()
        heal_partitions()
        thaw_everything(cloud)
        namespaces = set(cloud.namespaces())
        interfaces = set(cloud.interface_names())
        users = cloud_users(cloud)
        cloud.destroy_everything()
        runtime.store.dispose()
        leftovers = postgres_processes_under(base)
        shutil.rmtree(base, ignore_errors=True)
        assert not namespaces & list_namespaces(), "namespaces left behind"
        assert not interfaces & list_interfaces(), "interfaces left behind"
        assert not leftovers, "PostgreSQL processes left behind"
        assert_no_users_left(cloud, users)
        assert not base.exists(), f"{base} left behind"


@contextlib.contextmanager
def background(env: HasRuntime, runtime: Runtime | None = None) -> Iterator[Monitor]:
    """The worker's two threads in this process: the engine loop and the monitor."""
    runtime = runtime or env.runtime
    stop = threading.Event()
    engine = make_engine(runtime)
    monitor = Monitor(runtime, engine)
    threads = [threading.Thread(target=engine.loop, args=(stop,), daemon=True),
               threading.Thread(target=monitor.run, args=(stop,), daemon=True)]
    for t in threads:
        t.start()
    try:
        yield monitor
    finally:
        stop.set()
        engine.wake()
        for t in threads:
            t.join(timeout=30)
