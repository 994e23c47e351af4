"""Integration: /finetune through the service, arq on a real Redis and an in-process worker, with the demo base
model; then the admin publishes the draft and a member toons a photo with it."""

from __future__ import annotations

import io
import zipfile

import pytest
import sqlalchemy as sa

from backend.config import Settings
from backend.db.models import Blob, BlobKind, Dataset, Job, JobStatus, StyleModel, StyleStatus
from backend.service import Place, ToonService
from gan.checkpoints import read_checkpoint
from gan.synthetic import make_dataset
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, events_until_done, running_worker

GUILD = Place(platform="discord", community_id="77", name="toon makers")


def dataset_zip(extra: dict[str, bytes] | None = None, n: int = 10) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, img in enumerate(make_dataset(n, "toon", 64, seed=21)):
            png = io.BytesIO()
            Image.fromarray(img).save(png, format="PNG")
            zf.writestr(f"toons/{i:02d}.png", png.getvalue())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.asyncio
async def test_finetune_job_trains_a_draft_that_can_be_published_and_used(tmp_path, redis_url, redis):  # noqa: F811
    svc = await ToonService.open(
        Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url})
    )
    admin, member = actor(1, admin=True), actor(2)
    try:
        async with running_worker(svc, queues=("finetune", "toon")):
            # an archive with a path-traversal entry is refused by the worker, with the reason
            bad = await svc.start_finetune(admin, GUILD, "evil", dataset_zip({"../../escape.png": b"x"}), steps=4)
            events = await events_until_done(svc, bad.job_id, timeout_s=120)
            assert events[-1].status == "failed" and "path traversal" in events[-1].error, events[-1]

            ticket = await svc.start_finetune(admin, GUILD, "mystyle", dataset_zip({"README.txt": b"hi"}), steps=8)
            events = await events_until_done(svc, ticket.job_id, timeout_s=240)
            assert events[-1].status == "done", events[-1]
            stages = [e.stage for e in events if e.status == "running"]
            assert "ingest" in stages and "finetune" in stages
            snapshots = [e for e in events if e.preview]
            assert snapshots and all("KID" in (e.message or "") for e in snapshots), [e.message for e in events]
            result = events[-1].result
            assert (result["style"], result["images"], result["steps"]) == ("mystyle", 10, 8)
            assert result["dataset"]["skipped_not_an_image"] == 1 and result["metrics"]["kid"] is not None
            assert set(result["metrics"]["identity"]) >= {"8", "16", "32", "toon"}  # every swap of a 64 px model

            async with svc.rt.sessions() as s:
                style = await s.scalar(sa.select(StyleModel).where(StyleModel.name == "mystyle"))
                ds = await s.scalar(sa.select(Dataset).where(Dataset.name == "mystyle"))
                previews = await s.scalar(
                    sa.select(sa.func.count()).select_from(Blob).where(Blob.kind == BlobKind.PREVIEW)
                )
                job = await s.get(Job, ticket.job_id)
            assert style.status == StyleStatus.DRAFT and (ds.image_count, ds.status) == (10, "used")
            assert previews >= 1 and job.status == JobStatus.DONE
            meta = read_checkpoint(style.checkpoint_path).meta
            assert style.lineage == meta["ancestors"] and len(meta["ancestors"]) == 1
            assert meta["training"]["steps"] == 8 and meta["training"]["dataset"]["kept"] == 10

            info = await svc.publish_style(admin, GUILD, "mystyle")
            assert info.status == "published" and info.distill_job_id is not None  # its instant model is queued
            assert await svc.cancel(admin, info.distill_job_id)  # (hours of training: not in this test)
            toon = await svc.submit_toon(member, GUILD, astronaut(), style="mystyle", mode="fast")
            events = await events_until_done(svc, toon.job_id, timeout_s=240)
            assert events[-1].status == "done", events[-1]
            assert (await svc.result(toon.job_id)).style == "mystyle"
    finally:
        await svc.close()
