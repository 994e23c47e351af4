"""Service settings: read once from the environment, with defaults that run on one machine with no services.

Every value has an embedded default so `toonify` works out of the box (SQLite under the data directory, an
embedded Redis). A malformed variable fails loudly at start-up, naming the variable, instead of surfacing later
as an odd error deep inside a job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

T = TypeVar("T")

MiB = 1024 * 1024


@dataclass(frozen=True)
class QuotaSettings:
    """Admission limits enforced in Redis (see backend.quotas)."""

    user_active: int = 2  # queued + running jobs per user
    user_daily: int = 50  # jobs per user per UTC day
    community_daily: int = 1000  # jobs per community per UTC day
    max_queue: int = 200  # jobs waiting in the whole system


@dataclass(frozen=True)
class Settings:
    """Everything the service, the workers and the bots need to find their state and limits."""

    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file under data_dir (filled in by __post_init__)
    redis_url: str | None = None  # None: start an embedded Redis under data_dir
    device: str | None = None  # None: cuda when available, else cpu
    selfie_retention_s: int = 86400
    result_retention_s: int = 7 * 86400
    max_upload_bytes: int = 20 * MiB
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    job_timeout_s: int = 600
    toon_max_jobs: int = 8
    finetune_max_jobs: int = 1
    models_dir: Path | None = None  # None: the models bundled with the package
    worker_heartbeat_ttl_s: int = 10  # a worker silent this long is dead: its running jobs go back to the queue
    metrics_port: int | None = None  # Prometheus /metrics on this port (workers and bots); None: off
    shutdown_grace_s: int = 30  # on SIGTERM, workers and bots let running work finish for this long
    redis_retry_s: int = 60  # a worker keeps reconnecting to a lost Redis this long, then exits non-zero
    delivery_lease_s: float = 60.0  # a dead bot process's unfinished deliveries are taken over after this long
    db_connect_timeout_s: float = 5.0  # a database connection not made in this time: UnavailableError
    db_statement_timeout_s: float = 10.0  # a statement unanswered this long (SQLite: a lock held): UnavailableError
    distill_kimg: float = 60.0  # length of the instant-model trainings the service queues (gan.distill's default)
    finetune_steps: int = 400  # batches of a /finetune (backend.finetune.BATCH images each)
    finetune_snapshot_every: int = 50  # batches between a fine-tune's snapshots (preview, metrics, generator)

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", default_database_url(self.data_dir))

    @property
    def blobs_dir(self) -> Path:
        """Where the content-addressed blob files live."""
        return self.data_dir / "blobs"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables; unset or empty variables take the default.

        Raises ValueError naming the variable when a value cannot be parsed or is out of range.
        """
        env = os.environ if environ is None else environ
        data_dir = Path(_get(env, "TOONIFY_DATA_DIR", str, "data")).expanduser().absolute()
        models_dir = _get(env, "TOONIFY_MODELS_DIR", str, None)
        return cls(
            data_dir=data_dir,
            database_url=_get(env, "DATABASE_URL", _database_url, "") or default_database_url(data_dir),
            redis_url=_get(env, "REDIS_URL", _redis_url, None),
            device=_get(env, "TOONIFY_DEVICE", str, None),
            selfie_retention_s=_get(env, "TOONIFY_SELFIE_RETENTION_S", _positive_int, 86400),
            result_retention_s=_get(env, "TOONIFY_RESULT_RETENTION_S", _positive_int, 7 * 86400),
            max_upload_bytes=_get(env, "TOONIFY_MAX_UPLOAD_BYTES", _positive_int, 20 * MiB),
            quotas=QuotaSettings(
                user_active=_get(env, "TOONIFY_QUOTA_USER_ACTIVE", _positive_int, 2),
                user_daily=_get(env, "TOONIFY_QUOTA_USER_DAILY", _positive_int, 50),
                community_daily=_get(env, "TOONIFY_QUOTA_COMMUNITY_DAILY", _positive_int, 1000),
                max_queue=_get(env, "TOONIFY_QUOTA_MAX_QUEUE", _positive_int, 200),
            ),
            job_timeout_s=_get(env, "TOONIFY_JOB_TIMEOUT_S", _positive_int, 600),
            toon_max_jobs=_get(env, "TOONIFY_TOON_MAX_JOBS", _positive_int, 8),
            finetune_max_jobs=_get(env, "TOONIFY_FINETUNE_MAX_JOBS", _positive_int, 1),
            models_dir=Path(models_dir).expanduser().absolute() if models_dir else None,
            worker_heartbeat_ttl_s=_get(env, "TOONIFY_WORKER_HEARTBEAT_TTL_S", _positive_int, 10),
            metrics_port=_get(env, "TOONIFY_METRICS_PORT", _port, None),
            shutdown_grace_s=_get(env, "TOONIFY_SHUTDOWN_GRACE_S", _non_negative_int, 30),
            redis_retry_s=_get(env, "TOONIFY_REDIS_RETRY_S", _positive_int, 60),
            delivery_lease_s=_get(env, "TOONIFY_DELIVERY_LEASE_S", _positive_float, 60.0),
            db_connect_timeout_s=_get(env, "TOONIFY_DB_CONNECT_TIMEOUT_S", _positive_float, 5.0),
            db_statement_timeout_s=_get(env, "TOONIFY_DB_STATEMENT_TIMEOUT_S", _positive_float, 10.0),
            distill_kimg=_get(env, "TOONIFY_DISTILL_KIMG", _positive_kimg, 60.0),
            finetune_steps=_get(env, "TOONIFY_FINETUNE_STEPS", _positive_int, 400),
            finetune_snapshot_every=_get(env, "TOONIFY_FINETUNE_SNAPSHOT_EVERY", _positive_int, 50),
        )


def default_database_url(data_dir: Path) -> str:
    """The embedded default: one SQLite file in the data directory."""
    return f"sqlite+aiosqlite:///{Path(data_dir) / 'toonify.db'}"


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is invalid: {e}") from None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _positive_kimg(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number of thousands of images")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0 picks a free one)")
    return value


def _database_url(raw: str) -> str:
    try:
        url = make_url(raw)
    except ArgumentError as e:
        raise ValueError(str(e)) from None
    if url.get_backend_name() not in ("sqlite", "postgresql", "postgres"):
        raise ValueError("only sqlite and postgresql databases are supported")
    return raw


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw
