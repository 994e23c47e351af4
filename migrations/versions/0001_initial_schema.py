"""Initial schema: users, communities, memberships, blobs, styles, blends, polls, votes, jobs, datasets, latents.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Self-contained on purpose (no import of backend.db.models): a revision must keep describing the schema as it was
when written, whatever the models look like later. Enums are plain VARCHAR(16); timestamps are timestamptz on
PostgreSQL. tests/backend/test_migrations.py checks that `upgrade head` yields exactly Base.metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete=ondelete
    )


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _uq(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _indexes(table: str, *columns: str | tuple[str, ...]) -> None:
    for cols in columns:
        cols = (cols,) if isinstance(cols, str) else cols
        op.create_index(op.f(f"ix_{table}_{'_'.join(cols)}"), table, list(cols), unique=False)


TABLES = (
    "communities", "users", "blobs", "cached_latents", "memberships", "style_models",
    "blends", "datasets", "jobs", "polls", "poll_options", "votes",
)  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "communities",
        _id(),
        _str("platform", 16),
        _str("platform_community_id", 64),
        _str("name", 128),
        _ts("created_at"),
        _pk("communities"),
        _uq("communities", "platform", "platform_community_id"),
    )
    op.create_table(
        "users",
        _id(),
        _str("platform", 16),
        _str("platform_user_id", 64),
        _str("display_name", 128),
        _ts("created_at"),
        _pk("users"),
        _uq("users", "platform", "platform_user_id"),
    )
    op.create_table(
        "blobs",
        _id(),
        _str("sha256", 64),
        _int("owner_user_id", nullable=True),
        _int("size"),
        _str("media_type", 64),
        _str("kind", 16),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _fk("blobs", "owner_user_id", "users", "CASCADE"),
        _pk("blobs"),
        _uq("blobs", "owner_user_id", "sha256"),
    )
    _indexes("blobs", "expires_at", "sha256")
    op.create_table(
        "cached_latents",
        _id(),
        _int("user_id"),
        _str("image_sha256", 64),
        _str("base_hash", 64),
        _str("mode", 16),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _fk("cached_latents", "user_id", "users", "CASCADE"),
        _pk("cached_latents"),
        _uq("cached_latents", "user_id", "image_sha256", "base_hash", "mode"),
    )
    _indexes("cached_latents", "expires_at")
    op.create_table(
        "memberships",
        _id(),
        _int("user_id"),
        _int("community_id"),
        _str("role", 16),
        _fk("memberships", "community_id", "communities", "CASCADE"),
        _fk("memberships", "user_id", "users", "CASCADE"),
        _pk("memberships"),
        _uq("memberships", "user_id", "community_id"),
    )
    _indexes("memberships", "community_id")
    op.create_table(
        "style_models",
        _id(),
        _str("name", 64),
        _int("community_id", nullable=True),
        _str("status", 16),
        _str("checkpoint_path", 1024),
        _str("content_hash", 64, nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("default_blend", sa.JSON(), nullable=False),
        _int("created_by", nullable=True),
        _ts("created_at"),
        _fk("style_models", "community_id", "communities", "CASCADE"),
        _fk("style_models", "created_by", "users", "SET NULL"),
        _pk("style_models"),
        _uq("style_models", "community_id", "name"),
    )
    _indexes("style_models", "created_by")
    op.create_table(
        "blends",
        _id(),
        _int("style_id"),
        _int("community_id", nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        _str("label", 64),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        _int("created_by", nullable=True),
        _ts("created_at"),
        _fk("blends", "community_id", "communities", "CASCADE"),
        _fk("blends", "created_by", "users", "SET NULL"),
        _fk("blends", "style_id", "style_models", "CASCADE"),
        _pk("blends"),
    )
    _indexes("blends", "community_id", "created_by", "style_id")
    op.create_table(
        "datasets",
        _id(),
        _int("community_id"),
        _int("created_by", nullable=True),
        _str("name", 64),
        _int("blob_id", nullable=True),
        _int("image_count"),
        _str("status", 16),
        _ts("created_at"),
        _fk("datasets", "blob_id", "blobs", "SET NULL"),
        _fk("datasets", "community_id", "communities", "CASCADE"),
        _fk("datasets", "created_by", "users", "SET NULL"),
        _pk("datasets"),
    )
    _indexes("datasets", "blob_id", "community_id", "created_by")
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        _str("key", 128),
        _str("kind", 16),
        _str("status", 16),
        _int("user_id"),
        _int("community_id", nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        _int("attempts"),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _int("input_blob_id", nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        _str("worker_id", 128, nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("delivered_at", nullable=True),
        _fk("jobs", "community_id", "communities", "SET NULL"),
        _fk("jobs", "input_blob_id", "blobs", "SET NULL"),
        _fk("jobs", "user_id", "users", "CASCADE"),
        _pk("jobs"),
        _uq("jobs", "key"),
    )
    _indexes("jobs", "community_id", "input_blob_id", "status", ("user_id", "status"))
    op.create_table(
        "polls",
        _id(),
        _int("community_id"),
        _int("style_id"),
        _str("status", 16),
        _int("created_by", nullable=True),
        _ts("closes_at"),
        _int("winner_blend_id", nullable=True),
        _str("platform_message_id", 64, nullable=True),
        _ts("created_at"),
        _fk("polls", "community_id", "communities", "CASCADE"),
        _fk("polls", "created_by", "users", "SET NULL"),
        _fk("polls", "style_id", "style_models", "CASCADE"),
        _fk("polls", "winner_blend_id", "blends", "SET NULL"),
        _pk("polls"),
    )
    _indexes("polls", "community_id", "created_by", "style_id", "winner_blend_id")
    op.create_table(
        "poll_options",
        _id(),
        _int("poll_id"),
        _int("blend_id"),
        _int("position"),
        _fk("poll_options", "blend_id", "blends", "CASCADE"),
        _fk("poll_options", "poll_id", "polls", "CASCADE"),
        _pk("poll_options"),
        _uq("poll_options", "poll_id", "position"),
    )
    _indexes("poll_options", "blend_id")
    op.create_table(
        "votes",
        _id(),
        _int("poll_id"),
        _int("user_id"),
        _int("option_id"),
        _ts("created_at"),
        _ts("updated_at"),
        _fk("votes", "option_id", "poll_options", "CASCADE"),
        _fk("votes", "poll_id", "polls", "CASCADE"),
        _fk("votes", "user_id", "users", "CASCADE"),
        _pk("votes"),
        _uq("votes", "poll_id", "user_id"),
    )
    _indexes("votes", "option_id", "user_id")


def downgrade() -> None:
    # Children before parents; a table's indexes go with it.
    for table in reversed(TABLES):
        op.drop_table(table)
