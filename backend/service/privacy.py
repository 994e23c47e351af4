"""Privacy: forgetting a person on request, and expiring what the retention settings say to drop."""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa

from backend import keys, ledger
from backend.blobs import ExpireResult, expire_blobs
from backend.db.models import Blob, CachedLatent, Job, Platform, User, Vote, utcnow
from backend.service.base import Concern, names_redis
from backend.service.types import Actor, ForgetReport

log = logging.getLogger("toonify.service")
CHECKPOINT_TRIES = 20  # a reader mid-transaction keeps the WAL from being emptied: wait for it this many times


class PrivacyCommands(Concern):
    @names_redis
    async def forget_user(self, actor: Actor) -> ForgetReport:
        """Delete every row and file of the actor's: jobs, selfies, results, latents, votes, memberships.

        On SQLite the deleted rows are overwritten in the database file (``secure_delete``) and the write-ahead
        log, which still holds the rows as they were, is checkpointed and emptied."""
        async with self.rt.sessions() as s:
            user = await s.scalar(
                sa.select(User).where(
                    User.platform == Platform(actor.platform), User.platform_user_id == str(actor.user_id)
                )
            )
            if user is None:
                return ForgetReport(0, 0, 0, 0, 0)
            uid = user.id
            jobs = (await s.scalars(sa.select(Job).where(Job.user_id == uid))).all()
            shas = set((await s.scalars(sa.select(Blob.sha256).where(Blob.owner_user_id == uid))).all())
            counts = [
                len(jobs),
                len(shas),
                await s.scalar(sa.select(sa.func.count(Vote.id)).where(Vote.user_id == uid)),
                await s.scalar(sa.select(sa.func.count(CachedLatent.id)).where(CachedLatent.user_id == uid)),
            ]
            for job in jobs:
                if job.status in ledger.ACTIVE:
                    await self.rt.pool.set(keys.job_cancel(job.id), b"1", ex=86400)
                    await self.rt.pool.publish(keys.CANCEL_CHANNEL, job.id)
            await s.execute(sa.delete(User).where(User.id == uid))  # cascades: jobs, blobs rows, latents, votes…
            await s.commit()
            still_used = (
                set((await s.scalars(sa.select(Blob.sha256).where(Blob.sha256.in_(shas)))).all()) if shas else set()
            )
        await self.checkpoint_sqlite()
        files = 0
        for sha in shas - still_used:  # another user's identical file stays for them
            if self.rt.blobs.exists(sha):
                self.rt.blobs.delete(sha)
                files += 1
        for job in jobs:
            await self.rt.quotas.release(f"user:{uid}", job.id)
            await self.rt.pool.delete(keys.job_state(job.id))
        return ForgetReport(jobs=counts[0], blobs=counts[1], files=files, votes=counts[2], latents=counts[3])

    async def checkpoint_sqlite(self) -> bool:
        """On SQLite, move the write-ahead log into the database file and truncate it to zero bytes, so deleted
        rows survive in neither. True when the log was emptied (always True on other databases)."""
        if self.rt.engine.dialect.name != "sqlite":
            return True
        for _ in range(CHECKPOINT_TRIES):
            async with self.rt.engine.connect() as conn:
                busy, _log, _done = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).one()
            if not busy:
                return True
            await asyncio.sleep(0.1)
        log.warning("the SQLite write-ahead log could not be emptied: a reader kept it busy")
        return False

    async def expire(self) -> ExpireResult:
        """Delete expired selfies, results and cached latents (run periodically by the worker)."""
        async with self.rt.sessions() as s:
            await s.execute(sa.delete(CachedLatent).where(CachedLatent.expires_at <= utcnow()))
            await s.commit()
            return await expire_blobs(s, self.rt.blobs, utcnow())
