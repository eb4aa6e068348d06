"""The one small interface every cloud implements (`local` and `openstack`).

Rules every driver keeps, because durable operations rely on them:
- Every create_* is idempotent by `name`: if a resource with that name exists it is
  returned (adopted), never made twice. Names embed the instance id and node id.
- Every delete_* of something already gone returns quietly.
- Every resource carries `tags` (at least `pgha-instance` and, for nodes, `pgha-node`
  and `pgha-role`) so cleanup and the orphan sweeper can find it.
- Waiting is bounded; a driver raises `CloudError` with a plain sentence, never a
  secret, when something does not happen in time.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from broker.guest.bootstrap import GuestConfig

if TYPE_CHECKING:
    from broker.catalog import Plan

TAG_INSTANCE = "pgha-instance"
TAG_NODE = "pgha-node"
TAG_ROLE = "pgha-role"
TAG_MANAGED = "pgha-managed"  # value "true": the orphan sweeper's filter
TAG_PLAN = "pgha-plan"        # on ports: the catalog plan whose networks they belong to


class CloudError(Exception):
    """A cloud call failed for good (after the driver's own retries)."""


class TransientCloudError(CloudError):
    """Worth retrying later (5xx, 409 while busy, timeouts)."""


class NoValidHost(TransientCloudError):
    """No host of the zone can take a server now (the zone is down): try again later."""


class FenceError(CloudError):
    """The old primary could not be confirmed stopped: never promote after this."""


class ServerStatus(enum.StrEnum):
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    SHUTOFF = "SHUTOFF"      # stopped: fenced
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"      # the hypervisor does not answer (host down)


@dataclass(frozen=True)
class Resource:
    """What every cloud resource has: its id, the name the broker gave it, its tags."""

    id: str
    name: str
    tags: dict[str, str] = field(default_factory=dict, kw_only=True)


@dataclass(frozen=True)
class Port(Resource):
    address: str
    device_id: str | None          # the server it is attached to, None when unbound


@dataclass(frozen=True)
class PortNic:
    """What a guest needs to configure the port's NIC itself when it appears."""

    mac: str
    address: str
    prefix_length: int
    gateway: str                   # "" when the subnet has none
    mtu: int                       # 0 when the cloud does not say


@dataclass(frozen=True)
class Volume(Resource):
    availability_zone: str
    size_gb: int
    status: str                    # available | in-use | ...
    attached_to: str | None        # server id


@dataclass(frozen=True)
class Server(Resource):
    availability_zone: str
    status: ServerStatus
    management_address: str | None
    # Driver-specific facts for operators (e.g. {"netns": "pgha-1a2b"}).
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSpec:
    """Everything needed to boot one node."""

    name: str                      # pgha-<instance>-<node>
    availability_zone: str
    flavor: str
    image: str
    management_port_id: str        # made first, so its address is known before boot
    volume_id: str                 # the data volume, attached as the data disk
    guest: GuestConfig             # what the guest bootstrap makes of the server
    server_group_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


ResourceKind = Literal["server", "volume", "port", "server_group", "security_group"]


@dataclass(frozen=True)
class CloudResource:
    """Anything the broker made, for cleanup and the orphan sweeper."""

    kind: ResourceKind
    id: str
    name: str
    tags: dict[str, str]


class Cloud(abc.ABC):
    """Servers in zones, volumes, a movable service port, stop/fence and delete."""

    name: str = "abstract"

    # --- addresses ----------------------------------------------------------------------
    @abc.abstractmethod
    def admin_cidrs(self) -> tuple[str, ...]:
        """Where the broker's connections to nodes come from (pg_hba for the admin role);
        empty when the driver does not know."""

    @abc.abstractmethod
    def app_cidrs(self, plan: Plan) -> tuple[str, ...]:
        """Where applications reach nodes of `plan` from; empty when nobody said."""

    # --- ports -----------------------------------------------------------------
    @abc.abstractmethod
    def create_port(self, name: str, purpose: Literal["management", "service"],
                    tags: dict[str, str]) -> Port:
        """A port with a fixed address, not attached to anything."""

    @abc.abstractmethod
    def get_port(self, port_id: str) -> Port | None: ...

    @abc.abstractmethod
    def port_nic(self, port_id: str) -> PortNic:
        """The port's MAC and network, for the guest config of every server the port
        may be plugged into (its NIC agent configures the address itself)."""

    @abc.abstractmethod
    def attach_port(self, port_id: str, server_id: str) -> None:
        """Hot-plug the port into the running server; returns once the guest has the
        address: the broker reaches PostgreSQL on it (it answers an SSLRequest, bounded wait;
        CloudError otherwise). The cloud only plugs the NIC: the guest's NIC agent
        configures it.

        Raises CloudError if the port is bound to another server (never steals it)."""

    @abc.abstractmethod
    def detach_port(self, port_id: str, server_id: str) -> None:
        """Unplug; returns only once the cloud shows the port unbound (bounded wait)."""

    @abc.abstractmethod
    def delete_port(self, port_id: str) -> None: ...

    # --- volumes ---------------------------------------------------------------
    @abc.abstractmethod
    def create_volume(self, name: str, size_gb: int, availability_zone: str,
                      volume_type: str | None, tags: dict[str, str]) -> Volume: ...

    @abc.abstractmethod
    def get_volume(self, volume_id: str) -> Volume | None: ...

    @abc.abstractmethod
    def detach_volume(self, volume_id: str, server_id: str, *, force: bool = False) -> None:
        """Release the volume from a (possibly dead) server; `force` for a dead host."""

    @abc.abstractmethod
    def delete_volume(self, volume_id: str) -> None: ...

    # --- servers ---------------------------------------------------------------
    @abc.abstractmethod
    def ensure_server_group(self, name: str, tags: dict[str, str]) -> str | None:
        """An anti-affinity group for the instance's nodes (None where meaningless)."""

    @abc.abstractmethod
    def delete_server_group(self, group_id: str) -> None: ...

    @abc.abstractmethod
    def create_server(self, spec: ServerSpec) -> Server:
        """Boot a server that runs the guest bootstrap; adopt one with the same name.

        Returns when the cloud reports it ACTIVE. PostgreSQL may still be starting:
        callers wait for it with `broker.pg.connection.wait_ready`."""

    @abc.abstractmethod
    def get_server(self, server_id: str) -> Server | None: ...

    def zone_available(self, availability_zone: str) -> bool:
        """Whether the zone can take a new server now; True when the driver cannot tell
        (then a create in a dead zone fails, and is retried, on its own)."""
        return True

    @abc.abstractmethod
    def stop_server(self, server_id: str) -> None:
        """Fence: power the server off. Returns only when it is confirmed stopped;
        raises FenceError when that cannot be confirmed."""

    @abc.abstractmethod
    def delete_server(self, server_id: str) -> None:
        """Delete the server. Its ports are unbound and kept (they are deleted on
        their own), its volumes are detached and kept."""

    # --- security groups -------------------------------------------------------
    def delete_security_group(self, group_id: str, *, if_unused: bool = False) -> None:
        """Delete one of the broker's security groups; `if_unused`: keep one that a port
        still uses instead of failing. Clouds without security groups have none."""
        raise CloudError(f"this cloud has no security groups (asked for {group_id})")

    # --- housekeeping ----------------------------------------------------------
    def hand_repository_to(self, stanza: str, volume_id: str) -> None:  # noqa: B027
        """Let the node on `volume_id` write the stanza's backup repository (it is about
        to be promoted). Object storage: every node holds the credentials already."""

    def share_repository(self, stanza: str, volume_id: str | None) -> None:  # noqa: B027
        """Let the node on `volume_id` (a standby) read the stanza's repository, and no
        other node but its writer. Object storage: every node holds the credentials."""

    def delete_repository(self, stanza: str) -> None:
        """Delete the stanza's backup repository (a deleted instance's, after its restore
        window)."""
        raise CloudError(f"the {self.name} cloud cannot delete backup repositories")

    @abc.abstractmethod
    def find_resources(self, instance_id: str | None = None) -> list[CloudResource]:
        """Everything tagged as the broker's (for one instance, or all), of every kind
        `delete_resource` removes."""

    def delete_resource(self, resource: CloudResource) -> None:
        """Delete what `find_resources` found (a security group only once unused)."""
        if resource.kind == "server":
            self.delete_server(resource.id)
        elif resource.kind == "port":
            self.delete_port(resource.id)
        elif resource.kind == "volume":
            self.delete_volume(resource.id)
        elif resource.kind == "server_group":
            self.delete_server_group(resource.id)
        else:
            self.delete_security_group(resource.id, if_unused=True)

    def reporting(self, progress: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
        """While in this context, tell `progress` what the driver waits for (the
        operation's description shows it). Drivers whose calls return at once need not."""
        return contextlib.nullcontext()

    def check(self) -> list[str]:
        """Problems with the configuration (unreachable cloud, unknown flavor, ...)."""
        return []

    def capacity(self) -> list[str]:
        """One line per plan: how many more instances the cloud's quotas allow."""
        return []

    def close(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Release connections (optional)."""
