"""The SQL store: who the users and communities are, which styles and blends exist, votes, jobs and blobs.

Written to behave the same on SQLite (embedded default) and PostgreSQL (production): enums are stored as
short strings, timestamps are always timezone-aware UTC, JSON goes through `sa.JSON`, and every foreign key says
what happens on delete so that forgetting a user is one `DELETE FROM users`. Constraint names come from a naming
convention because Alembic's batch mode (SQLite table rebuilds) needs named constraints.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of datetime the store accepts)."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A fresh job id: uuid4 as 32 hex digits."""
    return uuid.uuid4().hex


class UTCDateTime(sa.TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that refuses naive datetimes and always returns aware UTC ones.

    SQLite keeps no offset, so values are normalised to UTC on the way in (string comparison then orders them
    correctly) and tagged UTC on the way out; PostgreSQL's timestamptz round-trips to the same values.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def str_enum(cls: type[enum.StrEnum]) -> sa.Enum:
    """A StrEnum stored by value as VARCHAR(16), identical on SQLite and PostgreSQL (no native ENUM type)."""
    return sa.Enum(
        cls,
        native_enum=False,
        length=16,
        create_constraint=False,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Platform(enum.StrEnum):
    DISCORD = "discord"
    TELEGRAM = "telegram"
    CLI = "cli"


class Role(enum.StrEnum):
    MEMBER = "member"
    ADMIN = "admin"
    OWNER = "owner"


class BlobKind(enum.StrEnum):
    SELFIE = "selfie"
    RESULT = "result"
    LATENT = "latent"
    DATASET = "dataset"
    CHECKPOINT = "checkpoint"
    PREVIEW = "preview"


class StyleStatus(enum.StrEnum):
    DRAFT = "draft"
    TRAINING = "training"
    PUBLISHED = "published"
    ARCHIVED = "archived"


class PollStatus(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class JobKind(enum.StrEnum):
    TOON = "toon"
    REBLEND = "reblend"
    FINETUNE = "finetune"
    PREVIEW = "preview"  # a poll's grid of candidate blends on probe faces
    DISTILL = "distill"  # train a style's instant (student) network for one blend
    EDIT = "edit"  # a toon re-rendered from its latents moved along named directions (/edit smile 2)
    SWEEP = "sweep"  # an animation of a toon (or probe faces) over the blend levels (/sweep)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class Base(AsyncAttrs, DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: sa.JSON(),
        list[Any]: sa.JSON(),
    }


def _fk(target: str, ondelete: str) -> sa.ForeignKey:
    return sa.ForeignKey(target, ondelete=ondelete)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (sa.UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[Platform] = mapped_column(str_enum(Platform))
    platform_user_id: Mapped[str] = mapped_column(sa.String(64))
    display_name: Mapped[str] = mapped_column(sa.String(128), default="")
    preferences: Mapped[dict[str, Any] | None]  # e.g. {"style": "disney"} from /style
    created_at: Mapped[datetime] = _created_at()

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )


class Community(Base):
    __tablename__ = "communities"
    __table_args__ = (sa.UniqueConstraint("platform", "platform_community_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[Platform] = mapped_column(str_enum(Platform))
    platform_community_id: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(128), default="")
    created_at: Mapped[datetime] = _created_at()

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="community", cascade="all, delete-orphan", passive_deletes=True
    )


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (sa.UniqueConstraint("user_id", "community_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(_fk("users.id", "CASCADE"))
    community_id: Mapped[int] = mapped_column(_fk("communities.id", "CASCADE"), index=True)
    role: Mapped[Role] = mapped_column(str_enum(Role), default=Role.MEMBER)

    user: Mapped[User] = relationship(back_populates="memberships")
    community: Mapped[Community] = relationship(back_populates="memberships")


class Blob(Base):
    """One owner's claim on a content-addressed file; the file goes when the last row with its sha256 goes."""

    __tablename__ = "blobs"
    __table_args__ = (sa.UniqueConstraint("owner_user_id", "sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    owner_user_id: Mapped[int | None] = mapped_column(_fk("users.id", "CASCADE"))  # None: system-owned
    size: Mapped[int]
    media_type: Mapped[str] = mapped_column(sa.String(64))
    kind: Mapped[BlobKind] = mapped_column(str_enum(BlobKind))
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime | None] = mapped_column(index=True)


class StyleModel(Base):
    __tablename__ = "style_models"
    __table_args__ = (sa.UniqueConstraint("community_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    community_id: Mapped[int | None] = mapped_column(_fk("communities.id", "CASCADE"))  # None: global
    status: Mapped[StyleStatus] = mapped_column(str_enum(StyleStatus), default=StyleStatus.DRAFT)
    checkpoint_path: Mapped[str] = mapped_column(sa.String(1024))  # absolute, or relative to data_dir
    content_hash: Mapped[str | None] = mapped_column(sa.String(64))
    lineage: Mapped[list[Any]] = mapped_column(default=list)  # content hashes, oldest ancestor first
    default_blend: Mapped[dict[str, Any]] = mapped_column(default=dict)  # BlendSpec.to_json()
    created_by: Mapped[int | None] = mapped_column(_fk("users.id", "SET NULL"), index=True)
    created_at: Mapped[datetime] = _created_at()

    blends: Mapped[list[Blend]] = relationship(
        back_populates="style", cascade="all, delete-orphan", passive_deletes=True
    )


class Blend(Base):
    __tablename__ = "blends"

    id: Mapped[int] = mapped_column(primary_key=True)
    style_id: Mapped[int] = mapped_column(_fk("style_models.id", "CASCADE"), index=True)
    community_id: Mapped[int | None] = mapped_column(_fk("communities.id", "CASCADE"), index=True)
    spec: Mapped[dict[str, Any]]  # BlendSpec.to_json()
    label: Mapped[str] = mapped_column(sa.String(64), default="")
    is_default: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[int | None] = mapped_column(_fk("users.id", "SET NULL"), index=True)
    created_at: Mapped[datetime] = _created_at()

    style: Mapped[StyleModel] = relationship(back_populates="blends")


class Poll(Base):
    __tablename__ = "polls"

    id: Mapped[int] = mapped_column(primary_key=True)
    community_id: Mapped[int] = mapped_column(_fk("communities.id", "CASCADE"), index=True)
    style_id: Mapped[int] = mapped_column(_fk("style_models.id", "CASCADE"), index=True)
    status: Mapped[PollStatus] = mapped_column(str_enum(PollStatus), default=PollStatus.OPEN)
    created_by: Mapped[int | None] = mapped_column(_fk("users.id", "SET NULL"), index=True)
    closes_at: Mapped[datetime]
    winner_blend_id: Mapped[int | None] = mapped_column(_fk("blends.id", "SET NULL"), index=True)
    platform_message_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = _created_at()

    options: Mapped[list[PollOption]] = relationship(
        back_populates="poll", cascade="all, delete-orphan", passive_deletes=True, order_by="PollOption.position"
    )


class PollOption(Base):
    __tablename__ = "poll_options"
    __table_args__ = (sa.UniqueConstraint("poll_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    poll_id: Mapped[int] = mapped_column(_fk("polls.id", "CASCADE"))
    blend_id: Mapped[int] = mapped_column(_fk("blends.id", "CASCADE"), index=True)
    position: Mapped[int]
    # A snapshot poll's option: the fine-tune snapshot (a generator file) rendered at the blend; None: a blend poll
    checkpoint_path: Mapped[str | None] = mapped_column(sa.String(1024))

    poll: Mapped[Poll] = relationship(back_populates="options")
    blend: Mapped[Blend] = relationship()


class Vote(Base):
    """One vote per member per poll; changing it updates option_id in place."""

    __tablename__ = "votes"
    __table_args__ = (sa.UniqueConstraint("poll_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    poll_id: Mapped[int] = mapped_column(_fk("polls.id", "CASCADE"))
    user_id: Mapped[int] = mapped_column(_fk("users.id", "CASCADE"), index=True)
    option_id: Mapped[int] = mapped_column(_fk("poll_options.id", "CASCADE"), index=True)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Job(Base):
    """The truth about a queued piece of work (arq is at-least-once; this row decides what already happened)."""

    __tablename__ = "jobs"
    __table_args__ = (sa.Index(None, "status"), sa.Index(None, "user_id", "status"))

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_job_id)
    key: Mapped[str] = mapped_column(sa.String(128), unique=True)  # idempotency key
    kind: Mapped[JobKind] = mapped_column(str_enum(JobKind))
    status: Mapped[JobStatus] = mapped_column(str_enum(JobStatus), default=JobStatus.QUEUED)
    user_id: Mapped[int] = mapped_column(_fk("users.id", "CASCADE"))
    community_id: Mapped[int | None] = mapped_column(_fk("communities.id", "SET NULL"), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    progress: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(sa.Text)
    input_blob_id: Mapped[int | None] = mapped_column(_fk("blobs.id", "SET NULL"), index=True)
    result: Mapped[dict[str, Any] | None]  # e.g. {"composite": sha, "crops": [sha, ...]}
    worker_id: Mapped[str | None] = mapped_column(sa.String(128))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]


class Student(Base):
    """A style's instant network for one blend: an image-to-image student distilled from its base and blended
    toon generators (gan.distill). ``blend_key`` is the spec's canonical JSON, so one row per style and blend;
    ``base_hash``/``toon_hash`` are the lineage the file was trained for (a style whose checkpoint changed
    no longer matches it, and the worker refuses to use it)."""

    __tablename__ = "students"
    __table_args__ = (sa.UniqueConstraint("style_id", "blend_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    style_id: Mapped[int] = mapped_column(_fk("style_models.id", "CASCADE"))
    blend: Mapped[dict[str, Any]]  # BlendSpec.to_json()
    blend_key: Mapped[str] = mapped_column(sa.String(1024))
    path: Mapped[str] = mapped_column(sa.String(1024))  # absolute, or relative to data_dir
    content_hash: Mapped[str | None] = mapped_column(sa.String(64))
    base_hash: Mapped[str] = mapped_column(sa.String(64))
    toon_hash: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), default="ready")
    job_id: Mapped[str | None] = mapped_column(_fk("jobs.id", "SET NULL"), index=True)  # None: from the manifest
    created_at: Mapped[datetime] = _created_at()


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    community_id: Mapped[int] = mapped_column(_fk("communities.id", "CASCADE"), index=True)
    created_by: Mapped[int | None] = mapped_column(_fk("users.id", "SET NULL"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    blob_id: Mapped[int | None] = mapped_column(_fk("blobs.id", "SET NULL"), index=True)
    image_count: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = _created_at()


class CachedLatent(Base):
    """Projected latents of one selfie under one base model, so a re-blend skips projection."""

    __tablename__ = "cached_latents"
    __table_args__ = (sa.UniqueConstraint("user_id", "image_sha256", "base_hash", "mode"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(_fk("users.id", "CASCADE"))
    image_sha256: Mapped[str] = mapped_column(sa.String(64))
    base_hash: Mapped[str] = mapped_column(sa.String(64))
    mode: Mapped[str] = mapped_column(sa.String(16))
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)  # safetensors bytes of the [F, num_ws, w_dim] latents
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime | None] = mapped_column(index=True)


class Delivery(Base):
    """Where one request's result goes (a chat, its progress message), and which bot process carries it now.

    The lease (``lease_owner`` until ``lease_until``) is renewed by its holder while it runs; a delivery whose
    lease lapsed (its process died) or was released (its process stopped) is taken over by another bot process
    of the same platform. ``finished_at`` is set once the progress message shows its final state."""

    __tablename__ = "deliveries"
    __table_args__ = (sa.Index(None, "platform", "finished_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(_fk("jobs.id", "CASCADE"), index=True)
    platform: Mapped[Platform] = mapped_column(str_enum(Platform))
    chat_id: Mapped[str] = mapped_column(sa.String(64))  # Telegram chat, Discord channel
    progress_message_id: Mapped[str] = mapped_column(sa.String(64))
    reply_to: Mapped[str | None] = mapped_column(sa.String(64))  # the command's message, where there is one
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)  # platform details (topic, user to mention, …)
    locale: Mapped[str] = mapped_column(sa.String(16), default="en")
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))
    lease_until: Mapped[datetime | None]
    failures: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None]

    items: Mapped[list[DeliveryItem]] = relationship(
        back_populates="delivery", cascade="all, delete-orphan", passive_deletes=True, order_by="DeliveryItem.position"
    )


class DeliveryItem(Base):
    """One photo of a result (0: the composite, 1…: the face crops); ``sent_at`` only once the platform confirmed."""

    __tablename__ = "delivery_items"
    __table_args__ = (sa.UniqueConstraint("delivery_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(_fk("deliveries.id", "CASCADE"))
    position: Mapped[int]
    name: Mapped[str] = mapped_column(sa.String(64))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    sent_at: Mapped[datetime | None]

    delivery: Mapped[Delivery] = relationship(back_populates="items")
