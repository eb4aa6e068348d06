"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 12:18:06.208814
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("service_id", sa.String(length=64), nullable=False),
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column("organization_guid", sa.String(length=128), nullable=False),
        sa.Column("space_guid", sa.String(length=128), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("maintenance_version", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("replication", sa.String(length=16), nullable=False),
        sa.Column("service_port_id", sa.String(length=128), nullable=True),
        sa.Column("service_address", sa.String(length=64), nullable=True),
        sa.Column("server_group_id", sa.String(length=128), nullable=True),
        sa.Column("admin_password_enc", sa.Text(), nullable=False),
        sa.Column("replication_password_enc", sa.Text(), nullable=False),
        sa.Column("sync_standby_node_id", sa.String(length=64), nullable=True),
        sa.Column("last_lag_bytes", sa.BigInteger(), nullable=True),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failover_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "bindings",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("instance_id", sa.String(length=128), nullable=False),
        sa.Column("app_guid", sa.String(length=128), nullable=True),
        sa.Column("bind_resource", sa.JSON(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("role_name", sa.String(length=63), nullable=False),
        sa.Column("password_enc", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_bindings_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bindings")),
    )
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bindings_instance_id"), ["instance_id"], unique=False)

    op.create_table(
        "failovers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.String(length=128), nullable=False),
        sa.Column("operation_id", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("old_primary_node_id", sa.String(length=64), nullable=True),
        sa.Column("new_primary_node_id", sa.String(length=64), nullable=True),
        sa.Column("lag_bytes_at_promotion", sa.BigInteger(), nullable=True),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("port_attached_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("standby_streaming_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_failovers_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failovers")),
    )
    with op.batch_alter_table("failovers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_failovers_instance_id"), ["instance_id"], unique=False)

    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("availability_zone", sa.String(length=64), nullable=False),
        sa.Column("server_id", sa.String(length=128), nullable=True),
        sa.Column("volume_id", sa.String(length=128), nullable=True),
        sa.Column("management_port_id", sa.String(length=128), nullable=True),
        sa.Column("management_address", sa.String(length=64), nullable=True),
        sa.Column("slot_name", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_nodes_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_nodes_instance_id"), ["instance_id"], unique=False)

    op.create_table(
        "operations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.String(length=128), nullable=False),
        sa.Column("binding_id", sa.String(length=128), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_operations_instance_id_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operations")),
    )
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_operations_created_at"), ["created_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_operations_instance_id"), ["instance_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_operations_state"), ["state"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_state"))
        batch_op.drop_index(batch_op.f("ix_operations_instance_id"))
        batch_op.drop_index(batch_op.f("ix_operations_created_at"))

    op.drop_table("operations")
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_nodes_instance_id"))

    op.drop_table("nodes")
    with op.batch_alter_table("failovers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_failovers_instance_id"))

    op.drop_table("failovers")
    with op.batch_alter_table("bindings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bindings_instance_id"))

    op.drop_table("bindings")
    op.drop_table("leases")
    op.drop_table("instances")
