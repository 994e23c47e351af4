"""Instant models: which style and blend has a ready student network, and queueing the job that trains one.

A student (gan.distill) is trained per style and blend; the ``students`` table says which exist. Requests
without a mode get ``instant`` where one exists (see JobCommands.submit_toon). Distillation jobs are
queued by an admin (``start_distill``) or by the service itself when a fine-tuned style is published or a
poll picks a new default blend; the same style, checkpoint, blend and length is one job.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend import ledger
from backend.db.models import Job, JobKind, JobStatus, Student, StyleModel
from backend.jobs import DistillParams, blend_key
from backend.ledger import CreatedJob, NewJob
from backend.runtime import Runtime
from gan.blending import BlendSpec

log = logging.getLogger("toonify.service")
READY = "ready"


def blend_words(spec: BlendSpec) -> str:
    """A blend as a person typed it: ``blend 16`` for the ``/blend N`` swaps, else the recipe described."""
    if spec == BlendSpec(mode="swap", resolution=spec.resolution, structure_from="toon"):
        return f"blend {spec.resolution}"
    return spec.describe()


def stored_path(data_dir: Path, path: str) -> Path:
    """A path as the store keeps it (absolute, or relative to the data directory) made absolute."""
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


async def ready_student(s: AsyncSession, data_dir: Path, style_id: int, spec: BlendSpec) -> Student | None:
    """The style's ready student for ``spec`` whose file is there, or None."""
    row = await s.scalar(
        sa.select(Student).where(
            Student.style_id == style_id, Student.blend_key == blend_key(spec), Student.status == READY
        )
    )
    if row is None or not stored_path(data_dir, row.path).is_file():
        return None
    return row


def distill_key(style: StyleModel, spec: BlendSpec, kimg: float) -> str:
    """The idempotency key: the same style checkpoint, blend and length is the same distillation."""
    ident = f"distill:{style.id}:{style.checkpoint_path}:{style.content_hash}:{blend_key(spec)}:{kimg:g}"
    return hashlib.sha256(ident.encode()).hexdigest()


async def queue_distill(
    rt: Runtime,
    style: StyleModel,
    spec: BlendSpec,
    *,
    user_id: int,
    community_id: int | None,
    kimg: float | None = None,
    reason: str = "admin",
) -> CreatedJob:
    """Create (or find, while it is queued or running, or done with its student still ready) the job distilling
    ``style`` at ``spec``."""
    kimg = rt.settings.distill_kimg if kimg is None else float(kimg)  # TOONIFY_DISTILL_KIMG
    params = DistillParams(style_id=style.id, style=style.name, spec=spec, kimg=kimg, reason=reason)
    key = distill_key(style, spec, kimg)
    async with rt.sessions() as s:
        done = await s.scalar(sa.select(Job).where(Job.key == key, Job.status == JobStatus.DONE))
        if done is not None and await ready_student(s, rt.settings.data_dir, style.id, spec) is None:
            done.key = f"{key[:80]}:retired:{done.id}"  # what it made is gone or went stale: it may run again
            await s.commit()
    return await ledger.create_job(rt, NewJob(key, JobKind.DISTILL, user_id, community_id, params))


async def auto_distill(
    rt: Runtime, style_id: int, spec: BlendSpec, *, user_id: int | None, community_id: int | None, reason: str
) -> str | None:
    """Queue a distillation the service decided on (a publish, a poll) unless the student exists already.

    Returns the job id, or None when nothing was queued. A failure here never undoes what caused it (the
    style stays published, the poll closed): it is logged, and an admin can still ``/distill``."""
    if user_id is None:  # every job belongs to someone; nobody is left to own this one
        log.warning("no one to own the distillation of style %s at %s; not queued", style_id, blend_words(spec))
        return None
    try:
        async with rt.sessions() as s:
            style = await s.get(StyleModel, style_id)
            if style is None or await ready_student(s, rt.settings.data_dir, style_id, spec) is not None:
                return None
        created = await queue_distill(rt, style, spec, user_id=user_id, community_id=community_id, reason=reason)
    except Exception:
        log.warning("could not queue the distillation of style %s (%s)", style_id, reason, exc_info=True)
        return None
    return created.job_id
