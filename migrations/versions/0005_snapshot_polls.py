"""Snapshot polls: a poll option may name a fine-tune snapshot (a generator file) to render at its blend.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-16

The new job kinds (edit, sweep) need no change: kinds are stored as short strings without a constraint.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("poll_options") as batch:
        batch.add_column(sa.Column("checkpoint_path", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("poll_options") as batch:
        batch.drop_column("checkpoint_path")
