"""The ``distill`` job: a style's instant model, a student network (gan.distill) for one blend.

The work is :func:`gan.distill.train_student` on the style's base and toon generators, with the perceptual
loss ``toonify distill`` uses (LPIPS where the worker has its weights, else the toon model's discriminator
features). It runs on the ``finetune`` queue: minutes to hours of device time. Resumable: a snapshot under
``data_dir/distill/<job id>/`` is written every ``snapshot_kimg`` and whenever the job stops (a cancel, a
hand-back at shutdown), and a retried delivery continues from it instead of step 0. Every step is reported
as progress (stage ``distill``, throttled like every job's). The student goes to
``data_dir/students/<style id>/<blend>.safetensors`` and becomes the style's ``students`` row for that blend
(a newer distillation of the same blend replaces the row and, atomically, the file).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.db.models import Job, Student, StyleModel
from backend.errors import BadInputError, JobCancelledError
from backend.jobs import DistillParams, DistillResult, blend_key
from backend.progress import JobProgress
from backend.service.students import READY, blend_words, stored_path
from backend.worker_state import WorkerState
from gan.blending import BlendSpec


def student_file(data_dir: Path, style_id: int, spec: BlendSpec) -> Path:
    """Where the worker keeps the student of a style and blend: readable name, plus a hash of the exact recipe."""
    digest = hashlib.sha256(blend_key(spec).encode()).hexdigest()[:12]
    name = f"{spec.mode}{spec.resolution or ''}-{spec.structure_from}-{digest}.safetensors"
    return data_dir / "students" / str(style_id) / name


def _loss_message(step: int, total: int, losses: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k in ("l1", "perceptual", "loss"))
    return f"step {step}/{total}" + (f": {parts}" if parts else "")


async def record_student(
    w: WorkerState, style_id: int, spec: BlendSpec, path: Path, student: Any, job_id: str | None
) -> None:
    """The style's row for this blend now names ``path`` (inserted, or replacing an older student)."""
    lineage, key = student.lineage, blend_key(spec)
    values = {
        "blend": spec.to_json(),
        "path": str(path),
        "content_hash": student.meta.get("content_hash"),
        "base_hash": lineage.base_hash,
        "toon_hash": lineage.toon_hash,
        "status": READY,
        "job_id": job_id,
    }
    for _ in range(2):  # a concurrent insert of the same (style, blend) wins the first try: update it then
        async with w.rt.sessions() as s:
            row = await s.scalar(sa.select(Student).where(Student.style_id == style_id, Student.blend_key == key))
            if row is None:
                s.add(Student(style_id=style_id, blend_key=key, **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
            try:
                await s.commit()
                return
            except sa.exc.IntegrityError:
                await s.rollback()
    raise RuntimeError(f"could not record the student of style {style_id} for {key}")


async def run_distill(w: WorkerState, job: Job) -> dict[str, Any]:
    """Train the student of the job's style and blend, save it, record it; returns the DistillResult JSON."""
    from gan.checkpoints import CheckpointError, load_discriminator
    from gan.distill import DistillCancelledError, DistillConfig, save_student, train_student
    from gan.perceptual import build_perceptual_loss

    rt, p = w.rt, DistillParams.from_json(job.params)
    data_dir = rt.settings.data_dir
    async with rt.sessions() as s:
        style = await s.get(StyleModel, p.style_id)
    if style is None or not style.checkpoint_path:
        raise BadInputError("this style no longer exists, or has no model yet")
    what = f"style {style.name!r} at {blend_words(p.spec)}"
    progress = w.progress[job.id] = JobProgress(rt.pool, job.id)
    progress("load", 0, 1, "loading models")
    toon_path = stored_path(data_dir, style.checkpoint_path)
    models = w.base_models_for(toon_path, style.name)
    tf = await w.batcher.call(w.models.toonifier, models, toon_path)
    try:
        p.spec.layer_weights(tf.base.resolution)
    except ValueError as e:
        raise BadInputError(f"cannot distil {what}: {e}") from e
    await w.check_cancel(job.id)

    config = DistillConfig(kimg=p.kimg)
    work = data_dir / "distill" / job.id
    snapshot = work / "snapshot.safetensors"
    cancel = w.cancel_event(job.id)
    loop = asyncio.get_running_loop()
    device, vgg, lpips = tf.device, models.vgg, models.lpips

    def on_step(step: int, total: int, losses: dict) -> None:
        loop.call_soon_threadsafe(progress, "distill", step, total, _loss_message(step, total, losses))

    def train():
        try:
            disc = load_discriminator(toon_path, device)  # the toon model's critic knows what toons look like
        except CheckpointError:
            disc = None
        loss = build_perceptual_loss(vgg, lpips, discriminator=disc).to(device)
        work.mkdir(parents=True, exist_ok=True)
        return train_student(
            tf.base, tf.toon, p.spec, config, loss_fn=loss, snapshot_path=snapshot, progress=on_step,
            should_cancel=cancel.is_set,
        )  # fmt: skip

    try:
        student = await asyncio.to_thread(train)
    except DistillCancelledError as e:
        raise JobCancelledError(f"{e} (the snapshot is kept: a retry continues from it)") from e
    except asyncio.CancelledError:  # arq abort or job timeout: stop the training thread at its next step too
        cancel.set()
        raise
    student.meta["job"] = {"id": job.id, "reason": p.reason, "kimg": p.kimg}
    out = student_file(data_dir, style.id, p.spec)
    await asyncio.to_thread(save_student, student, out)
    await record_student(w, style.id, p.spec, out, student, job.id)
    await asyncio.to_thread(shutil.rmtree, work, True)  # the snapshot was only for resuming
    await progress.flush()
    return DistillResult(
        style=style.name,
        blend=p.spec,
        student=str(out),
        kimg=p.kimg,
        content_hash=student.meta.get("content_hash"),
        base_hash=student.lineage.base_hash,
        toon_hash=student.lineage.toon_hash,
        reason=p.reason,
    ).to_json()
