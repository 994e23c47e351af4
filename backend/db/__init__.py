"""Engines, sessions and schema migrations for the SQL store (SQLite by default, PostgreSQL in production).

The schema is owned by Alembic (`migrations/` at the repository root); `upgrade()` runs it programmatically so
the service, the worker and tests bring a database to the current revision the same way. The migration helpers
are synchronous and start their own event loop: call them before the service's loop starts, or through
`asyncio.to_thread` from inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from backend.errors import UnavailableError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000  # when no statement timeout is given
DEFAULT_CONNECT_TIMEOUT_S = 5.0

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


def async_url(url: str | URL) -> URL:
    """The URL with its async driver filled in (`postgresql://` → asyncpg, `sqlite://` → aiosqlite)."""
    u = make_url(url)
    if "+" not in u.drivername:
        if u.drivername not in _ASYNC_DRIVERS:
            raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}")
        u = u.set(drivername=_ASYNC_DRIVERS[u.drivername])
    return u


def describe_url(url: str | URL) -> str:
    """The database URL for messages: no driver suffix, no password (``postgresql://user@host:5432/db``)."""
    u = make_url(url)
    u = u._replace(drivername=u.get_backend_name(), password=None, query={})  # a query may carry secrets too
    return u.render_as_string(hide_password=False)


def _sqlite_file(u: URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory / URI-style databases."""
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory":
        return None
    return Path(db)


def _reason(error: BaseException, timeout_s: float | None) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout_s:g} s" if timeout_s else "no answer in time"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0][:200] if text and text[0] else type(error).__name__


def make_engine(
    url: str | URL,
    *,
    sqlite_foreign_keys: bool = True,
    connect_timeout_s: float | None = DEFAULT_CONNECT_TIMEOUT_S,
    statement_timeout_s: float | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An async engine for `url` that fails fast and says so: a connection not made within `connect_timeout_s`,
    a statement (or COMMIT) not answered within `statement_timeout_s` (None: no limit), a refused or lost
    connection all raise :class:`~backend.errors.UnavailableError` naming the database (never its password).

    For SQLite it also creates the file's directory and sets on every connection WAL (readers never block the
    writer), a busy timeout (writers wait up to `statement_timeout_s` for a lock instead of failing at once),
    `secure_delete` (deleted rows are overwritten, not left readable in free pages) and `foreign_keys=ON`
    (SQLite ignores ON DELETE otherwise; migrations turn it off, see migrations/env.py).

    Extra keyword arguments go to `create_async_engine` (e.g. `poolclass=NullPool`).
    """
    u = async_url(url)
    shown = describe_url(u)
    sqlite = u.get_backend_name() == "sqlite"
    connect_args = dict(kwargs.pop("connect_args", {}))
    if sqlite:
        path = _sqlite_file(u)
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        busy_ms = SQLITE_BUSY_TIMEOUT_MS if statement_timeout_s is None else round(statement_timeout_s * 1000)
    else:
        connect_args.setdefault("timeout", connect_timeout_s)
        connect_args.setdefault("command_timeout", statement_timeout_s)
    engine = create_async_engine(u, connect_args=connect_args, **kwargs)

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: tuple, cparams: dict) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, TimeoutError, dialect.loaded_dbapi.Error) as e:
            raise UnavailableError(
                "database", f"the database at {shown} is unreachable: {_reason(e, connect_timeout_s)}"
            ) from e

    @event.listens_for(engine.sync_engine, "handle_error")
    def _lost(ctx: Any) -> None:
        error = ctx.original_exception
        if isinstance(error, UnavailableError) or not isinstance(error, Exception):
            return  # a task cancelled mid-statement (CancelledError, a BaseException) must stay a cancellation
        if isinstance(error, OSError | TimeoutError) or ctx.is_disconnect:
            raise UnavailableError(
                "database", f"the database at {shown} stopped answering: {_reason(error, statement_timeout_s)}"
            ) from error
        if sqlite and "database is locked" in str(error):
            raise UnavailableError(
                "database", f"the database at {shown} stayed locked by another writer for {busy_ms / 1000:g} s"
            ) from error

    if not sqlite:

        @event.listens_for(engine.sync_engine, "checkout")
        def _ping(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            # SQLAlchemy's pool_pre_ping would let a ping timeout escape as a bare TimeoutError: ping here, and
            # have the pool replace a connection that fails (connecting anew goes through _connect above).
            try:
                dbapi_connection.ping()
            except (OSError, TimeoutError, engine.dialect.loaded_dbapi.Error) as e:
                raise DisconnectionError(f"ping failed: {_reason(e, statement_timeout_s)}") from e

    if sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            if path is not None:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}")
            cursor.close()

    return engine


async def ping(engine: AsyncEngine) -> None:
    """Run ``SELECT 1``: raises UnavailableError (naming the database) when it cannot be reached."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


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
    """Migrate the database at `url` up to `revision` (synchronous; runs its own event loop).

    Processes that start together (a bot and a worker on a fresh SQLite file) migrate one after the other: a
    SQLite file is locked with a sidecar lock file for the whole upgrade, PostgreSQL takes an advisory lock in
    the migration's transaction (migrations/env.py). The second one then finds the database at head."""
    _outside_event_loop("upgrade")
    with _sqlite_migration_lock(url):
        command.upgrade(alembic_config(url), revision)


@contextlib.contextmanager
def _sqlite_migration_lock(url: str | URL) -> Iterator[None]:
    u = make_url(url) if isinstance(url, str) else url
    path = u.database if u.get_backend_name() == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".migrate.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
