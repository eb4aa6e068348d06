"""SDK objects -> the cloud interface's plain records, and the tag conventions.

- Servers and volumes carry tags as metadata (key -> value), set atomically at create.
- Ports and security groups carry Neutron tags, which are plain strings: "key=value".
- Server groups can carry neither: they are known by their name `pgha-<instance>`.
"""

from __future__ import annotations

import re
from typing import Any

from broker.cloud.base import (
    TAG_INSTANCE,
    TAG_MANAGED,
    CloudResource,
    Port,
    ResourceKind,
    Server,
    ServerStatus,
    Volume,
)

META_MANAGEMENT_ADDRESS = "pgha-management-address"
NAME_PREFIX = "pgha-"

_STATUS = {
    "BUILD": ServerStatus.BUILD, "REBUILD": ServerStatus.BUILD,
    "ACTIVE": ServerStatus.ACTIVE, "REBOOT": ServerStatus.ACTIVE,
    "HARD_REBOOT": ServerStatus.ACTIVE, "MIGRATING": ServerStatus.ACTIVE,
    "RESIZE": ServerStatus.ACTIVE, "VERIFY_RESIZE": ServerStatus.ACTIVE,
    "REVERT_RESIZE": ServerStatus.ACTIVE, "PASSWORD": ServerStatus.ACTIVE,
    "SHUTOFF": ServerStatus.SHUTOFF, "SHELVED_OFFLOADED": ServerStatus.SHUTOFF,
    "SOFT_DELETED": ServerStatus.SHUTOFF,
    "UNKNOWN": ServerStatus.UNKNOWN,
    # Frozen but resumable: neither serving nor fenced.
    "PAUSED": ServerStatus.ERROR, "SUSPENDED": ServerStatus.ERROR,
    "RESCUE": ServerStatus.ERROR, "SHELVED": ServerStatus.ERROR,
    "ERROR": ServerStatus.ERROR,
}


def managed(tags: dict[str, str]) -> dict[str, str]:
    return {**{k: str(v) for k, v in tags.items()}, TAG_MANAGED: "true"}


def to_neutron_tags(tags: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(tags.items())]


def from_neutron_tags(tags: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for tag in tags or []:
        key, sep, value = tag.partition("=")
        if sep and key.startswith(NAME_PREFIX):
            out[key] = value
    return out


def ours(metadata: dict[str, Any] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (metadata or {}).items() if k.startswith(NAME_PREFIX)}


def group_name_instance(name: str | None) -> str | None:
    """`pgha-<instance>` -> instance id (server groups have no tags)."""
    if name and name.startswith(NAME_PREFIX) and len(name) > len(NAME_PREFIX):
        return name[len(NAME_PREFIX):]
    return None


# What an untagged port or security group of the broker is called (Neutron tags are set
# right after the create, so a crash in between leaves only the name).
_UNTAGGED = re.compile(r"^pgha-(?P<instance>.+)-(?:service|nodes|[0-9a-f]{8})$")


def belongs(tags: dict[str, str], name: str | None, instance_id: str | None, *,
            by_name: bool = False) -> bool:
    """Tagged as the broker's (for this instance); with `by_name`, also an untagged
    resource named the way the broker names ports and security groups."""
    if tags.get(TAG_MANAGED) == "true" or TAG_INSTANCE in tags:
        return instance_id is None or tags.get(TAG_INSTANCE) == instance_id
    if not by_name or not name:
        return False
    match = _UNTAGGED.match(name)
    return match is not None and instance_id in (None, match.group("instance"))


def name_instance(name: str | None) -> str | None:
    match = _UNTAGGED.match(name or "")
    return match.group("instance") if match else None


def port_record(port: Any) -> Port:
    ips = port.fixed_ips or []
    return Port(id=port.id, name=port.name or "", address=ips[0]["ip_address"] if ips else "",
                device_id=port.device_id or None, tags=from_neutron_tags(port.tags))


def volume_record(volume: Any) -> Volume:
    attachments = volume.attachments or []
    return Volume(id=volume.id, name=volume.name or "",
                  availability_zone=volume.availability_zone or "",
                  size_gb=int(volume.size or 0), status=volume.status or "",
                  attached_to=attachments[0].get("server_id") if attachments else None,
                  tags=ours(volume.metadata))


def server_status(server: Any) -> ServerStatus:
    # UNKNOWN: Nova no longer hears the host; DOWN: it was forced down (admins see it).
    if (server.host_status or "").upper() in ("UNKNOWN", "DOWN"):
        return ServerStatus.UNKNOWN
    return _STATUS.get((server.status or "").upper(), ServerStatus.ERROR)


def server_record(server: Any) -> Server:
    metadata = server.metadata or {}
    address = metadata.get(META_MANAGEMENT_ADDRESS)
    if not address:
        for entries in (server.addresses or {}).values():
            if entries:
                address = entries[0].get("addr")
                break
    details = {"nova_status": str(server.status or ""),
               "task_state": str(server.task_state or ""),
               "vm_state": str(server.vm_state or "")}
    if server.compute_host:
        details["host"] = str(server.compute_host)
    if server.host_status:
        details["host_status"] = str(server.host_status)
    if server.fault and isinstance(server.fault, dict) and server.fault.get("message"):
        details["fault"] = str(server.fault["message"])[:200]
    return Server(id=server.id, name=server.name or "",
                  availability_zone=server.availability_zone or "",
                  status=server_status(server), management_address=address,
                  tags={k: v for k, v in ours(metadata).items()
                        if k != META_MANAGEMENT_ADDRESS},
                  details=details)


def resource(kind: ResourceKind, item_id: str, name: str | None,
             tags: dict[str, str]) -> CloudResource:
    return CloudResource(kind=kind, id=item_id, name=name or "", tags=tags)
