"""Names and tags of an instance's cloud resources: a node's server, volume and
management port are named after the instance and the node, so a re-run step adopts
what a previous run made."""

from __future__ import annotations

import uuid

from broker.cloud.base import TAG_INSTANCE, TAG_MANAGED, TAG_NODE, TAG_ROLE


def new_node_id() -> str:
    return uuid.uuid4().hex[:8]


def node_resource_name(instance_id: str, node_id: str) -> str:
    """Name of a node's server, volume and management port."""
    return f"pgha-{instance_id}-{node_id}"


def service_port_name(instance_id: str) -> str:
    return f"pgha-{instance_id}-service"


def server_group_name(instance_id: str) -> str:
    return f"pgha-{instance_id}"


def slot_name(node_id: str) -> str:
    return f"slot_{node_id}"


def instance_tags(instance_id: str) -> dict[str, str]:
    return {TAG_INSTANCE: instance_id, TAG_MANAGED: "true"}


def node_tags(instance_id: str, node_id: str, role: str) -> dict[str, str]:
    return {**instance_tags(instance_id), TAG_NODE: node_id, TAG_ROLE: role}
