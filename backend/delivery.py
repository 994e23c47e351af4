"""Deliveries: where each request's result goes, and which bot process is sending it (resumable after restarts).

A front end opens a delivery when it posts the progress message of a job (platform, chat, that message, the
command it answers). The process that opened it holds a lease and renews it (:meth:`DeliveryBook.renew`, every
``lease_s / 3``) while it watches the job and sends the photos. Each photo of a result is a row; it is marked
sent only after the platform confirmed it, so a process that stops halfway leaves exactly the unsent photos.

A stopping process releases its unfinished deliveries; a dead one stops renewing and its leases lapse after
``lease_s``. Either way :meth:`DeliveryBook.claim_orphans` hands them to another (or the restarted) process of the
same platform, which watches the job again if it is still queued or running, sends what is not yet sent and
brings the progress message to its final state. Only the lease holder sends, and it checks the lease before each
photo (:meth:`DeliveryBook.keep`): two processes never send the same photo. A process killed between the
platform's confirmation and :meth:`DeliveryBook.mark_sent` leaves that one photo unmarked: it is sent again.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backend.db.models import Delivery, DeliveryItem, Job, Platform, utcnow
from backend.runtime import Runtime

MAX_FAILURES = 5  # a delivery whose sends keep failing (the bot was removed from the chat) is given up


@dataclass(frozen=True)
class Address:
    """Where a result goes: the chat (Discord: channel), the progress message, the command it answers."""

    platform: str
    chat_id: str
    progress_message_id: str
    reply_to: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    job_id: str
    address: Address
    locale: str


@dataclass(frozen=True)
class Item:
    """One photo of a result: position 0 is the composite, 1… the face crops."""

    id: int
    position: int
    name: str
    sha256: str
    sent: bool


def _record(d: Delivery) -> DeliveryRecord:
    address = Address(d.platform.value, d.chat_id, d.progress_message_id, d.reply_to, dict(d.extra or {}))
    return DeliveryRecord(d.id, d.job_id, address, d.locale)


def result_items(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, sha256) of every photo of a toon result, composite first; a sweep's one animation."""
    if "animation" in result:
        return [(f"sweep.{result.get('format', 'gif')}", result["animation"])]
    crops = [(f"face{i + 1}.png", sha) for i, sha in enumerate(result.get("crops") or [])]
    return [("toon.png", result["composite"]), *crops]


class DeliveryBook:
    """The deliveries of one bot process (``owner``), over the runtime's SQL store."""

    def __init__(self, rt: Runtime, *, owner: str | None = None, lease_s: float | None = None) -> None:
        self.rt = rt
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_s = lease_s if lease_s is not None else rt.settings.delivery_lease_s

    def _until(self):
        return utcnow() + timedelta(seconds=self.lease_s)

    async def open(self, job_id: str, address: Address, locale: str = "en") -> int:
        """Record a new delivery of ``job_id``, leased to this process; returns its id."""
        async with self.rt.sessions() as s:
            d = Delivery(
                job_id=job_id,
                platform=Platform(address.platform),
                chat_id=address.chat_id,
                progress_message_id=address.progress_message_id,
                reply_to=address.reply_to,
                extra=address.extra,
                locale=locale[:16],
                lease_owner=self.owner,
                lease_until=self._until(),
            )
            s.add(d)
            await s.commit()
            return d.id

    async def keep(self, delivery_id: int) -> bool:
        """Renew the lease on one delivery; False when this process no longer holds it (then it must not send)."""
        async with self.rt.sessions() as s:
            res = await s.execute(
                sa.update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.lease_owner == self.owner, Delivery.finished_at.is_(None))
                .values(lease_until=self._until())
            )
            await s.commit()
        return res.rowcount == 1

    async def renew(self) -> int:
        """Renew every lease this process holds (its heartbeat); returns how many."""
        async with self.rt.sessions() as s:
            res = await s.execute(
                sa.update(Delivery)
                .where(Delivery.lease_owner == self.owner, Delivery.finished_at.is_(None))
                .values(lease_until=self._until())
            )
            await s.commit()
        return res.rowcount

    async def items(self, delivery_id: int) -> list[Item]:
        """The photos of the delivery's result, composite first; recorded from the job's result the first time."""
        async with self.rt.sessions() as s:
            query = sa.select(DeliveryItem).where(DeliveryItem.delivery_id == delivery_id)
            rows = (await s.scalars(query.order_by(DeliveryItem.position))).all()
            if not rows:
                of_delivery = sa.select(Delivery.job_id).where(Delivery.id == delivery_id).scalar_subquery()
                job = await s.scalar(sa.select(Job).where(Job.id == of_delivery))
                if job is None or not job.result or not ({"composite", "animation"} & set(job.result)):
                    return []
                rows = [
                    DeliveryItem(delivery_id=delivery_id, position=i, name=name, sha256=sha)
                    for i, (name, sha) in enumerate(result_items(job.result))
                ]
                s.add_all(rows)
                try:
                    await s.commit()
                except sa.exc.IntegrityError:  # recorded meanwhile by a previous holder: read those
                    await s.rollback()
                    return await self.items(delivery_id)
            return [Item(r.id, r.position, r.name, r.sha256, r.sent_at is not None) for r in rows]

    async def mark_sent(self, item_ids: list[int]) -> None:
        """The platform confirmed these photos."""
        async with self.rt.sessions() as s:
            await s.execute(
                sa.update(DeliveryItem)
                .where(DeliveryItem.id.in_(item_ids), DeliveryItem.sent_at.is_(None))
                .values(sent_at=utcnow())
            )
            await s.commit()

    async def finish(self, delivery_id: int) -> None:
        """The progress message shows its final state: nothing is left to do."""
        await self._set(delivery_id, finished_at=utcnow(), lease_owner=None, lease_until=None)

    async def release(self, delivery_id: int) -> None:
        """This process stops (shutdown): another process may take the delivery over at once."""
        await self._set(delivery_id, lease_owner=None, lease_until=None)

    async def fail(self, delivery_id: int) -> None:
        """Sending failed: another try after ``lease_s``, by whichever process claims it then."""
        await self._set(delivery_id, lease_owner=None, lease_until=self._until(), failures=Delivery.failures + 1)

    async def _set(self, delivery_id: int, **values: Any) -> None:
        async with self.rt.sessions() as s:
            await s.execute(
                sa.update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.lease_owner == self.owner, Delivery.finished_at.is_(None))
                .values(**values)
            )
            await s.commit()

    async def claim_orphans(self, platform: str, limit: int = 50) -> list[DeliveryRecord]:
        """Take over unfinished deliveries of ``platform`` whose lease lapsed or was released."""
        now = utcnow()
        open_and_free = sa.and_(
            Delivery.platform == Platform(platform),
            Delivery.finished_at.is_(None),
            Delivery.failures < MAX_FAILURES,
            sa.or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
        )
        async with self.rt.sessions() as s:
            query = sa.select(Delivery.id).where(open_and_free).order_by(Delivery.id).limit(limit)
            ids = (await s.scalars(query)).all()
        claimed = []
        for delivery_id in ids:  # one conditional update each: of two claimers, one wins each delivery
            async with self.rt.sessions() as s:
                res = await s.execute(
                    sa.update(Delivery)
                    .where(Delivery.id == delivery_id, open_and_free)
                    .values(lease_owner=self.owner, lease_until=self._until())
                )
                await s.commit()
                if res.rowcount == 1:
                    claimed.append(_record(await s.get(Delivery, delivery_id)))
        return claimed

    async def get(self, delivery_id: int) -> DeliveryRecord | None:
        async with self.rt.sessions() as s:
            d = await s.get(Delivery, delivery_id)
        return _record(d) if d is not None else None
