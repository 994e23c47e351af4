"""The service API: the only thing the bots call. Typed inputs and results; errors are ServiceErrors whose
message can be shown to the user as it is.

A front end passes who is asking (:class:`Actor`, with the platform's word on whether they administer the
community) and where (:class:`Place`); the service keeps users, communities and memberships in step with
that on every call, checks roles, quotas and input, writes the job row, and enqueues. Job ids are stable and
idempotent: the same photo with the same options from the same person is one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from arq.jobs import Job as ArqJob

from backend import ledger
from backend.blobs import ExpireResult, expire_blobs
from backend.config import Settings
from backend.db.models import (
    Blend,
    Blob,
    BlobKind,
    CachedLatent,
    Community,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Membership,
    Platform,
    Poll,
    PollOption,
    PollStatus,
    Role,
    StyleModel,
    StyleStatus,
    User,
    Vote,
    utcnow,
)
from backend.errors import BadInputError, ConflictError, NotAllowedError, NotFoundError, ServiceError
from backend.ledger import STATS_KEY, enqueue, record_blob
from backend.progress import ProgressEvent, latest, publish, watch
from backend.quotas import QuotaExceededError
from backend.runtime import QUEUE_NAMES, Runtime, open_runtime
from gan.blending import BlendError, BlendSpec
from gan.imageio import BadImageError, decode_image


class QuotaError(ServiceError):
    code = "quota"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Actor:
    """The person giving a command: platform ids, plus whether the platform says they administer the place."""

    platform: str
    user_id: str
    name: str = ""
    is_admin: bool = False


@dataclass(frozen=True)
class Place:
    """A Discord guild or a Telegram chat (None for a private conversation)."""

    platform: str
    community_id: str
    name: str = ""


@dataclass(frozen=True)
class JobTicket:
    job_id: str
    status: str
    duplicate: bool = False  # True: an identical request already existed; this is that job


@dataclass(frozen=True)
class ToonOutput:
    job_id: str
    composite: bytes  # the photo with every toonified face pasted back (PNG)
    crops: list[bytes]  # aligned toon crops (PNG), largest face first
    style: str
    spec: dict[str, Any]
    faces: int
    too_small: int


@dataclass(frozen=True)
class StyleInfo:
    name: str
    status: str
    community: bool  # True: this community's own style; False: available everywhere
    default_blend: dict[str, Any]


@dataclass(frozen=True)
class PollOptionInfo:
    position: int
    label: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class PollInfo:
    poll_id: int
    style: str
    status: str
    closes_at: datetime
    options: list[PollOptionInfo]
    tally: dict[int, int] = field(default_factory=dict)  # position -> votes
    winner: int | None = None
    preview_job_id: str | None = None  # renders the grid of options on probe faces (watch it, then result())


@dataclass(frozen=True)
class ForgetReport:
    jobs: int
    blobs: int
    files: int
    votes: int
    latents: int


BLEND_LEVELS = (4, 8, 16, 32, 64, 128, 256, 512)
MAX_DATASET_BYTES = 1 << 30  # a fine-tune dataset zip (a few hundred photos fit in far less)


def parse_blend(value: int | str | BlendSpec | None, resolution: int | None = None) -> BlendSpec | None:
    """``/blend 32`` → a swap at 32 px; also accepts a BlendSpec or its JSON. None stays None."""
    if value is None or isinstance(value, BlendSpec):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return BlendSpec.from_json(json.loads(value))
        except (ValueError, KeyError, TypeError, BlendError) as e:
            raise BadInputError(f"that blend description is not valid: {e}") from e
    try:
        level = int(value)
    except (TypeError, ValueError):
        raise BadInputError(f"blend must be a resolution such as 16 or 32, not {value!r}") from None
    allowed = [lv for lv in BLEND_LEVELS if resolution is None or lv <= resolution]
    if level not in allowed:
        raise BadInputError(f"blend must be one of {', '.join(map(str, allowed))}, not {level}")
    return BlendSpec(mode="swap", resolution=level, structure_from="toon")


class ToonService:
    """Open with ``await ToonService.open(settings)`` (or over an existing Runtime); ``await close()``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @classmethod
    async def open(cls, settings: Settings | None = None, **kw) -> ToonService:
        rt = await open_runtime(settings or Settings.from_env(), **kw)
        service = cls(rt)
        await service.sync_bundled_styles()
        return service

    async def close(self) -> None:
        await self.rt.close()

    # ----------------------------------------------------------------------------------------- people, places

    async def _user(self, s, actor: Actor) -> User:
        platform = Platform(actor.platform)
        user = await s.scalar(
            sa.select(User).where(User.platform == platform, User.platform_user_id == str(actor.user_id))
        )
        if user is None:
            user = User(platform=platform, platform_user_id=str(actor.user_id), display_name=actor.name[:128])
            s.add(user)
            try:
                await s.flush()
            except sa.exc.IntegrityError:  # created concurrently by another call
                await s.rollback()
                return await self._user(s, actor)
        return user

    async def _community(self, s, place: Place | None, user: User | None = None, actor: Actor | None = None):
        if place is None:
            return None
        platform = Platform(place.platform)
        comm = await s.scalar(
            sa.select(Community).where(
                Community.platform == platform, Community.platform_community_id == str(place.community_id)
            )
        )
        if comm is None:
            comm = Community(platform=platform, platform_community_id=str(place.community_id), name=place.name[:128])
            s.add(comm)
            try:
                await s.flush()
            except sa.exc.IntegrityError:
                await s.rollback()
                return await self._community(s, place, user, actor)
        if user is not None and actor is not None:
            m = await s.scalar(
                sa.select(Membership).where(Membership.user_id == user.id, Membership.community_id == comm.id)
            )
            role = Role.ADMIN if actor.is_admin else Role.MEMBER
            if m is None:
                s.add(Membership(user_id=user.id, community_id=comm.id, role=role))
            elif m.role != Role.OWNER:
                m.role = role  # the platform's current word wins: a demoted admin loses the right at once
            await s.flush()
        return comm

    async def _require_admin(self, s, actor: Actor, place: Place | None) -> tuple[User, Community]:
        if place is None:
            raise NotAllowedError("this command works in a server or group, not in a private chat")
        user = await self._user(s, actor)
        comm = await self._community(s, place, user, actor)
        if not actor.is_admin:
            raise NotAllowedError("only the admins of this community can do that")
        return user, comm

    async def require_admin(self, actor: Actor, place: Place | None) -> None:
        """Raise NotAllowedError unless ``actor`` administers ``place`` (front ends check before downloading)."""
        async with self.rt.sessions() as s:
            await self._require_admin(s, actor, place)
            await s.commit()

    # ----------------------------------------------------------------------------------------------- styles

    async def sync_bundled_styles(self) -> None:
        """Make the styles of the model manifest (bundled demo or TOONIFY_MODELS_DIR) global published rows."""
        from gan.styles import load_manifest

        try:
            manifest = load_manifest(self.rt.models_dir)
        except FileNotFoundError:
            return
        async with self.rt.sessions() as s:
            for name, entry in manifest.get("styles", {}).items():
                path = str(self.rt.models_dir / entry["toon"])
                row = await s.scalar(
                    sa.select(StyleModel).where(StyleModel.name == name, StyleModel.community_id.is_(None))
                )
                blend = entry.get("blend", {"mode": "swap", "resolution": 32})
                if row is None:
                    s.add(
                        StyleModel(
                            name=name,
                            community_id=None,
                            status=StyleStatus.PUBLISHED,
                            checkpoint_path=path,
                            default_blend=blend,
                        )
                    )
                else:
                    row.checkpoint_path, row.default_blend = path, blend
            try:
                await s.commit()
            except sa.exc.IntegrityError:  # another process synced at the same moment
                await s.rollback()

    def _default_style_name(self) -> str | None:
        from gan.styles import load_manifest

        try:
            return load_manifest(self.rt.models_dir).get("default_style")
        except FileNotFoundError:
            return None

    async def _style(self, s, name: str | None, comm: Community | None, *, drafts: bool = False) -> StyleModel:
        name = (name or self._default_style_name() or "").strip().lower()
        visible = [StyleStatus.PUBLISHED] + ([StyleStatus.DRAFT] if drafts else [])
        q = sa.select(StyleModel).where(StyleModel.name == name, StyleModel.status.in_(visible))
        scope = StyleModel.community_id.is_(None)
        if comm is not None:
            scope = scope | (StyleModel.community_id == comm.id)
        rows = (await s.scalars(q.where(scope))).all()
        if not rows:
            names = [st.name for st in await self._visible_styles(s, comm)]
            raise NotFoundError(f"there is no style called {name!r}; try one of: {', '.join(names) or 'none'}")
        return sorted(rows, key=lambda r: r.community_id is None)[0]  # the community's own wins

    async def _visible_styles(self, s, comm: Community | None) -> list[StyleModel]:
        scope = StyleModel.community_id.is_(None)
        if comm is not None:
            scope = scope | (StyleModel.community_id == comm.id)
        q = sa.select(StyleModel).where(scope, StyleModel.status == StyleStatus.PUBLISHED).order_by(StyleModel.name)
        return list((await s.scalars(q)).all())

    async def list_styles(self, place: Place | None = None) -> list[StyleInfo]:
        async with self.rt.sessions() as s:
            comm = await self._community(s, place)
            rows = await self._visible_styles(s, comm)
            await s.commit()
        return [StyleInfo(r.name, r.status.value, r.community_id is not None, r.default_blend) for r in rows]

    async def set_style(self, actor: Actor, place: Place | None, name: str) -> StyleInfo:
        """``/style NAME``: the actor's default style from now on (it must be visible here)."""
        async with self.rt.sessions() as s:
            user = await self._user(s, actor)
            comm = await self._community(s, place, user, actor)
            st = await self._style(s, name, comm, drafts=actor.is_admin)
            user.preferences = {**(user.preferences or {}), "style": st.name}
            await s.commit()
            return StyleInfo(st.name, st.status.value, st.community_id is not None, st.default_blend)

    async def _default_spec(self, s, style: StyleModel, comm: Community | None) -> dict[str, Any]:
        if comm is not None:
            blend = await s.scalar(
                sa.select(Blend).where(Blend.style_id == style.id, Blend.community_id == comm.id, Blend.is_default)
            )
            if blend is not None:
                return blend.spec
        return style.default_blend or {"mode": "swap", "resolution": 32, "structure_from": "toon"}

    # -------------------------------------------------------------------------------------------------- toon

    async def submit_toon(
        self,
        actor: Actor,
        place: Place | None,
        image: bytes,
        *,
        style: str | None = None,
        blend: int | str | BlendSpec | None = None,
        mode: str = "balanced",
        all_faces: bool = True,
    ) -> JobTicket:
        """Queue a toon of ``image``: checked (size, decodable, pixel limit), stored, quota-counted, enqueued."""
        limit = self.rt.settings.max_upload_bytes
        if len(image) > limit:
            raise BadInputError(f"that file is {len(image) / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB")
        if mode not in ("fast", "balanced", "quality"):
            raise BadInputError(f"mode must be fast, balanced or quality, not {mode!r}")
        try:
            await asyncio.to_thread(decode_image, image)
        except BadImageError as e:
            raise BadInputError(str(e)) from e
        spec = parse_blend(blend)
        sha = await asyncio.to_thread(self.rt.blobs.put, image)
        async with self.rt.sessions() as s:
            user = await self._user(s, actor)
            comm = await self._community(s, place, user, actor)
            preferred = (user.preferences or {}).get("style")
            try:
                st = await self._style(s, style or preferred, comm, drafts=actor.is_admin)
            except NotFoundError:
                if style:  # asked for by name: say so; a stale preference quietly falls back
                    raise
                st = await self._style(s, None, comm)
            spec_json = spec.to_json() if spec else await self._default_spec(s, st, comm)
            await s.commit()
            user_id, comm_id, style_id, style_name = user.id, comm.id if comm else None, st.id, st.name
        blob_id = await record_blob(
            self.rt, user_id, sha, len(image), "image/*", BlobKind.SELFIE, self.rt.settings.selfie_retention_s
        )
        params = {"style_id": style_id, "style": style_name, "spec": spec_json, "mode": mode, "all_faces": all_faces}
        return await self._submit(JobKind.TOON, user_id, comm_id, params, blob_id, sha)

    async def reblend(
        self, actor: Actor, place: Place | None, blend: int | str | BlendSpec, *, style: str | None = None
    ) -> JobTicket:
        """Re-render the actor's latest toon at another blend (its latents are cached: no projection)."""
        spec = parse_blend(blend)
        async with self.rt.sessions() as s:
            user = await self._user(s, actor)
            comm = await self._community(s, place, user, actor)
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
            st = await self._style(s, style or last.params.get("style"), comm, drafts=actor.is_admin)
            await s.commit()
            params = {**last.params, "style_id": st.id, "style": st.name, "spec": spec.to_json(), "reblend_of": last.id}
            blob = await s.get(Blob, last.input_blob_id)
            user_id, comm_id, blob_id, sha = user.id, comm.id if comm else None, last.input_blob_id, blob.sha256
        if not self.rt.blobs.exists(sha):
            raise NotFoundError("your last photo has expired; send it again with /toon")
        return await self._submit(JobKind.REBLEND, user_id, comm_id, params, blob_id, sha)

    async def _submit(
        self, kind: JobKind, user_id: int, comm_id: int | None, params: dict, blob_id: int | None, sha: str | None
    ) -> JobTicket:
        key_params = {k: v for k, v in params.items() if k != "reblend_of"}
        key = hashlib.sha256(
            json.dumps([user_id, sha, "toon", key_params], sort_keys=True).encode()
        ).hexdigest()  # a re-blend and a toon with the same options are the same work
        async with self.rt.sessions() as s:
            existing = await s.scalar(sa.select(Job).where(Job.key == key))
            if existing is not None:
                if existing.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                    existing.key = f"{key[:80]}:retired:{existing.id}"  # let the same request run again
                    await s.commit()
                else:
                    return JobTicket(existing.id, existing.status.value, duplicate=True)
        job = Job(key=key, kind=kind, user_id=user_id, community_id=comm_id, params=params, input_blob_id=blob_id)
        job.id = os.urandom(16).hex()
        try:
            await self.rt.quotas.admit(f"user:{user_id}", f"community:{comm_id}" if comm_id else None, job.id)
        except QuotaExceededError as e:
            raise QuotaError(str(e), e.retry_after_s) from e
        async with self.rt.sessions() as s:
            s.add(job)
            try:
                await s.commit()
            except sa.exc.IntegrityError:  # the same request raced us and won: that is the job
                await s.rollback()
                await self.rt.quotas.release(f"user:{user_id}", job.id)
                existing = await s.scalar(sa.select(Job).where(Job.key == key))
                return JobTicket(existing.id, existing.status.value, duplicate=True)
        await publish(self.rt.pool, ProgressEvent(job_id=job.id, status="queued", stage="queued"))
        await enqueue(self.rt.pool, job)
        return JobTicket(job.id, JobStatus.QUEUED.value)

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

    async def queue_position(self, job_id: str) -> tuple[int | None, float | None]:
        """(jobs ahead of this one, estimated seconds until it finishes) while it waits; (None, None) otherwise."""
        pool = self.rt.pool
        for queue in QUEUE_NAMES.values():
            rank = await pool.zrank(queue, job_id)
            if rank is not None:
                per_job = float(await pool.get(STATS_KEY) or 10.0)
                slots = max(1, self.rt.settings.toon_max_jobs)
                return rank, per_job * (rank // slots + 1)
        return None, None

    async def watch(self, job_id: str, *, timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        """Events for a job until it ends: queued (with position and wait estimate), stages, steps, result."""

        async def fallback() -> ProgressEvent | None:
            ev = await self._row_event(job_id)
            return ev if ev.terminal else None

        async for ev in watch(self.rt.pool, job_id, poll_s=1.0, timeout_s=timeout_s, fallback=fallback):
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
        r = job.result
        try:
            composite = self.rt.blobs.read(r["composite"])
            crops = [self.rt.blobs.read(sha) for sha in r["crops"]]
        except FileNotFoundError as e:
            raise NotFoundError("this result has expired or was deleted") from e
        return ToonOutput(
            job.id,
            composite,
            crops,
            r.get("style", ""),
            r.get("spec", {}),
            r.get("faces", len(crops)),
            r.get("too_small", 0),
        )

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
            user = await self._user(s, actor)
            await s.commit()
            return await s.scalar(
                sa.select(Job.id)
                .where(Job.user_id == user.id, Job.status.in_(ledger.ACTIVE))
                .order_by(Job.created_at.desc())
                .limit(1)
            )

    async def cancel(self, actor: Actor, job_id: str) -> bool:
        """Stop a job of the actor's (a queued one at once, a running one at its next step); False if it ended."""
        async with self.rt.sessions() as s:
            user = await self._user(s, actor)
            job = await s.get(Job, job_id)
            await s.commit()
        if job is None or job.user_id != user.id:
            raise NotFoundError("you have no such job")
        if job.status in ledger.TERMINAL:
            return False
        async with self.rt.sessions() as s:
            await s.execute(sa.update(Job).where(Job.id == job_id).values(cancel_requested=True))
            await s.commit()
        await self.rt.pool.set(ledger.cancel_key(job_id), b"1", ex=86400)
        await self.rt.pool.publish(ledger.CANCEL_CHANNEL, job_id)
        queue = QUEUE_NAMES["finetune" if job.kind == JobKind.FINETUNE else "toon"]
        if job.status == JobStatus.QUEUED and await ledger.finish(
            self.rt, job, JobStatus.CANCELLED, error="cancelled", only_from=(JobStatus.QUEUED,)
        ):
            with contextlib.suppress(TimeoutError):  # abort() marks the job, then waits for its end: we don't
                await ArqJob(job_id, self.rt.pool, _queue_name=queue).abort(timeout=0)
        return True

    # ----------------------------------------------------------------------------------------------- polls

    async def start_blend_poll(
        self,
        actor: Actor,
        place: Place | None,
        *,
        style: str | None = None,
        levels: tuple[int, ...] = (8, 16, 32),
        duration_s: int = 86400,
    ) -> PollInfo:
        """Admins: a poll between swap resolutions of a style; the winner becomes the community default."""
        if not 2 <= len(levels) <= 10:
            raise BadInputError("a poll needs between 2 and 10 blend levels")
        specs = [parse_blend(lv) for lv in levels]
        async with self.rt.sessions() as s:
            user, comm = await self._require_admin(s, actor, place)
            st = await self._style(s, style, comm)
            poll = Poll(
                community_id=comm.id,
                style_id=st.id,
                created_by=user.id,
                closes_at=utcnow() + timedelta(seconds=duration_s),
            )
            s.add(poll)
            await s.flush()
            for i, spec in enumerate(specs):
                blend = Blend(
                    style_id=st.id,
                    community_id=comm.id,
                    spec=spec.to_json(),
                    label=f"blend {spec.resolution}",
                    created_by=user.id,
                )
                s.add(blend)
                await s.flush()
                s.add(PollOption(poll_id=poll.id, blend_id=blend.id, position=i + 1))
            preview = Job(
                key=f"preview:poll:{poll.id}",
                kind=JobKind.PREVIEW,
                user_id=user.id,
                community_id=comm.id,
                params={
                    "poll_id": poll.id,
                    "style_id": st.id,
                    "style": st.name,
                    "specs": [sp.to_json() for sp in specs],
                },
            )
            preview.id = os.urandom(16).hex()
            s.add(preview)
            await s.commit()
            info = await self._poll_info(s, poll.id)
        await publish(self.rt.pool, ProgressEvent(job_id=preview.id, status="queued", stage="queued"))
        await enqueue(self.rt.pool, preview)
        return info

    async def _poll_info(self, s, poll_id: int) -> PollInfo:
        poll = await s.get(Poll, poll_id)
        opts = (
            await s.execute(
                sa.select(PollOption, Blend)
                .join(Blend, PollOption.blend_id == Blend.id)
                .where(PollOption.poll_id == poll_id)
                .order_by(PollOption.position)
            )
        ).all()
        counts = dict(
            (
                await s.execute(
                    sa.select(PollOption.position, sa.func.count(Vote.id))
                    .join(Vote, Vote.option_id == PollOption.id)
                    .where(PollOption.poll_id == poll_id)
                    .group_by(PollOption.position)
                )
            ).all()
        )
        style = await s.get(StyleModel, poll.style_id)
        winner = None
        if poll.winner_blend_id is not None:
            winner = next((o.position for o, b in opts if b.id == poll.winner_blend_id), None)
        preview = await s.scalar(sa.select(Job.id).where(Job.key == f"preview:poll:{poll.id}"))
        return PollInfo(
            preview_job_id=preview,
            poll_id=poll.id,
            style=style.name,
            status=poll.status.value,
            closes_at=poll.closes_at,
            options=[PollOptionInfo(o.position, b.label, b.spec) for o, b in opts],
            tally={o.position: int(counts.get(o.position, 0)) for o, _ in opts},
            winner=winner,
        )

    async def vote(self, actor: Actor, place: Place | None, poll_id: int, position: int) -> PollInfo:
        """One vote per member per poll; voting again changes it."""
        async with self.rt.sessions() as s:
            user = await self._user(s, actor)
            comm = await self._community(s, place, user, actor)
            poll = await s.get(Poll, poll_id)
            if poll is None or comm is None or poll.community_id != comm.id:
                raise NotFoundError("there is no such poll here")
            if poll.status != PollStatus.OPEN or poll.closes_at <= utcnow():
                raise ConflictError("this poll is closed")
            option = await s.scalar(
                sa.select(PollOption).where(PollOption.poll_id == poll_id, PollOption.position == position)
            )
            if option is None:
                raise BadInputError(f"this poll has no option {position}")
            vote = await s.scalar(sa.select(Vote).where(Vote.poll_id == poll_id, Vote.user_id == user.id))
            if vote is None:
                s.add(Vote(poll_id=poll_id, user_id=user.id, option_id=option.id))
            else:
                vote.option_id = option.id
            try:
                await s.commit()
            except sa.exc.IntegrityError:  # a double click raced: the other insert stands, change it
                await s.rollback()
                await s.execute(
                    sa.update(Vote)
                    .where(Vote.poll_id == poll_id, Vote.user_id == user.id)
                    .values(option_id=option.id, updated_at=utcnow())
                )
                await s.commit()
            return await self._poll_info(s, poll_id)

    async def close_poll(self, actor: Actor | None, place: Place | None, poll_id: int) -> PollInfo:
        """Close a poll (an admin, or ``actor=None`` for the deadline sweep); the winner becomes the default."""
        async with self.rt.sessions() as s:
            if actor is not None:
                _, comm = await self._require_admin(s, actor, place)
            poll = await s.get(Poll, poll_id)
            if poll is None or (actor is not None and poll.community_id != comm.id):
                raise NotFoundError("there is no such poll here")
            if poll.status == PollStatus.CLOSED:
                return await self._poll_info(s, poll_id)
            info = await self._poll_info(s, poll_id)
            best = max(info.tally.values(), default=0)
            if best > 0:  # ties go to the earliest option
                position = min(p for p, n in info.tally.items() if n == best)
                option = await s.scalar(
                    sa.select(PollOption).where(PollOption.poll_id == poll_id, PollOption.position == position)
                )
                await s.execute(
                    sa.update(Blend)
                    .where(Blend.style_id == poll.style_id, Blend.community_id == poll.community_id)
                    .values(is_default=Blend.id == option.blend_id)
                )
                poll.winner_blend_id = option.blend_id
            poll.status = PollStatus.CLOSED
            await s.commit()
            return await self._poll_info(s, poll_id)

    async def open_poll(self, place: Place | None) -> PollInfo | None:
        """The community's most recent open poll."""
        async with self.rt.sessions() as s:
            comm = await self._community(s, place)
            await s.commit()
            if comm is None:
                return None
            poll_id = await s.scalar(
                sa.select(Poll.id)
                .where(Poll.community_id == comm.id, Poll.status == PollStatus.OPEN)
                .order_by(Poll.created_at.desc())
                .limit(1)
            )
            return None if poll_id is None else await self._poll_info(s, poll_id)

    async def close_due_polls(self) -> list[PollInfo]:
        """Close every open poll past its deadline (run periodically by the worker)."""
        async with self.rt.sessions() as s:
            ids = (
                await s.scalars(sa.select(Poll.id).where(Poll.status == PollStatus.OPEN, Poll.closes_at <= utcnow()))
            ).all()
        return [await self.close_poll(None, None, i) for i in ids]

    # ---------------------------------------------------------------------------------------------- styles

    async def start_finetune(
        self, actor: Actor, place: Place | None, name: str, dataset: bytes, *, steps: int = 400
    ) -> JobTicket:
        """Admins: store a zip of images and queue a fine-tune of the base model into draft style ``name``."""
        await self.require_admin(actor, place)
        name = name.strip().lower()
        if not name or len(name) > 32 or not all(c.isalnum() or c in "-_" for c in name):
            raise BadInputError("a style name is 1 to 32 letters, digits, '-' or '_'")
        if len(dataset) > MAX_DATASET_BYTES:
            size, limit = len(dataset) / 2**20, MAX_DATASET_BYTES >> 20
            raise BadInputError(f"that dataset is {size:.0f} MB; the limit is {limit} MB")
        try:
            with zipfile.ZipFile(io.BytesIO(dataset)) as zf:
                n_files = sum(1 for m in zf.infolist() if not m.is_dir())
        except zipfile.BadZipFile as e:
            raise BadInputError("send the dataset as a .zip of images") from e
        if n_files < 8:
            raise BadInputError(f"the zip holds {n_files} files; a fine-tune needs at least 8 images")
        sha = await asyncio.to_thread(self.rt.blobs.put, dataset)
        async with self.rt.sessions() as s:
            user, comm = await self._require_admin(s, actor, place)
            st = await s.scalar(
                sa.select(StyleModel).where(StyleModel.name == name, StyleModel.community_id == comm.id)
            )
            if st is not None and st.status in (StyleStatus.PUBLISHED, StyleStatus.TRAINING):
                raise ConflictError(f"this community already has a {st.status.value} style called {name!r}")
            if st is None:
                st = StyleModel(
                    name=name,
                    community_id=comm.id,
                    status=StyleStatus.TRAINING,
                    checkpoint_path="",
                    created_by=user.id,
                    default_blend={"mode": "swap", "resolution": 32, "structure_from": "toon"},
                )
                s.add(st)
            await s.commit()
            user_id, comm_id, style_id = user.id, comm.id, st.id
        blob_id = await record_blob(self.rt, None, sha, len(dataset), "application/zip", BlobKind.DATASET, None)
        async with self.rt.sessions() as s:
            ds = Dataset(community_id=comm_id, created_by=user_id, name=name, blob_id=blob_id, status="uploaded")
            s.add(ds)
            await s.commit()
            ds_id = ds.id
        job = Job(
            key=hashlib.sha256(f"finetune:{comm_id}:{name}:{sha}:{steps}".encode()).hexdigest(),
            kind=JobKind.FINETUNE,
            user_id=user_id,
            community_id=comm_id,
            params={"style_id": style_id, "dataset_id": ds_id, "steps": steps, "style": name},
        )
        job.id = os.urandom(16).hex()
        async with self.rt.sessions() as s:
            existing = await s.scalar(sa.select(Job).where(Job.key == job.key))
            if existing is not None and existing.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                return JobTicket(existing.id, existing.status.value, duplicate=True)
            if existing is not None:
                existing.key = f"{job.key[:80]}:retired:{existing.id}"
            s.add(job)
            await s.commit()
        await publish(self.rt.pool, ProgressEvent(job_id=job.id, status="queued", stage="queued"))
        await enqueue(self.rt.pool, job)
        return JobTicket(job.id, "queued")

    async def publish_style(self, actor: Actor, place: Place | None, name: str) -> StyleInfo:
        """Admins: a draft style of this community becomes available to its members."""
        async with self.rt.sessions() as s:
            _, comm = await self._require_admin(s, actor, place)
            st = await s.scalar(
                sa.select(StyleModel).where(StyleModel.name == name.strip().lower(), StyleModel.community_id == comm.id)
            )
            if st is None:
                raise NotFoundError(f"this community has no style called {name!r}")
            if st.status != StyleStatus.DRAFT:
                raise ConflictError(f"{name!r} is {st.status.value}; only a finished draft can be published")
            st.status = StyleStatus.PUBLISHED
            await s.commit()
            return StyleInfo(st.name, st.status.value, True, st.default_blend)

    # ---------------------------------------------------------------------------------------------- privacy

    async def forget_user(self, actor: Actor) -> ForgetReport:
        """Delete every row and file of the actor's: jobs, selfies, results, latents, votes, memberships."""
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
                    await self.rt.pool.set(ledger.cancel_key(job.id), b"1", ex=86400)
                    await self.rt.pool.publish(ledger.CANCEL_CHANNEL, job.id)
            await s.execute(sa.delete(User).where(User.id == uid))  # cascades: jobs, blobs rows, latents, votes…
            await s.commit()
            still_used = (
                set((await s.scalars(sa.select(Blob.sha256).where(Blob.sha256.in_(shas)))).all()) if shas else set()
            )
        files = 0
        for sha in shas - still_used:  # another user's identical file stays for them
            if self.rt.blobs.exists(sha):
                self.rt.blobs.delete(sha)
                files += 1
        for job in jobs:
            await self.rt.quotas.release(f"user:{uid}", job.id)
            await self.rt.pool.delete(f"toonify:job:{job.id}:state")
        return ForgetReport(jobs=counts[0], blobs=counts[1], files=files, votes=counts[2], latents=counts[3])

    async def expire(self) -> ExpireResult:
        """Delete expired selfies, results and cached latents (run periodically by the worker)."""
        async with self.rt.sessions() as s:
            await s.execute(sa.delete(CachedLatent).where(CachedLatent.expires_at <= utcnow()))
            await s.commit()
            return await expire_blobs(s, self.rt.blobs, utcnow())

    async def stats(self) -> dict[str, Any]:
        """Counts for operators: jobs by status, users, communities, styles, queue lengths."""
        async with self.rt.sessions() as s:
            by_status = dict((await s.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status))).all())
            users = await s.scalar(sa.select(sa.func.count(User.id)))
            comms = await s.scalar(sa.select(sa.func.count(Community.id)))
            styles = await s.scalar(sa.select(sa.func.count(StyleModel.id)))
        queues = {name: await self.rt.pool.zcard(q) for name, q in QUEUE_NAMES.items()}
        return {
            "jobs": {k.value: v for k, v in by_status.items()},
            "users": users,
            "communities": comms,
            "styles": styles,
            "queued": queues,
        }
