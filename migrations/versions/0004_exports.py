"""exports: a model's files in device formats (GGUF), each its own row and job

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'exports',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('model_id', sa.String(length=40), nullable=False),
        sa.Column('format', sa.String(length=10), nullable=False),
        sa.Column('quant', sa.String(length=10), nullable=False),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('owner', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('model_id', 'format', 'quant'),
    )
    op.create_index(op.f('ix_exports_model_id'), 'exports', ['model_id'], unique=False)
    op.create_index(op.f('ix_exports_status'), 'exports', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_exports_status'), table_name='exports')
    op.drop_index(op.f('ix_exports_model_id'), table_name='exports')
    op.drop_table('exports')
