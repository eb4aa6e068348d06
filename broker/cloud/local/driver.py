"""LocalCloud: the Cloud interface over namespaces (netns.py, plumbing.py), the record
store (records.py), users per volume (users.py) and the guest bootstrap (boot.py).
See the package's docstring for what each resource is."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    Cloud,
    CloudError,
    CloudResource,
    FenceError,
    Server,
    ServerSpec,
    ServerStatus,
    Volume,
)
from broker.cloud.local import boot, hosts, machine
from broker.cloud.local.hosts import Hypervisors
from broker.cloud.local.netns import (
    FENCE_TIMEOUT,
    ip,
    kill_all,
    link_exists,
    links_down,
    live_status,
    namespace,
    namespace_pids,
    ns_exists,
)
from broker.cloud.local.plumbing import Plumbing, veth_names
from broker.cloud.local.ports import LocalPorts
from broker.cloud.local.records import (
    PortRecord,
    Records,
    RecordStore,
    ServerRecord,
    VolumeRecord,
    by_name,
)
from broker.cloud.local.repositories import Repositories
from broker.cloud.local.users import VolumeUsers, volume_user
from broker.guest import bootstrap

if TYPE_CHECKING:
    from broker.catalog import Plan
    from broker.config import Settings


class LocalCloud(LocalPorts, Hypervisors, Cloud):
    """Servers are network namespaces on a bridge."""

    name = "local"

    def __init__(self, root: Path, network: ipaddress.IPv4Network, bridge: str, *,
                 pg_bin: str | None = None, host_map: hosts.HostMap | None = None) -> None:
        self.pg_bin = machine.check_machine(network, bridge, pg_bin)
        self.host_map: hosts.HostMap = dict(host_map or hosts.DEFAULT_HOSTS)
        self.root = Path(root).absolute()
        self.network = network
        self.bridge = bridge
        machine.prepare_root(self.root)
        self.plumbing = Plumbing(network, bridge)
        self.records = RecordStore(self.root)
        # Marks the OS users this cloud made (destroy_everything finds them by it).
        self.volume_users = VolumeUsers(self.root)
        self.repositories = Repositories(self.root / "backups")

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalCloud:
        state_dir = settings.state_dir.absolute()
        machine.prepare_state_dir(state_dir)
        return cls(state_dir / "local-cloud", settings.local_network, settings.local_bridge,
                   pg_bin=settings.local_pg_bin, host_map=dict(settings.local_hosts))

    # --- facts -------------------------------------------------------------------------
    @property
    def broker_address(self) -> str:
        """The bridge's address: where the broker's connections to nodes come from."""
        return self.plumbing.broker_address

    def admin_cidrs(self) -> tuple[str, ...]:
        return (f"{self.broker_address}/32",)

    def app_cidrs(self, plan: Plan) -> tuple[str, ...]:
        """Apps reach the nodes from anywhere on the bridge's network, whatever the plan."""
        return (str(self.network),)

    @staticmethod
    def namespace(server_id: str) -> str:
        return namespace(server_id)

    @staticmethod
    def volume_user(volume_id: str) -> str:
        """The OS user PostgreSQL runs as on this volume, whichever server carries it."""
        return volume_user(volume_id)

    def server_pids(self, server_id: str) -> list[int]:
        """Live processes inside the server (its PostgreSQL)."""
        return namespace_pids(namespace(server_id))

    def ensure_network(self) -> None:
        """Make the bridge with the broker's address now (otherwise done on first use)."""
        self.plumbing.ensure_bridge()

    # --- volumes ---------------------------------------------------------------------------
    def _volume_dir(self, volume_id: str) -> Path:
        return self.root / "volumes" / volume_id

    def _own_volume(self, volume_id: str) -> str:
        """The volume's user's name, the volume made its own."""
        return self.volume_users.own_directory(volume_id, self._volume_dir(volume_id)).pw_name

    def users(self) -> list[str]:
        """The OS users this cloud made (for cleanup checks)."""
        return self.volume_users.names()

    @staticmethod
    def _volume(rec: VolumeRecord) -> Volume:
        return Volume(id=rec.id, name=rec.name, availability_zone=rec.availability_zone,
                      size_gb=rec.size_gb, status="in-use" if rec.attached_to else "available",
                      attached_to=rec.attached_to, tags=dict(rec.tags))

    def create_volume(self, name: str, size_gb: int, availability_zone: str,
                      volume_type: str | None, tags: dict[str, str]) -> Volume:
        with self.records.locked() as st:
            rec = by_name(st.volumes, name)
            if rec is None:
                rec = VolumeRecord(id=uuid.uuid4().hex[:12], name=name, size_gb=size_gb,
                                   availability_zone=availability_zone,
                                   volume_type=volume_type, tags=dict(tags))
                st.volumes[rec.id] = rec
            self.records.save(st)  # recorded before its user exists: a crash leaves nothing unknown
            self._own_volume(rec.id)
            return self._volume(rec)

    def get_volume(self, volume_id: str) -> Volume | None:
        rec = self.records.read().volumes.get(volume_id)
        return None if rec is None else self._volume(rec)

    def delete_volume(self, volume_id: str) -> None:
        with self.records.locked() as st:
            rec = st.volumes.get(volume_id)
            if rec is None:
                return
            if (server := st.server_of(rec.attached_to)) is not None:
                raise CloudError(f"volume {rec.name} is attached to server {server.name}: "
                                 "delete the server first")
            # rmtree never follows the links its user may have planted below.
            shutil.rmtree(self._volume_dir(volume_id), ignore_errors=True)
            with contextlib.suppress(KeyError):
                user = self.volume_users.own(volume_user(volume_id))
                self.repositories.forget_user(user.pw_uid, user.pw_gid)
            self.volume_users.delete(volume_user(volume_id))
            del st.volumes[volume_id]

    def detach_volume(self, volume_id: str, server_id: str, *, force: bool = False) -> None:
        with self.records.locked() as st:
            rec = st.volumes.get(volume_id)
            if rec is None or rec.attached_to != server_id:
                return
            server = st.servers.get(server_id)
            if server is not None and not force and namespace_pids(namespace(server_id)):
                raise CloudError(f"volume {rec.name} is in use by running server "
                                 f"{server.name}: stop it first (or force)")
            rec.attached_to = None

    # --- servers ---------------------------------------------------------------------------
    def ensure_server_group(self, name: str, tags: dict[str, str]) -> str | None:
        return None  # one machine: anti-affinity means nothing here

    def delete_server_group(self, group_id: str) -> None:
        return None

    def _server(self, rec: ServerRecord, st: Records) -> Server:
        port = st.ports.get(rec.management_port_id)
        volume_dir = self._volume_dir(rec.volume_id)
        return Server(
            id=rec.id, name=rec.name, availability_zone=rec.availability_zone,
            status=live_status(rec), management_address=port.address if port else None,
            tags=dict(rec.tags),
            details={"host": rec.host, "netns": namespace(rec.id),
                     "data_dir": str(volume_dir / "data"),
                     "log_file": str(volume_dir / "postgresql.log")})

    def _server_dir(self, server_id: str) -> Path:
        return boot.server_dir(self.root, server_id)

    def _set_status(self, server_id: str, status: ServerStatus) -> Server | None:
        with self.records.locked() as st:
            rec = st.servers.get(server_id)
            if rec is None:
                return None
            rec.status = status
            return self._server(rec, st)

    def create_server(self, spec: ServerSpec) -> Server:
        self.plumbing.ensure_bridge()
        with self.records.locked() as st:
            rec = by_name(st.servers, spec.name)
            if rec is not None and rec.status in (ServerStatus.ACTIVE, ServerStatus.SHUTOFF):
                return self._server(rec, st)  # adopt; a fenced server stays off
            port = st.ports.get(spec.management_port_id)
            volume = st.volumes.get(spec.volume_id)
            if port is None or port.purpose != "management":
                raise CloudError(f"management port {spec.management_port_id} does not exist")
            if volume is None:
                raise CloudError(f"volume {spec.volume_id} does not exist")
            if rec is None:
                rec = ServerRecord(id=uuid.uuid4().hex[:12], name=spec.name,
                                   availability_zone=spec.availability_zone,
                                   flavor=spec.flavor, image=spec.image,
                                   management_port_id=port.id, volume_id=volume.id,
                                   tags=dict(spec.tags))
            for what, holder in (("port", port.device_id), ("volume", volume.attached_to)):
                if holder not in (None, rec.id):
                    raise CloudError(f"{what} for {spec.name} is in use by server {holder}")
            if not rec.host or rec.host in st.hosts_down:
                rec.host = hosts.place(st, self.host_map, spec.availability_zone)
            rec.status = ServerStatus.BUILD
            port.device_id = rec.id
            volume.attached_to = rec.id
            st.servers[rec.id] = rec
            port_rec = dataclasses.replace(port)
        try:
            self.plumbing.setup_namespace(rec.id, port_rec)
            boot.boot(self._server_dir(rec.id), rec.id,
                      self._guest_config(rec.id, rec.volume_id, spec))
        except (CloudError, OSError, subprocess.SubprocessError) as exc:
            self._set_status(rec.id, ServerStatus.ERROR)
            if isinstance(exc, CloudError):
                raise
            raise CloudError(f"server {spec.name} could not be built: {exc}") from None
        server = self._set_status(rec.id, ServerStatus.ACTIVE)
        if server is None:
            raise CloudError(f"server {spec.name} was deleted while it booted")
        return server

    def _guest_config(self, server_id: str, volume_id: str,
                      spec: ServerSpec) -> bootstrap.GuestConfig:
        volume_dir = self._volume_dir(volume_id)
        run_as = self._own_volume(volume_id)
        backup_repo = dict(spec.guest.backup_repo)  # object storage: set by the broker
        if spec.guest.backup_stanza and not backup_repo:
            user = self.volume_users.own(run_as)
            if spec.guest.role == "primary":
                self.repositories.hand_over(spec.guest.backup_stanza,
                                            owner=(user.pw_uid, user.pw_gid))
            else:
                self.repositories.hand_over(spec.guest.backup_stanza, reader_gid=user.pw_gid)
            backup_repo = {"repo1-path": str(self.repositories.path(spec.guest.backup_stanza))}
        restore_from = dict(spec.guest.restore_from)
        if restore_from and "repo1-path" not in restore_from:
            # The restoring node reads the source's repository until the broker gives
            # its group back (share_repository).
            source = restore_from["stanza"]
            user = self.volume_users.own(run_as)
            self.repositories.hand_over(source, reader_gid=user.pw_gid)
            restore_from["repo1-path"] = str(self.repositories.path(source))
        return dataclasses.replace(
            spec.guest, data_dir=str(volume_dir / "data"), volume_device=None,
            mount_point=str(volume_dir), socket_dir=str(self._server_dir(server_id) / "run"),
            pg_bin=self.pg_bin, run_as=run_as, log_file=str(volume_dir / "postgresql.log"),
            backup_repo=backup_repo, restore_from=restore_from)

    def delete_repository(self, stanza: str) -> None:
        self.repositories.delete(stanza)

    def share_repository(self, stanza: str, volume_id: str | None) -> None:
        """The node on `volume_id` (the instance's standby) reads the repository; None:
        only its writer does."""
        if not self.repositories.path(stanza).exists():
            return
        if volume_id is None:
            self.repositories.hand_over(stanza, reader_gid=self.repositories.owner_gid(stanza))
            return
        user = self.volume_users.own(volume_user(volume_id))
        self.repositories.hand_over(stanza, reader_gid=user.pw_gid)

    def hand_repository_to(self, stanza: str, volume_id: str) -> None:
        """The volume's user becomes the repository's writer; the previous writer (the
        old primary: after a switchover, the standby) keeps reading it."""
        if not self.repositories.path(stanza).exists():
            return  # in object storage
        user = self.volume_users.own(volume_user(volume_id))
        self.repositories.hand_over_to(stanza, (user.pw_uid, user.pw_gid))

    def get_server(self, server_id: str) -> Server | None:
        st = self.records.read()
        rec = st.servers.get(server_id)
        return None if rec is None else self._server(rec, st)

    def start_server(self, server_id: str) -> Server:
        """Power a stopped server on again (local cloud only; like a VM reboot): the
        management link up, the service port's NIC bare again, then the guest bootstrap
        configures that NIC (its NIC agent) and starts PostgreSQL on its existing data.
        The guest config is the first boot's, as a VM's user-data is: its peers may have
        left since, which is why the bootstrap leaves an existing cluster's pg_hba (the
        broker's) as it is."""
        with self.records.locked() as st:
            rec = st.servers.get(server_id)
            if rec is None:
                raise CloudError(f"server {server_id} does not exist")
            if rec.host in st.hosts_down:
                raise CloudError(f"server {rec.name} cannot start: its host {rec.host} is down")
            port_rec = dataclasses.replace(st.ports[rec.management_port_id])
            self._guest_knows_nics(st, rec)
            guest = boot.saved_guest_config(self._server_dir(server_id))
            rec.status = ServerStatus.BUILD
        try:
            # A server from before users per volume ran as another user: now the volume's.
            guest = dataclasses.replace(guest, run_as=self._own_volume(rec.volume_id))
            self.plumbing.setup_namespace(server_id, port_rec)
            # The bootstrap's NIC agent configures the service port's NIC again.
            self.plumbing.reset_service_links(
                self.records.read().service_ports_of(server_id), server_id)
            boot.boot(self._server_dir(server_id), server_id, guest)
        except CloudError:
            self._set_status(server_id, ServerStatus.ERROR)
            raise
        server = self._set_status(server_id, ServerStatus.ACTIVE)
        if server is None:
            raise CloudError(f"server {server_id} was deleted while it started")
        return server

    def stop_server(self, server_id: str) -> None:
        """Fence: cut the links (no more acknowledged commits), SIGKILL every process in
        the namespace, confirm none is left, mark SHUTOFF."""
        rec = self.records.read().servers.get(server_id)
        if rec is None:
            return  # a server that does not exist runs nothing
        ns = namespace(server_id)
        if ns_exists(ns):
            links_down(ns)
            if not kill_all(ns):
                raise FenceError(f"server {rec.name}: processes still alive after SIGKILL "
                                 f"for {FENCE_TIMEOUT:.0f} s")
        self._set_status(server_id, ServerStatus.SHUTOFF)

    def delete_server(self, server_id: str) -> None:
        with self.records.locked() as st:
            rec = st.servers.get(server_id)
            if rec is None:
                return
            ns = namespace(server_id)
            # The service veth would die with the namespace: move it out first.
            for port in st.service_ports_of(server_id):
                self.plumbing.move_out(port, server_id)
                port.device_id = None
            self.records.save(st)
            if ns_exists(ns) and not kill_all(ns):
                raise FenceError(f"server {rec.name}: processes still alive, not deleted")
            mgmt = st.ports.get(rec.management_port_id)
            if mgmt is not None:
                host, _guest = veth_names(mgmt)
                if link_exists(host):
                    ip("link", "del", host)  # synchronous, unlike namespace teardown
                mgmt.device_id = None
            if ns_exists(ns):
                ip("netns", "del", ns)
            volume = st.volumes.get(rec.volume_id)
            if volume is not None and volume.attached_to == server_id:
                volume.attached_to = None
            shutil.rmtree(self._server_dir(server_id), ignore_errors=True)  # guest.json
            del st.servers[server_id]

    # --- housekeeping ----------------------------------------------------------------------
    def find_resources(self, instance_id: str | None = None) -> list[CloudResource]:
        st = self.records.read()
        found: list[CloudResource] = []
        kinds: tuple[tuple[Literal["server", "volume", "port"],
                           dict[str, ServerRecord] | dict[str, VolumeRecord]
                           | dict[str, PortRecord]], ...] = (
            ("server", st.servers), ("volume", st.volumes), ("port", st.ports))
        for kind, records in kinds:
            for rec in records.values():
                tags = rec.tags
                ours = TAG_INSTANCE in tags or tags.get(TAG_MANAGED) == "true"
                if ours and (instance_id is None or tags.get(TAG_INSTANCE) == instance_id):
                    found.append(CloudResource(kind=kind, id=rec.id, name=rec.name,
                                               tags=dict(tags)))
        return found

    def check(self) -> list[str]:
        problems = []
        if self.network.overlaps(ipaddress.IPv4Network("127.0.0.0/8")):
            problems.append(f"network {self.network} overlaps loopback")
        return problems

    def interface_names(self) -> list[str]:
        """Every root-namespace interface this cloud made (for cleanup checks)."""
        names = [self.bridge]
        for port in self.records.read().ports.values():
            host, guest = veth_names(port)
            names += [host] if port.purpose == "management" else [host, guest]
        return names

    def namespaces(self) -> list[str]:
        return [namespace(sid) for sid in self.records.read().servers]

    def destroy_everything(self) -> None:
        """Remove every namespace, interface, data directory, OS user and record of this
        cloud."""
        if self.root.exists():
            with self.records.locked() as st:
                for server_id in st.servers:
                    if ns_exists(namespace(server_id)):
                        links_down(namespace(server_id))
                        kill_all(namespace(server_id))
                for port in st.ports.values():
                    self.plumbing.delete_port_links(port)
                for server_id in st.servers:
                    if ns_exists(namespace(server_id)):
                        ip("netns", "del", namespace(server_id), check=False)
                st.clear()
            shutil.rmtree(self.root, ignore_errors=True)
        if link_exists(self.bridge):
            ip("link", "del", self.bridge, check=False)
        for name in self.users():
            self.volume_users.delete(name)
