"""Alembic migrations on real SQLite and PostgreSQL: they run both ways and build exactly the models' schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from backend.db import current_revision, downgrade, head_revision, make_engine, upgrade
from backend.db.models import Base

REPO = Path(__file__).resolve().parents[2]
APP_TABLES = set(Base.metadata.tables)


async def _inspect(url: str, fn):
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def table_names(url: str) -> set[str]:
    return asyncio.run(_inspect(url, lambda c: set(sa.inspect(c).get_table_names())))


def schema_diff(url: str) -> list:
    """What autogenerate would put in a new revision (empty when migrations and models agree)."""

    def compare(conn: sa.Connection) -> list:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)

    return asyncio.run(_inspect(url, compare))


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    head = head_revision()
    assert head is not None and current_revision(db_url) == head
    assert table_names(db_url) == APP_TABLES | {"alembic_version"}

    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert table_names(db_url) <= {"alembic_version"}

    upgrade(db_url, "head")
    assert current_revision(db_url) == head
    upgrade(db_url)  # already at head: nothing to do
    assert table_names(db_url) == APP_TABLES | {"alembic_version"}


def test_models_and_migrations_agree(db_url: str) -> None:
    upgrade(db_url)
    assert schema_diff(db_url) == []


def test_diff_would_notice_a_missing_table(db_url: str) -> None:
    """The agreement check above is not vacuous: drop one table and autogenerate sees it."""
    upgrade(db_url)

    async def drop(url: str) -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP TABLE votes")
        await engine.dispose()

    asyncio.run(drop(db_url))
    diff = schema_diff(db_url)
    assert any(d[0] == "add_table" and d[1].name == "votes" for d in diff), diff


def test_upgrade_refuses_to_run_inside_an_event_loop(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"

    async def inside() -> None:
        upgrade(db_url)

    with pytest.raises(RuntimeError, match="to_thread"):
        asyncio.run(inside())
    assert current_revision(db_url) is None


@pytest.mark.asyncio
async def test_upgrade_from_a_running_service_goes_through_a_thread(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
    await asyncio.to_thread(upgrade, db_url)
    assert await asyncio.to_thread(current_revision, db_url) == head_revision()


def test_alembic_ini_migrates_the_configured_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`alembic upgrade head` from the repository root uses the service's settings (DATABASE_URL here)."""
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", db_url)
    cfg = Config(str(REPO / "alembic.ini"))
    cfg.attributes["configure_logging"] = False  # keep pytest's logging as it is
    command.upgrade(cfg, "head")
    assert current_revision(db_url) == head_revision()
