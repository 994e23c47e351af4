"""Toon jobs: submission (checked, stored, quota-counted, enqueued), progress, results, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from arq.jobs import Job as ArqJob

from backend import keys, ledger
from backend.db.models import Blob, BlobKind, Community, Job, JobKind, JobStatus, StyleModel, User, utcnow
from backend.errors import BadInputError, ConflictError, NotFoundError
from backend.jobs import MODES, PROJECTION_MODES, ToonParams, ToonResult, queue_of
from backend.ledger import NewJob, store_blob
from backend.progress import ProgressEvent, latest, watch
from backend.quotas import QuotaExceededError
from backend.service.base import Concern, get_community, get_user, names_redis, names_redis_iter
from backend.service.students import blend_words, ready_student
from backend.service.styles import default_spec, has_encoder, resolve_style
from backend.service.types import Actor, JobTicket, Place, QuotaError, ToonOutput, parse_blend
from gan.blending import BlendSpec
from gan.imageio import BadImageError, decode_image

DEFAULT_JOB_SECONDS = 10.0  # the wait estimate before any toon job has finished


class JobCommands(Concern):
    @names_redis
    async def submit_toon(
        self,
        actor: Actor,
        place: Place | None,
        image: bytes,
        *,
        style: str | None = None,
        blend: int | str | BlendSpec | None = None,
        mode: str | None = None,
        all_faces: bool = True,
    ) -> JobTicket:
        """Queue a toon of ``image``: checked (size, decodable, pixel limit), stored, quota-counted, enqueued.

        ``mode`` None decides for the caller: ``instant`` where the style has a ready student network for the
        blend this request renders, else ``balanced``. ``instant`` asked for by name without a student is a
        BadInputError naming the style and blend; the projection modes always project.

        The photo's row is written before its file, and the quota slot is given back whenever the job row is
        not written, so a failure part-way (the database gone, say) leaves neither a file nothing accounts
        for nor a slot taken."""
        await self.styles_fresh()  # a style added or removed since the last request
        limit = self.rt.settings.max_upload_bytes
        if len(image) > limit:
            raise BadInputError(f"that file is {len(image) / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB")
        if mode is not None and mode not in MODES:
            raise BadInputError(f"mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, not {mode!r}")
        try:
            await asyncio.to_thread(decode_image, image)
        except BadImageError as e:
            raise BadInputError(str(e)) from e
        spec = parse_blend(blend)
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            st = await self._requested_style(s, actor, user, comm, style)
            spec = spec or await default_spec(s, st, comm)
            mode = await self._mode_for(s, st, spec, mode)
            await s.commit()
            user_id, comm_id, style_id, style_name = user.id, comm.id if comm else None, st.id, st.name
        retention = self.rt.settings.selfie_retention_s
        sha, blob_id = await store_blob(self.rt, user_id, image, "image/*", BlobKind.SELFIE, retention)
        params = ToonParams(style_id=style_id, style=style_name, spec=spec, mode=mode, all_faces=all_faces)
        return await self._submit(JobKind.TOON, user_id, comm_id, params, blob_id, sha)

    async def _mode_for(self, s, style: StyleModel, spec: BlendSpec, mode: str | None) -> str:
        """The mode a request runs in (see submit_toon)."""
        if mode == "fast" and not has_encoder(self.rt.models_dir, self.rt.settings.data_dir, style):
            raise BadInputError(
                f"the style {style.name!r} has no encoder yet, so fast mode is not available; "
                "use balanced or quality (an operator adds one with `toonify train-encoder`)"
            )
        if mode in PROJECTION_MODES:
            return mode
        if await ready_student(s, self.rt.settings.data_dir, style.id, spec) is not None:
            return "instant"
        if mode == "instant":
            raise BadInputError(
                f"the style {style.name!r} has no instant model for {blend_words(spec)} yet; "
                "leave out 'instant' to have it projected, or have one made (/distill, or `toonify distill`)"
            )
        return "balanced"

    async def _requested_style(
        self, s, actor: Actor, user: User, comm: Community | None, style: str | None
    ) -> StyleModel:
        preferred = (user.preferences or {}).get("style")
        try:
            return await resolve_style(s, self.rt.models_dir, style or preferred, comm, drafts=actor.is_admin)
        except NotFoundError:
            if style:  # asked for by name: say so; a stale preference quietly falls back
                raise
            return await resolve_style(s, self.rt.models_dir, None, comm)

    @names_redis
    async def reblend(
        self, actor: Actor, place: Place | None, blend: int | str | BlendSpec, *, style: str | None = None
    ) -> JobTicket:
        """Re-render the actor's latest toon at another blend: with the style's student for that blend where
        one exists (instant), else by projection (the latents of a projected toon are cached: no new search)."""
        await self.styles_fresh()  # a style added or removed since the last request
        spec = parse_blend(blend)
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
            last = await s.scalar(
                sa.select(Job)
                .where(
                    Job.user_id == user.id,
                    Job.kind.in_([JobKind.TOON, JobKind.REBLEND]),
                    Job.input_blob_id.is_not(None),
                )
                .order_by(Job.created_at.desc())
                .limit(1)
            )
            if last is None:
                raise NotFoundError("there is no earlier photo of yours to re-blend; send one with /toon first")
            before = ToonParams.from_json(last.params)
            st = await resolve_style(s, self.rt.models_dir, style or before.style, comm, drafts=actor.is_admin)
            projection = before.mode if before.mode in PROJECTION_MODES else "balanced"
            mode = "instant" if await ready_student(s, self.rt.settings.data_dir, st.id, spec) else projection
            await s.commit()
            params = replace(before, style_id=st.id, style=st.name, spec=spec, mode=mode, reblend_of=last.id)
            blob = await s.get(Blob, last.input_blob_id)
            user_id, comm_id, blob_id, sha = user.id, comm.id if comm else None, last.input_blob_id, blob.sha256
        if not self.rt.blobs.exists(sha):
            raise NotFoundError("your last photo has expired; send it again with /toon")
        return await self._submit(JobKind.REBLEND, user_id, comm_id, params, blob_id, sha)

    async def _submit(
        self, kind: JobKind, user_id: int, comm_id: int | None, params: ToonParams, blob_id: int, sha: str
    ) -> JobTicket:
        key = hashlib.sha256(
            json.dumps([user_id, sha, "toon", params.identity()], sort_keys=True).encode()
        ).hexdigest()  # a re-blend and a toon with the same options are the same work
        try:
            created = await ledger.create_job(
                self.rt, NewJob(key, kind, user_id, comm_id, params, input_blob_id=blob_id), count_quota=True
            )
        except QuotaExceededError as e:
            raise QuotaError(str(e), e.retry_after_s) from e
        return JobTicket(created.job_id, created.status.value, duplicate=created.duplicate)

    @names_redis
    async def job_status(self, job_id: str) -> ProgressEvent:
        """The job's latest state (from Redis, else from its SQL row)."""
        ev = await latest(self.rt.pool, job_id)
        if ev is not None:
            return ev
        return await self._row_event(job_id)

    async def _row_event(self, job_id: str) -> ProgressEvent:
        async with self.rt.sessions() as s:
            job = await s.get(Job, job_id)
        if job is None:
            raise NotFoundError("no such job")
        return ProgressEvent(
            job_id=job.id, status=job.status.value, stage=job.status.value, result=job.result, error=job.error
        )

    @names_redis
    async def queue_position(self, job_id: str) -> tuple[int | None, float | None]:
        """(jobs ahead of this one, estimated seconds until it finishes) while it waits; (None, None) otherwise."""
        pool = self.rt.pool
        for queue in keys.QUEUE_NAMES.values():
            rank = await pool.zrank(queue, job_id)
            if rank is not None:
                per_job = float(await pool.get(keys.STATS_KEY) or DEFAULT_JOB_SECONDS)
                slots = max(1, self.rt.settings.toon_max_jobs)
                return rank, per_job * (rank // slots + 1)
        return None, None

    @names_redis_iter
    async def watch(self, job_id: str, *, timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        """Events for a job until it ends: queued (with position and wait estimate), stages, steps, result."""

        async def fallback() -> ProgressEvent | None:
            ev = await self._row_event(job_id)
            return ev if ev.terminal else None

        async with contextlib.aclosing(
            watch(self.rt.pool, job_id, poll_s=1.0, timeout_s=timeout_s, fallback=fallback)
        ) as events:
            async for ev in events:
                if ev.status == "queued":
                    pos, eta = await self.queue_position(job_id)
                    ev = ProgressEvent(**{**ev.to_dict(), "queue_position": pos, "eta_s": eta})
                yield ev

    async def result(self, job_id: str) -> ToonOutput:
        async with self.rt.sessions() as s:
            job = await s.get(Job, job_id)
        if job is None:
            raise NotFoundError("no such job")
        if job.status != JobStatus.DONE or not job.result:
            raise ConflictError(
                f"that job is {job.status.value}, it has no result" + (f": {job.error}" if job.error else "")
            )
        r = ToonResult.from_json(job.result)
        try:
            composite = self.rt.blobs.read(r.composite)
            crops = [self.rt.blobs.read(sha) for sha in r.crops]
        except FileNotFoundError as e:
            raise NotFoundError("this result has expired or was deleted") from e
        spec: dict[str, Any] = r.spec.to_json() if r.spec else {}
        return ToonOutput(job.id, composite, crops, r.style, spec, r.faces, r.too_small, r.mode, r.edits)

    async def claim_delivery(self, job_id: str) -> bool:
        """True for exactly one caller per finished job: the front end that should send the result."""
        async with self.rt.sessions() as s:
            res = await s.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.DONE, Job.delivered_at.is_(None))
                .values(delivered_at=utcnow())
            )
            await s.commit()
        return res.rowcount == 1

    async def active_job(self, actor: Actor) -> str | None:
        """The actor's most recent queued or running job, if any (what ``/cancel`` stops)."""
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            await s.commit()
            return await s.scalar(
                sa.select(Job.id)
                .where(Job.user_id == user.id, Job.status.in_(ledger.ACTIVE))
                .order_by(Job.created_at.desc())
                .limit(1)
            )

    @names_redis
    async def cancel(self, actor: Actor, job_id: str) -> bool:
        """Stop a job of the actor's (a queued one at once, a running one at its next step); False if it ended."""
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            job = await s.get(Job, job_id)
            await s.commit()
        if job is None or job.user_id != user.id:
            raise NotFoundError("you have no such job")
        if job.status in ledger.TERMINAL:
            return False
        async with self.rt.sessions() as s:
            await s.execute(sa.update(Job).where(Job.id == job_id).values(cancel_requested=True))
            await s.commit()
        await self.rt.pool.set(keys.job_cancel(job_id), b"1", ex=86400)
        await self.rt.pool.publish(keys.CANCEL_CHANNEL, job_id)
        queue = keys.QUEUE_NAMES[queue_of(job.kind)]
        if job.status == JobStatus.QUEUED and await ledger.finish(
            self.rt, job, JobStatus.CANCELLED, error="cancelled", only_from=(JobStatus.QUEUED,)
        ):
            with contextlib.suppress(TimeoutError):  # abort() marks the job, then waits for its end: we don't
                await ArqJob(job_id, self.rt.pool, _queue_name=queue).abort(timeout=0)
        return True

    @names_redis
    async def stats(self) -> dict[str, Any]:
        """Counts for operators: jobs by status, users, communities, styles, queue lengths."""
        async with self.rt.sessions() as s:
            by_status = dict((await s.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status))).all())
            users = await s.scalar(sa.select(sa.func.count(User.id)))
            comms = await s.scalar(sa.select(sa.func.count(Community.id)))
            styles = await s.scalar(sa.select(sa.func.count(StyleModel.id)))
        queues = {name: await self.rt.pool.zcard(q) for name, q in keys.QUEUE_NAMES.items()}
        return {
            "jobs": {k.value: v for k, v in by_status.items()},
            "users": users,
            "communities": comms,
            "styles": styles,
            "queued": queues,
        }
