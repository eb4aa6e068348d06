"""Backups: each instance's backup repository (its schedule, how long it is kept after
the instance is deleted) and the backups it holds

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 07:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_repositories",
        sa.Column("instance_id", sa.String(128), sa.ForeignKey(
            "instances.id", name="fk_backup_repositories_instance_id_instances"),
            primary_key=True),
        sa.Column("stanza", sa.String(64), nullable=False),
        sa.Column("next_full_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_diff_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archive_end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("keep_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "backups",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("instance_id", sa.String(128), sa.ForeignKey(
            "instances.id", name="fk_backups_instance_id_instances"), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("operation_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_backups_instance_id", "backups", ["instance_id"])


def downgrade() -> None:
    op.drop_index("ix_backups_instance_id", table_name="backups")
    op.drop_table("backups")
    op.drop_table("backup_repositories")
