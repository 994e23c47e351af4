"""Deliveries: where each request's result goes, a lease on who sends it, and one row per photo sent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Self-contained like 0001 (no import of backend.db.models).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        _str("job_id", 36),
        _str("platform", 16),
        _str("chat_id", 64),
        _str("progress_message_id", 64),
        _str("reply_to", 64, nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        _str("locale", 16),
        _str("lease_owner", 128, nullable=True),
        _ts("lease_until", nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("finished_at", nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_deliveries_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
    )
    op.create_index(op.f("ix_deliveries_job_id"), "deliveries", ["job_id"], unique=False)
    op.create_index(op.f("ix_deliveries_platform_finished_at"), "deliveries", ["platform", "finished_at"], unique=False)
    op.create_table(
        "delivery_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        _str("name", 64),
        _str("sha256", 64),
        _ts("sent_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_items_delivery_id_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_items")),
        sa.UniqueConstraint("delivery_id", "position", name=op.f("uq_delivery_items_delivery_id_position")),
    )


def downgrade() -> None:
    op.drop_table("delivery_items")
    op.drop_table("deliveries")  # its indexes go with it
