"""backend.progress against a real Redis: publish/latest, and watch() ordering, de-duplication and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from enum import StrEnum

import pytest

from backend.progress import (
    STATE_TTL_S,
    ProgressEvent,
    channel,
    latest,
    publish,
    state_key,
    watch,
)
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401

TIMEOUT_S = 10.0  # only reached when a test fails: watchers would otherwise hang


@pytest.fixture
def job() -> str:
    """A fresh job id: pub/sub channels are shared by all databases, so concurrent test runs must not collide."""
    return uuid.uuid4().hex


def ev(job_id: str, status: str = "running", **kw) -> ProgressEvent:
    return ProgressEvent(job_id=job_id, status=status, **kw)


async def wait_subscribed(redis, job_id: str) -> None:  # noqa: F811
    """Until a watcher's subscription to the job's channel is live on the server."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            (_, n), *_ = await redis.pubsub_numsub(channel(job_id))
            if n >= 1:
                return
            await asyncio.sleep(0.005)


def test_event_json_round_trip() -> None:
    class Status(StrEnum):
        DONE = "done"

    e = ProgressEvent(
        job_id="abc",
        status=Status.DONE,
        stage="upload",
        step=3,
        total=3,
        message="ready",
        queue_position=None,
        eta_s=0.0,
        preview="ff" * 32,
        result={"composite": "aa" * 32, "crops": ["bb" * 32]},
        ts=1700000000.25,
        seq=7,
    )
    assert type(e.status) is str and e.status == "done" and e.terminal
    assert ProgressEvent.from_json(e.to_json()) == e
    assert ProgressEvent.from_json(e.to_json().encode()) == e
    data = json.loads(e.to_json())
    data["added_in_a_later_version"] = 1
    assert ProgressEvent.from_dict(data) == e
    with pytest.raises(ValueError, match="unknown job status 'paused'"):
        ev("j", "paused")


@pytest.mark.asyncio
async def test_publish_then_latest(redis, job) -> None:  # noqa: F811
    assert await latest(redis, job) is None
    first = await publish(redis, ev(job, "queued", stage="queued", queue_position=3))
    assert first.seq == 1
    assert await latest(redis, job) == first
    second = await publish(redis, ev(job, stage="render", step=2, total=5, eta_s=1.5))
    assert second.seq == 2
    assert await latest(redis, job) == second
    assert 0 < await redis.ttl(state_key(job)) <= STATE_TTL_S
    assert await latest(redis, "other") is None


@pytest.mark.asyncio
async def test_concurrent_publishers_get_distinct_ordered_seqs(redis, job) -> None:  # noqa: F811
    out = await asyncio.gather(*(publish(redis, ev(job, step=i)) for i in range(20)))
    assert sorted(e.seq for e in out) == list(range(1, 21))
    assert (await latest(redis, job)).seq == 20


@pytest.mark.asyncio
async def test_watch_latest_first_then_in_order_deduplicated_until_terminal(redis, job) -> None:  # noqa: F811
    await publish(redis, ev(job, "queued", stage="queued", queue_position=1))
    seen: list[ProgressEvent] = []
    first_seen = asyncio.Event()

    async def consume() -> None:
        async for e in watch(redis, job, poll_s=30, timeout_s=TIMEOUT_S):
            seen.append(e)
            first_seen.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(TIMEOUT_S):
        await first_seen.wait()
    await publish(redis, ev(job, stage="render", step=1, total=2))
    await publish(redis, ev(job, stage="render", step=1, total=2))  # same content again: no news
    await publish(redis, ev(job, stage="render", step=2, total=2))
    await publish(redis, ev(job, "done", result={"composite": "cc"}))
    await publish(redis, ev(job, "running", stage="late"))  # after the terminal event: never seen
    await asyncio.wait_for(task, TIMEOUT_S)

    assert [(e.status, e.step) for e in seen] == [("queued", None), ("running", 1), ("running", 2), ("done", None)]
    assert seen[0].queue_position == 1 and seen[-1].result == {"composite": "cc"}
    assert [e.seq for e in seen] == sorted({e.seq for e in seen})


@pytest.mark.asyncio
async def test_watch_gets_event_published_between_subscribe_and_first_read_once(redis, job) -> None:  # noqa: F811
    # on_subscribed runs after the subscription is live and before the stored state is read: the event is both
    # stored and delivered on the channel, and must come out exactly once.
    async def publish_now() -> None:
        await publish(redis, ev(job, stage="align"))

    seen = []
    async with contextlib.aclosing(
        watch(redis, job, poll_s=30, timeout_s=TIMEOUT_S, on_subscribed=publish_now)
    ) as events:
        async for e in events:
            seen.append(e)
            if len(seen) == 1:
                await publish(redis, ev(job, "failed", error="no face found"))
    assert [(e.status, e.stage, e.error) for e in seen] == [
        ("running", "align", None),
        ("failed", None, "no face found"),
    ]


@pytest.mark.asyncio
async def test_watch_does_not_miss_an_event_published_right_after_subscribing(redis, job) -> None:  # noqa: F811
    # No stored state, and a re-read far beyond the timeout: only the subscription can deliver the event.
    task = asyncio.create_task(_collect(watch(redis, job, poll_s=60, timeout_s=TIMEOUT_S)))
    await wait_subscribed(redis, job)
    await publish(redis, ev(job, "cancelled"))
    seen = await asyncio.wait_for(task, TIMEOUT_S)
    assert [e.status for e in seen] == ["cancelled"]


async def _collect(events) -> list[ProgressEvent]:
    return [e async for e in events]


@pytest.mark.asyncio
async def test_watch_recovers_a_lost_message_by_rereading_state(redis, job) -> None:  # noqa: F811
    await publish(redis, ev(job, "queued"))
    seen: list[ProgressEvent] = []

    async with contextlib.aclosing(watch(redis, job, poll_s=0.05, timeout_s=TIMEOUT_S)) as events:
        async for e in events:
            seen.append(e)
            if e.status == "queued":
                # A worker's update whose PUBLISH never reached us: only the state key changed.
                await redis.set(state_key(job), ev(job, stage="render", step=1, seq=2).to_json())
            elif e.status == "running":
                await redis.set(state_key(job), ev(job, "done", seq=3).to_json())
    assert [(e.status, e.seq) for e in seen] == [("queued", 1), ("running", 2), ("done", 3)]


@pytest.mark.asyncio
async def test_watch_ignores_stale_rereads_and_foreign_messages(redis, job) -> None:  # noqa: F811
    await publish(redis, ev(job, "queued"))
    await publish(redis, ev(job, step=1))
    seen: list[ProgressEvent] = []
    first_seen = asyncio.Event()

    async def consume() -> None:
        async for e in watch(redis, job, poll_s=0.01, timeout_s=TIMEOUT_S):
            seen.append(e)
            first_seen.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(TIMEOUT_S):
        await first_seen.wait()
    await redis.publish(channel(job), b"not json")
    await redis.publish(channel(job), ev("someone-else", "done", seq=99).to_json())
    await redis.set(state_key(job), ev(job, "queued", seq=1).to_json())  # older than what the watcher has seen
    await asyncio.sleep(0.1)  # the watcher re-reads that stale state several times meanwhile
    done = ev(job, "done", seq=3).to_json()
    await redis.set(state_key(job), done)
    await redis.publish(channel(job), done)
    await asyncio.wait_for(task, TIMEOUT_S)
    assert [(e.status, e.seq) for e in seen] == [("running", 2), ("done", 3)]


@pytest.mark.asyncio
async def test_watch_fallback_ends_a_watch_without_redis_state(redis, job) -> None:  # noqa: F811
    calls = 0

    async def from_sql() -> ProgressEvent | None:
        nonlocal calls
        calls += 1
        return ev(job, "done", result={"composite": "dd"}) if calls >= 3 else ev(job, "running")

    seen = await _collect(watch(redis, job, poll_s=0.01, timeout_s=TIMEOUT_S, fallback=from_sql))
    assert [(e.status, e.result) for e in seen] == [("done", {"composite": "dd"})]


@pytest.mark.asyncio
async def test_watch_times_out(redis, job) -> None:  # noqa: F811
    await publish(redis, ev(job, "queued"))
    seen = []
    with pytest.raises(TimeoutError):
        async for e in watch(redis, job, poll_s=0.05, timeout_s=0.3):
            seen.append(e)
    assert [e.status for e in seen] == ["queued"]


@pytest.mark.asyncio
async def test_closing_a_watch_early_releases_its_subscription(redis, job) -> None:  # noqa: F811
    await publish(redis, ev(job, "queued"))
    async with contextlib.aclosing(watch(redis, job, timeout_s=TIMEOUT_S)) as events:
        async for _ in events:
            break
    async with asyncio.timeout(TIMEOUT_S):
        while (await redis.pubsub_numsub(channel(job)))[0][1] != 0:
            await asyncio.sleep(0.01)
