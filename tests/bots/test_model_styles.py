"""Issue 15's done-when, end to end: two config-f 256 px networks (random weights; the base as an NVIDIA
stylegan2-ada-pytorch .pkl, its fine-tune as a rosinality .pt) become a style with ``toonify styles add`` (a real
process) while the Telegram bot runs against the fake Bot API; ``/style`` switches to it and back with no restart,
``/toon`` renders it, ``toonify toon --style`` renders it from the command line, and ``toonify styles remove``
takes it off the bot."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from backend.db.models import Job, JobStatus
from backend.service import ToonService
from gan import pipeline
from gan.styles import DEMO_DIR
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, running_worker
from tests.bots.test_telegram_e2e import ALICE, said
from tests.test_styles_admin import config_f_downloads  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "astronaut.png"


def toonify_cli(*args: str, models: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOONIFY_MODELS_DIR": str(models), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


async def finished_toons(service: ToonService) -> dict[str, Job]:
    """Finished jobs by the style they rendered (job ids are keys, not an order)."""
    async with service.rt.sessions() as s:
        jobs = (await s.scalars(sa.select(Job).where(Job.status == JobStatus.DONE))).all()
    return {(await service.result(job.id)).style: job for job in jobs}


@pytest.mark.asyncio
async def test_downloads_become_a_live_style(config_f_downloads, start_telegram, tmp_path, monkeypatch):  # noqa: F811 (config_f_downloads)
    base_pkl, toon_pt = config_f_downloads
    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models)  # the demo style stays; the new one comes beside it
    # Two projection steps at 256 px on a CPU: this test is about the wiring, not the likeness.
    monkeypatch.setitem(pipeline.MODES, "balanced", replace(pipeline.MODES["balanced"], steps=2))
    fake, service = await start_telegram(TOONIFY_MODELS_DIR=str(models))
    async with running_worker(service):
        fake.send_user_message(ALICE.id, ALICE, "/style cartoon")
        await said(fake, ALICE.id, "no style called 'cartoon'")

        added = toonify_cli("styles", "add", "cartoon", "--base", str(base_pkl), "--toon", str(toon_pt),
                            "--models-dir", str(models), models=models)  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "descends from this base" in added.stderr and "added style 'cartoon'" in added.stdout

        # The running bot sees it at once: /style switches, /toon renders it at 256 px.
        fake.send_user_message(ALICE.id, ALICE, "/style cartoon")
        await said(fake, ALICE.id, "Your default style is now cartoon.")
        fake.send_user_message(ALICE.id, ALICE, photo=astronaut(1), caption="/toon balanced")
        await said(fake, ALICE.id, "Here you are (cartoon", timeout=600)
        (job,) = (await finished_toons(service)).values()
        result = await service.result(job.id)
        assert result.style == "cartoon" and Image.open(io.BytesIO(result.crops[0])).size == (256, 256)

        # And back: the demo style's 64 px models serve the next toon.
        fake.send_user_message(ALICE.id, ALICE, "/style demo")
        await said(fake, ALICE.id, "Your default style is now demo.")
        fake.send_user_message(ALICE.id, ALICE, photo=astronaut(2), caption="/toon balanced")
        await said(fake, ALICE.id, "Here you are (demo", timeout=300)
        demo_job = (await finished_toons(service))["demo"]
        assert Image.open(io.BytesIO((await service.result(demo_job.id)).crops[0])).size == (64, 64)

        # From the command line too, in another process.
        out = tmp_path / "cli" / "toon.png"
        run = toonify_cli("toon", str(FIXTURE), "--style", "cartoon", "--steps", "2", "--out", str(out), models=models)
        assert run.returncode == 0, run.stderr
        assert Image.open(out.with_name("toon_toon0.png")).size == (256, 256)

        # Removed from the folder: the bot stops offering it.
        gone = toonify_cli("styles", "remove", "cartoon", "--models-dir", str(models), models=models)
        assert gone.returncode == 0, gone.stderr
        fake.send_user_message(ALICE.id, ALICE, "/style cartoon")
        await said(fake, ALICE.id, "no style called 'cartoon'", timeout=60)
        fake.send_user_message(ALICE.id, ALICE, "/styles")
        listing = await said(fake, ALICE.id, "Styles here:")
        assert "cartoon" not in (listing.text or "")
