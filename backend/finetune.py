"""The ``finetune`` job: a community's image set → a draft style fine-tuned from the base model.

The work is :mod:`gan.finetune`'s: safe ingestion of the uploaded zip (refusals come back to the admin as the
ingest report), then a :class:`~gan.finetune.FinetuneRun` under ``data_dir/finetune/<job id>/``. Resumable: the
run snapshots every ``snapshot_every`` steps, and a retried delivery of the job (a worker killed mid-run)
continues from the last snapshot instead of step 0. Each snapshot is published as a progress event carrying its
preview grid (a blob) and a one-line metrics summary; the job's result keeps the final metrics row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backend.blobs import copy_atomic
from backend.db.models import Blob, BlobKind, Dataset, Job, StyleModel, StyleStatus
from backend.errors import BadInputError, JobCancelledError
from backend.jobs import FinetuneParams, FinetuneResult
from backend.ledger import store_blob
from backend.progress import JobProgress, ProgressEvent, publish
from backend.worker_state import WorkerState

BATCH = 8
MIN_IMAGES = 8
METRIC_SAMPLES = 128  # generated images for KID per snapshot
IDENTITY_SAMPLES = 8  # latents rendered per swap resolution for the identity metric


def finetune_settings(params: FinetuneParams):
    """The job's recipe; ``steps`` and ``snapshot_every`` are counted in batches of ``BATCH`` images."""
    from gan.finetune import FinetuneSettings

    steps, every = params.steps, params.snapshot_every
    return FinetuneSettings(
        kimg=steps * BATCH / 1000,
        snapshot_kimg=every * BATCH / 1000,
        batch=BATCH,
        freeze_d=2,
        aug="ada",
        seed=0,
        metric_samples=METRIC_SAMPLES,
        identity_samples=IDENTITY_SAMPLES,
        preview_seeds=8,
    )


def snapshot_message(row: dict) -> str:
    """One line for the admin: KID and the best identity-keeping swap resolution so far."""
    kid = "n/a" if row.get("kid") is None else f"{row['kid']:.4f}"
    ident = {k: v for k, v in (row.get("identity") or {}).items() if isinstance(v, dict) and v.get("distance")}
    swaps = {k: v for k, v in ident.items() if k != "toon"}
    best = min(swaps.items(), key=lambda kv: kv[1]["distance"], default=None)
    keeps = f"; identity kept best at swap {best[0]} px ({best[1]['distance']:.2f})" if best else ""
    return f"snapshot at {row['kimg']:.2f} kimg: KID {kid}{keeps}"


async def _post_snapshot(w: WorkerState, job: Job, row: dict, work: Path, total: int) -> None:
    """Store the snapshot's preview grid as a blob and publish it with the metrics summary."""
    rt, sha = w.rt, None
    preview = work / row["preview"] if row.get("preview") else None
    if preview is not None and preview.is_file():
        data = preview.read_bytes()
        retention = rt.settings.result_retention_s
        sha, _ = await store_blob(rt, job.user_id, data, "image/png", BlobKind.PREVIEW, retention)
    event = ProgressEvent(
        job_id=job.id,
        status="running",
        stage="finetune",
        step=row["step"],
        total=total,
        message=snapshot_message(row),
        preview=sha,
    )
    await publish(rt.pool, event)


async def run_finetune(w: WorkerState, job: Job) -> dict[str, Any]:
    """Fine-tune the base model on the job's dataset; the style row becomes a draft pointing at the result."""
    from gan.checkpoints import read_checkpoint
    from gan.finetune import DatasetRefusedError, FinetuneRun, IdentityMeter, ingest

    rt, p = w.rt, FinetuneParams.from_json(job.params)
    async with rt.sessions() as s:
        style = await s.get(StyleModel, p.style_id)
        dataset = await s.get(Dataset, p.dataset_id)
        blob = await s.get(Blob, dataset.blob_id) if dataset and dataset.blob_id else None
    if style is None or blob is None or not rt.blobs.exists(blob.sha256):
        raise BadInputError("the dataset or style of this fine-tune is gone")
    progress = w.progress[job.id] = JobProgress(rt.pool, job.id)
    loop = asyncio.get_running_loop()
    device, base_path = w.models.device, w.base_models.base

    progress("ingest", 0, 1, "checking the images")
    resolution = (await asyncio.to_thread(read_checkpoint, base_path)).generator_config.resolution
    spill = rt.settings.data_dir / "tmp"  # past ingestion's memory bound, images go to a file here (not a RAM disk)
    spill.mkdir(parents=True, exist_ok=True)
    try:  # read from the blob's file member by member: the zip itself never sits in memory
        data = await asyncio.to_thread(
            ingest, rt.blobs.path(blob.sha256), resolution, min_images=MIN_IMAGES, name=f"{dataset.name}.zip",
            spill_dir=spill,
        )  # fmt: skip
    except DatasetRefusedError as e:
        raise BadInputError(f"the dataset was refused: {e}") from e
    await w.check_cancel(job.id)
    async with rt.sessions() as s:
        await s.execute(sa.update(Dataset).where(Dataset.id == dataset.id).values(image_count=len(data.images)))
        await s.execute(sa.update(StyleModel).where(StyleModel.id == style.id).values(status=StyleStatus.TRAINING))
        await s.commit()

    settings = finetune_settings(p)
    work = rt.settings.data_dir / "finetune" / job.id
    cancel = w.cancel_event(job.id)

    def train():
        meter, _ = IdentityMeter.maybe()
        run = FinetuneRun(work, base_path, data, settings, device=device, resume=True, identity=meter)
        total = run.total_steps

        def step_progress(stage: str, step: int, steps: int) -> None:
            loop.call_soon_threadsafe(progress, stage, step, steps)

        def on_snapshot(row: dict) -> None:  # wait, so the preview blob exists before the job can finish
            asyncio.run_coroutine_threadsafe(_post_snapshot(w, job, row, work, total), loop).result(timeout=60)

        return run.run(progress=step_progress, should_cancel=cancel.is_set, on_snapshot=on_snapshot)

    try:
        result = await asyncio.to_thread(train)
    except asyncio.CancelledError:  # arq abort or job timeout: stop the training thread at its next step too
        cancel.set()
        raise
    if result.status != "done":
        raise JobCancelledError(f"cancelled during fine-tuning at step {result.steps} (the last snapshot is kept)")
    out = rt.settings.data_dir / "styles" / f"{style.id}-{job.id[:8]}.safetensors"
    await asyncio.to_thread(copy_atomic, result.checkpoint, out)
    meta = (await asyncio.to_thread(read_checkpoint, out)).meta
    async with rt.sessions() as s:
        await s.execute(
            sa.update(StyleModel)
            .where(StyleModel.id == style.id)
            .values(
                status=StyleStatus.DRAFT,
                checkpoint_path=str(out),
                content_hash=meta.get("content_hash"),
                lineage=list(meta.get("ancestors", [])),
            )
        )
        await s.execute(sa.update(Dataset).where(Dataset.id == dataset.id).values(status="used"))
        await s.commit()
    counts = data.report.counts()
    return FinetuneResult(
        style=style.name,
        checkpoint=str(out),
        images=len(data.images),
        steps=result.steps,
        metrics=result.metrics[-1] if result.metrics else None,
        dataset=counts,
        report=str(work / "report.json"),
        summary=snapshot_message(result.metrics[-1]) if result.metrics else None,
    ).to_json()
