"""The shared state of a backend process: settings, SQL engine and sessions, blob store, Redis, quotas.

Both the service (in bot processes) and the worker open one :class:`Runtime`; ``open_runtime`` upgrades the
database to the newest migration first, so a fresh data directory is usable at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.blobs import BlobStore
from backend.config import Settings
from backend.db import make_engine, make_sessionmaker, upgrade
from backend.quotas import Quotas
from backend.redis import RedisHandle, connect
from gan.styles import DEMO_DIR

QUEUE_NAMES = {"toon": "toonify:queue:toon", "finetune": "toonify:queue:finetune"}


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    blobs: BlobStore
    redis: RedisHandle
    quotas: Quotas

    @property
    def pool(self):  # the arq pool (an ArqRedis, a redis.asyncio.Redis subclass)
        return self.redis.pool

    @property
    def models_dir(self) -> Path:
        return self.settings.models_dir or DEMO_DIR

    async def close(self) -> None:
        await self.redis.close()
        await self.engine.dispose()


async def open_runtime(settings: Settings, *, migrate: bool = True, redis: RedisHandle | None = None) -> Runtime:
    """Open every connection ``settings`` names (starting an embedded Redis when it names none)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        await asyncio.to_thread(upgrade, settings.database_url)
    engine = make_engine(settings.database_url)
    handle = redis or await connect(settings.redis_url, settings.data_dir)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        blobs=BlobStore(settings.blobs_dir, settings.max_upload_bytes),
        redis=handle,
        quotas=Quotas(handle.pool, settings.quotas),
    )
