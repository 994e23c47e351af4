"""Forgetting a person on SQLite leaves no trace of them in the database file or its write-ahead log."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.service import Actor, Place, ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut

PERSON = Actor(platform="telegram", user_id="918273645546372819", name="Quokka Zanzibar-Fernsby")
PLACE = Place(platform="telegram", community_id="-100777", name="privacy club")


def raw_bytes(db_file: Path) -> dict[str, bytes]:
    """The database file and its -wal as stored on disk (what a copy of the data directory would hold)."""
    return {p.name: p.read_bytes() for p in (db_file, db_file.with_name(db_file.name + "-wal")) if p.exists()}


def traces(files: dict[str, bytes], needles: list[str]) -> list[tuple[str, str]]:
    return [(name, n) for name, data in files.items() for n in needles if n.encode() in data]


@pytest.mark.asyncio
async def test_forget_leaves_no_trace_in_the_sqlite_file_or_wal(tmp_path, redis_url, redis):  # noqa: F811
    settings = Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url})
    db_file = Path(make_url(settings.database_url).database)
    svc = await ToonService.open(settings)
    try:
        tickets = [await svc.submit_toon(PERSON, PLACE, astronaut(v), mode="fast") for v in (0, 1)]
        await svc.set_style(PERSON, PLACE, "demo")  # a preference row update: one more version of the user row
        needles = [PERSON.name, PERSON.user_id, *(t.job_id for t in tickets)]
        before = raw_bytes(db_file)
        assert {n for _, n in traces(before, needles)} == set(needles)  # the check can see them

        report = await svc.forget_user(PERSON)
        assert report.jobs == 2

        async with svc.rt.engine.connect() as conn:  # on for every connection (many builds default to off)
            assert (await conn.exec_driver_sql("PRAGMA secure_delete")).scalar() == 1
        after = raw_bytes(db_file)
        assert traces(after, needles) == []
        assert len(after.get(db_file.name + "-wal", b"")) == 0  # checkpointed and truncated
    finally:
        await svc.close()
