"""Backups: where each instance's repository is (object storage named by its plan or
the environment when its first node was made), so that a catalog change never loses it

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backup_repositories") as batch:
        batch.add_column(sa.Column("location", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backup_repositories") as batch:
        batch.drop_column("location")
