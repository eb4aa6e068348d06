"""Wiring: settings → catalog, state store, vault, cloud, engine. Built once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from broker.backup import s3
from broker.catalog import Catalog, load_catalog
from broker.cloud.base import Cloud
from broker.config import Settings
from broker.crypto import Vault, load_or_create_key
from broker.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    catalog: Catalog
    store: Store
    vault: Vault
    # A field (not init=False) so that dataclasses.replace() keeps the driver: a copy
    # with other settings must not make a second cloud from those settings.
    _cloud: Cloud | None = field(default=None, repr=False)

    @property
    def cloud(self) -> Cloud:
        """The cloud driver, made on first use (the web process may never need it)."""
        if self._cloud is None:
            from broker.cloud import make_cloud

            self._cloud = make_cloud(self.settings, self.catalog)
        return self._cloud

    @cloud.setter
    def cloud(self, cloud: Cloud) -> None:
        """Use this driver instead of the configured one (tests, tools)."""
        self._cloud = cloud


def build_runtime(settings: Settings, *, upgrade: bool = True) -> Runtime:
    catalog = load_catalog(settings.catalog_path)
    s3.check_plans(settings, catalog)
    if settings.is_sqlite:
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.database_url)
    if upgrade:
        store.upgrade()
    vault = Vault(load_or_create_key(settings.state_dir, settings.encryption_key))
    return Runtime(settings=settings, catalog=catalog, store=store, vault=vault)
