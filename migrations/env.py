"""Alembic environment: async engines (aiosqlite / asyncpg), batch mode so SQLite can alter tables.

The database URL comes, in order, from `config.attributes["database_url"]` (set by `backend.db.upgrade`),
`sqlalchemy.url` in alembic.ini (normally empty), or the service settings (`DATABASE_URL` / the SQLite default),
so `alembic upgrade head` from the repository root migrates the same database the service would use.
A caller may also hand over an open sync connection as `config.attributes["connection"]`.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from backend.config import Settings
from backend.db import async_url, make_engine
from backend.db.models import Base, UTCDateTime

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        url = Settings.from_env().database_url
    return async_url(url).render_as_string(hide_password=False)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write our UTCDateTime as the plain DateTime it is in the database, so revisions don't import models."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, sa.Enum):
        return f"sa.String(length={obj.length})"
    return False


CONFIGURE_OPTS: dict[str, Any] = {
    "target_metadata": target_metadata,
    "render_as_batch": True,
    "compare_type": True,
    "render_item": render_item,
    "user_module_prefix": "sa.",
}


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (`alembic upgrade head --sql`)."""
    context.configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **CONFIGURE_OPTS)
    with context.begin_transaction():
        context.run_migrations()


MIGRATION_LOCK_ID = 0x746F6F6E  # PostgreSQL advisory lock: processes starting together migrate one at a time


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, **CONFIGURE_OPTS)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":  # held until this transaction ends; the next one reads head
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def run_async_migrations() -> None:
    # foreign_keys OFF on SQLite: a batch-mode table rebuild drops and recreates a table, which with
    # enforcement on would cascade-delete every row that references it.
    engine = make_engine(database_url(), poolclass=NullPool, sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
