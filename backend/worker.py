"""The GPU worker: arq job functions for the ``toon`` and ``finetune`` queues, on top of the job ledger.

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
import hashlib
import io
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch
from arq import Retry
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.worker import Worker, func
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from backend import ledger, metrics
from backend.batching import ProjectionBatcher
from backend.config import Settings
from backend.db.models import Blob, BlobKind, CachedLatent, Job, JobKind, JobStatus, StyleModel, utcnow
from backend.errors import BadInputError, JobCancelledError
from backend.ledger import STATS_KEY, enqueue, record_blob
from backend.logs import JOB_ID
from backend.model_cache import BaseModels, ModelCache, base_models_from_manifest
from backend.progress import ProgressEvent, publish
from backend.redis import redis_settings
from backend.runtime import QUEUE_NAMES, Runtime, open_runtime
from gan.align import FaceTooSmallError, NoFaceError
from gan.blending import BlendSpec
from gan.encoder import generator_hash
from gan.imageio import BadImageError, decode_image
from gan.projection import ProjectionCancelledError

log = logging.getLogger("toonify.worker")
MAX_TRIES = 3
PROGRESS_EVERY_S = 0.25  # progress events per job at most this often (the last step always goes out)


def heartbeat_key(worker_id: str) -> str:
    return f"toonify:worker:{worker_id}"


def job_seed(job_id: str, face: int) -> int:
    """Per-face seed from the job id: the same photo projects the same alone, in a batch or on a retry."""
    return int.from_bytes(hashlib.sha256(f"{job_id}:{face}".encode()).digest()[:4], "little")


@dataclass
class WorkerState:
    """What every job function of one worker process shares (``ctx['toonify']``)."""

    rt: Runtime
    models: ModelCache
    batcher: ProjectionBatcher
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    cancel_events: dict[str, threading.Event] = field(default_factory=dict)
    tasks: list[asyncio.Task] = field(default_factory=list)
    progress: dict[str, JobProgress] = field(default_factory=dict)  # running jobs' progress trackers
    cancel_seen_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # job -> (stage, step) at the flag

    @property
    def heartbeat_ttl_s(self) -> int:
        return self.rt.settings.worker_heartbeat_ttl_s

    @property
    def base_models(self) -> BaseModels:
        return base_models_from_manifest(self.rt.models_dir)

    def cancel_event(self, job_id: str) -> threading.Event:
        return self.cancel_events.setdefault(job_id, threading.Event())

    def request_cancel(self, job_id: str) -> None:
        p = self.progress.get(job_id)
        if job_id not in self.cancel_seen_at and p is not None:
            self.cancel_seen_at[job_id] = p.current
        self.cancel_event(job_id).set()

    async def check_cancel(self, job_id: str) -> None:
        if self.cancel_event(job_id).is_set() or await ledger.cancel_requested(self.rt, job_id):
            self.request_cancel(job_id)
            p = self.progress.get(job_id)
            raise JobCancelledError(f"cancelled between stages, after {p.current[0] if p else 'start'}")

    async def start(self) -> None:
        await self.rt.pool.set(heartbeat_key(self.worker_id), b"1", ex=self.heartbeat_ttl_s)
        await reconcile(self.rt)
        self.tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self.tasks.append(asyncio.create_task(self._reconcile_forever(), name="reconcile"))
        self.tasks.append(asyncio.create_task(self._maintain_forever(), name="maintenance"))
        self.tasks.append(asyncio.create_task(self._listen_cancel(), name="cancel-listener"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.batcher.close()
        with contextlib.suppress(Exception):
            await self.rt.pool.delete(heartbeat_key(self.worker_id))

    async def _heartbeat(self) -> None:
        while True:
            await self.rt.pool.set(heartbeat_key(self.worker_id), b"1", ex=self.heartbeat_ttl_s)
            await asyncio.sleep(self.heartbeat_ttl_s / 4)

    async def _reconcile_forever(self) -> None:
        """A worker that dies mid-job is noticed by the survivors once its heartbeat key expires."""
        while True:
            await asyncio.sleep(self.heartbeat_ttl_s / 2)
            try:
                await reconcile(self.rt)
            except Exception:  # a hiccup of Redis or SQL: try again next round
                log.exception("reconcile failed")

    async def _maintain_forever(self, every_s: float = 60.0) -> None:
        """Expire old selfies, results and latents; close polls past their deadline. Safe in every worker."""
        from backend.service import ToonService

        service = ToonService(self.rt)
        while True:
            try:
                await service.expire()
                await service.close_due_polls()
            except Exception:
                log.exception("maintenance failed")
            await asyncio.sleep(every_s)

    async def _listen_cancel(self) -> None:
        pubsub = self.rt.pool.pubsub()
        await pubsub.subscribe(ledger.CANCEL_CHANNEL)
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    job_id = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    self.request_cancel(job_id)
        finally:
            await pubsub.aclose()


async def reconcile(rt: Runtime) -> dict[str, int]:
    """Hand back jobs of dead workers and re-enqueue queued jobs Redis no longer holds; returns counts."""
    counts = {"requeued": 0, "reenqueued": 0}
    async with rt.sessions() as s:
        rows = (await s.scalars(sa.select(Job).where(Job.status.in_(ledger.ACTIVE)))).all()
    pool = rt.pool
    for job in rows:
        if job.status == JobStatus.RUNNING:
            if job.worker_id and await pool.exists(heartbeat_key(job.worker_id)):
                continue  # its worker is alive (maybe on another machine)
            await ledger.requeue(rt, job, error="the worker running this job stopped; retrying")
            await pool.delete(in_progress_key_prefix + job.id)  # arq would wait out the job timeout otherwise
            counts["requeued"] += 1
        queue = QUEUE_NAMES["finetune" if job.kind == JobKind.FINETUNE else "toon"]
        if await pool.zscore(queue, job.id) is None or not await pool.exists(job_key_prefix + job.id):
            await pool.delete(job_key_prefix + job.id)
            await enqueue(pool, job)
            counts["reenqueued"] += 1
    return counts


# ------------------------------------------------------------------------------------------------ toon job


async def toon_job(ctx: dict, job_id: str) -> str:
    """arq entry point for ``toon`` and ``reblend`` jobs; returns the job's final status."""
    w: WorkerState = ctx["toonify"]
    return await _run(w, job_id, ctx.get("job_try", 1), _toon_or_preview)


async def finetune_job(ctx: dict, job_id: str) -> str:
    """arq entry point for ``finetune`` jobs (see backend.finetune)."""
    from backend.finetune import run_finetune

    w: WorkerState = ctx["toonify"]
    return await _run(w, job_id, ctx.get("job_try", 1), run_finetune)


async def _run(w: WorkerState, job_id: str, job_try: int, body) -> str:
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
    await publish(rt.pool, ProgressEvent(job_id=job.id, status="running", stage="start"))
    t0 = time.perf_counter()
    try:
        result = await body(w, job)
    except JobCancelledError as e:
        seen = w.cancel_seen_at.get(job.id)
        note = f" (cancel seen at {seen[0]} step {seen[1]})" if seen else ""
        await ledger.finish(rt, job, JobStatus.CANCELLED, error=f"{e}{note}")
        return JobStatus.CANCELLED.value
    except BadInputError as e:
        await ledger.finish(rt, job, JobStatus.FAILED, error=str(e))
        return JobStatus.FAILED.value
    except asyncio.CancelledError:  # arq abort or job timeout: the row must not stay "running"
        asked = await asyncio.shield(ledger.cancel_requested(rt, job.id))  # else arq's job timeout fired
        status = JobStatus.CANCELLED if asked else JobStatus.FAILED
        error = "cancelled" if status == JobStatus.CANCELLED else "stopped: it ran past the job timeout"
        await asyncio.shield(ledger.finish(rt, job, status, error=error))
        raise
    except Exception as e:  # transient (device, disk, network): retry with back-off, then give up
        log.exception("job %s attempt %d failed", job.id, job.attempts)
        if job.attempts < MAX_TRIES:
            await ledger.requeue(rt, job, error=f"retrying after an error: {e}")
            raise Retry(defer=timedelta(seconds=2**job.attempts)) from e
        await ledger.finish(rt, job, JobStatus.FAILED, error=f"failed after {job.attempts} attempts: {e}")
        return JobStatus.FAILED.value
    finally:
        w.cancel_events.pop(job.id, None)
        w.progress.pop(job.id, None)
        w.cancel_seen_at.pop(job.id, None)
    await ledger.finish(rt, job, JobStatus.DONE, result=result)
    if job.kind != JobKind.FINETUNE:
        await _record_duration(rt, time.perf_counter() - t0)
    return JobStatus.DONE.value


async def _record_duration(rt: Runtime, seconds: float) -> None:
    old = await rt.pool.get(STATS_KEY)
    value = seconds if old is None else 0.8 * float(old) + 0.2 * seconds
    await rt.pool.set(STATS_KEY, str(value))


class JobProgress:
    """Publishes a job's (stage, step, total) at most every PROGRESS_EVERY_S, never an unchanged event."""

    def __init__(self, rt: Runtime, job_id: str) -> None:
        self.rt, self.job_id, self.last, self.sent = rt, job_id, 0.0, None
        self.pending: set[asyncio.Task] = set()
        self.current: tuple[str, int] = ("start", 0)  # unthrottled: where the job is right now

    def __call__(self, stage: str, step: int, total: int, message: str | None = None) -> None:
        self.current = (stage, step)
        now = time.monotonic()
        key = (stage, step, total)
        if key == self.sent or (now - self.last < PROGRESS_EVERY_S and step not in (0, total)):
            return
        self.last, self.sent = now, key
        event = ProgressEvent(
            job_id=self.job_id, status="running", stage=stage, step=step, total=total, message=message
        )
        task = asyncio.get_running_loop().create_task(publish(self.rt.pool, event))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def flush(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


async def _toon(w: WorkerState, job: Job) -> dict[str, Any]:
    release = w.batcher.announce()  # jobs started together meet in one projection pass
    try:
        return await _toon_stages(w, job, release)
    finally:
        release()


async def _toon_stages(w: WorkerState, job: Job, release: Callable[[], None]) -> dict[str, Any]:
    rt, p = w.rt, job.params
    progress = w.progress[job.id] = JobProgress(rt, job.id)
    async with rt.sessions() as s:
        blob = await s.get(Blob, job.input_blob_id) if job.input_blob_id else None
        style = await s.get(StyleModel, p["style_id"])
    if blob is None or not rt.blobs.exists(blob.sha256):
        raise BadInputError("the photo for this job has expired or was deleted; send it again")
    if style is None:
        raise BadInputError("this style no longer exists")
    await w.check_cancel(job.id)
    progress("load", 0, 1, "loading models")
    toon_path = Path(style.checkpoint_path)
    if not toon_path.is_absolute():
        toon_path = rt.settings.data_dir / toon_path
    tf = await w.batcher.call(w.models.toonifier, w.base_models, toon_path)
    data = await asyncio.to_thread(rt.blobs.read, blob.sha256)

    progress("align", 0, 1, "finding faces")
    try:
        image = await asyncio.to_thread(decode_image, data)
        alignment = await asyncio.to_thread(tf.align, image, all_faces=p.get("all_faces", True))
    except (BadImageError, NoFaceError, FaceTooSmallError) as e:
        raise BadInputError(str(e)) from e
    aligned = list(alignment)
    progress("align", 1, 1, f"{len(aligned)} face(s)")
    await w.check_cancel(job.id)

    mode = p.get("mode", "balanced")
    base_hash = generator_hash(tf.base)
    latents = await _cached_latents(rt, job.user_id, blob.sha256, base_hash, mode, len(aligned))
    if latents is None:
        from gan.pipeline import to_tensor

        crops = await w.batcher.call(to_tensor, [a.image for a in aligned], "cpu")
        release()
        try:
            latents = await w.batcher.project(
                tf,
                crops,
                mode,
                seeds=[job_seed(job.id, i) for i in range(len(aligned))],
                progress=lambda step, total: progress("project", step, total),
                cancelled=w.cancel_event(job.id),
            )
        except ProjectionCancelledError as e:
            raise JobCancelledError(str(e)) from e
        await _store_latents(rt, job.user_id, blob.sha256, base_hash, mode, latents)
    await w.check_cancel(job.id)

    progress("render", 0, 1, "drawing the toon")
    spec = BlendSpec.from_json(p.get("spec") or style.default_blend or {"mode": "swap", "resolution": 32})
    toon_crops = await w.batcher.call(tf.render, latents, spec)
    await w.check_cancel(job.id)
    progress("paste", 0, 1, "pasting back")
    composite = await w.batcher.call(tf.composite, image, aligned, toon_crops)
    progress("upload", 0, 1, "saving")
    composite_sha = await _store_result(rt, job.user_id, _png(composite), rt.settings.result_retention_s)
    crop_shas = [await _store_result(rt, job.user_id, _png(c), rt.settings.result_retention_s) for c in toon_crops]
    await progress.flush()
    return {
        "composite": composite_sha,
        "crops": crop_shas,
        "faces": len(aligned),
        "too_small": len(alignment.too_small),
        "style": style.name,
        "spec": spec.to_json(),
        "image_sha256": blob.sha256,
    }


async def _toon_or_preview(w: WorkerState, job: Job) -> dict[str, Any]:
    return await (_preview(w, job) if job.kind == JobKind.PREVIEW else _toon(w, job))


PROBE_SEEDS = (1, 2, 3, 4)  # the same probe faces for every poll, so polls are comparable


async def _preview(w: WorkerState, job: Job) -> dict[str, Any]:
    """A poll's grid: one row per candidate blend, the same probe faces in every row, labelled 1..N."""
    from PIL import ImageDraw

    from gan.images import z_from_seeds

    rt, p = w.rt, job.params
    async with rt.sessions() as s:
        style = await s.get(StyleModel, p["style_id"])
    if style is None:
        raise BadInputError("this style no longer exists")
    toon_path = Path(style.checkpoint_path)
    tf = await w.batcher.call(w.models.toonifier, w.base_models, toon_path)

    def probe_ws() -> torch.Tensor:
        with torch.no_grad():
            z = z_from_seeds(list(PROBE_SEEDS), tf.base.z_dim).to(tf.device)
            return tf.base.mapping(z, truncation_psi=0.7).unsqueeze(1).expand(-1, tf.base.num_ws, -1)

    ws = await w.batcher.call(probe_ws)
    rows = []
    for i, spec_json in enumerate(p["specs"]):
        await w.check_cancel(job.id)
        faces = await w.batcher.call(tf.render, ws, BlendSpec.from_json(spec_json))
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
    return {
        "composite": sha,
        "crops": row_shas,
        "faces": len(PROBE_SEEDS),
        "too_small": 0,
        "style": style.name,
        "spec": {},
        "poll_id": p["poll_id"],
    }


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _store_result(rt: Runtime, user_id: int, data: bytes, retention_s: int) -> str:
    sha = await asyncio.to_thread(rt.blobs.put, data)
    await record_blob(rt, user_id, sha, len(data), "image/png", BlobKind.RESULT, retention_s)
    return sha


async def _cached_latents(
    rt: Runtime, user_id: int, sha: str, base_hash: str, mode: str, faces: int
) -> torch.Tensor | None:
    async with rt.sessions() as s:
        row = await s.scalar(
            sa.select(CachedLatent).where(
                CachedLatent.user_id == user_id,
                CachedLatent.image_sha256 == sha,
                CachedLatent.base_hash == base_hash,
                CachedLatent.mode == mode,
            )
        )
    if row is None:
        return None
    latents = st_load(row.data)["latents"]
    return latents if latents.shape[0] == faces else None


async def _store_latents(rt: Runtime, user_id: int, sha: str, base_hash: str, mode: str, latents) -> None:
    data = st_save({"latents": latents.detach().cpu().contiguous()})
    expires = utcnow() + timedelta(seconds=rt.settings.selfie_retention_s)
    async with rt.sessions() as s:
        s.add(
            CachedLatent(
                user_id=user_id, image_sha256=sha, base_hash=base_hash, mode=mode, data=data, expires_at=expires
            )
        )
        try:
            await s.commit()
        except sa.exc.IntegrityError:  # already cached by an earlier delivery of this job
            await s.rollback()


# ------------------------------------------------------------------------------------------------ running


def make_workers(
    w: WorkerState, queues: tuple[str, ...] = ("toon", "finetune"), *, burst: bool = False
) -> list[Worker]:
    """arq Workers (one per queue) sharing ``w``; run them with ``await worker.async_run()``."""
    s = w.rt.settings
    made = []
    for queue in queues:
        fn = toon_job if queue == "toon" else finetune_job
        made.append(
            Worker(
                functions=[func(fn, name=queue, max_tries=MAX_TRIES + 1)],
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


@contextlib.asynccontextmanager
async def serving_worker(
    rt: Runtime, queues: tuple[str, ...] = ("toon", "finetune"), *, models: ModelCache | None = None
) -> AsyncIterator[tuple[WorkerState, list[asyncio.Task]]]:
    """A worker serving ``queues`` on ``rt`` inside this event loop, stopped on exit: the one way the worker
    process, ``toonify up``/``submit``, the benchmarks and the tests run one. Yields the state and the
    running tasks (a task that ends early means the worker died)."""
    state = WorkerState(rt=rt, models=models or ModelCache(default_device(rt.settings)), batcher=ProjectionBatcher())
    await state.start()
    workers = make_workers(state, queues)
    tasks = [asyncio.create_task(wk.async_run()) for wk in workers]
    tasks.append(asyncio.create_task(metrics.watch_queues(rt.pool, QUEUE_NAMES)))
    log.info("worker %s serving %s", state.worker_id, ", ".join(queues))
    try:
        yield state, tasks
    finally:
        await stop_workers(workers, tasks)
        await state.stop()


async def run_worker(
    settings: Settings, queues: tuple[str, ...] = ("toon", "finetune"), *, stop: asyncio.Event | None = None
) -> None:
    """Run a worker process until ``stop`` is set (or SIGTERM/SIGINT arrives)."""
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
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
    finally:
        await rt.close()


async def stop_workers(workers: list[Worker], tasks: list[asyncio.Task]) -> None:
    """Stop arq workers started with ``async_run`` tasks; a job cut short stays in its queue for a retry."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    for wk in workers:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await wk.close()


__all__ = [
    "WorkerState",
    "enqueue",
    "make_workers",
    "reconcile",
    "run_worker",
    "serving_worker",
    "stop_workers",
    "toon_job",
]
