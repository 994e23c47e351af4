"""The shared state of a backend process: settings, SQL engine and sessions, blob store, Redis, quotas.

Both the service (in bot processes) and the worker open one :class:`Runtime`; ``open_runtime`` checks that the
database and Redis answer (raising :class:`~backend.errors.UnavailableError` naming the one that does not), then
upgrades the database to the newest migration, so a fresh data directory is usable at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend import keys
from backend.blobs import BlobStore
from backend.config import Settings
from backend.db import make_engine, make_sessionmaker, ping, upgrade
from backend.errors import UnavailableError
from backend.quotas import Quotas
from backend.redis import REDIS_DOWN, EmbeddedRedisError, RedisHandle, connect
from gan.styles import DEMO_DIR

QUEUE_NAMES = keys.QUEUE_NAMES  # kept importable from here


def describe_redis(url: str | None) -> str:
    """The Redis URL for messages: no password (``redis://host:6379/0``)."""
    if url is None:
        return "the embedded Redis"
    scheme, _, rest = url.partition("://")
    return f"Redis at {scheme}://{rest.rpartition('@')[2]}"


def redis_unavailable(url: str | None, error: BaseException) -> UnavailableError:
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return UnavailableError("redis", f"{describe_redis(url)} is unreachable: {reason}")


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    blobs: BlobStore
    redis: RedisHandle
    quotas: Quotas
    synced_manifest: object | None = None  # the model manifest the styles table was last synced from

    @property
    def pool(self):  # the arq pool (an ArqRedis, a redis.asyncio.Redis subclass)
        return self.redis.pool

    @property
    def models_dir(self) -> Path:
        return self.settings.models_dir or DEMO_DIR

    def redis_unavailable(self, error: BaseException) -> UnavailableError:
        """The UnavailableError for a Redis failure of this runtime."""
        return redis_unavailable(self.settings.redis_url or self.redis.url, error)

    async def close(self) -> None:
        await self.redis.close()
        await self.engine.dispose()


def open_engine(settings: Settings) -> AsyncEngine:
    """The engine ``settings`` describe, with their connect and statement timeouts."""
    return make_engine(
        settings.database_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )


async def open_runtime(settings: Settings, *, migrate: bool = True, redis: RedisHandle | None = None) -> Runtime:
    """Open every connection ``settings`` names (starting an embedded Redis when it names none).

    Raises UnavailableError, naming the database or Redis, when one cannot be reached."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = open_engine(settings)
    try:
        await ping(engine)  # fail here, within the connect timeout, rather than inside a migration
        if migrate:
            await asyncio.to_thread(upgrade, settings.database_url)
        try:
            handle = redis or await connect(settings.redis_url, settings.data_dir)
        except (*REDIS_DOWN, EmbeddedRedisError) as e:
            raise redis_unavailable(settings.redis_url, e) from e
    except BaseException:
        await engine.dispose()
        raise
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        blobs=BlobStore(settings.blobs_dir, settings.max_upload_bytes),
        redis=handle,
        quotas=Quotas(handle.pool, settings.quotas),
    )
