"""The GPU worker: arq job functions for the ``toon`` and ``finetune`` queues, on top of the job ledger.

The ``toon`` queue runs toons, re-blends and poll previews; the ``finetune`` queue the long training jobs:
fine-tunes (backend.finetune) and distillations of instant models (backend.distill).

arq delivers a job at least once, so every function starts from the SQL row: a finished row is left alone,
a queued one is claimed (conditional UPDATE), and results are content-addressed blobs written before the row
says ``done``. On start-up the worker hands back rows left ``running`` by a worker that no longer sends
heartbeats (killed, machine lost) and re-enqueues queued rows that Redis forgot.

Toon jobs run concurrently (``max_jobs`` per worker); their projections meet in one
:class:`~backend.batching.ProjectionBatcher` pass. Cancellation: the service sets a Redis flag and publishes on
``toonify:cancel``; the worker turns that into a per-job event checked between pipeline stages and between
projection steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import torch
from arq import Retry
from arq.cron import cron
from arq.worker import Worker, func
from PIL import Image

from backend import ledger, metrics
from backend.batching import ProjectionBatcher
from backend.config import Settings
from backend.db.models import Blob, BlobKind, Job, JobKind, JobStatus, Student, StyleModel
from backend.distill import run_distill
from backend.errors import BadInputError, JobCancelledError, UnavailableError
from backend.explore import run_edit, run_sweep
from backend.finetune import run_finetune
from backend.jobs import PreviewParams, ToonParams, ToonResult, queue_of
from backend.keys import QUEUE_NAMES, STATS_KEY
from backend.latents import PROBE_PSI, PROBE_SEEDS, face_seeds, project_or_reuse
from backend.ledger import enqueue, store_blob
from backend.logs import JOB_ID
from backend.model_cache import ModelCache
from backend.progress import JobProgress, ProgressEvent, publish
from backend.redis import REDIS_DOWN, redis_settings
from backend.runtime import Runtime, describe_redis, open_runtime
from backend.service.students import blend_words, ready_student, stored_path
from backend.worker_state import WorkerState, reconcile
from gan.align import FaceTooSmallError, NoFaceError
from gan.blending import BlendSpec
from gan.imageio import BadImageError, decode_image
from gan.pipeline import Toonifier

log = logging.getLogger("toonify.worker")
MAX_TRIES = 3  # attempts that end in an error before a job fails for good
MAX_WORKER_DEATHS = 10  # a job whose worker died this often while running it (OOM?) is not tried again
HAND_BACK_WAIT_S = 15.0  # after the grace period: how long jobs get to reach their next step and hand back
MAINTENANCE_SECONDS = {0}  # arq cron: expiry and poll deadlines once a minute, by one worker of the fleet


class RedisLostError(UnavailableError):
    """The worker lost Redis and it did not come back within ``redis_retry_s``: exit, let a supervisor restart."""

    def __init__(self, detail: str) -> None:
        super().__init__("redis", detail)


# ------------------------------------------------------------------------------------------------ toon job


async def toon_job(ctx: dict, job_id: str) -> str:
    """arq entry point for ``toon``, ``reblend`` and ``preview`` jobs; returns the job's final status."""
    return await _run(ctx["toonify"], job_id, _toon_or_preview)


async def finetune_job(ctx: dict, job_id: str) -> str:
    """arq entry point for the ``finetune`` queue: fine-tunes (backend.finetune) and distillations
    (backend.distill), told apart by the job row's kind."""
    return await _run(ctx["toonify"], job_id, _finetune_or_distill)


async def distill_job(ctx: dict, job_id: str) -> str:
    """A distillation job by itself (the queue's entry point is finetune_job, which dispatches here too)."""
    return await _run(ctx["toonify"], job_id, run_distill)


async def _finetune_or_distill(w: WorkerState, job: Job) -> dict[str, Any]:
    return await (run_distill(w, job) if job.kind == JobKind.DISTILL else run_finetune(w, job))


async def maintenance(ctx: dict) -> dict[str, int]:
    """arq cron job: expire old selfies, results and latents; close polls past their deadline. arq runs each
    tick once for the whole fleet (the cron job's id is its tick)."""
    from backend.service import ToonService

    service = ToonService(ctx["toonify"].rt)
    expired = await service.expire()
    closed = await service.close_due_polls()
    return {"expired_rows": expired.rows, "closed_polls": len(closed)}


async def _run(w: WorkerState, job_id: str, body) -> str:
    JOB_ID.set(job_id)  # every log line of this job (its task, its threads) carries the id
    rt = w.rt
    job = await ledger.claim(rt, job_id, w.worker_id)
    if job is None:  # finished, cancelled before it started, taken by another delivery, or gone
        async with rt.sessions() as s:
            row = await s.get(Job, job_id)
        if row is None:
            return "missing"
        if row.status == JobStatus.QUEUED and row.cancel_requested:
            await ledger.finish(rt, row, JobStatus.CANCELLED, error="cancelled before it started")
            return JobStatus.CANCELLED.value
        return row.status.value
    if await w.worker_deaths(job.id) >= MAX_WORKER_DEATHS:  # a job that kills its worker must not loop for ever
        error = f"its worker died {MAX_WORKER_DEATHS} times while running it; not trying again"
        await ledger.finish(rt, job, JobStatus.FAILED, error=error)
        return JobStatus.FAILED.value
    w.running.add(job.id)
    try:  # the job is ours until its outcome is written: reconcile leaves rows of running jobs alone
        return await _run_claimed(w, job, body)
    finally:
        w.running.discard(job.id)
        w.handing_back.discard(job.id)
        w.cancel_events.pop(job.id, None)
        w.progress.pop(job.id, None)
        w.cancel_seen_at.pop(job.id, None)


async def _run_claimed(w: WorkerState, job: Job, body) -> str:
    rt = w.rt
    with contextlib.suppress(*REDIS_DOWN):
        await publish(rt.pool, ProgressEvent(job_id=job.id, status="running", stage="start"))
    t0 = time.perf_counter()
    try:
        result = await body(w, job)
    except JobCancelledError as e:
        if job.id in w.handing_back and not await w.cancel_flag(job.id):
            await _hand_back(rt, job)
            raise Retry(defer=0) from e  # arq keeps the job queued, ready for the next worker
        seen = w.cancel_seen_at.get(job.id)
        note = f" (cancel seen at {seen[0]} step {seen[1]})" if seen else ""
        await ledger.finish(rt, job, JobStatus.CANCELLED, error=f"{e}{note}")
        return JobStatus.CANCELLED.value
    except BadInputError as e:
        await ledger.finish(rt, job, JobStatus.FAILED, error=str(e))
        return JobStatus.FAILED.value
    except asyncio.CancelledError:  # shutdown past the grace period, an arq abort, or arq's job timeout
        if w.stopping:  # arq keeps a job cancelled this way queued ("will be run again")
            await asyncio.shield(_hand_back(rt, job))
        elif await asyncio.shield(w.cancel_flag(job.id)):
            await asyncio.shield(ledger.finish(rt, job, JobStatus.CANCELLED, error="cancelled"))
        else:
            error = "stopped: it ran past the job timeout"
            await asyncio.shield(ledger.finish(rt, job, JobStatus.FAILED, error=error))
        raise
    except Exception as e:  # transient (device, disk, network): retry with back-off, then give up
        log.exception("job %s attempt %d failed", job.id, job.attempts)
        if job.attempts < MAX_TRIES:
            await _hand_back(rt, job, error=f"retrying after an error: {e}")
            raise Retry(defer=timedelta(seconds=2**job.attempts)) from e
        await ledger.finish(rt, job, JobStatus.FAILED, error=f"failed after {job.attempts} attempts: {e}")
        return JobStatus.FAILED.value
    await ledger.finish(rt, job, JobStatus.DONE, result=result)
    if queue_of(job.kind) == "toon":  # the wait estimate is for toon jobs
        with contextlib.suppress(*REDIS_DOWN):
            await _record_duration(rt, time.perf_counter() - t0)
    return JobStatus.DONE.value


async def _hand_back(rt: Runtime, job: Job, error: str = "the worker stopped; it will run again") -> None:
    """running → queued. When SQL is away too, the row stays ``running`` under this worker, and reconcile hands
    it back once this worker's heartbeat is gone (or at once, from this worker's own reconcile round)."""
    try:
        await ledger.requeue(rt, job, error=error)
    except Exception as exc:
        log.warning("could not hand job %s back now (%s); reconcile will", job.id, exc)


async def _record_duration(rt: Runtime, seconds: float) -> None:
    old = await rt.pool.get(STATS_KEY)
    value = seconds if old is None else 0.8 * float(old) + 0.2 * seconds
    await rt.pool.set(STATS_KEY, str(value))


async def _toon(w: WorkerState, job: Job) -> dict[str, Any]:
    with w.batcher.announced() as release:  # jobs started together meet in one projection pass
        return await _toon_stages(w, job, release)


async def _toon_stages(w: WorkerState, job: Job, release: Callable[[], None]) -> dict[str, Any]:
    rt, p = w.rt, ToonParams.from_json(job.params)
    progress = w.progress[job.id] = JobProgress(rt.pool, job.id)
    async with rt.sessions() as s:
        blob = await s.get(Blob, job.input_blob_id) if job.input_blob_id else None
        style = await s.get(StyleModel, p.style_id)
    if blob is None or not rt.blobs.exists(blob.sha256):
        raise BadInputError("the photo for this job has expired or was deleted; send it again")
    if style is None:
        raise BadInputError("this style no longer exists")
    if p.mode == "instant":
        release()  # no projection: a pass need not wait for this job
    await w.check_cancel(job.id)
    progress("load", 0, 1, "loading models")
    toon_path = stored_path(rt.settings.data_dir, style.checkpoint_path)
    tf = await w.batcher.call(w.models.toonifier, w.base_models_for(toon_path, style.name), toon_path)
    data = await asyncio.to_thread(rt.blobs.read, blob.sha256)

    progress("align", 0, 1, "finding faces")
    try:
        image = await asyncio.to_thread(decode_image, data)
        alignment = await asyncio.to_thread(tf.align, image, all_faces=p.all_faces)
    except (BadImageError, NoFaceError, FaceTooSmallError) as e:
        raise BadInputError(str(e)) from e
    aligned = list(alignment)
    progress("align", 1, 1, f"{len(aligned)} face(s)")
    await w.check_cancel(job.id)

    mode, spec = p.mode, p.blend(style.default_blend)
    if mode == "instant":
        toon_crops = await _instant(w, job, tf, style, spec, [a.image for a in aligned])
    else:
        toon_crops = await _projected(w, job, tf, blob.sha256, spec, [a.image for a in aligned], release)
    await w.check_cancel(job.id)
    progress("paste", 0, 1, "pasting back")
    composite = await w.batcher.call(tf.composite, image, aligned, toon_crops)
    progress("upload", 0, 1, "saving")
    composite_sha = await _store_result(rt, job.user_id, _png(composite), rt.settings.result_retention_s)
    crop_shas = [await _store_result(rt, job.user_id, _png(c), rt.settings.result_retention_s) for c in toon_crops]
    await progress.flush()
    return ToonResult(
        composite=composite_sha,
        crops=tuple(crop_shas),
        faces=len(aligned),
        too_small=len(alignment.too_small),
        style=style.name,
        spec=spec,
        image_sha256=blob.sha256,
        mode=mode,
    ).to_json()


async def _projected(
    w: WorkerState,
    job: Job,
    tf: Toonifier,
    sha: str,
    spec: BlendSpec,
    faces: list[Image.Image],
    release: Callable[[], None],
) -> list[Image.Image]:
    """Project the faces (or reuse the latents cached for this photo and mode), then render them at ``spec``."""
    mode, progress = ToonParams.from_json(job.params).mode, w.progress[job.id]
    latents = await project_or_reuse(w, job, tf, sha, mode, faces, release)
    await w.check_cancel(job.id)
    progress("render", 0, 1, "drawing the toon")
    return await w.batcher.call(tf.render, latents, spec)


async def _instant(
    w: WorkerState, job: Job, tf: Toonifier, style: StyleModel, spec: BlendSpec, faces: list[Image.Image]
) -> list[Image.Image]:
    """The faces through the style's student for ``spec``: one forward pass, no latents (nothing cached).

    The student is checked against the style's models and blend. One made for others fails the job with the
    reason, and its row is marked stale, so requests without a mode go back to projection instead of failing
    the same way again."""
    from gan.checkpoints import CheckpointError
    from gan.distill import StudentMismatchError, read_student_lineage, student_lineage
    from gan.pipeline import to_tensor

    rt = w.rt
    what = f"the instant model of style {style.name!r} for {blend_words(spec)}"
    async with rt.sessions() as s:
        row = await ready_student(s, rt.settings.data_dir, style.id, spec)
    if row is None:
        raise BadInputError(f"{what} is gone; send the photo again (it will be projected) or ask for balanced")
    path = stored_path(rt.settings.data_dir, row.path)
    expected = student_lineage(tf.base, tf.toon, spec)
    try:
        student = await w.batcher.call(w.models.student, path, expected)
    except StudentMismatchError as e:
        found = await asyncio.to_thread(read_student_lineage, path)
        log.warning("job %s: %s", job.id, e)
        await _mark_student(rt, row.id, "stale")
        raise BadInputError(
            f"{what} was distilled for {found.mismatch(expected)}: it no longer fits the style. Ask for balanced "
            "mode, or an admin can /distill it again"
        ) from e
    except (CheckpointError, FileNotFoundError) as e:
        log.warning("job %s: %s", job.id, e)
        await _mark_student(rt, row.id, "broken")
        raise BadInputError(f"{what} cannot be read; ask for balanced mode, or an admin can /distill it again") from e
    await w.check_cancel(job.id)
    w.progress[job.id]("render", 0, 1, "drawing the toon (instant)")

    def run() -> list[Image.Image]:
        if tf.student_for(spec) is not student:
            tf.add_student(student)
        return tf.instant(to_tensor(faces, tf.device), spec)

    return await w.batcher.call(run)


async def _mark_student(rt: Runtime, student_id: int, status: str) -> None:
    async with rt.sessions() as s:
        await s.execute(sa.update(Student).where(Student.id == student_id).values(status=status))
        await s.commit()


async def _toon_or_preview(w: WorkerState, job: Job) -> dict[str, Any]:
    """The toon queue's jobs by kind: toons and re-blends, poll grids, /edit and /sweep (backend.explore)."""
    if job.kind == JobKind.PREVIEW:
        return await _preview(w, job)
    if job.kind == JobKind.EDIT:
        return await run_edit(w, job)
    if job.kind == JobKind.SWEEP:
        return await run_sweep(w, job)
    return await _toon(w, job)


async def _preview(w: WorkerState, job: Job) -> dict[str, Any]:
    """A poll's grid: one row per candidate blend, the same probe faces in every row, labelled 1..N. A snapshot
    poll's rows are its snapshots (each a generator file) at its blend."""
    from PIL import ImageDraw

    from gan.images import z_from_seeds

    rt, p = w.rt, PreviewParams.from_json(job.params)
    async with rt.sessions() as s:
        style = await s.get(StyleModel, p.style_id)
    if style is None:
        raise BadInputError("this style no longer exists")
    toon_path = stored_path(rt.settings.data_dir, style.checkpoint_path)
    tf = await w.batcher.call(w.models.toonifier, w.base_models_for(toon_path, style.name), toon_path)

    def probe_ws() -> torch.Tensor:
        with torch.no_grad():
            z = z_from_seeds(list(PROBE_SEEDS), tf.base.z_dim).to(tf.device)
            return tf.base.mapping(z, truncation_psi=PROBE_PSI).unsqueeze(1).expand(-1, tf.base.num_ws, -1)

    ws = await w.batcher.call(probe_ws)
    rows = []
    for i, spec in enumerate(p.specs):
        await w.check_cancel(job.id)
        row_tf = tf
        if i < len(p.checkpoints):  # a snapshot poll: this row's generator
            path = stored_path(rt.settings.data_dir, p.checkpoints[i])
            row_tf = await w.batcher.call(w.models.toonifier, w.base_models_for(path), path)
        faces = await w.batcher.call(row_tf.render, ws, spec)
        r = faces[0].width
        row = Image.new("RGB", (r * len(faces) + r // 2, r), "white")
        for j, face in enumerate(faces):
            row.paste(face, (r // 2 + j * r, 0))
        ImageDraw.Draw(row).text((4, 4), str(i + 1), fill="black")
        rows.append(row)
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * row.height))
    scale = max(1, 256 // rows[0].height)  # tiny demo models: enlarge so a chat client shows it sensibly
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    sha = await _store_result(rt, job.user_id, _png(grid), rt.settings.result_retention_s)
    row_shas = [await _store_result(rt, job.user_id, _png(r), rt.settings.result_retention_s) for r in rows]
    return ToonResult(
        composite=sha, crops=tuple(row_shas), faces=len(PROBE_SEEDS), style=style.name, poll_id=p.poll_id
    ).to_json()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _store_result(rt: Runtime, user_id: int, data: bytes, retention_s: int) -> str:
    sha, _ = await store_blob(rt, user_id, data, "image/png", BlobKind.RESULT, retention_s)
    return sha


# ------------------------------------------------------------------------------------------------ running


def make_workers(
    w: WorkerState,
    queues: tuple[str, ...] = ("toon", "finetune"),
    *,
    burst: bool = False,
    maintenance_seconds: set[int] | None = None,
) -> list[Worker]:
    """arq Workers (one per queue) sharing ``w``; the first also runs the maintenance cron job."""
    s = w.rt.settings
    made = []
    for queue in queues:
        fn = toon_job if queue == "toon" else finetune_job
        crons = [] if made else [cron(maintenance, second=maintenance_seconds or MAINTENANCE_SECONDS, timeout=300)]
        made.append(
            Worker(
                # arq's retry budget is only a backstop (a job it drops stays queued in SQL and is re-enqueued):
                # the ledger decides (MAX_TRIES errors, MAX_WORKER_DEATHS; graceful hand-backs are unlimited)
                functions=[func(fn, name=queue, max_tries=100)],
                cron_jobs=crons,
                queue_name=QUEUE_NAMES[queue],
                redis_settings=redis_settings(w.rt.redis.url),
                ctx={"toonify": w},
                max_jobs=s.toon_max_jobs if queue == "toon" else s.finetune_max_jobs,
                job_timeout=s.job_timeout_s if queue == "toon" else max(s.job_timeout_s, 24 * 3600),
                keep_result=60,
                allow_abort_jobs=True,
                handle_signals=False,
                poll_delay=0.25,  # seconds between queue polls: each poll costs the GIL a round trip
                health_check_interval=30,
                burst=burst,
            )
        )
    return made


def default_device(settings: Settings) -> str:
    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


class QueueSupervisor:
    """Runs the arq workers of one process; restarts one whose Redis connection broke, once Redis answers again.

    arq's poll loop ends at the first failed Redis call. The jobs it started keep running (they are their own
    tasks, and their results go to SQL), so the supervisor waits for Redis with back-off, reconciles (a Redis that
    restarted empty has forgotten the queue) and starts a fresh arq worker. If Redis stays away longer than
    ``redis_retry_s``, running jobs are handed back and RedisLostError ends the process with a non-zero status.
    """

    def __init__(self, state: WorkerState, queues: tuple[str, ...], maintenance_seconds: set[int] | None) -> None:
        self.state, self.queues, self.maintenance_seconds = state, queues, maintenance_seconds
        self.workers: list[Worker] = []  # every arq worker started, current and replaced (their jobs may run on)
        self.restarts = 0

    async def run(self) -> None:
        rt = self.state.rt
        while True:
            current = make_workers(self.state, self.queues, maintenance_seconds=self.maintenance_seconds)
            self.workers += current
            tasks = [
                asyncio.create_task(wk.async_run(), name=f"arq-{q}") for wk, q in zip(current, self.queues, strict=True)
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
            errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            if not errors:
                return  # burst mode: the queues are empty
            if not isinstance(errors[0], REDIS_DOWN):
                raise errors[0]
            for wk in current:
                wk.allow_pick_jobs = False
            log.warning("lost %s (%s); reconnecting", describe_redis(rt.redis.url), errors[0])
            await self._wait_for_redis()
            self.restarts += 1
            log.warning("%s is back: reconciling and serving again", describe_redis(rt.redis.url))
            await reconcile(rt, own=self.state)

    async def _wait_for_redis(self) -> None:
        rt, limit = self.state.rt, self.state.rt.settings.redis_retry_s
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + limit, 0.25
        while True:
            try:
                await rt.pool.ping()
                return
            except REDIS_DOWN:
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, 5.0)
        handed = self.state.hand_back_all()
        self.state.stopping = True
        await self.wait_for_jobs(HAND_BACK_WAIT_S)
        raise RedisLostError(
            f"lost the {describe_redis(rt.redis.url)} and it did not come back within {limit} s "
            f"({len(handed)} running job(s) handed back); exiting so a supervisor restarts the worker"
        )

    def running_tasks(self) -> list[asyncio.Task]:
        return [t for wk in self.workers for t in wk.tasks.values() if not t.done()]

    async def wait_for_jobs(self, timeout_s: float) -> bool:
        """True when every job task of every arq worker ended within ``timeout_s``."""
        pending = self.running_tasks()
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        return not self.running_tasks()

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs; let running ones finish for ``grace_s``, then hand back the rest at their next step."""
        self.state.stopping = True
        for wk in self.workers:
            wk.allow_pick_jobs = False
        if self.running_tasks():
            log.info("shutting down: %d job(s) running, waiting up to %s s", len(self.state.running), grace_s)
        if not await self.wait_for_jobs(grace_s):
            handed = self.state.hand_back_all()
            log.info("grace period over: handing back %s", ", ".join(handed) or "nothing")
            await self.wait_for_jobs(HAND_BACK_WAIT_S)

    async def close(self) -> None:
        """Cancel what is left (it is handed back too) and close arq's connections."""
        for wk in self.workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await wk.close()


@contextlib.asynccontextmanager
async def serving_worker(
    rt: Runtime,
    queues: tuple[str, ...] = ("toon", "finetune"),
    *,
    models: ModelCache | None = None,
    maintenance_seconds: set[int] | None = None,
) -> AsyncIterator[tuple[WorkerState, list[asyncio.Task]]]:
    """A worker serving ``queues`` on ``rt`` inside this event loop: the one way the worker process, ``toonify
    up``/``submit``, the benchmarks and the tests run one. Yields the state and the running tasks (one that ends
    means the worker gave up: Redis lost for good, or a bug). On exit it drains: no new jobs, running jobs get
    ``settings.shutdown_grace_s`` to finish, the rest are handed back to the queue."""
    state = WorkerState(rt=rt, models=models or ModelCache(default_device(rt.settings)), batcher=ProjectionBatcher())
    await state.start()
    supervisor = QueueSupervisor(state, queues, maintenance_seconds)
    tasks = [asyncio.create_task(supervisor.run(), name="arq-supervisor")]
    tasks.append(asyncio.create_task(metrics.watch_queues(rt.pool, QUEUE_NAMES)))
    log.info("worker %s serving %s", state.worker_id, ", ".join(queues))
    try:
        yield state, tasks
    finally:
        try:
            await supervisor.drain(rt.settings.shutdown_grace_s)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await supervisor.close()
            await state.stop()


async def run_worker(
    settings: Settings, queues: tuple[str, ...] = ("toon", "finetune"), *, stop: asyncio.Event | None = None
) -> None:
    """Run a worker process until ``stop`` is set or SIGTERM/SIGINT arrives, then drain (see serving_worker).
    Raises RedisLostError when Redis stays away past ``redis_retry_s``."""
    rt = await open_runtime(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    metrics.serve(settings.metrics_port)
    try:
        async with serving_worker(rt, queues) as (_, tasks):
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
    finally:
        await rt.close()


__all__ = [
    "QueueSupervisor",
    "RedisLostError",
    "WorkerState",
    "distill_job",
    "enqueue",
    "face_seeds",
    "make_workers",
    "reconcile",
    "run_worker",
    "serving_worker",
    "toon_job",
]
