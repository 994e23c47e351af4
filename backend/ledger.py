"""The job ledger: every status change of a job row goes through here, and is published as it is written.

The SQL row is the truth (arq delivers at least once); Redis carries the same state for watchers. Each
transition is a conditional UPDATE, so two deliveries of one job, or a worker racing a cancel, cannot both win.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession

from backend import keys, metrics
from backend.db.models import Blob, BlobKind, Job, JobKind, JobStatus, utcnow
from backend.jobs import JobParams, queue_of
from backend.progress import ProgressEvent, publish
from backend.runtime import Runtime

log = logging.getLogger("toonify.ledger")
TERMINAL = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)  # the same request may run again
# Kept importable from here; the names live in backend.keys.
CANCEL_CHANNEL = keys.CANCEL_CHANNEL
STATS_KEY = keys.STATS_KEY
cancel_key = keys.job_cancel


def quota_user_key(job: Job) -> str:
    return f"user:{job.user_id}"


def quota_community_key(job: Job) -> str | None:
    return f"community:{job.community_id}" if job.community_id is not None else None


@dataclass(frozen=True)
class NewJob:
    """A job to create: ``key`` makes it idempotent (the same key is the same job while it has not failed)."""

    key: str
    kind: JobKind
    user_id: int | None
    community_id: int | None
    params: JobParams
    input_blob_id: int | None = None


@dataclass(frozen=True)
class CreatedJob:
    job_id: str
    status: JobStatus
    duplicate: bool  # True: a live job with this key already existed; this is it


async def create_job(
    rt: Runtime, new: NewJob, *, count_quota: bool = False, session: AsyncSession | None = None
) -> CreatedJob:
    """Insert the job row (retiring a failed or cancelled row with the same key), publish ``queued``, enqueue.

    With ``count_quota`` the job is admitted against the user's quotas first (QuotaExceededError: nothing
    written); its slot is given back on every path where the row does not get written. With ``session`` the
    row is added to that session and committed with whatever the caller put there (one transaction).
    """
    if session is None:
        async with rt.sessions() as s:
            return await create_job(rt, new, count_quota=count_quota, session=s)
    s = session
    existing = await s.scalar(sa.select(Job).where(Job.key == new.key))
    if existing is not None and existing.status not in RETRYABLE:
        await s.commit()
        return CreatedJob(existing.id, existing.status, duplicate=True)
    if existing is not None:
        existing.key = f"{new.key[:80]}:retired:{existing.id}"  # let the same request run again
    job = Job(
        key=new.key,
        kind=new.kind,
        user_id=new.user_id,
        community_id=new.community_id,
        params=new.params.to_json(),
        input_blob_id=new.input_blob_id,
    )
    job.id = os.urandom(16).hex()
    if count_quota:
        await rt.quotas.admit(quota_user_key(job), quota_community_key(job), job.id)
    try:
        s.add(job)
        try:
            await s.commit()
        except sa.exc.IntegrityError:
            await s.rollback()
            winner = await s.scalar(sa.select(Job).where(Job.key == new.key))
            if winner is None:  # not a key clash (the user was forgotten meanwhile, say)
                raise
            await _give_back(rt, job, count_quota)
            return CreatedJob(winner.id, winner.status, duplicate=True)  # the same request raced us and won
    except BaseException:  # the database failed or the call was cancelled: no row, so no slot either
        await _give_back(rt, job, count_quota)
        raise
    await publish(rt.pool, ProgressEvent(job_id=job.id, status="queued", stage="queued"))
    await enqueue(rt.pool, job)  # lost if Redis fails here: workers re-enqueue queued rows Redis lacks
    return CreatedJob(job.id, JobStatus.QUEUED, duplicate=False)


async def _give_back(rt: Runtime, job: Job, counted: bool) -> None:
    """Release the slot of a job that was never written (and refund its daily count: it never ran)."""
    if not counted:
        return
    try:
        await rt.quotas.release(quota_user_key(job), job.id, community_key=quota_community_key(job), refund=True)
    except Exception:  # Redis failed too: the slot ages out after QuotaLimits.stale_after_s
        log.warning("quota slot of unwritten job %s not released", job.id, exc_info=True)


async def claim(rt: Runtime, job_id: str, worker_id: str) -> Job | None:
    """queued → running for this worker (attempts + 1); None when the job is gone, finished or taken."""
    async with rt.sessions() as s:
        res = await s.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
            .values(status=JobStatus.RUNNING, worker_id=worker_id, attempts=Job.attempts + 1, started_at=utcnow())
        )
        await s.commit()
        if res.rowcount != 1:
            return None
        job = await s.get(Job, job_id)
    metrics.JOB_WAIT_SECONDS.labels(kind=job.kind.value, mode=job.params.get("mode", "-")).observe(
        age_s(job.created_at)
    )
    return job


async def finish(
    rt: Runtime,
    job: Job,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    only_from: tuple[JobStatus, ...] = ACTIVE,
) -> bool:
    """Move ``job`` to a terminal status (once), release its quota slot and tell watchers."""
    async with rt.sessions() as s:
        res = await s.execute(
            sa.update(Job)
            .where(Job.id == job.id, Job.status.in_(only_from))
            .values(status=status, result=result, error=error, finished_at=utcnow())
        )
        await s.commit()
    won = res.rowcount == 1
    if won:
        _observe(job, status, error)
        await rt.quotas.release(quota_user_key(job), job.id)
        await publish(
            rt.pool, ProgressEvent(job_id=job.id, status=status.value, stage=status.value, result=result, error=error)
        )
    return won


def _observe(job: Job, status: JobStatus, error: str | None) -> None:
    kind, mode = job.kind.value, job.params.get("mode", "-")
    metrics.JOBS_FINISHED.labels(kind=kind, status=status.value).inc()
    if job.started_at is not None and job.status == JobStatus.RUNNING:
        seconds = age_s(job.started_at)
        metrics.JOB_SECONDS.labels(kind=kind, mode=mode, status=status.value).observe(seconds)
        metrics.GPU_SECONDS.labels(community=str(job.community_id or "private")).inc(seconds)
    if status == JobStatus.FAILED:
        metrics.JOB_FAILURES.labels(reason=metrics.failure_reason(error)).inc()


async def requeue(rt: Runtime, job: Job, *, error: str | None = None) -> None:
    """running → queued (a transient failure about to be retried, or a dead worker's job)."""
    async with rt.sessions() as s:
        await s.execute(
            sa.update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, worker_id=None, error=error)
        )
        await s.commit()
    await publish(rt.pool, ProgressEvent(job_id=job.id, status="queued", stage="queued", message=error))


async def save_progress(rt: Runtime, job_id: str, progress: dict[str, Any]) -> None:
    async with rt.sessions() as s:
        await s.execute(sa.update(Job).where(Job.id == job_id).values(progress=progress))
        await s.commit()


async def cancel_requested(rt: Runtime, job_id: str) -> bool:
    return bool(await rt.pool.exists(cancel_key(job_id)))


def age_s(t: datetime | None) -> float:
    return 0.0 if t is None else (utcnow() - t).total_seconds()


async def enqueue(pool: ArqRedis, job: Job) -> None:
    queue = queue_of(job.kind)
    await pool.enqueue_job(queue, job.id, _job_id=job.id, _queue_name=keys.QUEUE_NAMES[queue])


async def record_blob(
    rt: Runtime, user_id: int | None, sha: str, size: int, media_type: str, kind: BlobKind, retention_s: int | None
) -> int:
    """Insert (or refresh the expiry of) ``user_id``'s claim on blob ``sha``; returns the row id."""
    expires = None if retention_s is None else utcnow() + timedelta(seconds=retention_s)
    async with rt.sessions() as s:
        row = await s.scalar(sa.select(Blob).where(Blob.owner_user_id == user_id, Blob.sha256 == sha))
        if row is None:
            row = Blob(
                sha256=sha, owner_user_id=user_id, size=size, media_type=media_type, kind=kind, expires_at=expires
            )
            s.add(row)
        else:
            row.expires_at = expires
        try:
            await s.commit()
        except sa.exc.IntegrityError:  # a concurrent insert of the same claim won: use it
            await s.rollback()
            row = await s.scalar(sa.select(Blob).where(Blob.owner_user_id == user_id, Blob.sha256 == sha))
        return row.id


async def store_blob(
    rt: Runtime, user_id: int | None, data: bytes, media_type: str, kind: BlobKind, retention_s: int | None
) -> tuple[str, int]:
    """Store ``data`` as ``user_id``'s blob: the row first, then the file, so a failure in between leaves a row
    that expiry removes, never a file nothing accounts for. Returns (sha256, row id)."""
    sha = hashlib.sha256(data).hexdigest()
    blob_id = await record_blob(rt, user_id, sha, len(data), media_type, kind, retention_s)
    await asyncio.to_thread(rt.blobs.put, data)
    return sha, blob_id
