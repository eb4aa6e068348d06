"""The broker's own state: instances, nodes, bindings, operations, failovers, leases.

Plain SQLAlchemy 2.0 (no Flask-SQLAlchemy) so the worker needs no Flask app.
Every password column holds a `Vault` token, never plaintext (names end in `_enc`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Constraint names are fixed so that Alembic migrations can name them on SQLite too.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(DateTime):
    """Timezone-aware on PostgreSQL; SQLite gives naive values back, see `aware`."""

    def __init__(self) -> None:
        super().__init__(timezone=True)


def aware(value: datetime | None) -> datetime | None:
    """SQLite drops the zone: every stored time is UTC, so put it back."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


# Instance states
PROVISIONING = "provisioning"
READY = "ready"
UPDATING = "updating"
DEGRADED = "degraded"          # serving, but without the redundancy its plan promises
FAILED = "failed"              # provisioning failed; resources were cleaned up
DEPROVISIONING = "deprovisioning"
DEPROVISIONED = "deprovisioned"


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(64))
    plan_id: Mapped[str] = mapped_column(String(64))
    organization_guid: Mapped[str] = mapped_column(String(128))
    space_guid: Mapped[str] = mapped_column(String(128))
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    maintenance_version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default=PROVISIONING)
    state_reason: Mapped[str | None] = mapped_column(Text)  # why degraded / failed, in words
    replication: Mapped[str] = mapped_column(String(16))  # none | async | sync

    # The service port: the address apps use for the instance's whole life.
    service_port_id: Mapped[str | None] = mapped_column(String(128))
    service_address: Mapped[str | None] = mapped_column(String(64))
    server_group_id: Mapped[str | None] = mapped_column(String(128))

    # Cluster-wide roles: pg_basebackup copies them to every node.
    admin_password_enc: Mapped[str] = mapped_column(Text)
    replication_password_enc: Mapped[str] = mapped_column(Text)

    # The instance's own CA (broker/pg/tls.py); none on instances made before TLS until
    # `instances rotate-certs` gives them one.
    tls_ca_cert: Mapped[str | None] = mapped_column(Text)
    tls_ca_key_enc: Mapped[str | None] = mapped_column(Text)
    tls_ca_expires_at: Mapped[datetime | None] = mapped_column()

    # Replication facts the monitor keeps, like Patroni's sync key.
    sync_standby_node_id: Mapped[str | None] = mapped_column(String(64))
    last_lag_bytes: Mapped[int | None] = mapped_column(BigInteger)
    last_checked_at: Mapped[datetime | None] = mapped_column()
    last_failover_at: Mapped[datetime | None] = mapped_column()

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column()

    nodes: Mapped[list[Node]] = relationship(back_populates="instance", order_by="Node.created_at")
    bindings: Mapped[list[Binding]] = relationship(back_populates="instance")

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.state not in (NODE_DELETED,)]

    def primary(self) -> Node | None:
        return next((n for n in self.live_nodes() if n.role == PRIMARY), None)

    def standby(self) -> Node | None:
        return next((n for n in self.live_nodes() if n.role == STANDBY), None)

    def ca_for(self, node: Node) -> str | None:
        """The CA PEM to verify `node` with, None while the node serves no certificate
        of ours (an instance made before TLS, until its certificates are rotated)."""
        return self.tls_ca_cert if self.tls_ca_cert and node.tls_cert else None


# Node roles and states
PRIMARY = "primary"
STANDBY = "standby"
OLD_PRIMARY = "old-primary"   # fenced, waiting to be deleted

NODE_CREATING = "creating"
NODE_RUNNING = "running"
NODE_FENCED = "fenced"
NODE_DELETING = "deleting"
NODE_DELETED = "deleted"


class Node(Base):
    """One server of an instance, with its volume, in one availability zone."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # short hex, used in names
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=NODE_CREATING)
    availability_zone: Mapped[str] = mapped_column(String(64))
    server_id: Mapped[str | None] = mapped_column(String(128))
    volume_id: Mapped[str | None] = mapped_column(String(128))
    management_port_id: Mapped[str | None] = mapped_column(String(128))
    management_address: Mapped[str | None] = mapped_column(String(64))
    slot_name: Mapped[str | None] = mapped_column(String(64))  # its slot on the primary
    # The certificate the node serves (public), its key (encrypted), when it expires,
    # and its issue number (milliseconds) that the guest bootstrap compares.
    tls_cert: Mapped[str | None] = mapped_column(Text)
    tls_key_enc: Mapped[str | None] = mapped_column(Text)
    tls_expires_at: Mapped[datetime | None] = mapped_column()
    tls_issued_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="nodes")

    @property
    def application_name(self) -> str:
        """The standby's name in pg_stat_replication and synchronous_standby_names."""
        return f"node_{self.id}"


BINDING_CREATING = "creating"
BINDING_CREATED = "created"
BINDING_DELETED = "deleted"


class Binding(Base):
    """One application's (or service key's) own PostgreSQL role."""

    __tablename__ = "bindings"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    app_guid: Mapped[str | None] = mapped_column(String(128))
    bind_resource: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    role_name: Mapped[str] = mapped_column(String(63))
    password_enc: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=BINDING_CREATING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column()

    instance: Mapped[Instance] = relationship(back_populates="bindings")


# Operation states: the OSB last_operation states, plus `queued`.
QUEUED = "queued"
IN_PROGRESS = "in progress"
SUCCEEDED = "succeeded"
OP_FAILED = "failed"
UNFINISHED = (QUEUED, IN_PROGRESS)


class Operation(Base):
    """Long work on an instance. The row is the source of truth; each step is idempotent."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    binding_id: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))  # provision, update, deprovision, failover, ...
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    # The step names, stored when first run: a resume checks its code has the same list.
    steps: Mapped[list[str] | None] = mapped_column(JSON)
    step: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    not_before: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class Failover(Base):
    """One failover (or switchover / resurrect), with the timings operators ask for."""

    __tablename__ = "failovers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    operation_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # failover | switchover | resurrect
    cause: Mapped[str] = mapped_column(Text)
    old_primary_node_id: Mapped[str | None] = mapped_column(String(64))
    new_primary_node_id: Mapped[str | None] = mapped_column(String(64))
    lag_bytes_at_promotion: Mapped[int | None] = mapped_column(BigInteger)
    detected_at: Mapped[datetime] = mapped_column(default=utcnow)
    fenced_at: Mapped[datetime | None] = mapped_column()
    promoted_at: Mapped[datetime | None] = mapped_column()
    port_attached_at: Mapped[datetime | None] = mapped_column()
    standby_streaming_at: Mapped[datetime | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(32))  # succeeded | refused | failed
    detail: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A named lease, e.g. `monitor:<instance id>`: who watches which instance."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()


class BackupRepository(Base):
    """An instance's backup repository (pgBackRest stanza): when the workers take its next
    backups, and, once the instance is deleted, until when it is kept."""

    __tablename__ = "backup_repositories"

    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), primary_key=True)
    stanza: Mapped[str] = mapped_column(String(64))
    # Where the repository is (broker/backup/s3.py): object storage's endpoint, port,
    # bucket, region, URI style and prefix; {} the cloud's own; NULL not yet known.
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    next_full_at: Mapped[datetime | None] = mapped_column()
    next_diff_at: Mapped[datetime | None] = mapped_column()
    # Deleted instances: everything committed up to here is archived; kept until then.
    archive_end_at: Mapped[datetime | None] = mapped_column()
    keep_until: Mapped[datetime | None] = mapped_column()
    purged_at: Mapped[datetime | None] = mapped_column()


class Backup(Base):
    """One backup in an instance's repository, as pgBackRest last reported it."""

    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # <instance>/<label>
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column()
    stopped_at: Mapped[datetime] = mapped_column()
    operation_id: Mapped[str | None] = mapped_column(String(64))
