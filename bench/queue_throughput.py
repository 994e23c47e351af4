"""Queue benchmark: toon throughput with 1 and 8 jobs waiting, batched vs one by one, and the queue's overhead.

    python bench/queue_throughput.py                      # embedded Redis, SQLite in a temp dir, demo models, CPU
    REDIS_URL=redis://127.0.0.1:6379/13 python bench/queue_throughput.py --jobs 8 --mode balanced

Each run submits N different photos (the astronaut portrait, brightness-shifted per job, one user each) while
no worker runs, then starts an in-process worker and times until every job is done:
- ``batched``: the worker takes up to 8 jobs at once and their projections share one pass;
- ``one by one``: the same worker with ``max_jobs=1`` (what a plain arq GPU worker does).
The overhead row compares one job through the queue with the same photo through ``Toonifier.toonify``
directly (models already loaded in both). Nothing is asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.config import Settings  # noqa: E402
from backend.model_cache import ModelCache, base_models_from_manifest  # noqa: E402
from backend.service import Actor, ToonService  # noqa: E402
from backend.worker import serving_worker  # noqa: E402
from gan.styles import DEMO_DIR, get_style  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "astronaut.png"


def photo(variant: int) -> bytes:
    """The portrait with its corner pixel set from ``variant``: a distinct upload that looks the same."""
    arr = np.asarray(Image.open(FIXTURE).convert("RGB")).copy()
    arr[0, 0] = (variant % 256, variant // 256 % 256, 7)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


async def run_batch(
    settings: Settings, models: ModelCache, n: int, mode: str, offset: int, *, warm: bool = False
) -> tuple[float, list]:
    """n jobs through a fresh in-process worker: (seconds until all are done, faces per projection pass).

    ``warm=False``: the jobs wait in the queue before the worker starts, and the clock starts with the worker.
    ``warm=True``: the worker is running first, and the clock starts at the first submission."""
    service = await ToonService.open(settings)

    async def submit() -> list:
        return [
            await service.submit_toon(Actor("cli", f"bench{offset + i}"), None, photo(offset + i), mode=mode)
            for i in range(n)
        ]

    try:
        if warm:
            async with serving_worker(service.rt, ("toon",), models=models) as (state, _):
                await asyncio.sleep(1.0)  # arq is polling
                t0 = time.perf_counter()
                tickets = await submit()
                await wait_done(service, tickets)
                elapsed = time.perf_counter() - t0  # not counting the worker's shutdown
        else:
            tickets = await submit()
            t0 = time.perf_counter()
            async with serving_worker(service.rt, ("toon",), models=models) as (state, _):
                await wait_done(service, tickets)
                elapsed = time.perf_counter() - t0
        return elapsed, list(state.batcher.passes)
    finally:
        await service.close()


async def wait_done(service: ToonService, tickets: list) -> None:
    for t in tickets:
        async for ev in service.watch(t.job_id, timeout_s=1800):
            if ev.terminal:
                if ev.status != "done":
                    raise RuntimeError(f"job {t.job_id} {ev.status}: {ev.error}")
                break


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="toonify-bench-"))
    env = {**os.environ, "TOONIFY_DATA_DIR": str(tmp), "TOONIFY_QUOTA_MAX_QUEUE": "1000"}
    models = ModelCache(args.device)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {dev}; mode {args.mode}; Redis {env.get('REDIS_URL') or 'embedded'}")

    # Warm-up (loads the models into the shared cache) and the single-job overhead.
    one = Settings.from_env({**env, "TOONIFY_TOON_MAX_JOBS": "8"})
    await run_batch(one, models, 1, args.mode, offset=900, warm=True)
    queued_s, _ = await run_batch(one, models, 1, args.mode, offset=901, warm=True)
    print(f"\n{'scenario':>28} {'jobs':>5} {'seconds':>8} {'jobs/min':>9} {'faces per pass':>16}")
    print(f"{'through the queue (warm)':>28} {1:>5} {queued_s:>8.2f} {60 / queued_s:>9.1f} {'1':>16}")
    results = {}
    for label, max_jobs in (("batched (max_jobs=8)", 8), ("one by one (max_jobs=1)", 1)):
        settings = Settings.from_env({**env, "TOONIFY_TOON_MAX_JOBS": str(max_jobs)})
        seconds, passes = await run_batch(settings, models, args.jobs, args.mode, offset=100 * max_jobs)
        results[max_jobs] = seconds
        shown = ",".join(map(str, passes[:8])) + ("…" if len(passes) > 8 else "")
        print(f"{label:>28} {args.jobs:>5} {seconds:>8.2f} {60 * args.jobs / seconds:>9.1f} {shown:>16}")
    models_dir = one.models_dir or DEMO_DIR  # the same (cached) models the worker used
    tf = models.toonifier(base_models_from_manifest(models_dir), get_style(None, models_dir).toon)
    t0 = time.perf_counter()
    await asyncio.to_thread(tf.toonify, photo(902), mode=args.mode)
    direct_s = time.perf_counter() - t0

    print(f"{'direct Toonifier.toonify':>28} {1:>5} {direct_s:>8.2f} {60 / direct_s:>9.1f} {'-':>16}")
    ratio = results[8] / results[1]
    print(f"\nqueue overhead for one job: {queued_s - direct_s:+.2f} s; batched/one-by-one time: {ratio:.2f}")
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--mode", default="balanced", choices=["fast", "balanced", "quality"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
