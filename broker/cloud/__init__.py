"""Cloud drivers behind one interface (`broker.cloud.base.Cloud`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.catalog import Catalog
    from broker.cloud.base import Cloud
    from broker.config import Settings


def make_cloud(settings: Settings, catalog: Catalog, *, validate: bool = True) -> Cloud:
    """The configured driver; imported lazily so `local` never loads openstacksdk.

    validate=False: connected, but not refusing the catalog's problems (the CLI's
    `cloud check` lists them instead)."""
    if settings.cloud == "openstack":
        from broker.cloud.openstack import OpenStackCloud

        return OpenStackCloud.from_settings(settings, catalog, validate=validate)
    from broker.cloud.local import LocalCloud

    return LocalCloud.from_settings(settings)
