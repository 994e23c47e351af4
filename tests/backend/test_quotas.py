"""backend.quotas against a real Redis: limits hold under races from tasks and from separate processes."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis as redis_lib

from backend.quotas import QuotaExceededError, QuotaKind, QuotaLimits, Quotas
from tests.backend.redis_fixtures import embedded_redis, flush_sync, redis, redis_url  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC: 12 h before midnight
UNLIMITED = QuotaLimits(user_active=None, user_daily=None, community_daily=None, max_queue=None)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limits(**kw) -> QuotaLimits:
    return QuotaLimits(**{**UNLIMITED.__dict__, **kw})


async def try_admit(q: Quotas, user: str, community: str | None, job: str) -> QuotaExceededError | None:
    try:
        await q.admit(user, community, job)
    except QuotaExceededError as e:
        return e
    return None


@pytest.mark.asyncio
async def test_50_concurrent_admits_respect_the_active_limit(redis) -> None:  # noqa: F811
    q = Quotas(redis, QuotaLimits(user_active=2, user_daily=50, community_daily=1000, max_queue=200))
    results = await asyncio.gather(*(try_admit(q, "u1", "c1", f"job-{i}") for i in range(50)))
    admitted = [f"job-{i}" for i, r in enumerate(results) if r is None]
    assert len(admitted) == 2
    assert {r.kind for r in results if r is not None} == {QuotaKind.USER_ACTIVE}
    assert sorted(await q.active_jobs("u1")) == sorted(admitted)
    usage = await q.usage("u1", "c1")
    assert (usage.active, usage.user_daily, usage.community_daily, usage.queue) == (2, 2, 2, 2)


@pytest.mark.asyncio
async def test_release_is_idempotent_and_frees_a_slot(redis) -> None:  # noqa: F811
    q = Quotas(redis, limits(user_active=1))
    await q.admit("u1", None, "a")
    assert (await try_admit(q, "u1", None, "b")).kind == QuotaKind.USER_ACTIVE
    assert await q.release("u1", "a") is True
    assert await q.release("u1", "a") is False
    assert await q.release("u1", "never-admitted") is False
    await q.admit("u1", None, "b")
    assert await q.active_jobs("u1") == ["b"]
    assert (await q.usage("u1")).queue == 1


@pytest.mark.asyncio
async def test_admitting_the_same_job_twice_counts_once(redis) -> None:  # noqa: F811
    q = Quotas(redis, limits(user_active=1, user_daily=5))
    await q.admit("u1", "c1", "a")
    await q.admit("u1", "c1", "a")  # a retried request with the same job id
    usage = await q.usage("u1", "c1")
    assert (usage.active, usage.user_daily, usage.community_daily, usage.queue) == (1, 1, 1, 1)


@pytest.mark.asyncio
async def test_user_daily_limit_resets_at_utc_midnight(redis) -> None:  # noqa: F811
    clock = Clock()
    q = Quotas(redis, limits(user_daily=3), clock=clock)
    for i in range(3):
        await q.admit("u1", None, f"j{i}")
        await q.release("u1", f"j{i}")  # finished jobs still count for the day
    err = await try_admit(q, "u1", None, "j3")
    assert err is not None and err.kind == QuotaKind.USER_DAILY and err.limit == 3
    assert err.retry_after_s == pytest.approx(12 * 3600)
    assert str(err) == "You've used your 3 jobs for today. It resets at midnight UTC, in 12 h."
    assert await try_admit(q, "u2", None, "other-user") is None  # per user
    assert await q.active_jobs("u1") == []  # a refused job takes no slot
    clock.t = T0 + 12 * 3600 + 1  # just past midnight
    assert await try_admit(q, "u1", None, "j3") is None
    assert 0 < await redis.ttl("toonify:quota:user:u1:daily:20260102") <= 2 * 86400


@pytest.mark.asyncio
async def test_community_daily_limit_under_concurrency(redis) -> None:  # noqa: F811
    q = Quotas(redis, limits(community_daily=5))
    results = await asyncio.gather(*(try_admit(q, f"u{i % 10}", "c1", f"j{i}") for i in range(20)))
    assert sum(r is None for r in results) == 5
    assert {r.kind for r in results if r is not None} == {QuotaKind.COMMUNITY_DAILY}
    err = next(r for r in results if r is not None)
    assert str(err).startswith("This community has used its 5 jobs for today. It resets at midnight UTC, in ")
    assert await try_admit(q, "u1", "c2", "elsewhere") is None  # another community
    assert await try_admit(q, "u1", None, "direct-message") is None  # no community: not counted
    assert (await q.usage("u1", "c1")).community_daily == 5


@pytest.mark.asyncio
async def test_queue_cap_under_concurrency(redis) -> None:  # noqa: F811
    q = Quotas(redis, limits(max_queue=4))
    results = await asyncio.gather(*(try_admit(q, f"u{i}", None, f"j{i}") for i in range(12)))
    admitted = [i for i, r in enumerate(results) if r is None]
    assert len(admitted) == 4
    err = next(r for r in results if r is not None)
    assert err.kind == QuotaKind.QUEUE and err.retry_after_s is None
    assert str(err) == "The queue is full (4 jobs). Please try again in a few minutes."
    assert await q.release(f"u{admitted[0]}", f"j{admitted[0]}")
    assert await try_admit(q, "late", None, "late-job") is None
    assert (await q.usage("late")).queue == 4


@pytest.mark.asyncio
async def test_refund_returns_the_daily_count_once(redis) -> None:  # noqa: F811
    q = Quotas(redis, limits(user_daily=1, community_daily=1))
    await q.admit("u1", "c1", "a")
    assert (await try_admit(q, "u1", "c1", "b")).kind == QuotaKind.USER_DAILY
    assert await q.release("u1", "a", community_key="c1", refund=True)
    assert not await q.release("u1", "a", community_key="c1", refund=True)
    usage = await q.usage("u1", "c1")
    assert (usage.user_daily, usage.community_daily) == (0, 0)
    await q.admit("u1", "c1", "b")


@pytest.mark.asyncio
async def test_a_never_released_job_stops_counting_after_stale_after_s(redis) -> None:  # noqa: F811
    clock = Clock()
    q = Quotas(redis, limits(user_active=1, max_queue=1, stale_after_s=600), clock=clock)
    await q.admit("u1", None, "crashed")
    assert (await try_admit(q, "u1", None, "next")).kind == QuotaKind.USER_ACTIVE
    clock.t += 601
    assert await try_admit(q, "u1", None, "next") is None
    assert await q.active_jobs("u1") == ["next"]


def test_error_messages_are_readable_and_picklable() -> None:
    e = QuotaExceededError("user_active", 2)
    assert str(e) == "You can have 2 jobs in progress at a time. Wait for one to finish, then try again."
    one = QuotaExceededError(QuotaKind.USER_DAILY, 1, 90.0)
    assert str(one) == "You've used your 1 job for today. It resets at midnight UTC, in 2 min."
    assert str(QuotaExceededError(QuotaKind.USER_DAILY, 5, 3 * 3600 + 61)).endswith("in 3 h 2 min.")
    back = pickle.loads(pickle.dumps(one))
    assert (back.kind, back.limit, back.retry_after_s, str(back)) == (one.kind, 1, 90.0, str(one))


def test_limits_from_settings_like_object() -> None:
    class S:
        user_active, user_daily, community_daily, max_queue = 3, 4, 5, 6

    assert QuotaLimits.from_object(S()) == QuotaLimits(3, 4, 5, 6)


_RACER = textwrap.dedent(
    """
    import asyncio, json, sys
    from arq.connections import create_pool
    from backend.quotas import QuotaExceededError, QuotaLimits, Quotas
    from backend.redis import redis_settings

    async def main(url, tag):
        pool = await create_pool(redis_settings(url))
        q = Quotas(pool, QuotaLimits(user_active=2, user_daily=50, community_daily=1000, max_queue=200))
        await pool.incr("race:ready")
        while int(await pool.get("race:ready")) < 2:  # start together
            await asyncio.sleep(0.002)

        async def one(i):
            try:
                await q.admit("racer", "c1", f"{tag}-{i}")
                return 1
            except QuotaExceededError:
                return 0

        admitted = sum(await asyncio.gather(*(one(i) for i in range(25))))
        await pool.aclose()
        print(json.dumps({"admitted": admitted}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_two_processes_racing_admit_exactly_the_limit(redis_url: str) -> None:  # noqa: F811
    flush_sync(redis_url)
    client = redis_lib.Redis.from_url(redis_url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, redis_url, tag], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for tag in ("p1", "p2")
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            outs.append(json.loads(out.strip().splitlines()[-1])["admitted"])
        assert sum(outs) == 2
        assert client.zcard("toonify:quota:user:racer:active") == 2
        assert client.zcard("toonify:quota:queue") == 2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        client.close()
