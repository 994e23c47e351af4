"""The latent space through the service and an in-process worker (real Redis, real SQLite, the demo models with
named directions): /edit from cached latents (and from an instant toon, projected first), /sweep of a toon and of
the probe faces, and a vote between a fine-tune's snapshots whose winner becomes the style's checkpoint."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import sqlalchemy as sa
from PIL import Image

from backend.config import Settings
from backend.db.models import CachedLatent, Job, JobKind, PollOption, Student, StyleModel
from backend.delivery import Address, DeliveryBook
from backend.errors import BadInputError, NotAllowedError, NotFoundError
from backend.jobs import EditParams, SweepParams, SweepResult, blend_key, params_from_json
from backend.service import Place, ToonService
from gan.checkpoints.native import native_metadata
from gan.styles import DEMO_DIR, read_manifest
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, events_until_done, running_worker
from tests.backend.student_fixtures import record_student, tiny_student  # noqa: F401
from tests.backend.test_finetune_job import dataset_zip

GUILD = Place(platform="discord", community_id="14", name="latent club")
DEMO_BLEND = read_manifest(DEMO_DIR).style("demo").blend
DIRECTION_NAMES = ("age", "smile")


def add_demo_directions(models: Path) -> Path:
    """GANSpace directions of the demo toon generator, two of them named, registered in ``models``' manifest."""
    from gan.checkpoints import load_generator
    from gan.editing import (
        DirectionSet,
        direction_scales,
        directions_meta,
        ganspace_directions,
        name_direction,
        register_directions,
        save_directions,
        style_directions_path,
    )

    G = load_generator(read_manifest(models).style("demo").toon)
    components, values = ganspace_directions(G, n_samples=2000, top_k=4)
    scales = direction_scales(G, components, n_samples=2000)
    path = style_directions_path("demo", models)
    save_directions(path, DirectionSet(components, scales, values, directions_meta(G, "ganspace", style="demo")))
    name_direction(path, 0, "smile", "coarse")
    name_direction(path, 1, "age", "middle")
    register_directions(models, "demo", path)
    return path


@pytest.fixture(scope="module")
def explore_models(tmp_path_factory) -> Path:
    """A copy of the demo models whose demo style has named directions."""
    out = tmp_path_factory.mktemp("explore_models")
    shutil.copytree(DEMO_DIR, out, dirs_exist_ok=True)
    add_demo_directions(out)
    return out


def settings(tmp_path: Path, url: str, models: Path | None, **env: str) -> Settings:
    base = {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": url, "TOONIFY_QUOTA_USER_ACTIVE": "50"}
    if models is not None:
        base["TOONIFY_MODELS_DIR"] = str(models)
    return Settings.from_env({**base, **env})


@pytest_asyncio.fixture
async def service(tmp_path, redis_url, redis, explore_models):  # noqa: F811
    svc = await ToonService.open(settings(tmp_path, redis_url, explore_models))
    try:
        yield svc
    finally:
        await svc.close()


async def finished(svc: ToonService, job_id: str, timeout_s: float = 240) -> list:
    events = await events_until_done(svc, job_id, timeout_s=timeout_s)
    assert events[-1].status == "done", events[-1]
    return events


async def latent_rows(svc: ToonService) -> list[CachedLatent]:
    async with svc.rt.sessions() as s:
        return list(await s.scalars(sa.select(CachedLatent)))


async def fake_student(svc: ToonService, style_id: int) -> int:
    """A ready student row for the style (its file is never read here)."""
    async with svc.rt.sessions() as s:
        row = Student(style_id=style_id, blend=DEMO_BLEND.to_json(), blend_key=blend_key(DEMO_BLEND), path="x",
                      base_hash="b", toon_hash="t")  # fmt: skip
        s.add(row)
        await s.commit()
        return row.id


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.asyncio
async def test_edit_reuses_the_cached_latents_and_edits_add_up(service):
    me = actor(1)
    async with running_worker(service):
        toon = await service.submit_toon(me, None, astronaut(81), mode="balanced")
        await finished(service, toon.job_id)
        (cached,) = await latent_rows(service)

        edit = await service.edit_last(me, None, "smile", 2)
        events = await finished(service, edit.job_id)
        stages = {e.stage for e in events if e.status == "running"}
        assert "edit" in stages and not stages & {"project", "reproject"}, stages
        assert [r.id for r in await latent_rows(service)] == [cached.id], "no new projection, nothing new cached"

        before, after = await service.result(toon.job_id), await service.result(edit.job_id)
        assert after.edits == (("smile", 2.0),) and (after.style, after.spec) == (before.style, before.spec)
        assert np.abs(pixels(after.crops[0]) - pixels(before.crops[0])).mean() > 1.0, "the face changed"
        assert pixels(after.composite).shape == pixels(before.composite).shape  # pasted back onto the selfie

        # A second /edit adds to the first; the same direction again replaces its strength.
        more = await service.edit_last(me, None, "age", -1.5)
        await finished(service, more.job_id)
        assert (await service.result(more.job_id)).edits == (("smile", 2.0), ("age", -1.5))
        again = await service.edit_last(me, None, "smile", 1)
        await finished(service, again.job_id)
        assert (await service.result(again.job_id)).edits == (("age", -1.5), ("smile", 1.0))
        async with service.rt.sessions() as s:
            row = await s.get(Job, again.job_id)
        p = params_from_json(row.kind, row.params)
        assert isinstance(p, EditParams) and p.source_job == more.job_id and p.mode == "balanced"

    with pytest.raises(BadInputError) as e:
        await service.edit_last(me, None, "frown", 1)
    assert "frown" in e.value.public_message and "age, smile" in e.value.public_message
    with pytest.raises(BadInputError, match="between -10 and 10"):
        await service.edit_last(me, None, "smile", 40)
    with pytest.raises(NotFoundError, match="no earlier toon"):
        await service.edit_last(actor(2), None, "smile", 1)
    assert (await service.directions(me, None)).names == list(DIRECTION_NAMES)


@pytest.mark.asyncio
async def test_an_instant_toon_is_projected_once_then_edited(service, tiny_student):  # noqa: F811
    await record_student(service, tiny_student, DEMO_BLEND)
    me = actor(3)
    async with running_worker(service):
        toon = await service.submit_toon(me, None, astronaut(82))  # no mode: instant, the style has a student
        await finished(service, toon.job_id)
        assert (await service.result(toon.job_id)).mode == "instant"
        assert await latent_rows(service) == [], "instant mode keeps no latents"

        edit = await service.edit_last(me, None, "smile", 2)
        events = await finished(service, edit.job_id)
        assert any(e.stage == "reproject" for e in events), [e.stage for e in events]
        (cached,) = await latent_rows(service)
        assert cached.mode == "balanced"

        again = await service.edit_last(me, None, "age", 1)
        events = await finished(service, again.job_id)
        assert not any(e.stage in ("project", "reproject") for e in events), "the latents kept the first time"
        assert (await service.result(again.job_id)).edits == (("smile", 2.0), ("age", 1.0))


@pytest.mark.asyncio
async def test_sweep_of_the_last_toon_and_of_probe_faces(service):
    me = actor(4)
    async with running_worker(service):
        probe = await service.sweep(actor(5), None)  # no toon yet: the probe faces
        await finished(service, probe.job_id)
        out = await service.sweep_result(probe.job_id)
        assert out.source == "probe" and out.faces == 4 and out.filename == "sweep.gif"
        assert out.levels == [4, 8, 16, 32, 64]  # 4 px up to the demo models' full resolution

        with Image.open(io.BytesIO(out.animation)) as gif:
            assert gif.format == "GIF" and gif.n_frames == len(out.levels)
            gif.seek(0)
            first = np.asarray(gif.convert("RGB"), dtype=np.int16)
            gif.seek(gif.n_frames - 1)
            last = np.asarray(gif.convert("RGB"), dtype=np.int16)
        assert np.abs(first - last).mean() > 1.0, "the blend changes from frame to frame"

        toon = await service.submit_toon(me, None, astronaut(83), mode="balanced")
        await finished(service, toon.job_id)
        edit = await service.edit_last(me, None, "smile", 2)
        await finished(service, edit.job_id)
        sweep = await service.sweep(me, None)
        events = await finished(service, sweep.job_id)
        assert not any(e.stage in ("project", "reproject") for e in events)
        result = SweepResult.from_json(events[-1].result)
        assert result.source == "toon" and result.faces == 1 and result.edits == (("smile", 2.0),)
        async with service.rt.sessions() as s:
            row = await s.get(Job, sweep.job_id)
        assert row.kind == JobKind.SWEEP and SweepParams.from_json(row.params).source_job == edit.job_id

        # A bot restarted halfway finds the animation as the one item of the sweep's delivery.
        book = DeliveryBook(service.rt)
        delivery = await book.open(sweep.job_id, Address("telegram", "1", "2"))
        (item,) = await book.items(delivery)
        assert (item.name, item.sha256) == ("sweep.gif", result.animation)


@pytest.mark.asyncio
async def test_a_style_without_directions_says_how_to_make_them(tmp_path, redis_url, redis):  # noqa: F811
    bare = tmp_path / "models"
    shutil.copytree(DEMO_DIR, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["styles"]["demo"].pop("directions", None)
    (bare / "manifest.json").write_text(json.dumps(manifest))
    (bare / "demo.directions.safetensors").unlink(missing_ok=True)
    svc = await ToonService.open(settings(tmp_path, redis_url, bare))
    try:
        me = actor(6)
        async with running_worker(svc):
            toon = await svc.submit_toon(me, None, astronaut(84), mode="fast")
            await finished(svc, toon.job_id)
        with pytest.raises(BadInputError, match=r"no named directions yet.*toonify directions demo --register"):
            await svc.edit_last(me, None, "smile", 1)
        assert (await svc.directions(me, None)).names == []
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_a_vote_between_snapshots_makes_the_winner_the_styles_checkpoint(service):
    admin, members = actor(7, admin=True), [actor(8), actor(9)]
    async with running_worker(service, ("toon", "finetune")):
        with pytest.raises(NotAllowedError):
            await service.start_snapshot_poll(members[0], GUILD, "mystyle")
        with pytest.raises(BadInputError, match="not a style this community fine-tuned"):
            await service.start_snapshot_poll(admin, GUILD, "demo")

        tune = await service.start_finetune(admin, GUILD, "mystyle", dataset_zip(), steps=8, snapshot_every=4)
        events = await finished(service, tune.job_id, timeout_s=600)
        assert sum(1 for e in events if e.preview) >= 3, "the base row and two training snapshots"
        assert "KID" in (events[-1].result.get("summary") or "")

        poll = await service.start_snapshot_poll(admin, GUILD, "mystyle")
        assert poll.snapshots and len(poll.options) == 2
        assert [o.label.split(",")[0] for o in poll.options] == ["snapshot 0.032 kimg", "snapshot 0.064 kimg"]
        await finished(service, poll.preview_job_id)
        grid = await service.result(poll.preview_job_id)
        assert len(grid.crops) == 2, "one row per snapshot"
        first_row, second_row = (pixels(c) for c in grid.crops)
        assert (first_row != second_row).any(), "each row is drawn by its own snapshot"

        async with service.rt.sessions() as s:
            style = await s.scalar(sa.select(StyleModel).where(StyleModel.name == "mystyle"))
            options = list(await s.scalars(sa.select(PollOption).where(PollOption.poll_id == poll.poll_id)))
        final_checkpoint = style.checkpoint_path
        early = next(o for o in options if o.position == 1)
        early_hash = native_metadata(service.rt.settings.data_dir / early.checkpoint_path)["content_hash"]
        assert early_hash != style.content_hash, "the last snapshot is the finished model; the first is not"
        student = await fake_student(service, style.id)

        for member in members:
            await service.vote(member, GUILD, poll.poll_id, 1)
        closed = await service.close_poll(admin, GUILD, poll.poll_id)
        assert closed.winner == 1 and closed.snapshots
        assert closed.distill_job_id is None, "a draft gets its instant model when it is published"

    async with service.rt.sessions() as s:
        style = await s.scalar(sa.select(StyleModel).where(StyleModel.name == "mystyle"))
        student_row = await s.get(Student, student)
    assert style.checkpoint_path != final_checkpoint and Path(style.checkpoint_path).is_file()
    assert style.content_hash == early_hash == native_metadata(style.checkpoint_path)["content_hash"]
    assert student_row.status == "stale", "an instant model of the old checkpoint no longer fits"
