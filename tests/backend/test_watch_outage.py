"""Watching a job while Redis is killed: the watch neither fails nor hangs; the SQL row (the fallback) ends it,
and once Redis is back the watch hears published events again. A real redis-server is SIGKILLed here."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import Redis

from backend.progress import ProgressEvent, publish, watch
from tests.backend.stack import free_port
from tests.backend.test_worker_faults import start_redis


@pytest.mark.asyncio
async def test_watch_survives_redis_going_away_and_coming_back(tmp_path):
    port = free_port()
    server = start_redis(port, tmp_path)
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1, socket_timeout=5)
    row: dict[str, ProgressEvent | None] = {"terminal": None}  # what the SQL row says

    async def fallback() -> ProgressEvent | None:
        return row["terminal"]

    seen: list[ProgressEvent] = []
    try:
        await publish(client, ProgressEvent(job_id="j1", status="running", stage="project", step=1, total=40))
        async with contextlib.aclosing(watch(client, "j1", poll_s=0.2, timeout_s=60, fallback=fallback)) as events:
            seen.append(await anext(events))
            assert seen[-1].step == 1
            server.kill()  # SIGKILL: the pub/sub connection breaks under the watcher
            server.wait()
            await asyncio.sleep(1.0)
            server = start_redis(port, tmp_path)  # back, empty: event numbers start again at 1
            await asyncio.sleep(1.0)  # the watcher notices and subscribes again
            await publish(client, ProgressEvent(job_id="j1", status="running", stage="render", step=0, total=1))
            seen.append(await asyncio.wait_for(anext(events), 30))
            assert (seen[-1].stage, seen[-1].seq) == ("render", 1)  # heard although its seq went back to 1

            server.kill()
            server.wait()
            row["terminal"] = ProgressEvent(job_id="j1", status="done", stage="done")  # the job ends meanwhile
            seen.append(await asyncio.wait_for(anext(events), 30))
            assert seen[-1].status == "done"
            with pytest.raises(StopAsyncIteration):
                await anext(events)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
        if server.poll() is None:
            server.kill()
            server.wait()
