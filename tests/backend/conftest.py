"""SQL and settings fixtures for backend tests: real SQLite always, real PostgreSQL when one answers.

`db_url` is parametrised over both engines. PostgreSQL is DATABASE_URL when that is a postgresql URL, else
postgres@127.0.0.1:5432/test; when it does not answer, the postgresql cases are skipped. Each test session
creates its own scratch database on that server (dropped at the end), and each test starts from an empty
`public` schema, so tests never see each other's rows, nor those of other test runs on the same server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from backend.config import Settings
from backend.db import async_url, make_engine, make_sessionmaker
from backend.db.models import Base

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def postgres_server_url() -> URL:
    """Where to look for PostgreSQL: DATABASE_URL if it names one, else the default test server."""
    env = os.environ.get("DATABASE_URL", "").strip()
    if env and make_url(env).get_backend_name() == "postgresql":
        return async_url(env)
    return make_url(DEFAULT_PG_URL)


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_execute(url: URL, *statements: str, timeout: float = 5.0) -> None:
    conn = await asyncpg.connect(_dsn(url), timeout=timeout)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[URL | None]:
    """A scratch database for this test session, or None when no PostgreSQL answers."""
    server = postgres_server_url()
    try:
        asyncio.run(_pg_execute(server, "SELECT 1", timeout=3.0))
    except (OSError, TimeoutError, asyncpg.PostgresError):
        yield None
        return
    name = f"toonify_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_execute(server, f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name)
    finally:
        asyncio.run(_pg_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def reset_postgres(url: URL) -> None:
    """Empty the scratch database: close stray connections, then drop and recreate the public schema."""
    asyncio.run(
        _pg_execute(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            "DROP SCHEMA IF EXISTS public CASCADE",
            "CREATE SCHEMA public",
        )
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database (no tables): a fresh SQLite file, or the reset PostgreSQL scratch database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'db' / 'toonify.db'}"
    url = request.getfixturevalue("postgres_database")
    if url is None:
        pytest.skip(f"no PostgreSQL at {postgres_server_url().render_as_string(hide_password=True)}")
    reset_postgres(url)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with the data directory (SQLite file, blobs) under the test's tmp dir."""
    return Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data")})


@pytest_asyncio.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on `db_url` with every table created from the models (migrations are tested separately)."""
    eng = make_engine(db_url)
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest_asyncio.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with make_sessionmaker(engine)() as s:
        yield s
