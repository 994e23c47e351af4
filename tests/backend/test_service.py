"""Integration: service → arq on a real Redis → worker → SQL ledger and blob store, with the demo models."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from PIL import Image

from backend.config import Settings
from backend.db.models import Blob, CachedLatent, Job, JobStatus, Membership, User, Vote
from backend.errors import BadInputError, NotAllowedError
from backend.service import Place, QuotaError, ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, blank_photo, events_until_done, running_worker

ROOT = Path(__file__).resolve().parents[2]
GUILD = Place(platform="discord", community_id="42", name="toon club")


def make_settings(tmp_path: Path, url: str, db_url: str | None = None, **env: str) -> Settings:
    base = {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": url, **env}
    if db_url:
        base["DATABASE_URL"] = db_url
    return Settings.from_env(base)


@pytest_asyncio.fixture
async def service(tmp_path, redis_url, redis):  # noqa: F811 - `redis` flushes the test database first
    svc = await ToonService.open(make_settings(tmp_path, redis_url, TOONIFY_QUOTA_USER_ACTIVE="4"))
    try:
        yield svc
    finally:
        await svc.close()


async def count(svc: ToonService, model, *where) -> int:
    async with svc.rt.sessions() as s:
        return await s.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


@pytest.mark.asyncio
async def test_submit_runs_to_done_and_reblend_skips_projection(tmp_path, redis_url, redis, db_url):  # noqa: F811
    svc = await ToonService.open(make_settings(tmp_path, redis_url, db_url))
    try:
        async with running_worker(svc):
            ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="balanced")
            events = await events_until_done(svc, ticket.job_id)
            assert events[-1].status == "done", events[-1]
            stages = [e.stage for e in events if e.status == "running"]
            assert "align" in stages, [(e.seq, e.stage, e.step) for e in events]
            assert stages.index("align") < stages.index("project") < stages.index("render")
            steps = [e.step for e in events if e.stage == "project"]
            assert steps == sorted(steps) and steps[-1] == 40

            out = await svc.result(ticket.job_id)
            with Image.open(io.BytesIO(out.composite)) as im, Image.open(io.BytesIO(astronaut())) as src:
                assert im.size == src.size
            assert len(out.crops) == out.faces == 1
            assert await count(svc, Blob, Blob.kind == "result") == 2
            assert await svc.claim_delivery(ticket.job_id) is True
            assert await svc.claim_delivery(ticket.job_id) is False  # delivered once

            again = await svc.reblend(actor(1), GUILD, 8)
            events = await events_until_done(svc, again.job_id)
            assert events[-1].status == "done"
            assert "project" not in [e.stage for e in events]  # cached latents: no projection
            assert (await svc.result(again.job_id)).spec["resolution"] == 8
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_same_request_twice_is_one_job(service):
    first = await service.submit_toon(actor(1), GUILD, astronaut())
    racing = await asyncio.gather(*(service.submit_toon(actor(1), GUILD, astronaut()) for _ in range(5)))
    assert {t.job_id for t in racing} == {first.job_id}
    assert all(t.duplicate for t in racing)
    assert await count(service, Job) == 1
    other = await service.submit_toon(actor(1), GUILD, astronaut(), blend=8)  # other options: other job
    assert other.job_id != first.job_id


@pytest.mark.asyncio
async def test_quotas_hold_when_50_submissions_race(tmp_path, redis_url, redis):  # noqa: F811
    svc = await ToonService.open(make_settings(tmp_path, redis_url, TOONIFY_QUOTA_USER_ACTIVE="3"))
    try:
        photos = [astronaut(v) for v in range(50)]  # 50 different photos: 50 different requests
        results = await asyncio.gather(*(svc.submit_toon(actor(7), GUILD, p) for p in photos), return_exceptions=True)
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, QuotaError)]
        assert len(accepted) == 3 and len(refused) == 47, [r for r in results if isinstance(r, Exception)][:3]
        assert "in progress at a time" in str(refused[0])
        assert await count(svc, Job) == 3
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_bad_input_gets_a_clear_message_and_keeps_nothing(service):
    with pytest.raises(BadInputError, match=r"not an image"):
        await service.submit_toon(actor(1), GUILD, b"%PDF-1.4 definitely not a photo")
    png = astronaut()
    with pytest.raises(BadInputError, match=r"incomplete or damaged"):
        await service.submit_toon(actor(1), GUILD, png[: len(png) // 2])
    with pytest.raises(BadInputError, match="limit"):
        await service.submit_toon(actor(1), GUILD, b"\0" * (service.rt.settings.max_upload_bytes + 1))
    with pytest.raises(BadInputError, match="blend"):
        await service.submit_toon(actor(1), GUILD, png, blend=33)
    assert await count(service, Job) == 0
    with pytest.raises(NotAllowedError, match="admins"):
        await service.start_blend_poll(actor(2, admin=False), GUILD)

    async with running_worker(service):
        ticket = await service.submit_toon(actor(1), GUILD, blank_photo())
        events = await events_until_done(service, ticket.job_id)
    assert events[-1].status == "failed"
    assert "face" in events[-1].error.lower()
    async with service.rt.sessions() as s:
        job = await s.get(Job, ticket.job_id)
    assert job.attempts == 1  # bad input is not retried


@pytest.mark.asyncio
async def test_cancel_stops_a_running_job_within_one_step(service):
    async with running_worker(service):
        ticket = await service.submit_toon(actor(1), GUILD, astronaut(), mode="quality")
        async for ev in service.watch(ticket.job_id, timeout_s=120):
            if ev.stage == "project" and (ev.step or 0) >= 3:
                assert await service.cancel(actor(1), ticket.job_id) is True
                break
        events = await events_until_done(service, ticket.job_id)
    final = events[-1]
    assert final.status == "cancelled", final
    stopped = re.search(r"cancelled at step (\d+)/300", final.error)
    seen = re.search(r"cancel seen at project step (\d+)", final.error)
    assert stopped and seen, final.error
    assert int(stopped.group(1)) - int(seen.group(1)) <= 1  # the next step boundary after the flag
    assert int(stopped.group(1)) < 300
    with pytest.raises(Exception, match=r"no such job"):
        await service.cancel(actor(2), ticket.job_id)  # not theirs


@pytest.mark.asyncio
async def test_forget_user_leaves_no_row_or_file(service):
    async with running_worker(service):
        mine = await service.submit_toon(actor(1), GUILD, astronaut())
        theirs = await service.submit_toon(actor(2), GUILD, astronaut())  # same photo, another person
        for t in (mine, theirs):
            assert (await events_until_done(service, t.job_id))[-1].status == "done"
    poll = await service.start_blend_poll(actor(3, admin=True), GUILD, levels=(8, 16))
    await service.vote(actor(1), GUILD, poll.poll_id, 1)
    async with service.rt.sessions() as s:
        uid = await s.scalar(sa.select(User.id).where(User.platform_user_id == actor(1).user_id))
        my_shas = set((await s.scalars(sa.select(Blob.sha256).where(Blob.owner_user_id == uid))).all())
        their_shas = set((await s.scalars(sa.select(Blob.sha256).where(Blob.owner_user_id != uid))).all())
    assert my_shas and all(service.rt.blobs.exists(h) for h in my_shas)

    report = await service.forget_user(actor(1))
    assert report.jobs == 1 and report.votes == 1
    owned = [(User, User.id), (Job, Job.user_id), (Blob, Blob.owner_user_id), (CachedLatent, CachedLatent.user_id),
             (Vote, Vote.user_id), (Membership, Membership.user_id)]  # fmt: skip
    for model, col in owned:
        assert await count(service, model, col == uid) == 0, model.__name__
    for sha in my_shas - their_shas:
        assert not service.rt.blobs.exists(sha)
    for sha in my_shas & their_shas:  # the other person's identical photo is theirs to keep
        assert service.rt.blobs.exists(sha)
    assert (await service.result(theirs.job_id)).crops


def _worker_process(env: dict[str, str]) -> subprocess.Popen:
    code = "import sys; from backend.cli import main; sys.exit(main(['worker', '--queues', 'toon']))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.asyncio
async def test_worker_killed_mid_job_loses_nothing(tmp_path, redis_url, redis):  # noqa: F811
    env = {**os.environ, "TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url,
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",
           "TOONIFY_WORKER_HEARTBEAT_TTL_S": "2", "TOONIFY_DEVICE": "cpu"}  # fmt: skip
    svc = await ToonService.open(Settings.from_env(env))
    first = _worker_process(env)
    second = None
    try:
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="quality")
        async for ev in svc.watch(ticket.job_id, timeout_s=180):
            if ev.stage == "project" and (ev.step or 0) >= 5:
                break
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind
        first.wait()
        async with svc.rt.sessions() as s:
            assert (await s.get(Job, ticket.job_id)).status == JobStatus.RUNNING  # the row still says running

        second = _worker_process(env)
        events = await events_until_done(svc, ticket.job_id, timeout_s=240)
        assert events[-1].status == "done", (events[-1], second.stderr.read1().decode()[-2000:] if second else "")
        async with svc.rt.sessions() as s:
            job = await s.get(Job, ticket.job_id)
        assert job.attempts == 2 and job.status == JobStatus.DONE
        out = await svc.result(ticket.job_id)
        assert out.crops
        assert [await svc.claim_delivery(ticket.job_id) for _ in range(3)] == [True, False, False]
        assert await count(svc, Job) == 1
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        await svc.close()


@pytest.mark.asyncio
async def test_blend_poll_votes_and_winner_becomes_the_community_default(service):
    admin, alice, bob = actor(1, admin=True), actor(2), actor(3)
    async with running_worker(service):
        poll = await service.start_blend_poll(admin, GUILD, levels=(8, 16, 32))
        assert [o.spec["resolution"] for o in poll.options] == [8, 16, 32]
        events = await events_until_done(service, poll.preview_job_id)
        assert events[-1].status == "done", events[-1]
        grid = await service.result(poll.preview_job_id)
        with Image.open(io.BytesIO(grid.composite)) as im:
            assert im.height >= 3 * 64  # one row per option
        assert len(grid.crops) == 3

        await service.vote(alice, GUILD, poll.poll_id, 1)
        await service.vote(bob, GUILD, poll.poll_id, 1)
        info = await service.vote(alice, GUILD, poll.poll_id, 3)  # changed her mind: still one vote
        assert info.tally == {1: 1, 2: 0, 3: 1}
        await service.vote(admin, GUILD, poll.poll_id, 3)
        with pytest.raises(NotAllowedError):
            await service.close_poll(bob, GUILD, poll.poll_id)
        closed = await service.close_poll(admin, GUILD, poll.poll_id)
        assert closed.status == "closed" and closed.winner == 3
        with pytest.raises(Exception, match="closed"):
            await service.vote(bob, GUILD, poll.poll_id, 2)

        ticket = await service.submit_toon(bob, GUILD, astronaut(), mode="fast")  # no blend given
        assert (await events_until_done(service, ticket.job_id))[-1].status == "done"
        assert (await service.result(ticket.job_id)).spec["resolution"] == 32  # the community's winner
        elsewhere = Place(platform="discord", community_id="43")  # another server keeps the style's default
        other = await service.submit_toon(bob, elsewhere, astronaut(), mode="fast")
        assert (await events_until_done(service, other.job_id))[-1].status == "done"
        assert (await service.result(other.job_id)).spec["resolution"] == 16  # the demo style's manifest blend


@pytest.mark.asyncio
async def test_selfies_expire_and_style_preferences_stick(service):
    ticket = await service.submit_toon(actor(1), GUILD, astronaut())
    async with service.rt.sessions() as s:
        selfie = (await s.scalars(sa.select(Blob).where(Blob.kind == "selfie"))).one()
        assert selfie.expires_at is not None
        selfie.expires_at = selfie.created_at  # as if the retention period had passed
        await s.commit()
    assert service.rt.blobs.exists(selfie.sha256)
    expired = await service.expire()
    assert expired.rows == 1
    assert await count(service, Blob, Blob.kind == "selfie") == 0
    async with service.rt.sessions() as s:
        assert (await s.get(Job, ticket.job_id)).input_blob_id is None

    with pytest.raises(Exception, match="no style called"):
        await service.set_style(actor(1), GUILD, "nope")
    info = await service.set_style(actor(1), GUILD, "demo")
    assert info.name == "demo"
    assert [st.name for st in await service.list_styles(GUILD)] == ["demo"]


@pytest.mark.asyncio
async def test_transient_errors_are_retried_and_timeouts_reported(tmp_path, redis_url, redis, monkeypatch):  # noqa: F811
    svc = await ToonService.open(make_settings(tmp_path, redis_url, TOONIFY_JOB_TIMEOUT_S="3"))
    try:
        real_read, failures = svc.rt.blobs.read, []

        def flaky_read(sha: str) -> bytes:  # the disk hiccups once
            if not failures:
                failures.append(sha)
                raise OSError("I/O error (injected)")
            return real_read(sha)

        monkeypatch.setattr(svc.rt.blobs, "read", flaky_read)
        async with running_worker(svc):
            ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="fast")
            events = await events_until_done(svc, ticket.job_id)
            assert events[-1].status == "done", events[-1]
            async with svc.rt.sessions() as s:
                assert (await s.get(Job, ticket.job_id)).attempts == 2

            slow = await svc.submit_toon(actor(2), GUILD, astronaut(), mode="quality")  # 300 steps > 3 s here
            events = await events_until_done(svc, slow.job_id)
        assert events[-1].status == "failed" and "timeout" in events[-1].error, events[-1]
    finally:
        await svc.close()
