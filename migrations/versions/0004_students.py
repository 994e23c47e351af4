"""Students: each style's instant (distilled) network per blend, with the lineage it was trained for.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09

Self-contained like 0001 (no import of backend.db.models).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "students",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("style_id", sa.Integer(), nullable=False),
        sa.Column("blend", sa.JSON(), nullable=False),
        _str("blend_key", 1024),
        _str("path", 1024),
        _str("content_hash", 64, nullable=True),
        _str("base_hash", 64),
        _str("toon_hash", 64),
        _str("status", 16),
        _str("job_id", 36, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["style_id"], ["style_models.id"], name=op.f("fk_students_style_id_style_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_students_job_id_jobs"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_students")),
        sa.UniqueConstraint("style_id", "blend_key", name=op.f("uq_students_style_id_blend_key")),
    )
    op.create_index(op.f("ix_students_job_id"), "students", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_table("students")  # its index goes with it
