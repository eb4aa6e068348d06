"""The fake OpenStack's data plane on the local cloud: its servers are namespaces.

The fake keeps the API's records (Nova, Neutron, Cinder); every change that a real
cloud would make to the data plane is passed on to a LocalCloud:
- a Neutron port is a LocalCloud port (its address becomes the port's fixed IP);
- a Cinder volume is a LocalCloud volume (a directory);
- booting a server reads the broker's cloud-init user-data, takes the node's
  GuestConfig and the bootstrap from it, and boots a namespace that runs that very
  bootstrap (the LocalCloud adapts only the placement: data directory, sockets);
- an interface attach delivers the service veth as a bare NIC (the port's MAC, which
  Neutron reports, no address) and, as udev would, runs the guest's NIC agent (the
  user-data's, checked at boot to be broker/guest/nic_agent.py): only the guest
  configures the address; a detach takes the veth back; a stop kills the namespace's
  processes; a delete removes the namespace; a dead hypervisor (`kill_host`) kills
  its guests and takes their links down, and then does nothing more, like a real one.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import threading
from typing import Any, Literal

import yaml

from broker.cloud.base import ServerSpec
from broker.cloud.local import LocalCloud
from broker.cloud.openstack.userdata import (
    BOOTSTRAP_PATH,
    CONFIG_PATH,
    NIC_AGENT_PATH,
    bootstrap_source,
    nic_agent_source,
)
from broker.guest.bootstrap import GuestConfig
from harness.faults import crash_namespace
from tests.fakes.openstack.state import CloudState, Port, Server, Volume

log = logging.getLogger(__name__)


class LocalBackend:
    boot_in_thread = True

    def __init__(self, local: LocalCloud, service_network: str = "pgha-service") -> None:
        self.local = local
        self.service_network = service_network
        self.ports: dict[str, str] = {}      # fake id -> local id
        self.volumes: dict[str, str] = {}
        self.servers: dict[str, str] = {}
        self.booted: list[dict[str, Any]] = []   # what each guest was given (for tests)
        self._lock = threading.Lock()

    @classmethod
    def install(cls, state: CloudState, local: LocalCloud) -> LocalBackend:
        """Back `state` with `local`: both subnets become the local cloud's network."""
        backend = cls(local)
        with state.lock:
            for subnet in state.subnets.values():
                subnet.cidr = str(local.network)
                subnet.gateway_ip = local.broker_address
            state.hooks = backend
        return backend

    # --- Neutron / Cinder -----------------------------------------------------------------
    def port_created(self, port: Port, network: str) -> str | None:
        purpose: Literal["management", "service"] = (
            "service" if network == self.service_network else "management")
        local = self.local.create_port(f"os-{port.id}", purpose, {})
        if purpose == "service":
            # The NIC the guest will see carries the local veth's MAC: Neutron reports it
            # (a deployment picks its MACs' base, `base_mac`).
            port.mac_address = self.local.port_nic(local.id).mac
        with self._lock:
            self.ports[port.id] = local.id
        return local.address

    def port_deleted(self, port: Port) -> None:
        local_id = self.ports.pop(port.id, None)
        if local_id is not None:
            self.local.delete_port(local_id)

    def volume_created(self, volume: Volume) -> None:
        local = self.local.create_volume(f"os-{volume.id}", volume.size, volume.zone, None, {})
        with self._lock:
            self.volumes[volume.id] = local.id

    def volume_deleted(self, volume: Volume) -> None:
        local_id = self.volumes.pop(volume.id, None)
        if local_id is not None:
            self.local.delete_volume(local_id)

    def volume_released(self, volume: Volume, server_id: str) -> None:
        local_volume = self.volumes.get(volume.id)
        local_server = self.servers.get(server_id)
        if local_volume and local_server:
            self.local.detach_volume(local_volume, local_server, force=True)

    # --- Nova -------------------------------------------------------------------------------
    def boot(self, server: Server, user_data: bytes | None) -> None:
        if not user_data:
            raise RuntimeError("no user-data: nothing would configure PostgreSQL")
        document = yaml.safe_load(user_data.decode())
        files = {f["path"]: f for f in document["write_files"]}
        script = gzip.decompress(base64.b64decode(files[BOOTSTRAP_PATH]["content"]))
        if script != bootstrap_source():
            raise RuntimeError("the user-data's bootstrap is not broker/guest/bootstrap.py")
        agent = gzip.decompress(base64.b64decode(files[NIC_AGENT_PATH]["content"]))
        if agent != nic_agent_source():
            raise RuntimeError("the user-data's NIC agent is not broker/guest/nic_agent.py")
        raw = base64.b64decode(files[CONFIG_PATH]["content"]).decode()
        guest = GuestConfig.from_json(raw)
        with self._lock:
            self.booted.append({"server": server.name, "config": json.loads(raw),
                                "cloud_config": {k: v for k, v in document.items()
                                                 if k != "write_files"}})
            management = self.ports[server.port_ids[0]]
            volume = self.volumes[server.volume_ids[0]]
        spec = ServerSpec(name=f"os-{server.id}", availability_zone=server.zone,
                          flavor=server.flavor_id, image=server.image_id,
                          management_port_id=management, volume_id=volume, guest=guest)
        local = self.local.create_server(spec)  # runs the bootstrap in a namespace
        with self._lock:
            self.servers[server.id] = local.id

    def crash(self, server: Server) -> None:
        """The hypervisor died: links down, every process killed, nothing else."""
        local_id = self.servers.get(server.id)
        if local_id is None:
            return
        crash_namespace(self.local.namespace(local_id), links_down=True)

    def power_off(self, server: Server) -> None:
        local_id = self.servers.get(server.id)
        if local_id is not None:
            self.local.stop_server(local_id)

    def power_on(self, server: Server) -> None:
        local_id = self.servers.get(server.id)
        if local_id is not None:
            self.local.start_server(local_id)

    def destroy(self, server: Server) -> None:
        local_id = self.servers.pop(server.id, None)
        if local_id is not None:
            self.local.delete_server(local_id)

    def plug(self, server: Server, port: Port) -> None:
        self.local.plug_port(self.ports[port.id], self.servers[server.id])

    def unplug(self, server: Server, port: Port) -> None:
        local_server = self.servers.get(server.id)
        if local_server is not None:
            self.local.detach_port(self.ports[port.id], local_server)
