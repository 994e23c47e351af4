"""The model manifest under a running service: a style added or removed by another process shows up on the next
request; a manifest an operator breaks mid-edit does not take the styles away (the last good one serves, and
``toonify health --models`` names the broken field); fixing it takes effect at once."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.errors import BadInputError, NotFoundError, UnavailableError
from backend.health import check_models
from backend.service import ToonService
from gan.styles import DEMO_DIR, update_manifest
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, events_until_done, running_worker
from tests.backend.test_unavailable import _HOLD_SQLITE_LOCK


@pytest.fixture
def models(tmp_path):
    out = tmp_path / "models"
    shutil.copytree(DEMO_DIR, out)
    return out


@pytest_asyncio.fixture
async def service(tmp_path, models, redis_url, redis):  # noqa: F811
    settings = Settings.from_env(
        {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url, "TOONIFY_MODELS_DIR": str(models)}
    )
    svc = await ToonService.open(settings)
    try:
        yield svc
    finally:
        await svc.close()


def names(styles) -> set[str]:
    return {s.name for s in styles}


@pytest.mark.asyncio
async def test_styles_follow_the_manifest_and_survive_a_broken_edit(service, models):
    assert names(await service.list_styles()) == {"demo"}

    # Another process lists a second style (same models, another default blend): no restart needed.
    def add_copy(data):
        data["styles"]["demo8"] = {**data["styles"]["demo"], "blend": {"mode": "swap", "resolution": 8}}
        data["styles"]["demo8"].pop("students", None)

    update_manifest(models, add_copy)
    assert names(await service.list_styles()) == {"demo", "demo8"}
    info = await service.set_style(actor(1), None, "demo8")
    assert info.name == "demo8" and info.default_blend["resolution"] == 8

    # An operator breaks the file by hand: the running service keeps the styles it had, and health says why.
    manifest = models / "manifest.json"
    good = manifest.read_text()
    broken = json.loads(good)
    broken["styles"]["demo8"]["blend"]["resolution"] = 33
    manifest.write_text(json.dumps(broken))
    assert names(await service.list_styles()) == {"demo", "demo8"}
    check = check_models(service.rt.settings)
    assert not check.ok and "styles.demo8.blend.resolution" in check.detail
    async with running_worker(service):
        ticket = await service.submit_toon(actor(1), None, astronaut(), mode="fast")
        events = await events_until_done(service, ticket.job_id)
    assert events[-1].status == "done", events[-1]
    assert (await service.result(ticket.job_id)).style == "demo8"

    # A style whose entry lists no encoder: fast mode is refused up front, naming the way out.
    manifest.write_text(good)
    update_manifest(models, lambda data: data["styles"]["demo8"].update(encoder=None))
    with pytest.raises(BadInputError, match="no encoder yet, so fast mode is not available"):
        await service.submit_toon(actor(1), None, astronaut(3), style="demo8", mode="fast")

    # Fixed, then the style removed: it is archived, and asking for it says so.
    manifest.write_text(good)
    update_manifest(models, lambda data: data["styles"].pop("demo8"))
    assert names(await service.list_styles()) == {"demo"}
    with pytest.raises(NotFoundError, match="no style called 'demo8'"):
        await service.set_style(actor(1), None, "demo8")
    # A preference for the removed style falls back to the default instead of failing the next toon.
    async with running_worker(service):
        ticket = await service.submit_toon(actor(1), None, astronaut(1), mode="fast")
        events = await events_until_done(service, ticket.job_id)
    assert events[-1].status == "done" and (await service.result(ticket.job_id)).style == "demo"


@pytest.mark.asyncio
async def test_a_locked_database_during_the_resync_is_named_then_synced(tmp_path, models, redis_url, redis):  # noqa: F811
    """Another process holds SQLite's write lock when a manifest change needs syncing: the request fails within
    the statement timeout with the usual message naming the database (no hang, no raw driver error), and the
    first request after the lock is gone makes the new style visible."""
    settings = Settings.from_env(
        {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url, "TOONIFY_MODELS_DIR": str(models),
         "TOONIFY_DB_STATEMENT_TIMEOUT_S": "1"}
    )  # fmt: skip
    svc = await ToonService.open(settings)
    holder = None
    try:
        update_manifest(models, lambda d: d["styles"].update(demo8={**d["styles"]["demo"], "students": []}))
        db_file = make_url(settings.database_url).database
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_SQLITE_LOCK, db_file], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
        with pytest.raises(UnavailableError, match="locked by another writer"):
            await asyncio.wait_for(svc.set_style(actor(1), None, "demo8"), 60)
        holder.communicate("\n", timeout=30)
        holder = None
        assert (await svc.set_style(actor(1), None, "demo8")).name == "demo8"
    finally:
        if holder is not None:
            holder.communicate("\n", timeout=30)
        await svc.close()
