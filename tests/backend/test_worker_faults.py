"""The worker under the faults an operator meets: SIGTERM mid-job, Redis killed and back, Redis gone for good.

Every test runs `toonify worker` as a real process against a real Redis (the machine's, or a private
redis-server this test kills) and a real SQLite file, with the demo models. Also: the same selfie gives the same
pixels in fresh runs (and the same as the library's own pipeline), and maintenance runs as an arq cron job.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from backend.config import Settings
from backend.db.models import Blob, Job, JobStatus, StyleModel, utcnow
from backend.keys import job_deaths
from backend.model_cache import ModelCache, base_models_from_manifest
from backend.redis import redis_server_executable
from backend.service import Place, ToonService
from backend.worker import MAX_WORKER_DEATHS, serving_worker
from backend.worker_state import reconcile
from gan.blending import BlendSpec
from gan.styles import DEMO_DIR
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import FIXTURE, actor, astronaut, events_until_done, free_port, running_worker

ROOT = Path(__file__).resolve().parents[2]
GUILD = Place(platform="discord", community_id="7", name="ops")


def worker_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",
        "TOONIFY_WORKER_HEARTBEAT_TTL_S": "2",
        "TOONIFY_DEVICE": "cpu",
        "TOONIFY_QUOTA_USER_ACTIVE": "4",
        **extra,
    }


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    code = "import sys; from bots.cli import main; sys.exit(main(['worker', '--queues', 'toon']))"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab")
    )


async def job_row(svc: ToonService, job_id: str) -> Job:
    async with svc.rt.sessions() as s:
        return await s.get(Job, job_id)


async def wait_for_row(svc: ToonService, job_id: str, statuses: set[JobStatus], timeout_s: float = 240) -> Job:
    """Poll the SQL row (the truth, readable while Redis is down) until its status is one of ``statuses``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        row = await job_row(svc, job_id)
        if row.status in statuses:
            return row
        if loop.time() > deadline:
            raise AssertionError(f"job {job_id} still {row.status} after {timeout_s} s")
        await asyncio.sleep(0.2)


async def wait_until_projecting(svc: ToonService, job_id: str, step: int = 3) -> None:
    async for ev in svc.watch(job_id, timeout_s=240):
        assert ev.status in ("queued", "running"), ev
        if ev.stage == "project" and (ev.step or 0) >= step:
            return


def stop(*procs: subprocess.Popen | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=30)


@pytest.mark.asyncio
async def test_sigterm_mid_job_hands_it_back_and_the_next_worker_finishes_it(tmp_path, redis_url, redis):  # noqa: F811
    env = worker_env(tmp_path, redis_url, TOONIFY_SHUTDOWN_GRACE_S="0")  # no grace: hand back at once
    svc = await ToonService.open(Settings.from_env(env))
    first = second = None
    try:
        first = start_worker(env, tmp_path / "first.log")
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="balanced")
        await wait_until_projecting(svc, ticket.job_id)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-3000:]
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts, row.worker_id) == (JobStatus.QUEUED, 1, None), row.error
        assert "stopped" in row.error  # not "ran past the job timeout"

        second = start_worker(env, tmp_path / "second.log")
        events = await events_until_done(svc, ticket.job_id)
        assert events[-1].status == "done", (events[-1], (tmp_path / "second.log").read_text()[-3000:])
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.attempts) == (JobStatus.DONE, 2)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        stop(first, second)
        await svc.close()


@pytest.mark.asyncio
async def test_sigterm_lets_the_running_job_finish_and_takes_no_new_one(tmp_path, redis_url, redis):  # noqa: F811
    env = worker_env(tmp_path, redis_url, TOONIFY_SHUTDOWN_GRACE_S="300")
    svc = await ToonService.open(Settings.from_env(env))
    worker = None
    try:
        worker = start_worker(env, tmp_path / "worker.log")
        running = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="balanced")
        await wait_until_projecting(svc, running.job_id)
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # the worker has seen the signal and stopped polling the queue
        waiting = await svc.submit_toon(actor(2), GUILD, astronaut(1), mode="fast")
        assert await asyncio.to_thread(worker.wait, 240) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        row = await job_row(svc, running.job_id)
        assert (row.status, row.attempts) == (JobStatus.DONE, 1), row.error  # finished inside the grace period
        row = await job_row(svc, waiting.job_id)
        assert (row.status, row.attempts) == (JobStatus.QUEUED, 0)  # left for the next worker
    finally:
        stop(worker)
        await svc.close()


def start_redis(port: int, tmp_path: Path) -> subprocess.Popen:
    """A private redis-server on ``port`` with no persistence: a restart comes back empty, as the machine's does."""
    proc = subprocess.Popen(
        [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {port}")


@pytest.mark.asyncio
async def test_redis_killed_and_back_mid_job_the_worker_reconnects_and_finishes(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    env = worker_env(tmp_path, url, TOONIFY_REDIS_RETRY_S="60")
    svc = await ToonService.open(Settings.from_env(env))
    worker = None
    try:
        worker = start_worker(env, tmp_path / "worker.log")
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="balanced")
        await wait_until_projecting(svc, ticket.job_id)
        server.kill()  # SIGKILL: no goodbye to any client
        server.wait()
        await asyncio.sleep(2.0)
        server = start_redis(port, tmp_path)  # back, and empty: the queue, heartbeats and progress are gone
        row = await wait_for_row(svc, ticket.job_id, {JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
        log = (tmp_path / "worker.log").read_text()
        assert row.status == JobStatus.DONE, (row.error, log[-3000:])
        assert worker.poll() is None, log[-3000:]  # still serving

        later = await svc.submit_toon(actor(2), GUILD, astronaut(1), mode="fast")  # a new job after the blip
        events = await events_until_done(svc, later.job_id)
        assert events[-1].status == "done", (events[-1], log[-3000:])
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 60) == 0
    finally:
        stop(worker)
        await svc.close()
        stop(server)


@pytest.mark.asyncio
async def test_redis_gone_for_good_the_worker_hands_back_and_exits_non_zero(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    env = worker_env(tmp_path, url, TOONIFY_REDIS_RETRY_S="3", TOONIFY_SHUTDOWN_GRACE_S="0")
    svc = await ToonService.open(Settings.from_env(env))
    worker = again = None
    try:
        worker = start_worker(env, tmp_path / "worker.log")
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="quality")  # outlasts the 3 s of retries
        await wait_until_projecting(svc, ticket.job_id)
        server.kill()
        server.wait()
        rc = await asyncio.to_thread(worker.wait, 120)
        log = (tmp_path / "worker.log").read_text()
        assert rc == 3, log[-3000:]  # "unavailable": a supervisor restarts it
        assert f"toonify: lost the Redis at redis://127.0.0.1:{port}" in log, log[-3000:]
        row = await job_row(svc, ticket.job_id)
        assert (row.status, row.worker_id) == (JobStatus.QUEUED, None), row.error  # handed back, not lost

        server = start_redis(port, tmp_path)  # an empty Redis: the job is only in SQL now
        again = start_worker(env, tmp_path / "again.log")
        row = await wait_for_row(svc, ticket.job_id, {JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
        assert row.status == JobStatus.DONE, (row.error, (tmp_path / "again.log").read_text()[-3000:])
        assert row.attempts == 2
    finally:
        stop(worker, again)
        await svc.close()
        stop(server)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.asyncio
async def test_the_same_selfie_gives_the_same_pixels_in_fresh_runs_and_as_the_library(tmp_path, redis_url, redis):  # noqa: F811
    outputs, toon_paths = [], []
    for run in range(2):  # two fresh deployments: new data directory, new job ids, an empty Redis database
        await redis.flushdb()
        env = worker_env(tmp_path / f"run{run}", redis_url, TOONIFY_SHUTDOWN_GRACE_S="5")
        svc = await ToonService.open(Settings.from_env(env))
        try:
            async with running_worker(svc):
                ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="balanced")
                assert (await events_until_done(svc, ticket.job_id))[-1].status == "done"
            outputs.append(await svc.result(ticket.job_id))
            async with svc.rt.sessions() as s:
                toon_paths.append(Path(await s.scalar(sa.select(StyleModel.checkpoint_path))))
        finally:
            await svc.close()
    first, second = outputs
    assert first.job_id != second.job_id
    assert np.array_equal(pixels(first.composite), pixels(second.composite))
    assert [c for c in first.crops] == [c for c in second.crops]

    # ... and what `toonify toon` computes for the same photo, style and blend
    tf = ModelCache("cpu").toonifier(base_models_from_manifest(DEMO_DIR), toon_paths[0])
    with Image.open(FIXTURE) as photo:
        lib = tf.toonify(photo.convert("RGB"), mode="balanced", spec=BlendSpec.from_json(first.spec))
    assert np.array_equal(pixels(first.crops[0]), np.asarray(lib.crops[0].convert("RGB")))


@pytest.mark.asyncio
async def test_maintenance_runs_as_a_cron_job(tmp_path, redis_url, redis):  # noqa: F811
    env = worker_env(tmp_path, redis_url, TOONIFY_SHUTDOWN_GRACE_S="5")
    svc = await ToonService.open(Settings.from_env(env))
    try:
        admin = actor(1, admin=True)
        await svc.start_blend_poll(admin, GUILD, levels=(8, 16), duration_s=1)
        ticket = await svc.submit_toon(actor(2), GUILD, astronaut())
        async with svc.rt.sessions() as s:  # the selfie's retention has passed
            await s.execute(sa.update(Blob).values(expires_at=utcnow() - timedelta(seconds=1)))
            await s.commit()
        await svc.cancel(actor(2), ticket.job_id)
        every_second = set(range(60))  # the cron job fires every second here (every minute by default)
        async with serving_worker(svc.rt, ("toon",), models=ModelCache("cpu"), maintenance_seconds=every_second):
            for _ in range(200):
                info = await svc.open_poll(GUILD)
                async with svc.rt.sessions() as s:
                    selfies = await s.scalar(sa.select(sa.func.count(Blob.id)).where(Blob.kind == "selfie"))
                if info is None and selfies == 0:
                    break
                await asyncio.sleep(0.1)
        assert info is None, info  # closed by the cron job, not by anyone's command
        assert selfies == 0
    finally:
        await svc.close()


@pytest.mark.asyncio
async def test_a_job_whose_worker_keeps_dying_is_given_up(tmp_path, redis_url, redis):  # noqa: F811
    env = worker_env(tmp_path, redis_url, TOONIFY_SHUTDOWN_GRACE_S="5")
    svc = await ToonService.open(Settings.from_env(env))
    try:
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut(), mode="fast")
        for death in range(1, MAX_WORKER_DEATHS + 1):  # each time a worker took it and died (no heartbeat)
            async with svc.rt.sessions() as s:
                await s.execute(sa.update(Job).values(status=JobStatus.RUNNING, worker_id=f"gone:{death}"))
                await s.commit()
            counts = await reconcile(svc.rt)
            assert counts["requeued"] == 1
            assert int(await redis.get(job_deaths(ticket.job_id))) == death
            assert (await job_row(svc, ticket.job_id)).status == JobStatus.QUEUED
        async with running_worker(svc):
            events = await events_until_done(svc, ticket.job_id)
        assert events[-1].status == "failed" and f"died {MAX_WORKER_DEATHS} times" in events[-1].error, events[-1]

        other = await svc.submit_toon(actor(2), GUILD, astronaut(1), mode="fast")  # one death is no reason to stop
        async with svc.rt.sessions() as s:
            await s.execute(sa.update(Job).where(Job.id == other.job_id).values(status=JobStatus.RUNNING))
            await s.commit()
        await reconcile(svc.rt)
        async with running_worker(svc):
            assert (await events_until_done(svc, other.job_id))[-1].status == "done"
    finally:
        await svc.close()
