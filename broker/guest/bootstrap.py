"""Guest bootstrap: what every server runs once at boot to become a PostgreSQL node.

The SAME code runs in both clouds:
- `openstack`: cloud-init user-data writes this file and the node's JSON config and
  runs `python3 bootstrap.py /etc/pgha/guest.json` (as root, like cloud-init).
- `local`: the driver runs it inside the server's network namespace.

It uses only the standard library and PostgreSQL's own binaries, because a guest
image has python3 and PostgreSQL but none of the broker's packages.

Usage: python3 bootstrap.py CONFIG.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class GuestConfig:
    """What one node must become. Produced by the broker, serialised to JSON."""

    instance_id: str
    node_id: str
    role: str                          # "primary" | "standby"
    admin_password: str                # superuser `postgres`, for the broker only
    replication_password: str          # role `pgha_replicator`
    replication: str = "none"          # none | async | sync (the plan's mode)
    application_name: str = ""         # this node's name as a standby
    primary_address: str | None = None  # standby: where to take the base backup
    slot_name: str | None = None       # standby: its slot on the primary
    port: int = 5432
    database: str = "appdb"
    # pg_hba inputs: who may connect as what.
    admin_cidrs: tuple[str, ...] = ()  # the broker's addresses
    peer_addresses: tuple[str, ...] = ()  # the instance's other nodes (replication)
    app_cidrs: tuple[str, ...] = ()    # where apps come from (the service address)
    settings: dict[str, str] = field(default_factory=dict)  # extra postgresql.conf lines
    # Placement, filled in by the cloud driver.
    data_dir: str = "/var/lib/pgha/data"
    volume_device: str | None = None   # openstack: format and mount this device
    mount_point: str = "/var/lib/pgha"
    socket_dir: str = "/var/run/postgresql"
    pg_bin: str = "/usr/lib/postgresql/15/bin"
    run_as: str = "postgres"
    log_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GuestConfig:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("admin_cidrs", "peer_addresses", "app_cidrs"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def main(argv: list[str]) -> int:
    raise NotImplementedError("guest bootstrap: implemented in the local-cloud work")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
