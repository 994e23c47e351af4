"""The ``finetune`` job: a community's image set → a draft style fine-tuned from the base model.

Resumable: the trainer snapshots under ``data_dir/finetune/<job id>/`` every ``snapshot_every`` steps, and a
retried delivery of the job (a worker killed mid-run) continues from the last snapshot instead of step 0.
Dataset reading here is the minimal safe path (a zip of images, each decoded with the pixel limit and
centre-cropped); curated ingestion (alignment, de-duplication, reports) belongs to the fine-tune issue.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image

from backend.db.models import Blob, Dataset, Job, StyleModel, StyleStatus
from backend.errors import BadInputError, JobCancelledError
from backend.progress import ProgressEvent, publish

MAX_DATASET_IMAGES = 2000
MAX_MEMBER_BYTES = 20 << 20  # an image larger than this inside the zip is refused (zip-bomb guard)
MAX_TOTAL_BYTES = 1 << 30


def read_dataset_zip(data: bytes, resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 3] from a zip of images; sizes are checked from the headers before anything inflates."""
    from gan.imageio import BadImageError, decode_image

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise BadInputError("the dataset is not a zip file") from e
    members = [m for m in zf.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
    if len(members) > MAX_DATASET_IMAGES:
        raise BadInputError(f"the dataset has {len(members)} files; at most {MAX_DATASET_IMAGES} are accepted")
    if any(m.file_size > MAX_MEMBER_BYTES for m in members) or sum(m.file_size for m in members) > MAX_TOTAL_BYTES:
        raise BadInputError("the dataset unpacks to more than the allowed size (20 MB per image, 1 GB in all)")
    images = []
    for m in members:
        with zf.open(m) as f:
            raw = f.read(MAX_MEMBER_BYTES + 1)
        if len(raw) > MAX_MEMBER_BYTES:  # the header lied about the size
            raise BadInputError(f"{m.filename} unpacks to more than 20 MB")
        try:
            im = decode_image(raw)
        except BadImageError:
            continue  # not an image (a README, say): skipped, counted below
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        images.append(np.asarray(im.convert("RGB")))
    if len(images) < 8:
        raise BadInputError(f"the dataset has {len(images)} usable images; at least 8 are needed")
    return np.stack(images)


async def run_finetune(w, job: Job) -> dict[str, Any]:
    """Fine-tune the base model on the job's dataset; the style row becomes a draft pointing at the result."""
    from gan.checkpoints import load_discriminator, load_generator
    from gan.training import TrainConfig, Trainer, lineage_of

    rt, p = w.rt, job.params
    async with rt.sessions() as s:
        style = await s.get(StyleModel, p["style_id"])
        dataset = await s.get(Dataset, p["dataset_id"])
        blob = await s.get(Blob, dataset.blob_id) if dataset and dataset.blob_id else None
    if style is None or blob is None or not rt.blobs.exists(blob.sha256):
        raise BadInputError("the dataset or style of this fine-tune is gone")
    device = w.models.device
    base_path = w.base_models.base
    G = await asyncio.to_thread(load_generator, base_path, device)
    images = await asyncio.to_thread(read_dataset_zip, rt.blobs.read(blob.sha256), G.resolution)
    async with rt.sessions() as s:
        await s.execute(sa.update(Dataset).where(Dataset.id == dataset.id).values(image_count=len(images)))
        await s.execute(sa.update(StyleModel).where(StyleModel.id == style.id).values(status=StyleStatus.TRAINING))
        await s.commit()

    steps, every = int(p.get("steps", 400)), int(p.get("snapshot_every", 50))
    work = rt.settings.data_dir / "finetune" / job.id
    snapshot = work / "snapshot.pt"
    cancel = w.cancel_event(job.id)
    loop = asyncio.get_running_loop()

    def train() -> tuple[bool, Path | None]:
        if snapshot.is_file():
            trainer = Trainer.resume(snapshot, images, device=device)
        else:
            D = load_discriminator(base_path, device)
            cfg = TrainConfig(batch=8, freeze_d=2, diffaugment="color,translation", ema_rampup=None, seed=0)
            trainer = Trainer(G, D, images, cfg, meta={"ancestors": lineage_of(G), "dataset": {"images": len(images)}})
        while trainer.step_count < steps:
            target = min(steps, (trainer.step_count // every + 1) * every)
            if not trainer.train(steps=target, should_cancel=cancel.is_set):
                return False, None
            trainer.save_snapshot(snapshot)
            event = ProgressEvent(
                job_id=job.id, status="running", stage="finetune", step=trainer.step_count, total=steps
            )
            asyncio.run_coroutine_threadsafe(publish(rt.pool, event), loop)
        out = rt.settings.data_dir / "styles" / f"{style.id}-{job.id[:8]}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        return True, trainer.export(out)

    finished, out = await asyncio.to_thread(train)
    if not finished:
        raise JobCancelledError("cancelled during fine-tuning (the last snapshot is kept)")
    toon = await asyncio.to_thread(load_generator, out, "cpu")
    async with rt.sessions() as s:
        await s.execute(
            sa.update(StyleModel)
            .where(StyleModel.id == style.id)
            .values(
                status=StyleStatus.DRAFT,
                checkpoint_path=str(out),
                content_hash=toon.meta.get("content_hash"),
                lineage=list(toon.meta.get("ancestors", [])),
            )
        )
        await s.execute(sa.update(Dataset).where(Dataset.id == dataset.id).values(status="used"))
        await s.commit()
    return {"style": style.name, "checkpoint": str(out), "images": len(images), "steps": steps}
