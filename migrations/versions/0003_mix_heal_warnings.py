"""models: mix and heal are part of a model's identity; alpha "default" is "proportional"; jobs carry warnings

Rows made before this revision were made with the paper's mix (Eq. 3), teacher-free, and their alpha "default" was
the proportional rule: they get those values. Their identity hashes are left as they are: they were computed from
the tuple without mix and heal, so no new request matches them, and the engine that made them no longer makes the
same files for the same tuple (it prunes by activations where it fell back to weight magnitude).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 06:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mix', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('heal', sa.JSON(), nullable=True))
    op.execute("UPDATE models SET mix = 'paper'")
    op.execute("UPDATE models SET alpha_request = 'proportional' WHERE alpha_request = 'default'")
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.alter_column('mix', existing_type=sa.String(length=10), nullable=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warnings', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('warnings')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('heal')
        batch_op.drop_column('mix')
