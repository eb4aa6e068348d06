"""The broker deployed as Cloud Foundry runs it, on the local cloud.

What the Python buildpack builds: a fresh venv from `requirements.txt` alone (the
project itself is not installed: the app directory, as `cf push` uploads it under
`.cfignore`, is the working directory). The state store is a real PostgreSQL bound
through `VCAP_SERVICES` in the shape Cloud Controller gives (`postgres://` uri,
`tags: ["postgresql"]`). `manifest.yml`'s own commands start 2 `web` and 2 `worker`
processes with `PORT`, `VCAP_APPLICATION` and `CF_INSTANCE_INDEX` set; each worker
runs in a container of its own, so each has its own host name (BROKER_HOST_IDENTITY
here): a dead worker's work moves by lease expiry only, never by the same-host
dead-pid shortcut.

A whole lifecycle goes through the two web processes in turn, and in the middle:
- the worker running a provision is SIGKILLed: the other finishes it, taking the
  operation over only once its lease expired;
- one web process (its container: the gunicorn master and its workers) is
  SIGKILLed: the platform's requests go on through the other;
- the two workers split the two instances' monitor leases; the one watching the
  instance the app writes to is SIGKILLed: the other takes that lease once it
  expired (not before) and fails the instance over when its primary is killed,
  with no acknowledged write lost.
Then unbind and deprovision; the state store holds nothing unfinished, and nothing
is left behind (processes, namespaces, interfaces, OS users)."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
import yaml
from cryptography.fernet import Fernet
from sqlalchemy import select

from broker.config import load_settings
from broker.monitor.leases import monitor_lease_name
from broker.store.models import (
    BINDING_DELETED,
    DEPROVISIONED,
    OP_FAILED,
    SUCCEEDED,
    UNFINISHED,
    Binding,
    Failover,
    Instance,
    Lease,
    Operation,
    aware,
    utcnow,
)
from harness.env import FailoverEnv, failover_env
from harness.faults import kill_server
from harness.machine import free_port, world_traversable_tmpdir
from harness.waiting import eventually, settled
from harness.workflows import instance
from harness.writer import Writer
from tests.support.api import PASSWORD, USERNAME, osb_headers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


# --- staging, as the Python buildpack does ----------------------------------------------
@dataclass(frozen=True)
class Droplet:
    app: Path       # the app directory as uploaded (the processes' working directory)
    venv: Path      # what `pip install -r requirements.txt` built


def _cfignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        pattern = pattern.strip("/")
        if anchored:
            if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(parts[0], pattern):
                return True
        elif any(fnmatch.fnmatch(p, pattern) for p in parts) or fnmatch.fnmatch(rel, pattern):
            return True
    return False


def _upload(dest: Path) -> None:
    """What `cf push` uploads: the app directory minus `.cfignore` (and `.git`)."""
    patterns = [line.strip() for line in (ROOT / ".cfignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] == ".git" or _cfignored(rel, patterns) or path.is_dir():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


@pytest.fixture(scope="session")
def droplet() -> Iterator[Droplet]:
    root = world_traversable_tmpdir("pgha-droplet-")
    try:
        app, venv = root / "app", root / "venv"
        _upload(app)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--no-input", "-r",
             "requirements.txt"], cwd=app, capture_output=True, text=True, timeout=600,
            env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")})
        assert pip.returncode == 0, pip.stderr[-3000:]
        yield Droplet(app=app, venv=venv)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_upload_holds_the_app_and_nothing_the_tests_need() -> None:
    with contextlib.ExitStack() as stack:
        dest = world_traversable_tmpdir("pgha-upload-")
        stack.callback(shutil.rmtree, dest, True)
        _upload(dest)
        for needed in ("manifest.yml", "requirements.txt", "runtime.txt", "catalog.yml",
                       "broker/__main__.py", "broker/guest/bootstrap.py",
                       "migrations/env.py"):
            assert (dest / needed).is_file(), needed
        for left_out in (".venv", "tests", "harness", "benchmarks", ".git"):
            assert not (dest / left_out).exists(), left_out


# --- the manifest and the platform's environment ---------------------------------------
def _processes() -> dict[str, dict[str, Any]]:
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text())
    [app] = manifest["applications"]
    assert app["buildpacks"] == ["python_buildpack"]
    return {p["type"]: p for p in app["processes"]}


def _vcap_services(state_url: str) -> str:
    """A bound PostgreSQL service as Cloud Controller renders it (the broker's own
    database under the name the manifest binds, a `postgres://` uri)."""
    uri = "postgres://" + state_url.split("://", 1)[1]
    return json.dumps({"postgresql": [{
        "binding_guid": str(uuid.uuid4()), "binding_name": None,
        "credentials": {"uri": uri, "hostname": "127.0.0.1", "name": uri.rsplit("/", 1)[1]},
        "instance_guid": str(uuid.uuid4()), "instance_name": "broker-state",
        "label": "postgresql", "name": "broker-state", "plan": "small", "provider": None,
        "syslog_drain_url": None, "tags": ["postgresql", "relational"], "volume_mounts": [],
    }]})


def _vcap_application(index: int, port: int, process_type: str) -> str:
    return json.dumps({
        "application_id": "8d3a6f0e-0000-4000-8000-000000000001",
        "application_name": "pgha-broker", "application_uris": ["pgha-broker.apps.test"],
        "cf_api": "https://api.test", "limits": {"fds": 16384, "mem": 512, "disk": 1024},
        "name": "pgha-broker", "organization_name": "system", "space_name": "brokers",
        "process_type": process_type, "instance_index": index, "port": port,
        "uris": ["pgha-broker.apps.test"], "version": str(uuid.uuid4()),
    })


@dataclass
class Platform:
    """Starts the manifest's processes as Diego would, one 'container' each."""

    env: FailoverEnv
    droplet: Droplet
    state_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)

    def _environment(self, process_type: str, index: int, port: int,
                     host: str) -> dict[str, str]:
        base = self.env.worker_env()
        del base["DATABASE_URL"]   # the state store comes from VCAP_SERVICES
        base = {k: v for k, v in base.items()
                if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        return {
            **base,
            "PATH": f"{self.droplet.venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.env.base / f"home-{host}"),
            "PORT": str(port), "CF_INSTANCE_INDEX": str(index),
            "VCAP_APPLICATION": _vcap_application(index, port, process_type),
            "VCAP_SERVICES": _vcap_services(self.state_url),
            "BROKER_CLOUD": "local", "BROKER_USERNAME": USERNAME, "BROKER_PASSWORD": PASSWORD,
            "BROKER_HOST_IDENTITY": host,
            # web only: gunicorn listens on loopback here (on Diego: every address)
            "BROKER_LISTEN": "127.0.0.1",
        }

    def start(self, name: str, process_type: str, index: int) -> subprocess.Popen[bytes]:
        port = free_port()
        host = f"{name}-container"
        (self.env.base / f"home-{host}").mkdir(mode=0o700)
        command = _processes()[process_type]["command"]
        with (self.env.base / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(["bash", "-c", command], cwd=self.droplet.app,
                                    env=self._environment(process_type, index, port, host),
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs[name] = proc
        if process_type == "web":
            base = f"http://127.0.0.1:{port}"
            eventually(lambda: self._healthy(name, base), f"{name} answering /health", 90,
                       interval=0.3)
            self.bases[name] = base
        return proc

    def _healthy(self, name: str, base: str) -> bool:
        assert self.procs[name].poll() is None, self.log(name)[-3000:]
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(f"{base}/health", timeout=5).status_code == 200
        return False

    def log(self, name: str) -> str:
        return (self.env.base / f"{name}.log").read_text(errors="replace")

    def crash(self, name: str) -> None:
        """The container dies: every process in it, at once."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.bases.pop(name, None)
        eventually(lambda: not _group_alive(proc.pid), f"{name}'s processes gone", 30)

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM, as `cf stop` sends; the exit status of each process."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                codes[name] = None
        self.procs.clear()
        return codes


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Api:
    """Cloud Controller: each request through the next live web process."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._turn = itertools.count()
        self.served_by: list[str] = []

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        names = sorted(self.platform.bases)
        name = names[next(self._turn) % len(names)]
        self.served_by.append(name)
        return requests.request(method, f"{self.platform.bases[name]}{path}",
                                headers=osb_headers(), timeout=60, **kwargs)

    def wait_operation(self, instance_id: str, operation: str, timeout: float = 300) -> None:
        def done() -> bool:
            answer = self.call("GET", f"/v2/service_instances/{instance_id}/last_operation",
                               params={"operation": operation})
            assert answer.status_code == 200, answer.text
            state = answer.json()["state"]
            assert state != "failed", answer.json()
            return bool(state == "succeeded")

        eventually(done, f"{operation} succeeded", timeout, interval=0.5)


# --- reading the state store -----------------------------------------------------------
def _operation(env: FailoverEnv, operation_id: str) -> Operation:
    with env.runtime.store.session() as s:
        op = s.get(Operation, operation_id)
        assert op is not None
        return op


def _lease(env: FailoverEnv, instance_id: str) -> tuple[str, datetime] | None:
    with env.runtime.store.session() as s:
        row = s.execute(select(Lease.owner, Lease.expires_at)
                        .where(Lease.name == monitor_lease_name(instance_id))).first()
    if row is None:
        return None
    expires = aware(row[1])
    assert expires is not None
    return str(row[0]), expires


def _host(owner: str | None) -> str | None:
    return owner.split(":", 1)[0] if owner else None


def _watched_by(env: FailoverEnv, instance_id: str) -> str | None:
    lease = _lease(env, instance_id)
    return _host(lease[0]) if lease is not None and lease[1] >= utcnow() else None


def _held_until_expiry(env: FailoverEnv, read: Any, dead_host: str,
                       expires: datetime, what: str, timeout: float) -> str:
    """Watch an owner id until a host other than `dead_host` holds it; every reading
    taken before `expires` must still name the dead one. The new host."""
    deadline = time.monotonic() + timeout
    while True:
        host = _host(read())
        seen_at = utcnow()  # after the read: the takeover it shows happened before
        if host is not None and host != dead_host:
            assert seen_at >= expires, f"{what} taken over before its lease expired"
            return host
        assert time.monotonic() < deadline, f"never saw {what} taken over"
        time.sleep(0.1)


def _provision(api: Api, instance_id: str, plan: Any) -> str:
    answer = api.call("PUT", f"/v2/service_instances/{instance_id}",
                      params={"accepts_incomplete": "true"},
                      json={"service_id": plan.service_id, "plan_id": plan.id,
                            "organization_guid": "org-1", "space_guid": "space-1",
                            "context": {"platform": "cloudfoundry"}})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["operation"])


def _deprovision(api: Api, instance_id: str, plan: Any) -> None:
    answer = api.call("DELETE", f"/v2/service_instances/{instance_id}",
                      params={"service_id": plan.service_id, "plan_id": plan.id,
                              "accepts_incomplete": "true"})
    assert answer.status_code == 202, answer.text
    api.wait_operation(instance_id, answer.json()["operation"])


# Staging alone (a venv from requirements.txt) takes ~90 s without a pip cache.
@pytest.mark.timeout(900)
def test_two_web_and_two_workers_as_cloud_foundry_runs_them(
        droplet: Droplet, pg_state_url: str, tmp_path: Path) -> None:
    processes = _processes()
    assert processes["web"]["instances"] == 2 and processes["worker"]["instances"] == 2
    assert processes["worker"]["health-check-type"] == "process"
    with failover_env(pg_state_url) as env:
        platform = Platform(env, droplet, pg_state_url)
        try:
            secrets = _lifecycle(env, platform, tmp_path)
        finally:
            codes = platform.stop_all()
        # `cf stop` (SIGTERM): every process ends cleanly well before Diego's SIGKILL.
        assert all(code == 0 for code in codes.values()), codes
        assert not _running_in(droplet.app), "a broker process outlived its container"
        for log in env.base.glob("*.log"):
            text = log.read_text(errors="replace")
            assert not [s for s in secrets if s in text], f"a secret in {log.name}"


def _running_in(app: Path) -> list[int]:
    """Processes whose working directory is the app directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cwd").resolve() == app:
                pids.append(int(proc.name))
    return pids


def _lifecycle(env: FailoverEnv, platform: Platform, tmp_path: Path) -> list[str]:
    """The whole scenario; the secrets that must appear in no process's log."""
    plan = env.runtime.catalog.plan_by_name("ha-sync")
    pg_password = platform.state_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    for index, name in enumerate(("web-0", "web-1")):
        platform.start(name, "web", index)
    for index, name in enumerate(("worker-0", "worker-1")):
        platform.start(name, "worker", index)
    api = Api(platform)

    # The catalog, through both web processes.
    catalogs = [api.call("GET", "/v2/catalog") for _ in range(2)]
    assert [c.status_code for c in catalogs] == [200, 200]
    assert catalogs[0].json() == catalogs[1].json()
    [service] = [s for s in catalogs[0].json()["services"] if s["id"] == plan.service_id]
    assert plan.id in {p["id"] for p in service["plans"]}

    # A provision whose worker dies mid-flight: the other finishes it, but only once
    # the operation's lease expired (the dead worker was on another host).
    orders = "orders-db"
    operation = _provision(api, orders, plan)
    claimed = eventually(lambda: (op := _operation(env, operation)).owner and op,
                         "a worker claiming the provision", 60)
    dead_host = _host(claimed.owner)
    assert dead_host in ("worker-0-container", "worker-1-container")
    dead = dead_host.removesuffix("-container")
    platform.crash(dead)
    after_kill = _operation(env, operation)   # the dead worker renews nothing any more
    lease_end = aware(after_kill.lease_expires_at)
    if after_kill.state in UNFINISHED and lease_end is not None:
        assert _host(after_kill.owner) == dead_host

        def provision_owner() -> str:
            op = _operation(env, operation)
            return op.owner or ("" if op.state in UNFINISHED else "finished:0:-")

        heir = _held_until_expiry(env, provision_owner, dead_host, lease_end,
                                  "the provision", 120)
        assert heir in ("worker-0-container", "worker-1-container", "finished")
    api.wait_operation(orders, operation)
    # Diego restarts the crashed instance: a new container, a new host name.
    platform.start(f"{dead}-restarted", "worker", int(dead[-1]))

    stock = "stock-db"
    api.wait_operation(stock, _provision(api, stock, plan))
    workers = {"worker-0", "worker-1", "worker-0-restarted", "worker-1-restarted"} & set(
        platform.procs)
    assert len(workers) == 2

    # The two live workers split the two instances' monitor leases.
    eventually(lambda: {_watched_by(env, orders), _watched_by(env, stock)}
               == {f"{w}-container" for w in workers},
               "each worker watching one instance", 90, interval=0.2)

    # Bind like an app (service key shape aside: an app guid), connect with TLS
    # verify-full against the binding's own CA.
    binding = "app-binding-1"
    answer = api.call("PUT", f"/v2/service_instances/{orders}/service_bindings/{binding}",
                      json={"service_id": plan.service_id, "plan_id": plan.id,
                            "bind_resource": {"app_guid": "app-guid-1"}})
    assert answer.status_code == 201, answer.text
    creds = answer.json()["credentials"]
    assert creds["sslmode"] == "verify-full" and "sslmode=verify-full" in creds["uri"]
    ca = tmp_path / "binding-ca.pem"
    ca.write_text(creds["ca_certificate"])
    conn = psycopg2.connect(creds["uri"], sslrootcert=str(ca), connect_timeout=10)
    conn.autocommit = True
    assert conn.info.ssl_in_use and conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE acked (id bigint PRIMARY KEY, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    conn.close()

    writer = Writer(creds)
    writer.start()
    try:
        writer.wait_acks(20)

        # A web process dies with its container; the platform goes on through the other.
        platform.crash("web-0")
        for _ in range(3):
            assert api.call("GET", "/v2/catalog").status_code == 200
            assert api.call("GET", f"/v2/service_instances/{orders}/service_bindings/"
                            f"{binding}").status_code == 200
        platform.start("web-0-restarted", "web", 0)

        # The worker watching `orders` dies: the other takes the lease over once it
        # expired, not before, and then fails the instance over.
        lease = _lease(env, orders)
        assert lease is not None
        watcher = _host(lease[0])
        assert watcher is not None
        platform.crash(watcher.removesuffix("-container"))
        # Read after the kill: the dead worker renews nothing any more.
        final = _lease(env, orders)
        assert final is not None and _host(final[0]) == watcher
        heir = _held_until_expiry(env, lambda: (_lease(env, orders) or (None,))[0],
                                  watcher, final[1], "the monitor lease", 60)
        assert heir in {f"{w}-container" for w in platform.procs}

        old = instance(env.runtime, orders).primary()
        assert old is not None and old.server_id is not None
        writer.wait_acks(5, after=writer.acked[-1][1])
        fault_at = time.monotonic()
        kill_server(env.cloud, old.server_id)
        writer.wait_recovery(fault_at, timeout=120)
        eventually(lambda: settled(env, orders) and
                   instance(env.runtime, orders).primary().id != old.id,  # type: ignore[union-attr]
                   "the failover done and a standby streaming again", 240)
        writer.wait_acks(20, after=time.monotonic())
    finally:
        writer.stop()
    conn = psycopg2.connect(creds["uri"], sslrootcert=str(ca), connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM acked")
        stored = {int(r[0]) for r in cur.fetchall()}
    conn.close()
    acked = {i for i, _ in writer.acked}
    assert acked and acked <= stored, f"acknowledged writes lost: {sorted(acked - stored)[:10]}"

    with env.runtime.store.session() as s:
        [event] = s.scalars(select(Failover).where(Failover.instance_id == orders)).all()
        assert event.outcome == "succeeded"

    answer = api.call("DELETE", f"/v2/service_instances/{orders}/service_bindings/{binding}",
                      params={"service_id": plan.service_id, "plan_id": plan.id})
    assert answer.status_code == 200, answer.text
    _deprovision(api, orders, plan)
    _deprovision(api, stock, plan)
    assert set(api.served_by) == {"web-0", "web-1", "web-0-restarted"}

    # The state store: everything finished, nothing failed, nothing held.
    with env.runtime.store.session() as s:
        ops = s.scalars(select(Operation)).all()
        assert not [o.id for o in ops if o.state in UNFINISHED]
        assert not [(o.kind, o.error) for o in ops if o.state == OP_FAILED]
        assert {o.kind for o in ops if o.state == SUCCEEDED} >= {
            "provision", "failover", "deprovision"}
        states = {i.id: i.state for i in s.scalars(select(Instance))}
        assert states == {orders: DEPROVISIONED, stock: DEPROVISIONED}
        assert not [b.id for b in s.scalars(select(Binding)) if b.state != BINDING_DELETED]
    eventually(lambda: _watched_by(env, orders) is None and _watched_by(env, stock) is None,
               "no monitor lease on a deprovisioned instance", 30)
    return [PASSWORD, creds["password"], env.key, pg_password]


def test_the_manifest_environment_is_settings_the_broker_accepts() -> None:
    """Every variable the manifest sets is a documented setting, and with its
    `((vars))` filled in and a bound state store the settings load."""
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text())
    env: dict[str, str] = manifest["applications"][0]["env"]
    documented = set(re.findall(r"`((?:BROKER|OS)_[A-Z_]+)`", (ROOT / "README.md").read_text()))
    assert {k for k in env if not k.startswith("OS_")} <= documented
    filled = {k: re.sub(r"\(\((\w+)\)\)", "x", v) for k, v in env.items()}
    filled.update(BROKER_ENCRYPTION_KEY=Fernet.generate_key().decode(),
                  BROKER_ADMIN_CIDR="10.0.0.0/24",
                  VCAP_APPLICATION=_vcap_application(0, 8080, "web"),
                  VCAP_SERVICES=_vcap_services("postgresql://u:p@db.test:5432/state"))
    settings = load_settings(filled)
    assert settings.cloud == "openstack"
    assert settings.database_url == "postgresql://u:p@db.test:5432/state"
    assert settings.observability.external_url == "https://pgha-broker.apps.test"
