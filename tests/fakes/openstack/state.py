"""The fake cloud's state and behaviour: what Nova, Neutron and Cinder would do.

Everything happens under one lock. Work that a real cloud does asynchronously
(booting, stopping, detaching) is queued as a task on the server's compute host
and runs on a later request once it is due, but only while that host is alive:
a dead hypervisor accepts requests and never carries them out, like the real one.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

PROJECT_ID = "b2a6f0c3d1e84f5c9a0b7c6d5e4f3a21"
ADMIN_PROJECT_ID = "0d2f7e6c5b4a49388271605f4e3d2c1b"


class ApiError(Exception):
    """Becomes an HTTP error response with an OpenStack-shaped body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def nova_error(status: int, message: str) -> ApiError:
    key = {400: "badRequest", 403: "forbidden", 404: "itemNotFound",
           409: "conflictingRequest"}.get(status, "computeFault")
    return ApiError(status, {key: {"code": status, "message": message}})


def neutron_error(status: int, kind: str, message: str) -> ApiError:
    return ApiError(status, {"NeutronError": {"type": kind, "message": message, "detail": ""}})


def cinder_error(status: int, message: str) -> ApiError:
    key = {400: "badRequest", 403: "forbidden", 404: "itemNotFound",
           413: "overLimit"}.get(status, "computeFault")
    return ApiError(status, {key: {"code": status, "message": message}})


def new_id() -> str:
    return str(uuid.uuid4())


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def wall() -> datetime:
    return datetime.now(UTC)


class Hooks(Protocol):
    """What happens in the data plane (the namespace-backed fake implements these)."""

    boot_in_thread: bool  # boot() takes seconds: run it outside the API's lock

    def port_created(self, port: Port, network: str) -> str | None: ...  # its address
    def port_deleted(self, port: Port) -> None: ...
    def volume_created(self, volume: Volume) -> None: ...
    def volume_deleted(self, volume: Volume) -> None: ...
    def volume_released(self, volume: Volume, server_id: str) -> None: ...
    def boot(self, server: Server, user_data: bytes | None) -> None: ...
    def crash(self, server: Server) -> None: ...  # its hypervisor died
    def power_off(self, server: Server) -> None: ...
    def power_on(self, server: Server) -> None: ...
    def destroy(self, server: Server) -> None: ...
    def plug(self, server: Server, port: Port) -> None: ...
    def unplug(self, server: Server, port: Port) -> None: ...


class NoHooks:
    boot_in_thread = False

    def port_created(self, port: Port, network: str) -> str | None: return None
    def port_deleted(self, port: Port) -> None: pass
    def volume_created(self, volume: Volume) -> None: pass
    def volume_deleted(self, volume: Volume) -> None: pass
    def volume_released(self, volume: Volume, server_id: str) -> None: pass
    def boot(self, server: Server, user_data: bytes | None) -> None: pass
    def crash(self, server: Server) -> None: pass
    def power_off(self, server: Server) -> None: pass
    def power_on(self, server: Server) -> None: pass
    def destroy(self, server: Server) -> None: pass
    def plug(self, server: Server, port: Port) -> None: pass
    def unplug(self, server: Server, port: Port) -> None: pass


@dataclass
class Host:
    name: str
    zone: str
    service_id: str = field(default_factory=new_id)
    alive: bool = True
    died_at: float | None = None         # monotonic time of the last heartbeat
    died_wall: datetime | None = None
    forced_down: bool = False
    disabled: bool = False


@dataclass
class Flavor:
    id: str
    name: str
    vcpus: int = 2
    ram: int = 4096
    disk: int = 20
    extra_specs: dict[str, str] = field(default_factory=dict)


@dataclass
class Image:
    id: str
    name: str
    status: str = "active"
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class Network:
    id: str
    name: str


@dataclass
class Subnet:
    id: str
    name: str
    network_id: str
    cidr: str
    gateway_ip: str | None
    next_host: int = 10


@dataclass
class SecurityGroup:
    id: str
    name: str
    description: str
    project_id: str
    rules: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass
class Port:
    id: str
    name: str
    network_id: str
    fixed_ips: list[dict[str, str]]
    security_groups: list[str]
    project_id: str
    mac_address: str
    description: str = ""
    device_id: str = ""
    device_owner: str = ""
    host_id: str = ""
    status: str = "DOWN"
    tags: list[str] = field(default_factory=list)
    created_at: datetime = field(default_factory=wall)


@dataclass
class Attachment:
    id: str
    volume_id: str
    server_id: str
    device: str
    host_name: str
    attached_at: datetime = field(default_factory=wall)


@dataclass
class Volume:
    id: str
    name: str
    size: int
    zone: str
    volume_type: str
    project_id: str
    metadata: dict[str, str]
    status: str = "creating"
    attachments: list[Attachment] = field(default_factory=list)
    description: str = ""
    created_at: datetime = field(default_factory=wall)
    # Fault: Nova's detach (and the local delete's) never releases it.
    stuck: bool = False
    # Fault: a Cinder attachment delete by the owner fails; only admin force-detach helps.
    attachment_delete_fails: bool = False


@dataclass
class ServerGroup:
    id: str
    name: str
    policy: str
    project_id: str
    members: list[str] = field(default_factory=list)


@dataclass
class Server:
    id: str
    name: str
    project_id: str
    zone: str
    flavor_id: str
    image_id: str
    metadata: dict[str, str]
    user_data: str | None
    group_id: str | None
    host: str | None = None
    vm_state: str = "building"
    task_state: str | None = "scheduling"
    power_state: int = 0
    fault: dict[str, Any] | None = None
    port_ids: list[str] = field(default_factory=list)
    volume_ids: list[str] = field(default_factory=list)
    created: datetime = field(default_factory=wall)
    updated: datetime = field(default_factory=wall)
    # Requests the host never acted on (a dead hypervisor).
    pending: list[str] = field(default_factory=list)
    # The config drive's files (openstack/latest/...), written once when it booted.
    config_drive: dict[str, Any] | None = None


@dataclass
class Task:
    due: float
    host: str | None
    what: str
    run: Callable[[], None]


@dataclass
class FaultRule:
    """Answer `status` (or sleep `delay` first) for matching requests, `times` times.

    With `applied`, the request is carried out first and only its answer is lost: a
    `status` replaces the real answer, a `delay` holds it past the client's timeout."""

    path: str                       # a regex searched in the request path
    method: str | None = None
    status: int | None = None
    delay: float = 0.0
    times: int | None = 1           # None: every time
    body: dict[str, Any] | None = None
    applied: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        return re.search(self.path, path) is not None


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


# Nova's status from vm_state and task_state alone (nova/api/openstack/common.py,
# _STATE_MAP): the compute host's health never enters it.
_VM_TO_STATUS = {
    "building": "BUILD", "active": "ACTIVE", "stopped": "SHUTOFF", "error": "ERROR",
    "deleted": "DELETED", "paused": "PAUSED", "soft-delete": "SOFT_DELETED",
    "suspended": "SUSPENDED", "rescued": "RESCUE",
}

# Upstream defaults: nova/conf/quota.py and Neutron's and Cinder's quota options.
DEFAULT_QUOTAS = {
    "instances": 10, "cores": 20, "ram": 51200, "server_groups": 10,
    "server_group_members": 10, "security_groups": 10, "security_group_rules": 100,
    "ports": 500, "volumes": 10, "gigabytes": 1000,
}

_RUNNING = 1
_SHUTDOWN = 4


class CloudState:
    """The whole fake cloud. Tunables are plain attributes, set by tests."""

    def __init__(self, zones: tuple[str, ...] = ("az1", "az2", "az3"),
                 hosts_per_zone: int = 2) -> None:
        self.lock = threading.RLock()
        self.hooks: Hooks = NoHooks()
        # Timing (seconds): kept short so tests stay fast.
        self.build_delay = 0.05
        self.action_delay = 0.05
        self.service_down_time = 60.0
        # A synchronous RPC to a dead compute host waits this long (Nova: 60 s).
        self.rpc_response_timeout = 60.0
        # > 0: DELETE soft-deletes (SOFT_DELETED, ports and volume kept) and the host
        # reclaims the server after this many seconds; forceDelete ends it at once.
        self.reclaim_instance_interval = 0.0
        # Who sees a server's host_status: "admin" (Nova's default for both
        # show:host_status and show:host_status:unknown-only), "unknown-only"
        # (members see it when UNKNOWN) or "member" (a cloud that relaxed both).
        self.host_status_policy = "admin"
        # Nova's metadata API: the proxy's shared secret and the cache time.
        self.metadata_secret = "metadata-proxy-secret"
        self.metadata_cache_expiration = 15.0
        self.zones = list(zones)
        self.volume_zones = list(zones)
        self.hosts: dict[str, Host] = {}
        for zone in zones:
            for i in range(1, hosts_per_zone + 1):
                name = f"cmp-{zone}-{i}"
                self.hosts[name] = Host(name=name, zone=zone)
        self.flavors: dict[str, Flavor] = {}
        self.images: dict[str, Image] = {}
        self.networks: dict[str, Network] = {}
        self.subnets: dict[str, Subnet] = {}
        self.security_groups: dict[str, SecurityGroup] = {}
        self.ports: dict[str, Port] = {}
        self.volumes: dict[str, Volume] = {}
        self.volume_types = {"__DEFAULT__": new_id(), "ssd": new_id()}
        self.server_groups: dict[str, ServerGroup] = {}
        self.servers: dict[str, Server] = {}
        self.tasks: list[Task] = []
        self.faults: list[FaultRule] = []
        self.requests: list[Recorded] = []
        self.quotas: dict[str, int] = dict(DEFAULT_QUOTAS)
        self._mac = 0
        self._seed()

    # --- setup -----------------------------------------------------------------
    def _seed(self) -> None:
        self.add_flavor("m1.small", vcpus=1, ram=2048)
        self.add_flavor("m1.medium", vcpus=2, ram=4096)
        self.add_flavor("m1.large", vcpus=4, ram=8192,
                        extra_specs={"aggregate_instance_extra_specs:ssd": "true"})
        self.add_image("pgha-postgresql-15", properties={"os_shutdown_timeout": "0"})
        mgmt = self.add_network("pgha-management")
        self.add_subnet("pgha-management-subnet", mgmt.id, "10.70.0.0/24")
        svc = self.add_network("pgha-service")
        self.add_subnet("pgha-service-subnet", svc.id, "10.80.0.0/24")
        self.add_security_group("ops-ssh", "operators' ssh", project_id=PROJECT_ID)
        self.add_security_group("default", "default", project_id=PROJECT_ID)

    def add_flavor(self, name: str, **kw: Any) -> Flavor:
        flavor = Flavor(id=new_id(), name=name, **kw)
        self.flavors[flavor.id] = flavor
        return flavor

    def add_image(self, name: str, **kw: Any) -> Image:
        image = Image(id=new_id(), name=name, **kw)
        self.images[image.id] = image
        return image

    def add_network(self, name: str) -> Network:
        net = Network(id=new_id(), name=name)
        self.networks[net.id] = net
        return net

    def add_subnet(self, name: str, network_id: str, cidr: str) -> Subnet:
        gateway = str(next(ipaddress.ip_network(cidr).hosts()))
        subnet = Subnet(id=new_id(), name=name, network_id=network_id, cidr=cidr,
                        gateway_ip=gateway)
        self.subnets[subnet.id] = subnet
        return subnet

    def add_security_group(self, name: str, description: str, project_id: str) -> SecurityGroup:
        sg = SecurityGroup(id=new_id(), name=name, description=description,
                           project_id=project_id)
        sg.rules = [self._rule(sg.id, "egress", "IPv4"), self._rule(sg.id, "egress", "IPv6")]
        self.security_groups[sg.id] = sg
        return sg

    @staticmethod
    def _rule(sg_id: str, direction: str, ethertype: str, **kw: Any) -> dict[str, Any]:
        rule = {"id": new_id(), "security_group_id": sg_id, "direction": direction,
                "ethertype": ethertype, "protocol": None, "port_range_min": None,
                "port_range_max": None, "remote_ip_prefix": None, "remote_group_id": None,
                "description": ""}
        rule.update(kw)
        return rule

    def by_name(self, table: dict[str, Any], name: str) -> Any:
        return next(v for v in table.values() if v.name == name)

    # --- time and the compute hosts ---------------------------------------------
    def tick(self) -> None:
        """Run every due task whose host is alive."""
        now = time.monotonic()
        ran = True
        while ran:
            ran = False
            for task in sorted(self.tasks, key=lambda t: t.due):
                if task.due > now:
                    break
                if task.host is not None and not self.hosts[task.host].alive:
                    continue
                self.tasks.remove(task)
                task.run()
                ran = True
                break

    def schedule(self, host: str | None, what: str, fn: Callable[[], None],
                 delay: float | None = None) -> None:
        due = time.monotonic() + (self.action_delay if delay is None else delay)
        self.tasks.append(Task(due=due, host=host, what=what, run=fn))

    def service_up(self, host: Host) -> bool:
        """Nova's servicegroup view: a dead host counts as up until service_down_time."""
        if host.forced_down:
            return False
        if host.alive:
            return True
        assert host.died_at is not None
        return time.monotonic() - host.died_at <= self.service_down_time

    def zone_enabled(self, zone: str) -> bool | None:
        """Nova's zone list: a zone is available while one of its services is enabled
        (its heartbeat plays no part); None when no service is there (not listed)."""
        hosts = [h for h in self.hosts.values() if h.zone == zone]
        return any(not h.disabled for h in hosts) if hosts else None

    def host_status(self, server: Server) -> str:
        """Nova's precedence: forced_down, then disabled, then the heartbeat."""
        if not server.host:
            return ""
        host = self.hosts[server.host]
        if host.forced_down:
            return "DOWN"
        if host.disabled:
            return "MAINTENANCE"
        return "UP" if self.service_up(host) else "UNKNOWN"

    def shows_host_status(self, server: Server, admin: bool) -> bool:
        if admin or self.host_status_policy == "member":
            return True
        return self.host_status_policy == "unknown-only" \
            and self.host_status(server) == "UNKNOWN"

    def kill_host(self, name: str) -> None:
        """The hypervisor dies: no heartbeats, no work done, its guests are gone too."""
        with self.lock:
            host = self.hosts[name]
            host.alive = False
            host.died_at = time.monotonic()
            host.died_wall = wall()
            for server in self.servers.values():
                if server.host == name:
                    self.hooks.crash(server)

    def revive_host(self, name: str) -> None:
        with self.lock:
            host = self.hosts[name]
            host.alive = True
            host.died_at = None
            host.died_wall = None

    def host_of(self, server_id: str) -> str | None:
        with self.lock:
            server = self.servers.get(server_id)
            return server.host if server else None

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.lock:
            self.tick()
            yield

    # --- quotas ------------------------------------------------------------------
    def _count(self, resource: str, project_id: str) -> int:
        if resource == "instances":
            return sum(1 for s in self.servers.values() if s.project_id == project_id)
        if resource == "ports":
            return sum(1 for p in self.ports.values() if p.project_id == project_id)
        if resource == "security_groups":
            return sum(1 for g in self.security_groups.values() if g.project_id == project_id)
        if resource == "volumes":
            return sum(1 for v in self.volumes.values() if v.project_id == project_id)
        if resource == "gigabytes":
            return sum(v.size for v in self.volumes.values() if v.project_id == project_id)
        if resource == "server_groups":
            return sum(1 for g in self.server_groups.values() if g.project_id == project_id)
        if resource in ("cores", "ram"):
            attr = "vcpus" if resource == "cores" else "ram"
            return sum(getattr(self.flavors[s.flavor_id], attr) for s in self.servers.values()
                       if s.project_id == project_id)
        if resource == "security_group_rules":
            return sum(len(g.rules) for g in self.security_groups.values()
                       if g.project_id == project_id)
        raise KeyError(resource)

    def usage(self, project_id: str) -> dict[str, int]:
        return {r: self._count(r, project_id) for r in DEFAULT_QUOTAS
                if r != "server_group_members"}

    def check_instance_quota(self, project_id: str, flavor: Flavor) -> None:
        """Nova's TooManyInstances (403), naming every resource that would overflow."""
        wanted = {"cores": flavor.vcpus, "instances": 1, "ram": flavor.ram}
        overs = sorted(r for r, n in wanted.items() if self.over_quota(r, project_id, n))
        if overs:
            first = overs[0]
            raise nova_error(403, f"Quota exceeded for {', '.join(overs)}: Requested "
                                  f"{wanted[first]}, but already used "
                                  f"{self._count(first, project_id)} of "
                                  f"{self.quotas[first]} {', '.join(overs)}")

    def over_quota(self, resource: str, project_id: str, adding: int = 1) -> bool:
        limit = self.quotas.get(resource)
        return limit is not None and self._count(resource, project_id) + adding > limit

    # --- Neutron -----------------------------------------------------------------
    def allocate_ip(self, subnet: Subnet) -> str:
        net = ipaddress.ip_network(subnet.cidr)
        used = {ip["ip_address"] for p in self.ports.values() for ip in p.fixed_ips}
        while True:
            if subnet.next_host >= net.num_addresses - 1:
                raise neutron_error(409, "IpAddressGenerationFailure", "No more IP addresses "
                                    f"available on network {subnet.network_id}.")
            candidate = str(net.network_address + subnet.next_host)
            subnet.next_host += 1
            if candidate not in used:
                return candidate

    def create_port(self, body: dict[str, Any], project_id: str) -> Port:
        network_id = body.get("network_id")
        if network_id not in self.networks:
            raise neutron_error(404, "NetworkNotFound", f"Network {network_id} could not be found.")
        if "tags" in body:
            raise neutron_error(400, "HTTPBadRequest", "Unrecognized attribute(s) 'tags'")
        if self.over_quota("ports", project_id):
            raise neutron_error(409, "OverQuota", "Quota exceeded for resources: ['port'].")
        fixed_ips = []
        requested = body.get("fixed_ips") or [
            {"subnet_id": next(s.id for s in self.subnets.values() if s.network_id == network_id)}
        ]
        for req in requested:
            subnet = self.subnets.get(req.get("subnet_id", ""))
            if subnet is None or subnet.network_id != network_id:
                raise neutron_error(400, "InvalidInput", "Invalid input for operation: "
                                    "subnet is not on the port's network.")
            address = req.get("ip_address") or self.allocate_ip(subnet)
            fixed_ips.append({"subnet_id": subnet.id, "ip_address": address})
        groups = body.get("security_groups")
        if groups is None:
            groups = [next(g.id for g in self.security_groups.values() if g.name == "default")]
        for gid in groups:
            if gid not in self.security_groups:
                raise neutron_error(404, "SecurityGroupNotFound",
                                    f"Security group {gid} does not exist")
        self._mac += 1
        port = Port(id=new_id(), name=body.get("name", ""), network_id=network_id,
                    fixed_ips=fixed_ips, security_groups=list(groups), project_id=project_id,
                    mac_address=f"fa:16:3e:00:{self._mac // 256:02x}:{self._mac % 256:02x}",
                    description=body.get("description", ""))
        address = self.hooks.port_created(port, self.networks[network_id].name)
        if address is not None:  # the data plane chose it (namespace-backed fake)
            port.fixed_ips[0]["ip_address"] = address
        self.ports[port.id] = port
        return port

    def delete_security_group(self, sg_id: str) -> None:
        if sg_id not in self.security_groups:
            raise neutron_error(404, "SecurityGroupNotFound",
                                f"Security group {sg_id} does not exist")
        if any(sg_id in p.security_groups for p in self.ports.values()):
            raise neutron_error(409, "SecurityGroupInUse",
                                f"Security Group {sg_id} in use.")
        del self.security_groups[sg_id]

    def bind_port(self, port: Port, server: Server) -> None:
        port.device_id = server.id
        port.device_owner = f"compute:{server.zone}"
        port.host_id = server.host or ""
        port.status = "ACTIVE"
        if port.id not in server.port_ids:
            server.port_ids.append(port.id)
        self.hooks.plug(server, port)

    def unbind_port(self, port: Port, server: Server | None, *, unplug: bool = True) -> None:
        if server is not None:
            if port.id in server.port_ids:
                server.port_ids.remove(port.id)
            if unplug:
                self.hooks.unplug(server, port)
        port.device_id = ""
        port.device_owner = ""
        port.host_id = ""
        port.status = "DOWN"

    # --- Cinder ------------------------------------------------------------------
    def create_volume(self, body: dict[str, Any], project_id: str) -> Volume:
        size = int(body.get("size") or 0)
        zone = body.get("availability_zone") or self.volume_zones[0]
        if zone not in self.volume_zones:
            raise cinder_error(400, f"Availability zone '{zone}' is invalid.")
        vtype = body.get("volume_type") or "__DEFAULT__"
        if vtype not in self.volume_types and vtype not in self.volume_types.values():
            raise cinder_error(404, f"Volume type with name {vtype} could not be found.")
        if self.over_quota("volumes", project_id):
            raise cinder_error(413, "VolumeLimitExceeded: Maximum number of volumes allowed "
                               f"({self.quotas['volumes']}) exceeded for quota 'volumes'.")
        if self.over_quota("gigabytes", project_id, size):
            raise cinder_error(413, f"VolumeSizeExceedsAvailableQuota: Requested volume or "
                               f"snapshot exceeds allowed gigabytes quota. Requested {size}G.")
        volume = Volume(id=new_id(), name=body.get("name") or "", size=size, zone=zone,
                        volume_type=vtype, project_id=project_id,
                        metadata=dict(body.get("metadata") or {}),
                        description=body.get("description") or "")
        self.volumes[volume.id] = volume
        self.hooks.volume_created(volume)

        def ready() -> None:
            if volume.id in self.volumes and volume.status == "creating":
                volume.status = "available"

        self.schedule(None, f"create volume {volume.id}", ready)
        return volume

    def attach_volume(self, volume: Volume, server: Server, device: str) -> Attachment:
        attachment = Attachment(id=new_id(), volume_id=volume.id, server_id=server.id,
                                device=device, host_name=server.host or "")
        volume.attachments.append(attachment)
        volume.status = "in-use"
        if volume.id not in server.volume_ids:
            server.volume_ids.append(volume.id)
        return attachment

    def release_volume(self, volume: Volume, server_id: str) -> None:
        volume.attachments = [a for a in volume.attachments if a.server_id != server_id]
        if not volume.attachments:
            volume.status = "available"
        self.hooks.volume_released(volume, server_id)

    # --- Nova --------------------------------------------------------------------
    def pick_host(self, zone: str, group: ServerGroup | None) -> Host | None:
        """The scheduler: ComputeFilter (service counted up, enabled), the zone, and the
        group's policy. Hard anti-affinity counts every member, SHUTOFF ones included;
        soft anti-affinity only prefers other hosts."""
        members = set()
        if group is not None and group.policy in ("anti-affinity", "soft-anti-affinity"):
            members = {self.servers[m].host for m in group.members if m in self.servers}
        eligible = [h for h in self.hosts.values()
                    if h.zone == zone and self.service_up(h) and not h.disabled]
        free = [h for h in eligible if h.name not in members]
        if free:
            return free[0]
        if group is not None and group.policy == "soft-anti-affinity" and eligible:
            return eligible[0]
        return None

    @staticmethod
    def server_status(server: Server) -> str:
        return _VM_TO_STATUS.get(server.vm_state, "UNKNOWN")

    def boot(self, server: Server) -> None:
        """The scheduler's and the compute host's part of a create."""
        group = self.server_groups.get(server.group_id or "")
        host = self.pick_host(server.zone, group)
        if host is None:
            def fail() -> None:
                server.vm_state = "error"
                server.task_state = None
                server.fault = {"code": 500, "created": iso(wall()),
                                "message": "No valid host was found. There are not enough "
                                           "hosts available."}
            self.schedule(None, f"schedule {server.id}", fail, self.build_delay)
            return
        server.host = host.name
        server.task_state = "spawning"
        if group is not None:
            group.members.append(server.id)
        for port_id in server.port_ids:
            port = self.ports[port_id]
            port.device_id = server.id
            port.device_owner = f"compute:{server.zone}"
            port.host_id = host.name
        for volume_id in server.volume_ids:
            self.attach_volume(self.volumes[volume_id], server, "/dev/vdb")

        def running() -> None:
            if server.id not in self.servers:
                return
            server.vm_state = "active"
            server.task_state = None
            server.power_state = _RUNNING
            for port_id in server.port_ids:
                self.ports[port_id].status = "ACTIVE"

        def failed(reason: str) -> None:
            if server.id in self.servers:
                server.vm_state = "error"
                server.task_state = None
                server.fault = {"code": 500, "created": iso(wall()), "message": reason}

        def spawned() -> None:
            if server.id not in self.servers:
                return
            user_data = base64.b64decode(server.user_data) if server.user_data else None
            if not self.hooks.boot_in_thread:
                self.hooks.boot(server, user_data)
                running()
                return

            def in_thread() -> None:
                try:
                    self.hooks.boot(server, user_data)
                except Exception as exc:
                    with self.lock:
                        failed(f"the guest did not boot: {exc}")
                    return
                with self.lock:
                    running()

            threading.Thread(target=in_thread, name=f"boot-{server.id}", daemon=True).start()

        self.schedule(host.name, f"spawn {server.id}", spawned, self.build_delay)

    def destroy(self, server: Server) -> None:
        """Terminate: ports unbound and kept, volumes released (unless stuck)."""
        if server.id not in self.servers:
            return
        self.hooks.destroy(server)
        for port_id in list(server.port_ids):
            port = self.ports.get(port_id)
            if port is not None:
                self.unbind_port(port, server, unplug=False)
        for volume_id in list(server.volume_ids):
            volume = self.volumes.get(volume_id)
            if volume is not None and not volume.stuck:
                self.release_volume(volume, server.id)
        for group in self.server_groups.values():
            if server.id in group.members:
                group.members.remove(server.id)
        del self.servers[server.id]

    def delete_server(self, server: Server, *, force: bool = False) -> None:
        """DELETE (a soft delete when reclaim_instance_interval is set) or forceDelete."""
        host = self.hosts.get(server.host or "")
        if host is None or not self.service_up(host):
            # Nova's "local delete": the API cleans up without the compute host.
            self.destroy(server)
            return
        if self.reclaim_instance_interval > 0 and not force:
            self.soft_delete(server, host)
            return
        if server.task_state == "deleting":
            return  # "Instance is already in deleting state, ignoring this request"
        server.task_state = "deleting"
        if not host.alive:
            server.pending.append("delete")
        self.schedule(host.name, f"delete {server.id}", lambda: self.destroy(server))

    def soft_delete(self, server: Server, host: Host) -> None:
        if server.vm_state == "soft-delete":
            return  # soft-deleted again: nothing changes, ports and volume stay held
        server.task_state = "soft-deleting"
        if not host.alive:
            server.pending.append("soft delete")

        def off() -> None:
            if server.id in self.servers:
                server.vm_state = "soft-delete"
                server.task_state = None
                server.power_state = _SHUTDOWN
                self.hooks.power_off(server)

                def reclaim() -> None:
                    if server.id in self.servers and server.vm_state == "soft-delete":
                        self.destroy(server)

                self.schedule(host.name, f"reclaim {server.id}", reclaim,
                              self.reclaim_instance_interval)

        self.schedule(host.name, f"soft delete {server.id}", off)

    def require_host_up(self, server: Server, action: str) -> Host:
        host = self.hosts.get(server.host or "")
        if host is None:
            raise nova_error(409, f"Instance {server.id} is not ready yet.")
        return host

    def check_state(self, server: Server, action: str, vm_states: tuple[str, ...]) -> None:
        if server.vm_state not in vm_states:
            raise nova_error(409, f"Cannot '{action}' instance {server.id} while it is in "
                                  f"vm_state {server.vm_state}")
        if server.task_state is not None:
            raise nova_error(409, f"Cannot '{action}' instance {server.id} while it is in "
                                  f"task_state {server.task_state}")

    def stop(self, server: Server) -> None:
        self.check_state(server, "stop", ("active", "error"))
        host = self.require_host_up(server, "stop")
        server.task_state = "powering-off"
        if not host.alive:
            server.pending.append("stop")

        def off() -> None:
            if server.id in self.servers:
                server.vm_state = "stopped"
                server.power_state = _SHUTDOWN
                server.task_state = None
                self.hooks.power_off(server)

        self.schedule(host.name, f"stop {server.id}", off)

    def start(self, server: Server) -> None:
        self.check_state(server, "start", ("stopped",))
        host = self.require_host_up(server, "start")
        server.task_state = "powering-on"

        def on() -> None:
            if server.id in self.servers:
                server.vm_state = "active"
                server.power_state = _RUNNING
                server.task_state = None
                self.hooks.power_on(server)

        self.schedule(host.name, f"start {server.id}", on)

    def attach_interface(self, server: Server, port_id: str) -> Port | None:
        """The port, bound; None when the host is dead (the RPC call will time out)."""
        self.check_state(server, "attach_interface", ("active", "paused", "stopped"))
        host = self.require_host_up(server, "attach_interface")
        port = self.ports.get(port_id)
        if port is None:
            raise nova_error(404, f"Port id {port_id} could not be found.")
        if port.device_id:
            raise nova_error(409, f"Port {port_id} is still in use.")
        if not host.alive:
            return None
        self.bind_port(port, server)
        return port

    def detach_interface(self, server: Server, port_id: str) -> None:
        self.check_state(server, "detach_interface", ("active", "paused", "stopped"))
        host = self.require_host_up(server, "detach_interface")
        port = self.ports.get(port_id)
        if port is None or port.device_id != server.id:
            raise nova_error(404, f"Port {port_id} is not attached")
        if not host.alive:
            server.pending.append(f"detach port {port_id}")

        def unplug() -> None:
            if port.id in self.ports and port.device_id == server.id:
                self.unbind_port(port, server)

        self.schedule(host.name, f"detach {port_id} from {server.id}", unplug)

    def detach_volume(self, server: Server, volume_id: str) -> None:
        volume = self.volumes.get(volume_id)
        if volume is None or not any(a.server_id == server.id for a in volume.attachments):
            raise nova_error(404, f"volume_id not found: {volume_id}")
        self.check_state(server, "detach_volume", ("active", "paused", "stopped", "resized",
                                                   "soft-delete", "shelved",
                                                   "shelved_offloaded"))
        host = self.require_host_up(server, "detach_volume")
        if not self.service_up(host):
            # check_instance_host(check_is_up=True): ServiceUnavailable, mapped to 409.
            raise nova_error(409, "Service is unavailable at this time.")
        volume.status = "detaching"
        if not host.alive:
            server.pending.append(f"detach volume {volume_id}")

        def done() -> None:
            if volume.stuck:
                return
            if volume_id in server.volume_ids:
                server.volume_ids.remove(volume_id)
            self.release_volume(volume, server.id)

        self.schedule(host.name, f"detach volume {volume_id}", done)
