"""jobs.idempotency_key: the Idempotency-Key of the upload that asked for the job.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A retried upload (the same key) is answered with the jobs its first attempt created instead of a
second set; the key lives on the jobs, not only on the document, because a keyed upload can find a
document an earlier upload without a key created.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_jobs_document_idempotency_key', ['document_id', 'idempotency_key'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_document_idempotency_key')
        batch_op.drop_column('idempotency_key')
