"""Projected latents kept per (user, photo, base model, mode), and the seeds and probe faces every job that renders
faces shares: the toon job, re-blends, poll grids, ``/edit`` and ``/sweep``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from backend.db.models import CachedLatent, Job, utcnow
from backend.errors import JobCancelledError
from backend.runtime import Runtime

if TYPE_CHECKING:
    from PIL import Image

    from backend.worker_state import WorkerState
    from gan.pipeline import Toonifier

PROBE_SEEDS = (1, 2, 3, 4)  # the same probe faces for every poll grid and sweep, so they are comparable
PROBE_PSI = 0.7  # their truncation: typical faces


def face_seeds(faces: int) -> list[int]:
    """Seed per face: the face's index, as ``toonify toon`` uses. The same photo gives the same pixels in every
    run, alone or in a batch (each face has its own generator), whatever the job's random id."""
    return list(range(faces))


async def cached_latents(
    rt: Runtime, user_id: int, sha: str, base_hash: str, mode: str, faces: int
) -> torch.Tensor | None:
    """The latents projected earlier for this photo, base model and mode, if they are kept and fit ``faces``."""
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


async def store_latents(rt: Runtime, user_id: int, sha: str, base_hash: str, mode: str, latents) -> None:
    """Keep ``latents`` for this photo (as long as its selfie is kept); a second delivery of a job changes nothing."""
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


async def project_or_reuse(
    w: WorkerState,
    job: Job,
    tf: Toonifier,
    sha: str,
    mode: str,
    faces: list[Image.Image],
    release: Callable[[], None],
    stage: str = "project",
) -> torch.Tensor:
    """The latents kept for this photo, base model and mode; else the faces projected now in the worker's shared
    pass (progress under ``stage``) and kept. ``release`` lets a pass start without this job once its crops are
    ready, or at once when nothing needs projecting."""
    from gan.encoder import generator_hash
    from gan.pipeline import to_tensor
    from gan.projection import ProjectionCancelledError

    base_hash = generator_hash(tf.base)
    latents = await cached_latents(w.rt, job.user_id, sha, base_hash, mode, len(faces))
    if latents is not None:
        release()
        return latents
    progress = w.progress[job.id]
    crops = await w.batcher.call(to_tensor, faces, "cpu")
    release()
    try:
        latents = await w.batcher.project(
            tf,
            crops,
            mode,
            seeds=face_seeds(len(faces)),
            progress=lambda step, total: progress(stage, step, total),
            cancelled=w.cancel_event(job.id),
        )
    except ProjectionCancelledError as e:
        raise JobCancelledError(str(e)) from e
    await store_latents(w.rt, job.user_id, sha, base_hash, mode, latents)
    return latents
