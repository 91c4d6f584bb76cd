"""aliases and tags of models: an alias names one model (and is the Hub repository cbd/<alias>); tags label models

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'aliases',
        sa.Column('name', sa.String(length=96), nullable=False),
        sa.Column('model_id', sa.String(length=40), nullable=False),
        sa.Column('previous_model_id', sa.String(length=40), nullable=True),
        sa.Column('updated_by', sa.String(length=64), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_index(op.f('ix_aliases_model_id'), 'aliases', ['model_id'], unique=False)
    op.create_table(
        'model_tags',
        sa.Column('model_id', sa.String(length=40), nullable=False),
        sa.Column('tag', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('model_id', 'tag'),
    )
    op.create_index(op.f('ix_model_tags_tag'), 'model_tags', ['tag'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_model_tags_tag'), table_name='model_tags')
    op.drop_table('model_tags')
    op.drop_index(op.f('ix_aliases_model_id'), table_name='aliases')
    op.drop_table('aliases')
