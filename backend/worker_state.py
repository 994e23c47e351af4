"""What one worker process shares between its jobs, and the loops that keep it known to the others.

A worker announces itself with a heartbeat key; every worker reconciles at start-up and every half TTL, handing
back rows left ``running`` by a worker whose heartbeat stopped and re-enqueueing queued rows Redis forgot (a
Redis restart without persistence forgets the whole queue). The loops outlive Redis blips: an error is logged
and the loop tries again after a back-off, so a Redis restart costs a few seconds, not the process.

Job functions (backend.worker, backend.finetune) read ``ctx['toonify']``, a :class:`WorkerState`: the runtime,
the model cache, the projection batcher, and per-job cancellation events. The same event stops a job for two
reasons: the user cancelled it, or the worker is shutting down and hands the job back (``handing_back``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from arq.constants import in_progress_key_prefix, job_key_prefix

from backend import ledger
from backend.batching import ProjectionBatcher
from backend.db.models import Job, JobStatus
from backend.errors import JobCancelledError
from backend.jobs import queue_of
from backend.keys import QUEUE_NAMES, job_deaths, worker_heartbeat
from backend.ledger import enqueue
from backend.model_cache import BaseModels, ModelCache, base_models_from_manifest
from backend.progress import JobProgress
from backend.runtime import Runtime

log = logging.getLogger("toonify.worker")
RETRY_CAP_S = 5.0  # the longest pause between two tries of a background loop whose Redis or SQL call failed


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
    running: set[str] = field(default_factory=set)  # jobs this process has claimed and not yet let go
    handing_back: set[str] = field(default_factory=set)  # running jobs told to stop and go back to the queue
    stopping: bool = False  # shutting down: a job that stops now is handed back, never failed

    @property
    def heartbeat_ttl_s(self) -> int:
        return self.rt.settings.worker_heartbeat_ttl_s

    @property
    def base_models(self) -> BaseModels:
        """The folder's base (community fine-tunes start from it)."""
        return base_models_from_manifest(self.rt.models_dir)

    def base_models_for(self, toon_path: Path, style: str | None = None) -> BaseModels:
        """The base ``toon_path`` (of the style called ``style``) blends with: its manifest style's own base and
        encoder, else the folder's."""
        return base_models_from_manifest(self.rt.models_dir, toon_path, style)

    def cancel_event(self, job_id: str) -> threading.Event:
        return self.cancel_events.setdefault(job_id, threading.Event())

    def request_cancel(self, job_id: str) -> None:
        p = self.progress.get(job_id)
        if job_id not in self.cancel_seen_at and p is not None:
            self.cancel_seen_at[job_id] = p.current
        self.cancel_event(job_id).set()

    def hand_back_all(self) -> list[str]:
        """Tell every running job to stop at its next step; each goes back to ``queued`` for another worker."""
        for job_id in self.running:
            self.handing_back.add(job_id)
            self.cancel_event(job_id).set()
        return sorted(self.running)

    async def check_cancel(self, job_id: str) -> None:
        """Raise JobCancelledError if the job was cancelled (or is being handed back); called between stages."""
        if self.cancel_event(job_id).is_set() or await self.cancel_flag(job_id):
            self.request_cancel(job_id)
            p = self.progress.get(job_id)
            raise JobCancelledError(f"cancelled between stages, after {p.current[0] if p else 'start'}")

    async def worker_deaths(self, job_id: str) -> int:
        """Times a worker died running ``job_id`` (0 when Redis cannot say: the guard errs on running the job)."""
        try:
            return int(await self.rt.pool.get(job_deaths(job_id)) or 0)
        except Exception as exc:
            log.warning("death count of job %s unreadable: %s", job_id, exc)
            return 0

    async def cancel_flag(self, job_id: str) -> bool:
        """The user's cancel flag in Redis (False when Redis cannot be read)."""
        try:
            return await ledger.cancel_requested(self.rt, job_id)
        except Exception as exc:
            log.warning("cancel flag of job %s unreadable: %s", job_id, exc)
            return False

    async def start(self) -> None:
        await self.rt.pool.set(worker_heartbeat(self.worker_id), b"1", ex=self.heartbeat_ttl_s)
        await reconcile(self.rt, own=self)
        self.tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self.tasks.append(asyncio.create_task(self._reconcile_forever(), name="reconcile"))
        self.tasks.append(asyncio.create_task(self._listen_cancel(), name="cancel-listener"))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.batcher.close()
        with contextlib.suppress(Exception):
            await self.rt.pool.delete(worker_heartbeat(self.worker_id))

    async def _heartbeat(self) -> None:
        async def beat() -> None:
            await self.rt.pool.set(worker_heartbeat(self.worker_id), b"1", ex=self.heartbeat_ttl_s)

        await forever("heartbeat", beat, every_s=self.heartbeat_ttl_s / 4)

    async def _reconcile_forever(self) -> None:
        """A worker that dies mid-job is noticed by the survivors once its heartbeat key expires."""
        await forever(
            "reconcile", lambda: reconcile(self.rt, own=self), every_s=self.heartbeat_ttl_s / 2, first_wait=True
        )

    async def _listen_cancel(self) -> None:
        async def listen() -> None:
            pubsub = self.rt.pool.pubsub()
            try:
                await pubsub.subscribe(ledger.CANCEL_CHANNEL)
                for job_id in list(self.running):  # a cancel published while we were not listening
                    if await ledger.cancel_requested(self.rt, job_id):
                        self.request_cancel(job_id)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None:
                        data = msg["data"]
                        self.request_cancel(data.decode() if isinstance(data, bytes) else str(data))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

        await forever("cancel listener", listen, every_s=0.0)


async def forever(name: str, body, *, every_s: float, first_wait: bool = False) -> None:
    """Await ``body()`` every ``every_s`` until cancelled. A failing round (Redis or SQL away) is logged and
    tried again after a back-off of 0.5 s doubling up to RETRY_CAP_S, so a blip never ends the loop."""
    backoff = 0.5
    if first_wait:
        await asyncio.sleep(every_s)
    while True:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if asyncio.current_task().cancelling():  # a cancellation some layer turned into an error
                raise asyncio.CancelledError from exc
            log.warning("%s failed (%s); trying again in %.1f s", name, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_CAP_S)
            continue
        backoff = 0.5
        await asyncio.sleep(every_s)


async def reconcile(rt: Runtime, own: WorkerState | None = None) -> dict[str, int]:
    """Hand back jobs of dead workers and re-enqueue queued jobs Redis no longer holds; returns counts.

    With ``own``, rows ``running`` under this worker that it no longer runs (a hand-back whose SQL write failed)
    go back to the queue too."""
    counts = {"requeued": 0, "reenqueued": 0}
    async with rt.sessions() as s:
        rows = (await s.scalars(sa.select(Job).where(Job.status.in_(ledger.ACTIVE)))).all()
    pool = rt.pool
    for job in rows:
        if job.status == JobStatus.RUNNING:
            mine_but_gone = own is not None and job.worker_id == own.worker_id and job.id not in own.running
            if not mine_but_gone and job.worker_id and await pool.exists(worker_heartbeat(job.worker_id)):
                continue  # its worker is alive (maybe on another machine)
            await ledger.requeue(rt, job, error="the worker running this job stopped; retrying")
            if not mine_but_gone:  # a dead worker, not a hand-back whose SQL write failed
                await pool.incr(job_deaths(job.id))
                await pool.expire(job_deaths(job.id), 7 * 86400)
            await pool.delete(in_progress_key_prefix + job.id)  # arq would wait out the job timeout otherwise
            counts["requeued"] += 1
        queue = QUEUE_NAMES[queue_of(job.kind)]
        if await pool.zscore(queue, job.id) is None or not await pool.exists(job_key_prefix + job.id):
            await pool.delete(job_key_prefix + job.id)
            await enqueue(pool, job)
            counts["reenqueued"] += 1
    return counts
