"""The broker with its OpenStack driver against the fake, whose servers are local-cloud
namespaces running the bootstrap from the broker's own user-data: for the end-to-end
tests and the OpenStack failover benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from broker.catalog import load_catalog
from broker.cloud.openstack import OpenStackCloud
from broker.config import DEFAULT_CATALOG, load_settings
from broker.crypto import Vault
from broker.operations.engine import Engine
from broker.runtime import Runtime
from broker.store import Store
from harness.machine import make_local_cloud
from harness.workflows import make_engine
from tests.fakes.openstack import FakeOpenStack
from tests.fakes.openstack.local_backend import LocalBackend
from tests.support.openstack import make_cloud

# Short waits where the tests need them; the fencing ladder's own settings are given
# by each caller.
E2E_OPTIONS: dict[str, Any] = {
    "api_timeout": 15.0, "boot_timeout": 120.0, "volume_timeout": 30.0,
    "delete_timeout": 60.0, "stop_timeout": 1.0, "detach_timeout": 10.0,
    "host_down_timeout": 60.0, "retry_budget": 20.0, "poll_interval": 0.05,
    "poll_max_interval": 0.3,
}


@dataclass
class OpenStackEnv:
    fake: FakeOpenStack
    backend: LocalBackend
    cloud: OpenStackCloud
    runtime: Runtime
    engine: Engine


@contextlib.contextmanager
def openstack_on_namespaces(tmp_path: Path, setenv: Callable[[str, str], None], *,
                            admin: bool = False, service_down_time: float = 6.0,
                            **options: Any) -> Iterator[OpenStackEnv]:
    """The fake has Nova's default policies: with admin=False the broker has member-only
    credentials and never sees a host's status; with admin=True it reads it through its
    admin connection (BROKER_OPENSTACK_ADMIN_CLOUD). `options` override E2E_OPTIONS."""
    with make_local_cloud() as local:
        fake = FakeOpenStack()
        backend = LocalBackend.install(fake.state, local)
        fake.state.service_down_time = service_down_time
        fake.start()
        try:
            setenv("OS_CLIENT_CONFIG_FILE", str(fake.write_clouds_yaml(tmp_path)))
            setenv("OS_CLOUD", "fake")
            catalog = load_catalog(DEFAULT_CATALOG)
            cloud = make_cloud(catalog, admin=admin, admin_cidr=f"{local.broker_address}/32",
                               **{**E2E_OPTIONS, **options})
            url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
            settings = load_settings({
                "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "DATABASE_URL": url,
                "BROKER_STATE_DIR": str(tmp_path / "state"), "BROKER_CLOUD": "openstack",
                "BROKER_ADMIN_CIDR": f"{local.broker_address}/32",
            })
            store = Store(url)
            store.upgrade()
            runtime = Runtime(settings=settings, catalog=catalog, store=store,
                              vault=Vault(Fernet.generate_key().decode()))
            runtime.cloud = cloud
            try:
                yield OpenStackEnv(fake, backend, cloud, runtime, make_engine(runtime))
            finally:
                cloud.close()
                store.dispose()
        finally:
            fake.stop()
