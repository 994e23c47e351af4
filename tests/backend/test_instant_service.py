"""Instant mode in the service: which mode a request gets, students recorded from the manifest, and the
distillation jobs that admins, publishing and polls queue. Real Redis and real SQL (SQLite and PostgreSQL);
no worker runs here (tests/backend/test_distill_job.py runs them)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from backend.cli import SUBMIT_MODES
from backend.config import Settings
from backend.db.models import Community, Job, JobKind, JobStatus, Poll, Student, StyleModel, StyleStatus, utcnow
from backend.errors import BadInputError, NotAllowedError, NotFoundError
from backend.jobs import MODES, DistillParams, DistillResult, ToonParams, ToonResult, blend_key, params_from_json
from backend.keys import QUEUE_NAMES
from backend.service import Place, ToonService
from gan.blending import BlendSpec
from gan.distill import DistillConfig
from gan.styles import DEFAULT_BLEND, DEMO_DIR, read_manifest
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut
from tests.backend.student_fixtures import demo_models_without_students, record_student, tiny_student  # noqa: F401

GUILD = Place(platform="discord", community_id="13", name="instant club")
DEMO_BLEND = read_manifest(DEMO_DIR).style("demo").blend  # swap 16: what the demo style renders by default
SWAP32 = BlendSpec(mode="swap", resolution=32, structure_from="toon")


def settings(tmp_path: Path, url: str, db_url: str | None = None, **env: str) -> Settings:
    """The demo models without their shipped student, so each test decides which blends have one."""
    models = tmp_path / "models"
    if not models.exists():
        demo_models_without_students(models)
    base = {
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": url,
        "TOONIFY_QUOTA_USER_ACTIVE": "50",
        "TOONIFY_MODELS_DIR": str(models),
    }
    if db_url:
        base["DATABASE_URL"] = db_url
    return Settings.from_env({**base, **env})


@pytest_asyncio.fixture
async def service(tmp_path, redis_url, redis):  # noqa: F811 - `redis` flushes the test database first
    svc = await ToonService.open(settings(tmp_path, redis_url))
    try:
        yield svc
    finally:
        await svc.close()


async def job(svc: ToonService, job_id: str) -> Job:
    async with svc.rt.sessions() as s:
        return await s.get(Job, job_id)


async def mode_of(svc: ToonService, job_id: str) -> str:
    return ToonParams.from_json((await job(svc, job_id)).params).mode


async def distill_jobs(svc: ToonService) -> list[Job]:
    async with svc.rt.sessions() as s:
        q = sa.select(Job).where(Job.kind == JobKind.DISTILL).order_by(Job.created_at)
        return list((await s.scalars(q)).all())


@pytest.mark.asyncio
async def test_automatic_mode_picks_instant_where_a_student_is(tmp_path, redis_url, redis, db_url, tiny_student):  # noqa: F811
    svc = await ToonService.open(settings(tmp_path, redis_url, db_url))
    member = actor(1)
    try:
        before = await svc.submit_toon(member, GUILD, astronaut(1))  # no student yet
        assert await mode_of(svc, before.job_id) == "balanced"
        with pytest.raises(BadInputError, match=r"style 'demo' has no instant model for blend 16"):
            await svc.submit_toon(member, GUILD, astronaut(2), mode="instant")

        await record_student(svc, tiny_student, DEMO_BLEND)
        auto = await svc.submit_toon(member, GUILD, astronaut(2))  # the style's blend (16) has one now
        assert await mode_of(svc, auto.job_id) == "instant"
        named = await svc.submit_toon(member, GUILD, astronaut(3), mode="instant")
        assert await mode_of(svc, named.job_id) == "instant"
        for i, mode in enumerate(("fast", "balanced", "quality")):  # a projection mode named always projects
            ticket = await svc.submit_toon(member, GUILD, astronaut(4 + i), mode=mode)
            assert await mode_of(svc, ticket.job_id) == mode
        other_blend = await svc.submit_toon(member, GUILD, astronaut(8), blend=32)  # no student for 32
        assert await mode_of(svc, other_blend.job_id) == "balanced"
        with pytest.raises(BadInputError, match=r"'demo' has no instant model for blend 32.*/distill"):
            await svc.submit_toon(member, GUILD, astronaut(9), blend=32, mode="instant")
        with pytest.raises(BadInputError, match="instant, fast, balanced or quality"):
            await svc.submit_toon(member, GUILD, astronaut(9), mode="turbo")

        async with svc.rt.sessions() as s:  # the student's file is gone: automatic projects again
            await s.execute(sa.update(Student).values(path=str(tmp_path / "gone.safetensors")))
            await s.commit()
        gone = await svc.submit_toon(member, GUILD, astronaut(10))
        assert await mode_of(svc, gone.job_id) == "balanced"
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_the_community_default_blend_decides_the_automatic_mode(service, tiny_student):  # noqa: F811
    admin, member = actor(1, admin=True), actor(2)
    await record_student(service, tiny_student, SWAP32)  # the file's own blend does not matter to the service
    poll = await service.start_blend_poll(admin, GUILD, levels=(16, 32))
    await service.vote(member, GUILD, poll.poll_id, 2)
    closed = await service.close_poll(admin, GUILD, poll.poll_id)
    assert closed.winner == 2 and closed.distill_job_id is None  # blend 32 has a student: nothing to distil
    here = await service.submit_toon(member, GUILD, astronaut(1))
    elsewhere = await service.submit_toon(member, Place("discord", "99", "elsewhere"), astronaut(1))
    assert (await mode_of(service, here.job_id), await mode_of(service, elsewhere.job_id)) == ("instant", "balanced")


@pytest.mark.asyncio
async def test_reblend_is_instant_where_the_blend_has_a_student_else_it_projects(service, tiny_student):  # noqa: F811
    member = actor(1)
    await record_student(service, tiny_student, DEMO_BLEND)
    first = await service.submit_toon(member, GUILD, astronaut())
    assert await mode_of(service, first.job_id) == "instant"
    to32 = await service.reblend(member, GUILD, 32)  # no student for 32: projection, from the same photo
    row = await job(service, to32.job_id)
    assert (row.kind, ToonParams.from_json(row.params).mode) == (JobKind.REBLEND, "balanced")
    back = await service.reblend(member, GUILD, 16)  # the student again: the same work as the first toon
    assert back.duplicate and back.job_id == first.job_id

    quality = await service.submit_toon(member, GUILD, astronaut(5), mode="quality")
    again = await service.reblend(member, GUILD, 32)  # projected before: same recipe (its latents are cached)
    assert again.job_id != quality.job_id and await mode_of(service, again.job_id) == "quality"
    instant = await service.reblend(member, GUILD, 16)
    assert await mode_of(service, instant.job_id) == "instant"


@pytest.mark.asyncio
async def test_start_distill_is_for_admins_and_one_job_per_style_blend_and_length(service):
    admin, member = actor(1, admin=True), actor(2)
    with pytest.raises(NotAllowedError):
        await service.start_distill(member, GUILD, "demo")
    with pytest.raises(NotAllowedError):
        await service.start_distill(admin, None, "demo")  # a private chat has no admins
    with pytest.raises(NotFoundError, match="no style called 'nope'"):
        await service.start_distill(admin, GUILD, "nope")
    with pytest.raises(BadInputError, match="kimg"):
        await service.start_distill(admin, GUILD, "demo", kimg=0)
    assert await distill_jobs(service) == []

    ticket = await service.start_distill(admin, GUILD)  # the default style at the blend this community gets
    row = await job(service, ticket.job_id)
    p = params_from_json(row.kind, row.params)
    assert isinstance(p, DistillParams) and row.status == JobStatus.QUEUED
    assert (p.style, p.spec, p.kimg, p.reason) == ("demo", DEMO_BLEND, DistillConfig().kimg, "admin")
    assert await service.rt.pool.zscore(QUEUE_NAMES["finetune"], ticket.job_id) is not None  # the long queue
    assert await service.rt.pool.zscore(QUEUE_NAMES["toon"], ticket.job_id) is None

    same = await service.start_distill(admin, GUILD, "demo", 16)
    assert same.duplicate and same.job_id == ticket.job_id
    other = await service.start_distill(admin, GUILD, "demo", 32, kimg=2)
    p = params_from_json(JobKind.DISTILL, (await job(service, other.job_id)).params)
    assert not other.duplicate and (p.spec, p.kimg) == (SWAP32, 2.0)
    assert len(await distill_jobs(service)) == 2


@pytest.mark.asyncio
async def test_publishing_a_fine_tune_queues_its_instant_model(service):
    admin = actor(1, admin=True)
    await service.require_admin(admin, GUILD)  # the community row
    async with service.rt.sessions() as s:
        comm = await s.scalar(sa.select(Community).where(Community.platform_community_id == GUILD.community_id))
        s.add(
            StyleModel(
                name="mine",
                community_id=comm.id,
                status=StyleStatus.DRAFT,
                checkpoint_path=str(DEMO_DIR / "toon.safetensors"),
                default_blend=SWAP32.to_json(),
            )
        )
        await s.commit()
    info = await service.publish_style(admin, GUILD, "mine")
    assert info.status == "published" and info.distill_job_id is not None
    row = await job(service, info.distill_job_id)
    p = params_from_json(row.kind, row.params)
    assert (row.kind, p.style, p.spec, p.reason) == (JobKind.DISTILL, "mine", SWAP32, "publish")
    assert await service.rt.pool.zscore(QUEUE_NAMES["finetune"], row.id) is not None


@pytest.mark.asyncio
async def test_a_poll_that_changes_the_default_blend_queues_its_instant_model(service):
    admin, member = actor(1, admin=True), actor(2)
    poll = await service.start_blend_poll(admin, GUILD, levels=(8, 32))
    await service.vote(member, GUILD, poll.poll_id, 2)
    closed = await service.close_poll(admin, GUILD, poll.poll_id)
    assert closed.winner == 2 and closed.distill_job_id is not None
    row = await job(service, closed.distill_job_id)
    p = params_from_json(row.kind, row.params)
    admin_id = (await job(service, poll.preview_job_id)).user_id
    assert (p.style, p.spec, p.reason, row.user_id) == ("demo", SWAP32, "poll", admin_id)

    same = await service.start_blend_poll(admin, GUILD, levels=(32, 16))  # 32 wins again: no new default
    await service.vote(member, GUILD, same.poll_id, 1)
    assert (await service.close_poll(admin, GUILD, same.poll_id)).distill_job_id is None

    due = await service.start_blend_poll(admin, GUILD, levels=(8, 16))  # closed by the deadline sweep
    await service.vote(member, GUILD, due.poll_id, 1)
    async with service.rt.sessions() as s:
        await s.execute(sa.update(Poll).where(Poll.id == due.poll_id).values(closes_at=utcnow() - timedelta(1)))
        await s.commit()
    [swept] = await service.close_due_polls()
    assert swept.winner == 1 and swept.distill_job_id is not None
    row = await job(service, swept.distill_job_id)
    p = params_from_json(row.kind, row.params)
    assert (p.spec.resolution, p.reason, row.user_id) == (8, "poll", admin_id)  # owned by the poll's creator
    assert len(await distill_jobs(service)) == 2


@pytest.mark.asyncio
async def test_the_manifests_students_become_rows_and_make_the_style_instant(tmp_path, redis_url, redis, tiny_student):  # noqa: F811
    models = tmp_path / "models"
    models.mkdir()
    for name in ("base.safetensors", "toon.safetensors", "encoder.safetensors"):
        (models / name).symlink_to(DEMO_DIR / name)
    (models / "students").mkdir()
    shutil.copyfile(tiny_student, models / "students" / "demo_swap32.safetensors")
    manifest = json.loads((DEMO_DIR / "manifest.json").read_text())
    from gan.distill import read_student_lineage

    lineage = read_student_lineage(tiny_student)
    manifest["styles"]["demo"]["students"] = [
        {"file": "students/demo_swap32.safetensors", "blend": DEMO_BLEND.to_json(), "base_hash": lineage.base_hash,
         "toon_hash": lineage.toon_hash, "content_hash": "c0ffee", "kimg": 0.008}
    ]  # fmt: skip
    (models / "manifest.json").write_text(json.dumps(manifest))

    svc = await ToonService.open(settings(tmp_path, redis_url, TOONIFY_MODELS_DIR=str(models)))
    try:
        await svc.sync_bundled_styles()  # again: still one row
        async with svc.rt.sessions() as s:
            rows = (await s.scalars(sa.select(Student))).all()
        assert len(rows) == 1
        row = rows[0]
        assert (row.blend_key, row.status, row.job_id) == (blend_key(DEMO_BLEND), "ready", None)
        assert (row.base_hash, row.toon_hash, row.content_hash) == (lineage.base_hash, lineage.toon_hash, "c0ffee")
        assert Path(row.path) == models / "students" / "demo_swap32.safetensors"
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut())
        assert await mode_of(svc, ticket.job_id) == "instant"
    finally:
        await svc.close()


def test_job_types_round_trip_and_the_cli_offers_every_mode() -> None:
    assert SUBMIT_MODES == MODES == ("instant", "fast", "balanced", "quality")
    p = DistillParams(style_id=3, style="demo", spec=SWAP32, kimg=1.5, reason="poll")
    assert DistillParams.from_json(json.loads(json.dumps(p.to_json()))) == p
    r = DistillResult(style="demo", blend=SWAP32, student="/x.safetensors", kimg=1.5, content_hash="ab", base_hash="b",
                      toon_hash="t", reason="poll")  # fmt: skip
    assert DistillResult.from_json(r.to_json()) == r and "student" in r.to_json() and "checkpoint" not in r.to_json()
    t = ToonResult(composite="c", crops=("a",), faces=1, style="demo", spec=DEFAULT_BLEND, mode="instant")
    assert ToonResult.from_json(t.to_json()).mode == "instant"
    assert ToonResult.from_json({"composite": "c", "crops": []}).mode == ""  # rows from before instant mode
