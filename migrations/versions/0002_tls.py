"""TLS: each instance's CA, each node's certificate

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 04:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tls_ca_cert", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("tls_ca_key_enc", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("tls_ca_expires_at", sa.DateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tls_cert", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("tls_key_enc", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("tls_expires_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("tls_issued_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        for column in ("tls_issued_at", "tls_expires_at", "tls_key_enc", "tls_cert"):
            batch_op.drop_column(column)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for column in ("tls_ca_expires_at", "tls_ca_key_enc", "tls_ca_cert"):
            batch_op.drop_column(column)
