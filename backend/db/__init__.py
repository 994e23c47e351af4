"""Engines, sessions and schema migrations for the SQL store (SQLite by default, PostgreSQL in production).

The schema is owned by Alembic (`migrations/` at the repository root); `upgrade()` runs it programmatically so
the service, the worker and tests bring a database to the current revision the same way. The migration helpers
are synchronous and start their own event loop: call them before the service's loop starts, or through
`asyncio.to_thread` from inside it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


def async_url(url: str | URL) -> URL:
    """The URL with its async driver filled in (`postgresql://` → asyncpg, `sqlite://` → aiosqlite)."""
    u = make_url(url)
    if "+" not in u.drivername:
        if u.drivername not in _ASYNC_DRIVERS:
            raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}")
        u = u.set(drivername=_ASYNC_DRIVERS[u.drivername])
    return u


def _sqlite_file(u: URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory / URI-style databases."""
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`. For SQLite: creates the file's directory and sets on every connection WAL
    (readers never block the writer), a busy timeout (writers wait instead of failing at once) and
    `foreign_keys=ON` (SQLite ignores ON DELETE otherwise; migrations turn it off, see migrations/env.py).

    Extra keyword arguments go to `create_async_engine` (e.g. `poolclass=NullPool`).
    """
    u = async_url(url)
    if u.get_backend_name() != "sqlite":
        return create_async_engine(u, **kwargs)

    path = _sqlite_file(u)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(u, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if path is not None:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}")
        cursor.close()

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no surprise lazy loads in async code)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | URL) -> Config:
    """An Alembic Config for this repository's migrations, targeting `url` (passed as an attribute, so
    nothing is read from alembic.ini or the environment)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = async_url(url).render_as_string(hide_password=False)
    return cfg


def _outside_event_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what}() runs its own event loop: call it before the loop starts or via asyncio.to_thread")


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (synchronous; runs its own event loop)."""
    _outside_event_loop("upgrade")
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" empties it; synchronous)."""
    _outside_event_loop("downgrade")
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest revision in the migrations directory."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | URL) -> str | None:
    """The revision the database at `url` is at (None: never migrated). Synchronous; runs its own loop."""
    _outside_event_loop("current_revision")

    async def read() -> str | None:
        engine = make_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
        finally:
            await engine.dispose()

    return asyncio.run(read())
