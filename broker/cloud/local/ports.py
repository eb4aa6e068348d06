"""The local cloud's ports: records plus veth pairs on the bridge (plumbing.py)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Literal

from broker.cloud.base import CloudError, Port, PortNic, ServerStatus
from broker.cloud.local import boot
from broker.cloud.local.netns import ip, link_exists, live_status, namespace, ns_exists
from broker.cloud.local.plumbing import Plumbing, service_mac, veth_names
from broker.cloud.local.records import PortRecord, Records, RecordStore, ServerRecord, by_name
from broker.cloud.reach import wait_reachable

VETH_MTU = 1500


class LocalPorts:
    """Ports of the LocalCloud (mixed into it)."""

    root: Path
    records: RecordStore
    plumbing: Plumbing

    @staticmethod
    def _port(rec: PortRecord) -> Port:
        return Port(id=rec.id, name=rec.name, address=rec.address, device_id=rec.device_id,
                    tags=dict(rec.tags))

    def create_port(self, name: str, purpose: Literal["management", "service"],
                    tags: dict[str, str]) -> Port:
        self.plumbing.ensure_bridge()
        with self.records.locked() as st:
            rec = by_name(st.ports, name)
            if rec is None:
                rec = PortRecord(id=uuid.uuid4().hex[:10], name=name, purpose=purpose,
                                 address=self.plumbing.allocate_address(st), tags=dict(tags))
                st.ports[rec.id] = rec
                self.records.save(st)
                # The address may be a deleted port's: the host must not keep its MAC.
                ip("neigh", "flush", "to", rec.address, "dev", self.plumbing.bridge, check=False)
            if rec.purpose == "service" and rec.device_id is None:
                self.plumbing.ensure_service_veth(rec)
            return self._port(rec)

    def get_port(self, port_id: str) -> Port | None:
        rec = self.records.read().ports.get(port_id)
        return None if rec is None else self._port(rec)

    def port_nic(self, port_id: str) -> PortNic:
        rec = self.records.read().ports.get(port_id)
        if rec is None:
            raise CloudError(f"port {port_id} does not exist")
        if rec.purpose != "service":
            raise CloudError(f"port {rec.name} is a management port: its NIC is set up at boot")
        return self._nic(rec)

    def _nic(self, rec: PortRecord) -> PortNic:
        # The bridge's address stands for the subnet's router (the host routes nothing).
        return PortNic(mac=service_mac(rec), address=rec.address,
                       prefix_length=self.plumbing.network.prefixlen,
                       gateway=self.plumbing.broker_address, mtu=VETH_MTU)

    def _guest_knows_nics(self, st: Records, server: ServerRecord) -> None:
        """A server booted before guests configured their service NIC learns it."""
        mgmt = st.ports.get(server.management_port_id)
        for port in st.service_ports_of(server.id):
            boot.with_service_nic(boot.server_dir(self.root, server.id), self._nic(port),
                                  mgmt.address if mgmt else "")

    def attach_port(self, port_id: str, server_id: str) -> None:
        """Plug the port, then wait until PostgreSQL answers on its address (the guest's
        agent configured it)."""
        if self.plug_port(port_id, server_id):
            address = self.records.read().ports[port_id].address
            wait_reachable(address)

    def plug_port(self, port_id: str, server_id: str) -> bool:
        """What the hypervisor and the guest's udev do: deliver the bare NIC and run the
        guest's NIC agent on it. True when the server runs (a stopped one configures the
        NIC when it boots)."""
        with self.records.locked() as st:
            port = st.ports.get(port_id)
            server = st.servers.get(server_id)
            if port is None:
                raise CloudError(f"port {port_id} does not exist")
            if server is None:
                raise CloudError(f"server {server_id} does not exist")
            bound = port.device_id
            if bound not in (None, server_id):
                raise CloudError(f"port {port.name} is attached to server {bound}; "
                                 "detach it first")
            if port.purpose == "management":
                if bound == server_id:
                    return False
                raise CloudError("management ports are attached when their server boots")
            if not ns_exists(namespace(server_id)):
                raise CloudError(f"server {server.name} has no namespace (deleted?)")
            # Record the binding first: a crash mid-move is then finished by a retry.
            port.device_id = server_id
            running = live_status(server) == ServerStatus.ACTIVE
            if running:
                self._guest_knows_nics(st, server)
            moving = dataclasses.replace(port)
        # The move (a few `ip` runs) and the guest's agent (a Python start and more `ip`
        # runs, as udev's would be in a VM) happen outside the records' lock: they take
        # 0.1-0.5 s on a loaded machine, and under the lock a dead host's failovers moved
        # their addresses one at a time. The binding is recorded, so no other call
        # plugs this port elsewhere meanwhile.
        self.plumbing.move_in(moving, server_id)
        if not running:
            return False
        boot.run_nic_agent(boot.server_dir(self.root, server_id), server_id)
        return True

    def detach_port(self, port_id: str, server_id: str) -> None:
        with self.records.locked(write=False) as st:
            port = st.ports.get(port_id)
            if port is None or port.device_id not in (None, server_id):
                return
            if port.purpose == "management":
                raise CloudError("a management port stays with its server until deleted")
        # Outside the lock, like plug_port's move: the port stays bound to `server_id`
        # until it is out, so nobody plugs it elsewhere meanwhile.
        self.plumbing.move_out(port, server_id)
        with self.records.locked() as st:
            port = st.ports.get(port_id)
            if port is not None and port.device_id == server_id:
                port.device_id = None

    def delete_port(self, port_id: str) -> None:
        with self.records.locked() as st:
            port = st.ports.get(port_id)
            if port is None:
                return
            server = st.server_of(port.device_id)
            if server is not None:
                if port.purpose == "management":
                    raise CloudError(f"port {port.name} belongs to server {server.name}: "
                                     "delete the server first")
                self.plumbing.move_out(port, server.id)
            host, _guest = veth_names(port)
            if link_exists(host):
                ip("link", "del", host)  # takes its peer with it, wherever it is
            del st.ports[port_id]

