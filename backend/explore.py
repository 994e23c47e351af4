"""The ``/edit`` and ``/sweep`` jobs (toon queue): the latent space of a style, on the photo of a user's last toon.

``/edit`` re-renders that photo's faces from their latents moved along the style's named directions
(:mod:`gan.editing`, strengths in σ of sampled W, each direction on its own W+ layers), at the toon's blend, and
pastes them back onto the stored selfie. ``/sweep`` renders the faces (or the fixed probe faces) with the swap
level going from 4 px up to full resolution, as an animated GIF. Both take the latents cached for the photo and
its projection mode; a toon made in instant mode kept none, so its photo is projected first (balanced, the
progress says why) and the latents are kept for the next time.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from backend.db.models import Blob, BlobKind, Job, StyleModel
from backend.errors import BadInputError
from backend.jobs import ANIMATION_MEDIA_TYPES, EditParams, Edits, SweepParams, SweepResult, ToonResult
from backend.latents import PROBE_PSI, PROBE_SEEDS, project_or_reuse
from backend.ledger import store_blob
from backend.progress import JobProgress
from backend.service.explore import read_directions
from backend.service.students import stored_path
from backend.worker_state import WorkerState
from gan.align import FaceTooSmallError, NoFaceError
from gan.imageio import BadImageError, decode_image
from gan.pipeline import Toonifier

MAX_SWEEP_FACES = 4  # a sweep shows the largest faces of a group photo side by side, at most this many
MIN_FRAME_PX = 256  # tiny models' frames are enlarged to about this height, as poll grids are


async def run_edit(w: WorkerState, job: Job) -> dict[str, Any]:
    """``/edit``: the photo's faces, edited, pasted back onto it; the result is a toon result with its edits."""
    with w.batcher.announced() as release:  # jobs started together meet in one projection pass
        return await _edit(w, job, release)


async def run_sweep(w: WorkerState, job: Job) -> dict[str, Any]:
    """``/sweep``: one frame per swap level, 4 px to full resolution, as a looping GIF (or WebP)."""
    with w.batcher.announced() as release:
        return await _sweep(w, job, release)


async def _edit(w: WorkerState, job: Job, release: Callable[[], None]) -> dict[str, Any]:
    rt, p = w.rt, EditParams.from_json(job.params)
    progress = w.progress[job.id] = JobProgress(rt.pool, job.id)
    style, blob = await _rows(w, job, p.style_id)
    if blob is None:
        raise BadInputError("the photo of your last toon has expired or was deleted; send it again with /toon")
    progress("load", 0, 1, "loading models")
    tf = await _toonifier(w, style)
    directions = await _directions(w, style, tf, p.edits)
    image, aligned = await _faces(w, job, tf, blob, p.all_faces)
    latents = await _latents(w, job, tf, blob.sha256, p.mode, p.source_mode, aligned, release)
    await w.check_cancel(job.id)
    progress("edit", 0, 1, "editing")

    def edit_and_render() -> list[Image.Image]:
        return tf.render(_apply(latents.to(tf.device), directions, p.edits), p.spec)

    crops = await w.batcher.call(edit_and_render)
    await w.check_cancel(job.id)
    progress("paste", 0, 1, "pasting back")
    composite = await w.batcher.call(tf.composite, image, aligned, crops)
    progress("upload", 0, 1, "saving")
    composite_sha = await _store(w, job, _png(composite), "image/png")
    crop_shas = [await _store(w, job, _png(c), "image/png") for c in crops]
    await progress.flush()
    return ToonResult(
        composite=composite_sha,
        crops=tuple(crop_shas),
        faces=len(aligned),
        style=style.name,
        spec=p.spec,
        image_sha256=blob.sha256,
        mode=p.mode,
        edits=p.edits,
    ).to_json()


async def _sweep(w: WorkerState, job: Job, release: Callable[[], None]) -> dict[str, Any]:
    from gan.editing import animation_bytes, blend_sweep_frames, seed_latents

    rt, p = w.rt, SweepParams.from_json(job.params)
    progress = w.progress[job.id] = JobProgress(rt.pool, job.id)
    if p.fmt not in ANIMATION_MEDIA_TYPES:
        raise BadInputError(f"a sweep is a gif or webp animation, not {p.fmt!r}")
    style, blob = await _rows(w, job, p.style_id)
    progress("load", 0, 1, "loading models")
    tf = await _toonifier(w, style)
    if p.source_job is None or blob is None:  # no toon of theirs: the probe faces show what the levels do
        release()
        if p.source_job is not None:
            raise BadInputError("the photo of your last toon has expired or was deleted; send it again with /toon")
        ws = await w.batcher.call(lambda: seed_latents(tf.base, list(PROBE_SEEDS), truncation=PROBE_PSI))
        source, sha = "probe", None
    else:
        directions = await _directions(w, style, tf, p.edits) if p.edits else None
        _, aligned = await _faces(w, job, tf, blob, p.all_faces)
        latents = await _latents(w, job, tf, blob.sha256, p.mode, p.source_mode, aligned, release)
        latents = latents[:MAX_SWEEP_FACES]  # the largest faces (aligned largest first)
        ws = await w.batcher.call(lambda: _apply(latents.to(tf.device), directions, p.edits))
        source, sha = "toon", blob.sha256
    await w.check_cancel(job.id)
    levels = [2**i for i in range(2, tf.base.log_size + 1)]  # 4 px … full resolution
    progress("sweep", 0, 1, "drawing every blend level")
    frames = await w.batcher.call(blend_sweep_frames, tf.base, tf.toon, ws, levels, p.structure_from)
    scale = max(1, MIN_FRAME_PX // frames[0].height)
    if scale > 1:  # tiny demo models: enlarge so a chat client shows it sensibly
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    data = await asyncio.to_thread(animation_bytes, frames, p.fmt)
    progress("upload", 0, 1, "saving")
    animation = await _store(w, job, data, ANIMATION_MEDIA_TYPES[p.fmt])
    await progress.flush()
    return SweepResult(
        animation=animation,
        fmt=p.fmt,
        style=style.name,
        levels=tuple(levels),
        faces=len(ws),
        source=source,
        image_sha256=sha,
        edits=p.edits if source == "toon" else (),
    ).to_json()


# ------------------------------------------------------------------------------------------------ stages


async def _rows(w: WorkerState, job: Job, style_id: int) -> tuple[StyleModel, Blob | None]:
    """The style (BadInputError when gone) and the job's photo (None when it has none, or its file is gone)."""
    async with w.rt.sessions() as s:
        style = await s.get(StyleModel, style_id)
        blob = await s.get(Blob, job.input_blob_id) if job.input_blob_id else None
    if style is None:
        raise BadInputError("this style no longer exists")
    if blob is not None and not w.rt.blobs.exists(blob.sha256):
        blob = None
    await w.check_cancel(job.id)
    return style, blob


async def _toonifier(w: WorkerState, style: StyleModel) -> Toonifier:
    path = stored_path(w.rt.settings.data_dir, style.checkpoint_path)
    return await w.batcher.call(w.models.toonifier, w.base_models_for(path, style.name), path)


async def _directions(w: WorkerState, style: StyleModel, tf: Toonifier, edits: Edits):
    """The style's directions, checked against its toon generator and against every direction asked for."""
    from gan.editing import DirectionsError, DirectionsMismatchError

    rt = w.rt
    found = await asyncio.to_thread(read_directions, rt.models_dir, rt.settings.data_dir, style)
    try:
        found.check_generator(tf.toon)
        for name, _ in edits:
            found.get(name)
    except DirectionsMismatchError as e:
        raise BadInputError(
            f"the named directions of style {style.name!r} were made for another model of it (its checkpoint "
            f"changed since); an admin makes new ones with `toonify directions {style.name} --register`"
        ) from e
    except DirectionsError as e:
        raise BadInputError(str(e)) from e
    return found


def _apply(ws: torch.Tensor, directions, edits: Edits) -> torch.Tensor:
    """``ws`` moved by each edit in turn, each on its direction's own W+ layers."""
    for name, strength in edits:
        ws = directions.get(name).apply(ws, strength)
    return ws


async def _faces(w: WorkerState, job: Job, tf: Toonifier, blob: Blob, all_faces: bool):
    """(the photo, its aligned faces, largest first), as the toon job found them."""
    progress = w.progress[job.id]
    data = await asyncio.to_thread(w.rt.blobs.read, blob.sha256)
    progress("align", 0, 1, "finding faces")
    try:
        image = await asyncio.to_thread(decode_image, data)
        alignment = await asyncio.to_thread(tf.align, image, all_faces=all_faces)
    except (BadImageError, NoFaceError, FaceTooSmallError) as e:
        raise BadInputError(str(e)) from e
    aligned = list(alignment)
    progress("align", 1, 1, f"{len(aligned)} face(s)")
    await w.check_cancel(job.id)
    return image, aligned


async def _latents(
    w: WorkerState,
    job: Job,
    tf: Toonifier,
    sha: str,
    mode: str,
    source_mode: str,
    aligned: list,
    release: Callable[[], None],
) -> torch.Tensor:
    """The latents kept for the photo in ``mode``; else projected now (and kept). Stage ``reproject`` when the toon
    was instant (it kept no latents), so the chat can say why this takes a while."""
    stage = "reproject" if source_mode == "instant" else "project"
    return await project_or_reuse(w, job, tf, sha, mode, [a.image for a in aligned], release, stage)


async def _store(w: WorkerState, job: Job, data: bytes, media_type: str) -> str:
    rt = w.rt
    sha, _ = await store_blob(rt, job.user_id, data, media_type, BlobKind.RESULT, rt.settings.result_retention_s)
    return sha


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
