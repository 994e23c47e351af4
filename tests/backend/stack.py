"""The whole backend for integration tests: service + in-process worker on a real Redis and real SQL,
with the bundled demo models. Also photos to feed it."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from PIL import Image

from backend.model_cache import ModelCache
from backend.progress import ProgressEvent
from backend.service import Actor, ToonService
from backend.worker import WorkerState, serving_worker

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut.png"


def astronaut(variant: int = 0) -> bytes:
    """The portrait, slightly different per variant (brightness), so each variant is a distinct upload."""
    im = Image.open(FIXTURE).convert("RGB")
    if variant:
        arr = np.asarray(im).astype(np.int16) + variant
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers a test starts, or for nobody)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blank_photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 130, 140)).save(buf, format="PNG")
    return buf.getvalue()


def actor(n: int = 1, admin: bool = False) -> Actor:
    return Actor(platform="discord", user_id=str(1000 + n), name=f"user{n}", is_admin=admin)


def long_enough_to_show_progress(monkeypatch, steps: int = 150) -> None:
    """Balanced projection with ``steps`` steps for workers started after this: on an idle machine the demo's 40
    steps can end inside the bots' 1.5 s progress throttle, and a test of the progress message would see none."""
    from dataclasses import replace

    from gan import pipeline

    monkeypatch.setitem(pipeline.MODES, "balanced", replace(pipeline.MODES["balanced"], steps=steps))


@contextlib.asynccontextmanager
async def running_worker(service: ToonService, queues: tuple[str, ...] = ("toon",)) -> AsyncIterator[WorkerState]:
    async with serving_worker(service.rt, queues, models=ModelCache("cpu")) as (state, _):
        yield state


async def events_until_done(service: ToonService, job_id: str, timeout_s: float = 240) -> list[ProgressEvent]:
    events = []
    async with contextlib.aclosing(service.watch(job_id, timeout_s=timeout_s)) as it:
        async for ev in it:
            events.append(ev)
    return events
