"""The catalog: `catalog.yml` loaded, validated and turned into plain objects.

A bad catalog stops the broker at start with the path of the bad field, e.g.
``catalog.yml: services[0].plans[1].cloud.replication: 'semi' is not one of ...``.
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from broker.config import ConfigError

Replication = Literal["none", "async", "sync"]

_SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"

_NETWORK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "management_network": {"type": "string", "minLength": 1},
        "service_network": {"type": "string", "minLength": 1},
        "service_subnet": {"type": "string", "minLength": 1},
        "security_groups": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "app_cidrs": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
}

_BACKUPS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        # A WAL segment is archived at least this often under any write load: the most
        # a total loss of every node can cost (the RPO).
        "archive_timeout_s": {"type": "integer", "minimum": 1, "maximum": 3600},
        "retention_days": {"type": "integer", "minimum": 1, "maximum": 3650},
        "full_every_days": {"type": "integer", "minimum": 1, "maximum": 365},
        "diff_every_days": {"type": "integer", "minimum": 1, "maximum": 365},
        # The plan's repositories in S3-compatible object storage; a field not set here
        # comes from BROKER_BACKUP_S3_* (credentials always do).
        "object_storage": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "endpoint": {"type": "string", "pattern": r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$"},
                # S3's bucket names (Swift containers and RGW buckets are within them).
                "bucket": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
                "region": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
                "uri_style": {"type": "string", "enum": ["host", "path"]},
                "prefix": {"type": "string",
                           "pattern": r"^/?[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?$"},
            },
        },
    },
}

_CLOUD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["nodes", "replication", "flavor", "image", "volume_size_gb", "availability_zones"],
    "additionalProperties": False,
    "properties": {
        "nodes": {"type": "integer", "enum": [1, 2]},
        "replication": {"type": "string", "enum": ["none", "async", "sync"]},
        "flavor": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "volume_size_gb": {"type": "integer", "minimum": 1},
        "volume_type": {"type": ["string", "null"]},
        "availability_zones": {
            "type": "array", "minItems": 1, "uniqueItems": True,
            "items": {"type": "string", "minLength": 1},
        },
        # Where a standby may be rebuilt while its own zone has no live host; it moves
        # back once that zone is up again. Empty: the rebuild waits for the zone.
        "fallback_zones": {
            "type": "array", "uniqueItems": True,
            "items": {"type": "string", "minLength": 1},
        },
        # A primary left in a fallback zone (a failover promoted the standby there)
        # moves back by a switchover once a standby in the plan's zones is in sync.
        "primary_returns_home": {"type": "boolean"},
        "network": _NETWORK_SCHEMA,
        "backups": _BACKUPS_SCHEMA,
    },
}

_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"parameters": {"type": "object"}},
}

# A service and a plan are named alike: a uuid, a CLI-friendly name, a description.
_IDENTITY: dict[str, Any] = {
    "id": {"type": "string", "format": "uuid"},
    "name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9-]*$"},
    "description": {"type": "string", "minLength": 1},
}

_PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "description", "maintenance_info", "cloud", "schemas"],
    "properties": {
        **_IDENTITY,
        "free": {"type": "boolean"},
        "bindable": {"type": "boolean"},
        "plan_updateable": {"type": "boolean"},
        "maximum_polling_duration": {"type": "integer", "minimum": 60},
        "maintenance_info": {
            "type": "object",
            "required": ["version"],
            "properties": {"version": {"type": "string", "pattern": _SEMVER},
                           "description": {"type": "string"}},
        },
        "metadata": {"type": "object"},
        "schemas": {
            "type": "object",
            "required": ["service_instance", "service_binding"],
            "properties": {
                "service_instance": {
                    "type": "object",
                    "required": ["create", "update"],
                    "properties": {"create": _PARAMS, "update": _PARAMS},
                },
                "service_binding": {
                    "type": "object",
                    "required": ["create"],
                    "properties": {"create": _PARAMS},
                },
            },
        },
        "cloud": _CLOUD_SCHEMA,
    },
}

_CATALOG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "name", "description", "bindable", "plans"],
                "properties": {
                    **_IDENTITY,
                    "bindable": {"type": "boolean"},
                    "plan_updateable": {"type": "boolean"},
                    "instances_retrievable": {"type": "boolean"},
                    "bindings_retrievable": {"type": "boolean"},
                    "allow_context_updates": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "metadata": {"type": "object"},
                    "plans": {"type": "array", "minItems": 1, "items": _PLAN_SCHEMA},
                },
            },
        },
    },
}


@dataclass(frozen=True)
class NetworkSettings:
    management_network: str | None = None
    service_network: str | None = None
    service_subnet: str | None = None
    security_groups: tuple[str, ...] = ()
    app_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObjectStorage:
    """A plan's object storage for its repositories; None: BROKER_BACKUP_S3_*'s."""

    endpoint: str | None = None      # host name or address
    port: int | None = None
    bucket: str | None = None
    region: str | None = None
    uri_style: str | None = None     # "host" or "path"
    prefix: str | None = None


@dataclass(frozen=True)
class BackupSettings:
    """Continuous archiving and backups of a plan's instances."""

    archive_timeout_s: int = 60
    retention_days: int = 7  # the restore window; a deleted instance's backups stay as long
    full_every_days: int = 7
    diff_every_days: int = 1
    object_storage: ObjectStorage | None = None  # None: the environment's (or the host's)


@dataclass(frozen=True)
class CloudSettings:
    """How the broker builds a plan's instances (never shown to the platform)."""

    nodes: int
    replication: Replication
    flavor: str
    image: str
    volume_size_gb: int
    volume_type: str | None
    availability_zones: tuple[str, ...]
    network: NetworkSettings = field(default_factory=NetworkSettings)
    fallback_zones: tuple[str, ...] = ()   # a standby's refuge while its zone is down
    primary_returns_home: bool = True      # switch a primary in a fallback zone back
    backups: BackupSettings = field(default_factory=BackupSettings)

    @property
    def is_ha(self) -> bool:
        return self.nodes == 2


@dataclass(frozen=True)
class Plan:
    id: str
    name: str
    service_id: str
    maintenance_version: str
    cloud: CloudSettings
    provision_schema: dict[str, Any]
    update_schema: dict[str, Any]
    bind_schema: dict[str, Any]
    raw: dict[str, Any]  # the OSB plan object, without `cloud`


@dataclass(frozen=True)
class Service:
    id: str
    name: str
    raw: dict[str, Any]  # the OSB service object, without plans
    plans: tuple[Plan, ...]


@dataclass(frozen=True)
class Catalog:
    services: tuple[Service, ...]

    def plan(self, plan_id: str) -> Plan | None:
        for service in self.services:
            for plan in service.plans:
                if plan.id == plan_id:
                    return plan
        return None

    def service(self, service_id: str) -> Service | None:
        return next((s for s in self.services if s.id == service_id), None)

    def plan_by_name(self, name: str) -> Plan:
        for service in self.services:
            for plan in service.plans:
                if plan.name == name:
                    return plan
        raise KeyError(name)

    def osb(self) -> dict[str, Any]:
        """The catalog document served on GET /v2/catalog."""
        return {
            "services": [
                {**s.raw, "plans": [p.raw for p in s.plans]} for s in self.services
            ]
        }


def _backup_settings(doc: dict[str, Any], where: str) -> BackupSettings:
    fields = {k: v for k, v in doc.items() if k != "object_storage"}
    storage = doc.get("object_storage")
    if storage is None:
        return BackupSettings(**fields)
    endpoint, port = storage.get("endpoint"), None
    if endpoint is not None and ":" in endpoint:
        endpoint, raw_port = endpoint.rsplit(":", 1)
        port = int(raw_port)
        if not 0 < port < 65536:
            raise ConfigError(f"{where}.object_storage.endpoint: port {port} is not 1-65535")
    prefix = storage.get("prefix")
    return BackupSettings(**fields, object_storage=ObjectStorage(
        endpoint=endpoint, port=port, bucket=storage.get("bucket"),
        region=storage.get("region"), uri_style=storage.get("uri_style"),
        prefix="/" + prefix.strip("/") if prefix is not None else None))


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _check_uuid(value: str, where: str, source: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise ConfigError(f"{source}: {where}: {value!r} is not a UUID") from None


def parse_catalog(document: Any, source: str = "catalog.yml") -> Catalog:
    validator = jsonschema.Draft7Validator(_CATALOG_SCHEMA)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise ConfigError(f"{source}: {_path(first)}: {first.message}")

    seen_ids: set[str] = set()
    services: list[Service] = []
    for si, s in enumerate(document["services"]):
        _check_uuid(s["id"], f"services[{si}].id", source)
        plans: list[Plan] = []
        for pi, p in enumerate(s["plans"]):
            where = f"services[{si}].plans[{pi}]"
            _check_uuid(p["id"], f"{where}.id", source)
            if p["id"] in seen_ids:
                raise ConfigError(f"{source}: {where}.id: {p['id']} is used twice")
            seen_ids.add(p["id"])
            cloud_doc = p["cloud"]
            if cloud_doc["nodes"] == 1 and cloud_doc["replication"] != "none":
                raise ConfigError(f"{source}: {where}.cloud.replication: a one-node plan "
                                  "must have replication 'none'")
            if cloud_doc["nodes"] == 2 and cloud_doc["replication"] == "none":
                raise ConfigError(f"{source}: {where}.cloud.replication: a two-node plan "
                                  "needs 'async' or 'sync'")
            fallback = cloud_doc.get("fallback_zones") or []
            if set(fallback) & set(cloud_doc["availability_zones"]):
                raise ConfigError(f"{source}: {where}.cloud.fallback_zones: a fallback zone "
                                  "must not be one of the plan's availability_zones")
            if fallback and cloud_doc["nodes"] == 1:
                raise ConfigError(f"{source}: {where}.cloud.fallback_zones: only an HA plan "
                                  "rebuilds a standby (a one-node plan is resurrected on its "
                                  "volume, in its zone)")
            if cloud_doc["nodes"] == 2 and len(cloud_doc["availability_zones"]) < 2:
                raise ConfigError(f"{source}: {where}.cloud.availability_zones: an HA plan "
                                  "needs two zones (the standby never shares the primary's)")
            schemas = p["schemas"]
            for key in ("create", "update"):
                _check_schema(schemas["service_instance"][key].get("parameters", {}),
                              f"{where}.schemas.service_instance.{key}.parameters", source)
            _check_schema(schemas["service_binding"]["create"].get("parameters", {}),
                          f"{where}.schemas.service_binding.create.parameters", source)
            backups = cloud_doc.get("backups") or {}
            if backups.get("diff_every_days", 1) > backups.get("full_every_days", 7):
                raise ConfigError(f"{source}: {where}.cloud.backups.diff_every_days: a "
                                  "differential backup is never rarer than a full one")
            net = cloud_doc.get("network") or {}
            cloud = CloudSettings(
                nodes=cloud_doc["nodes"],
                replication=cloud_doc["replication"],
                flavor=cloud_doc["flavor"],
                image=cloud_doc["image"],
                volume_size_gb=cloud_doc["volume_size_gb"],
                volume_type=cloud_doc.get("volume_type"),
                availability_zones=tuple(cloud_doc["availability_zones"]),
                fallback_zones=tuple(fallback),
                primary_returns_home=cloud_doc.get("primary_returns_home", True),
                network=NetworkSettings(
                    management_network=net.get("management_network"),
                    service_network=net.get("service_network"),
                    service_subnet=net.get("service_subnet"),
                    security_groups=tuple(net.get("security_groups", ())),
                    app_cidrs=tuple(net.get("app_cidrs", ())),
                ),
                backups=_backup_settings(backups, f"{source}: {where}.cloud.backups"),
            )
            raw = {k: copy.deepcopy(v) for k, v in p.items() if k != "cloud"}
            plans.append(Plan(
                id=p["id"], name=p["name"], service_id=s["id"],
                maintenance_version=p["maintenance_info"]["version"],
                cloud=cloud,
                provision_schema=schemas["service_instance"]["create"].get("parameters", {}),
                update_schema=schemas["service_instance"]["update"].get("parameters", {}),
                bind_schema=schemas["service_binding"]["create"].get("parameters", {}),
                raw=raw,
            ))
        raw_service = {k: copy.deepcopy(v) for k, v in s.items() if k != "plans"}
        services.append(Service(id=s["id"], name=s["name"], raw=raw_service, plans=tuple(plans)))
    return Catalog(services=tuple(services))


def _check_schema(schema: dict[str, Any], where: str, source: str) -> None:
    try:
        jsonschema.Draft4Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{source}: {where}: not a valid JSON schema: {exc.message}") from None


def load_catalog(path: Path) -> Catalog:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the catalog {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    return parse_catalog(document, path.name)


_PARAM_NAME = re.compile(r"'([^']+)'")


def validate_parameters(schema: dict[str, Any], parameters: Any) -> str | None:
    """None when `parameters` fit the plan's schema, else a sentence naming the parameter."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        return "parameters must be a JSON object"
    validator = jsonschema.Draft4Validator(schema)
    errors = sorted(validator.iter_errors(parameters), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    error = errors[0]
    if error.validator == "additionalProperties":
        allowed = sorted((schema.get("properties") or {}).keys())
        unknown = sorted(set(parameters) - set(allowed))
        return (f"unknown parameter {', '.join(repr(u) for u in unknown)}; "
                f"this plan accepts: {', '.join(allowed) or 'none'}")
    name = ".".join(str(p) for p in error.absolute_path) or "parameters"
    return f"parameter {name!r}: {error.message}"
