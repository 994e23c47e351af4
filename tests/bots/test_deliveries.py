"""backend.delivery on real SQLite: one holder per delivery, leases released or lapsed are taken over, photos are
recorded once and marked sent, failing deliveries are given up."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import sqlalchemy as sa

from backend.config import Settings
from backend.db.models import Job, JobStatus
from backend.delivery import MAX_FAILURES, Address, DeliveryBook
from backend.service import Actor, ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut

WHERE = Address("telegram", "42", "7", "6", {"thread_id": None})


@pytest_asyncio.fixture
async def service(tmp_path, redis_url, redis):  # noqa: F811
    settings = Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url})
    svc = await ToonService.open(settings)
    try:
        yield svc
    finally:
        await svc.close()


async def a_job(service: ToonService, result: dict | None = None) -> str:
    ticket = await service.submit_toon(Actor("telegram", "42", "Uma"), None, astronaut(7))  # no worker: queued
    if result is not None:
        async with service.rt.sessions() as s:
            await s.execute(sa.update(Job).where(Job.id == ticket.job_id).values(status=JobStatus.DONE, result=result))
            await s.commit()
    return ticket.job_id


@pytest.mark.asyncio
async def test_one_holder_and_a_released_delivery_is_taken_over(service):
    a, b = DeliveryBook(service.rt, owner="a", lease_s=60), DeliveryBook(service.rt, owner="b", lease_s=60)
    delivery_id = await a.open(await a_job(service), WHERE, "de")
    assert await b.claim_orphans("telegram") == [] and not await b.keep(delivery_id)
    assert await a.keep(delivery_id) and await a.renew() == 1

    await a.release(delivery_id)  # a stops
    c = DeliveryBook(service.rt, owner="c", lease_s=60)
    won = await asyncio.gather(b.claim_orphans("telegram"), c.claim_orphans("telegram"))
    assert sorted(len(w) for w in won) == [0, 1], "of two claimers, one gets it"
    (record,) = won[0] or won[1]
    assert (record.id, record.address, record.locale) == (delivery_id, WHERE, "de")
    assert not await a.keep(delivery_id), "the old holder must not send any more"
    assert await b.claim_orphans("discord") == []  # only the platform's own bots take it


@pytest.mark.asyncio
async def test_a_lapsed_lease_is_taken_over(service):
    dead = DeliveryBook(service.rt, owner="dead", lease_s=0.2)
    delivery_id = await dead.open(await a_job(service), WHERE)
    alive = DeliveryBook(service.rt, owner="alive", lease_s=60)
    await asyncio.sleep(0.3)  # the dead process renewed nothing
    assert [r.id for r in await alive.claim_orphans("telegram")] == [delivery_id]
    assert not await dead.keep(delivery_id) and await alive.keep(delivery_id)


@pytest.mark.asyncio
async def test_photos_are_recorded_once_and_marked_sent(service):
    book = DeliveryBook(service.rt, owner="a", lease_s=60)
    job_id = await a_job(service, {"composite": "c" * 64, "crops": ["1" * 64, "2" * 64]})
    delivery_id = await book.open(job_id, WHERE)
    items = await book.items(delivery_id)
    assert [(i.position, i.name, i.sent) for i in items] == [
        (0, "toon.png", False),
        (1, "face1.png", False),
        (2, "face2.png", False),
    ]
    await book.mark_sent([items[0].id])
    again = await book.items(delivery_id)
    assert [i.id for i in again] == [i.id for i in items] and [i.sent for i in again] == [True, False, False]
    await book.finish(delivery_id)
    assert await DeliveryBook(service.rt, owner="b", lease_s=60).claim_orphans("telegram") == []


@pytest.mark.asyncio
async def test_a_delivery_that_keeps_failing_is_given_up(service):
    book = DeliveryBook(service.rt, owner="a", lease_s=0.01)
    delivery_id = await book.open(await a_job(service), WHERE)
    for failures in range(1, MAX_FAILURES + 1):
        await book.fail(delivery_id)
        await asyncio.sleep(0.05)  # the retry waits one lease
        retried = [r.id for r in await book.claim_orphans("telegram")]
        assert retried == ([delivery_id] if failures < MAX_FAILURES else [])
    assert not await book.keep(delivery_id)
