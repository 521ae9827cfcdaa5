"""documents.encrypted_password; documents.enqueued_at and jobs.enqueued_at (issue 12).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

encrypted_password holds an upload's PDF password as a Fernet token until its parse ends
(storage/passwords.py), so a parse re-sent by the reaper or the reconciler can still open the file.
enqueued_at is when a message was last sent for the row: the reconciler re-sends only rows whose
last send is older than reconcile_grace_s. Existing rows take their updated_at.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('encrypted_password', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE documents SET enqueued_at = updated_at")
    op.execute("UPDATE jobs SET enqueued_at = updated_at")
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.alter_column('enqueued_at', existing_type=sa.DateTime(timezone=True), nullable=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('enqueued_at', existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
    with op.batch_alter_table('documents', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('encrypted_password')
