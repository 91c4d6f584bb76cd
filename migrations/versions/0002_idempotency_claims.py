"""idempotency keys are claimed before their resource exists (resource_id nullable)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.alter_column('resource_id', existing_type=sa.String(length=40), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE resource_id IS NULL")
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.alter_column('resource_id', existing_type=sa.String(length=40), nullable=False)
