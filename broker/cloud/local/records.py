"""The local cloud's records (what the OpenStack API keeps in its database).

They live in `<root>/state.json`, guarded by flock, because the web and worker
processes share them. The file is root's and 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from broker.cloud.base import ServerStatus

PortPurpose = Literal["management", "service"]


@dataclass
class PortRecord:
    id: str
    name: str
    purpose: PortPurpose
    address: str
    device_id: str | None = None      # the server it is attached to
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class VolumeRecord:
    id: str
    name: str
    size_gb: int
    availability_zone: str
    volume_type: str | None = None
    attached_to: str | None = None    # server id
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerRecord:
    id: str
    name: str
    availability_zone: str
    flavor: str
    image: str
    management_port_id: str
    volume_id: str
    status: ServerStatus = ServerStatus.BUILD
    tags: dict[str, str] = field(default_factory=dict)
    host: str = ""                    # the hypervisor it runs on ("" before hosts existed)


R = TypeVar("R", PortRecord, VolumeRecord, ServerRecord)
_FIELDS = {cls: frozenset(f.name for f in dataclasses.fields(cls))
           for cls in (PortRecord, VolumeRecord, ServerRecord)}


def _load(cls: type[R], raw: dict[str, Any]) -> R:
    names = _FIELDS[cls]
    record = cls(**{k: v for k, v in raw.items() if k in names})
    record.tags = dict(record.tags or {})
    return record


def _dump(record: PortRecord | VolumeRecord | ServerRecord) -> dict[str, Any]:
    # Every field is a scalar but tags (a flat dict of strings): a shallow copy is
    # enough, and dataclasses.asdict's deep copy was most of a save's time.
    return {**vars(record), "tags": dict(record.tags)}


def open_private(path: Path, flags: int) -> int:
    """Open (creating) a 0600 file of root's; an older file keeps no wider mode."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


@dataclass
class Records:
    """Every server, port and volume of the cloud, by id."""

    servers: dict[str, ServerRecord] = field(default_factory=dict)
    ports: dict[str, PortRecord] = field(default_factory=dict)
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    hosts_down: list[str] = field(default_factory=list)  # hypervisors powered off

    @classmethod
    def from_json(cls, text: str) -> Records:
        data = json.loads(text)
        servers = {k: _load(ServerRecord, v) for k, v in data.get("servers", {}).items()}
        for server in servers.values():
            server.status = ServerStatus(server.status)
        return cls(servers=servers,
                   ports={k: _load(PortRecord, v) for k, v in data.get("ports", {}).items()},
                   volumes={k: _load(VolumeRecord, v)
                            for k, v in data.get("volumes", {}).items()},
                   hosts_down=sorted(data.get("hosts_down", [])))

    def to_json(self) -> str:
        data = {"servers": {k: {**_dump(v), "status": v.status.value}
                            for k, v in self.servers.items()},
                "ports": {k: _dump(v) for k, v in self.ports.items()},
                "volumes": {k: _dump(v) for k, v in self.volumes.items()},
                "hosts_down": sorted(self.hosts_down)}
        # No indent: json's C encoder only runs without one, and the records are
        # written at every step of every failover (`python -m json.tool` reads them).
        return json.dumps(data, sort_keys=True)

    def clear(self) -> None:
        for table in (self.servers, self.ports, self.volumes):
            table.clear()
        self.hosts_down.clear()

    def server_of(self, server_id: str | None) -> ServerRecord | None:
        """The server a port or volume is bound to; None if unbound or that server is gone."""
        return None if server_id is None else self.servers.get(server_id)

    def servers_on(self, host: str) -> list[ServerRecord]:
        return [s for s in self.servers.values() if s.host == host]

    def service_ports_of(self, server_id: str) -> list[PortRecord]:
        return [p for p in self.ports.values()
                if p.device_id == server_id and p.purpose == "service"]


def by_name(records: dict[str, R], name: str) -> R | None:
    return next((r for r in records.values() if r.name == name), None)


class RecordStore:
    """The records file, read and written under an exclusive flock."""

    def __init__(self, root: Path) -> None:
        self.path = root / "state.json"
        self.lock_path = root / "state.lock"

    @contextlib.contextmanager
    def locked(self, *, write: bool = True) -> Iterator[Records]:
        """The records under the lock; saved on a normal exit (not after an exception)."""
        with os.fdopen(open_private(self.lock_path, os.O_RDWR), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                records = (Records.from_json(self.path.read_text())
                           if self.path.exists() else Records())
                yield records
                if write:
                    self.save(records)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> Records:
        with self.locked(write=False) as records:
            return records

    def save(self, records: Records) -> None:
        """Write now, still under the caller's lock (before a step that may fail)."""
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_EXCL), "w") as f:
            f.write(records.to_json())
        os.replace(tmp, self.path)
