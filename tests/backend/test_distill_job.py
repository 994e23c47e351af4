"""Integration: distillation jobs and instant toons through the service, arq on a real Redis and a worker (in
this process, or a real `toonify worker` process for SIGTERM), real SQL, the demo models.

An admin's /distill trains a student on the worker and records it; a member's /toon without a mode then runs
instant and gives the same pixels as ``Toonifier.toonify(mode="instant")``. Cancels stop training between
steps; SIGTERM hands the job back and the next worker resumes from the snapshot. A student made for other
models fails the job with the reason, once: its row goes stale and the next request projects."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.config import Settings
from backend.db.models import CachedLatent, Job, JobStatus, Student, StyleModel
from backend.jobs import ToonParams, blend_key
from backend.model_cache import ModelCache, base_models_from_manifest
from backend.service import Place, ToonService
from gan.blending import BlendSpec
from gan.distill import load_student, read_student_lineage
from gan.styles import DEMO_DIR, read_manifest
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import FIXTURE, actor, astronaut, events_until_done, running_worker
from tests.backend.student_fixtures import record_student, tiny_student  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
GUILD = Place(platform="discord", community_id="31", name="distillers")
DEMO_BLEND = read_manifest(DEMO_DIR).style("demo").blend  # swap 16
SWAP32 = BlendSpec(mode="swap", resolution=32, structure_from="toon")
ONE_STEP_KIMG = 0.016  # one batch of the default recipe (16 pairs)


def env_for(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",
        "TOONIFY_WORKER_HEARTBEAT_TTL_S": "2",
        "TOONIFY_DEVICE": "cpu",
        "TOONIFY_QUOTA_USER_ACTIVE": "8",
        **extra,
    }


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


async def job_row(svc: ToonService, job_id: str) -> Job:
    async with svc.rt.sessions() as s:
        return await s.get(Job, job_id)


async def students(svc: ToonService) -> list[Student]:
    """The students distillation jobs made (the bundled demo style's own student is a row too, with no job)."""
    async with svc.rt.sessions() as s:
        q = sa.select(Student).where(Student.job_id.is_not(None)).order_by(Student.id)
        return list((await s.scalars(q)).all())


async def first_distill_step(svc: ToonService, job_id: str, at_least: int = 1) -> int:
    async for ev in svc.watch(job_id, timeout_s=300):
        assert ev.status in ("queued", "running"), ev
        if ev.stage == "distill" and (ev.step or 0) >= at_least:
            return ev.step


@pytest.mark.asyncio
async def test_distill_then_instant_toons_match_the_library(tmp_path, redis_url, redis):  # noqa: F811
    svc = await ToonService.open(Settings.from_env(env_for(tmp_path, redis_url)))
    admin, member = actor(1, admin=True), actor(2)
    try:
        async with running_worker(svc, queues=("toon", "finetune")):
            ticket = await svc.start_distill(admin, GUILD, kimg=ONE_STEP_KIMG)  # the demo style's blend (16)
            events = await events_until_done(svc, ticket.job_id)
            assert events[-1].status == "done", events[-1]
            steps = [e for e in events if e.stage == "distill"]
            assert steps and steps[-1].step == steps[-1].total == 1 and "l1" in steps[-1].message, steps
            result = events[-1].result
            assert (result["style"], result["blend"], result["reason"]) == ("demo", DEMO_BLEND.to_json(), "admin")
            [row] = await students(svc)
            assert (row.blend_key, row.status, row.job_id, row.path) == (
                blend_key(DEMO_BLEND),
                "ready",
                ticket.job_id,
                result["student"],
            )
            path = Path(row.path)
            assert path.is_file() and path.is_relative_to(tmp_path / "data" / "students")
            lineage = read_student_lineage(path)
            assert (lineage.base_hash, lineage.toon_hash, lineage.spec) == (row.base_hash, row.toon_hash, DEMO_BLEND)
            assert row.content_hash == result["content_hash"] == load_student(path).meta["content_hash"]
            assert not (tmp_path / "data" / "distill" / ticket.job_id).exists()  # the snapshot was only for resuming

            toon = await svc.submit_toon(member, GUILD, astronaut())  # no mode: the student exists, so instant
            events = await events_until_done(svc, toon.job_id)
            assert events[-1].status == "done", events[-1]
            assert "project" not in [e.stage for e in events]
            out = await svc.result(toon.job_id)
            assert (out.mode, out.spec, out.faces) == ("instant", DEMO_BLEND.to_json(), 1)
            async with svc.rt.sessions() as s:
                assert await s.scalar(sa.select(sa.func.count()).select_from(CachedLatent)) == 0  # no latents
                toon_path = await s.scalar(sa.select(StyleModel.checkpoint_path).where(StyleModel.name == "demo"))
            used = load_student(path)

            same = await svc.start_distill(admin, GUILD, kimg=ONE_STEP_KIMG)  # made, and its student is ready
            assert same.duplicate and same.job_id == ticket.job_id
            async with svc.rt.sessions() as s:  # the student went stale (say its style's model changed)
                await s.execute(sa.update(Student).values(status="stale"))
                await s.commit()
            again = await svc.start_distill(admin, GUILD, kimg=ONE_STEP_KIMG)  # so the same request runs again
            assert not again.duplicate and again.job_id != ticket.job_id
            assert (await events_until_done(svc, again.job_id))[-1].status == "done"
            [row] = await students(svc)
            assert (row.status, row.job_id, row.path) == ("ready", again.job_id, str(path))
    finally:
        await svc.close()

    # ... and what the library computes for the same photo, style, blend and student
    tf = ModelCache("cpu").toonifier(base_models_from_manifest(DEMO_DIR), Path(toon_path))
    tf.add_student(used)
    with Image.open(FIXTURE) as photo:
        lib = tf.toonify(photo.convert("RGB"), mode="instant", spec=DEMO_BLEND)
    assert lib.latents is None
    assert np.array_equal(pixels(out.crops[0]), np.asarray(lib.crops[0].convert("RGB")))
    assert np.array_equal(pixels(out.composite), np.asarray(lib.composite.convert("RGB")))


@pytest.mark.asyncio
async def test_cancel_stops_a_distillation_between_steps(tmp_path, redis_url, redis):  # noqa: F811
    svc = await ToonService.open(Settings.from_env(env_for(tmp_path, redis_url)))
    admin = actor(1, admin=True)
    try:
        async with running_worker(svc, queues=("finetune",)):
            ticket = await svc.start_distill(admin, GUILD, "demo", 32, kimg=4.0)  # 250 steps: far from done
            await first_distill_step(svc, ticket.job_id)
            assert await svc.cancel(admin, ticket.job_id) is True
            events = await events_until_done(svc, ticket.job_id)
            assert events[-1].status == "cancelled", events[-1]
            row = await job_row(svc, ticket.job_id)
            assert row.status == JobStatus.CANCELLED and row.attempts == 1 and "cancelled at step" in row.error
            assert await students(svc) == []  # nothing recorded
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_a_mismatched_student_fails_the_job_once(tmp_path, redis_url, redis, tiny_student):  # noqa: F811
    svc = await ToonService.open(Settings.from_env(env_for(tmp_path, redis_url)))
    member = actor(2)
    try:
        student_id = await record_student(svc, tiny_student, SWAP32)  # a file distilled for blend 16, filed as 32
        ticket = await svc.submit_toon(member, GUILD, astronaut(), blend=32)
        assert ToonParams.from_json((await job_row(svc, ticket.job_id)).params).mode == "instant"
        async with running_worker(svc, queues=("toon",)):
            events = await events_until_done(svc, ticket.job_id)
        assert events[-1].status == "failed", events[-1]
        error = events[-1].error
        assert "instant model of style 'demo' for blend 32 was distilled for blend swap at 16px" in error, error
        assert "no longer fits" in error and str(tiny_student) not in error  # the reason, not a server path
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts) == (JobStatus.FAILED, 1)  # failed for good at once, not retried
        async with svc.rt.sessions() as s:
            assert (await s.get(Student, student_id)).status == "stale"
        again = await svc.submit_toon(member, GUILD, astronaut(1), blend=32)  # automatic projects now
        assert ToonParams.from_json((await job_row(svc, again.job_id)).params).mode == "balanced"
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_an_unreadable_student_fails_the_job_once_and_goes_broken(tmp_path, redis_url, redis, tiny_student):  # noqa: F811
    svc = await ToonService.open(Settings.from_env(env_for(tmp_path, redis_url)))
    member = actor(2)
    try:
        damaged = tmp_path / "damaged.safetensors"
        damaged.write_bytes(tiny_student.read_bytes())
        student_id = await record_student(svc, damaged, DEMO_BLEND)  # the right lineage for the demo's blend ...
        raw = bytearray(damaged.read_bytes())
        raw[-8:] = bytes(8)  # ... and then its weights are damaged on disk
        damaged.write_bytes(bytes(raw))
        ticket = await svc.submit_toon(member, GUILD, astronaut())
        assert ToonParams.from_json((await job_row(svc, ticket.job_id)).params).mode == "instant"
        async with running_worker(svc, queues=("toon",)):
            events = await events_until_done(svc, ticket.job_id)
        assert events[-1].status == "failed", events[-1]
        error = events[-1].error
        assert "instant model of style 'demo' for blend 16 cannot be read" in error, error
        assert str(damaged) not in error  # the reason, not a server path
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts) == (JobStatus.FAILED, 1)
        async with svc.rt.sessions() as s:
            assert (await s.get(Student, student_id)).status == "broken"
        again = await svc.submit_toon(member, GUILD, astronaut(1))  # automatic projects now
        assert ToonParams.from_json((await job_row(svc, again.job_id)).params).mode == "balanced"
    finally:
        await svc.close()


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    code = "import sys; from bots.cli import main; sys.exit(main(['worker', '--queues', 'finetune']))"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab")
    )


def stop(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=30)


@pytest.mark.asyncio
async def test_sigterm_hands_a_distillation_back_and_the_next_worker_resumes_it(tmp_path, redis_url, redis):  # noqa: F811
    env = env_for(tmp_path, redis_url, TOONIFY_SHUTDOWN_GRACE_S="0")  # no grace: hand back at the next step
    svc = await ToonService.open(Settings.from_env(env))
    admin, first, second = actor(1, admin=True), None, None
    try:
        first = start_worker(env, tmp_path / "first.log")
        ticket = await svc.start_distill(admin, GUILD, "demo", 32, kimg=12 * ONE_STEP_KIMG)  # 12 steps
        await first_distill_step(svc, ticket.job_id, at_least=2)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 120) == 0, (tmp_path / "first.log").read_text()[-3000:]
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts, row.worker_id) == (JobStatus.QUEUED, 1, None), row.error
        assert "stopped" in row.error
        snapshot = tmp_path / "data" / "distill" / ticket.job_id / "snapshot.safetensors"
        assert snapshot.is_file()  # written when it stopped

        second = start_worker(env, tmp_path / "second.log")
        events = await events_until_done(svc, ticket.job_id, timeout_s=300)
        assert events[-1].status == "done", (events[-1], (tmp_path / "second.log").read_text()[-3000:])
        resumed = [e.step for e in events if e.stage == "distill"]
        assert resumed and resumed[0] >= 3, resumed  # continued after the steps the first worker made
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts) == (JobStatus.DONE, 2)
        [student] = await students(svc)
        assert (student.blend_key, student.job_id) == (blend_key(SWAP32), ticket.job_id)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 60) == 0
    finally:
        stop(first, second)
        await svc.close()


@pytest.mark.asyncio
async def test_sigkill_mid_distillation_loses_nothing(tmp_path, redis_url, redis):  # noqa: F811
    """A worker killed outright (no hand-back, no snapshot on the way out): its heartbeat expires, the next worker
    reconciles the row back to the queue and trains the student to the end."""
    env = env_for(tmp_path, redis_url)
    svc = await ToonService.open(Settings.from_env(env))
    admin, first, second = actor(1, admin=True), None, None
    try:
        first = start_worker(env, tmp_path / "first.log")
        ticket = await svc.start_distill(admin, GUILD, "demo", 32, kimg=8 * ONE_STEP_KIMG)  # 8 steps
        await first_distill_step(svc, ticket.job_id, at_least=2)
        first.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 60) == -signal.SIGKILL
        assert (await job_row(svc, ticket.job_id)).status == JobStatus.RUNNING  # nobody has noticed yet

        second = start_worker(env, tmp_path / "second.log")
        events = await events_until_done(svc, ticket.job_id, timeout_s=300)
        assert events[-1].status == "done", (events[-1], (tmp_path / "second.log").read_text()[-3000:])
        row = await job_row(svc, ticket.job_id)
        assert row.status == JobStatus.DONE and row.attempts == 2
        [student] = await students(svc)
        assert (student.blend_key, student.job_id, student.status) == (blend_key(SWAP32), ticket.job_id, "ready")
        assert load_student(tmp_path / "data" / student.path if not Path(student.path).is_absolute() else student.path)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 60) == 0
    finally:
        stop(first, second)
        await svc.close()
