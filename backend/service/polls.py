"""Polls: admins offer a few blends of a style, members vote, the winner becomes the community default.

A snapshot poll (``/blend vote snapshots STYLE``) offers instead the snapshots of the fine-tune that made one of the
community's own styles, each rendered at the blend the community gets for it; its winner becomes the style's
checkpoint (the style belongs to this community alone, so that is this community's model), its instant models
for the old checkpoint are marked stale, and where the style is published the instant model of its blend is
queued anew.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend import ledger
from backend.blobs import copy_atomic
from backend.db.models import (
    Blend,
    Community,
    Job,
    JobKind,
    JobStatus,
    Poll,
    PollOption,
    PollStatus,
    Student,
    StyleModel,
    StyleStatus,
    Vote,
    utcnow,
)
from backend.errors import BadInputError, ConflictError, NotFoundError
from backend.jobs import FinetuneParams, PreviewParams
from backend.ledger import NewJob
from backend.service.base import Concern, get_community, get_user, names_redis, require_admin
from backend.service.students import auto_distill, stored_path
from backend.service.styles import default_spec, resolve_style
from backend.service.types import Actor, Place, PollInfo, PollOptionInfo, parse_blend
from gan.styles import relative_to

log = logging.getLogger("toonify.service")
MAX_POLL_OPTIONS = 10
SNAPSHOT_DIR = "snapshots"  # gan.finetune.SNAPSHOT_DIR: a run's generator per snapshot, names in training order


def preview_key(poll_id: int) -> str:
    return f"preview:poll:{poll_id}"


@dataclass(frozen=True)
class Snapshot:
    """One generator a fine-tune kept at a snapshot."""

    path: Path
    kimg: float
    kid: float | None
    content_hash: str | None


def finetune_snapshots(work: Path) -> list[Snapshot]:
    """The loadable generators of the fine-tune run in ``work``, in training order (gan.finetune writes one per
    training snapshot, with ``meta["snapshot"]``: kimg, step, metrics row)."""
    from gan.checkpoints import CheckpointError
    from gan.checkpoints.native import native_metadata

    found = []
    for path in sorted((work / SNAPSHOT_DIR).glob("*.safetensors")):
        try:
            meta = native_metadata(path)
        except CheckpointError:
            log.warning("%s is no readable snapshot; left out", path)
            continue
        info = meta.get("snapshot") or {}
        kid = (info.get("metrics") or {}).get("kid")
        found.append(Snapshot(path, float(info.get("kimg", 0.0)), kid, meta.get("content_hash")))
    return found


def spread(items: list, n: int) -> list:
    """At most ``n`` of ``items``, evenly spaced, always keeping the last (the finished model)."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def _snapshot_label(snap: Snapshot) -> str:
    kid = f", KID {snap.kid:.4f}" if snap.kid is not None else ""
    return f"snapshot {snap.kimg:g} kimg{kid}"[:64]


async def poll_info(s: AsyncSession, poll_id: int) -> PollInfo:
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
    preview = await s.scalar(sa.select(Job.id).where(Job.key == preview_key(poll.id)))
    return PollInfo(
        preview_job_id=preview,
        poll_id=poll.id,
        style=style.name,
        status=poll.status.value,
        closes_at=poll.closes_at,
        options=[PollOptionInfo(o.position, b.label, b.spec) for o, b in opts],
        tally={o.position: int(counts.get(o.position, 0)) for o, _ in opts},
        winner=winner,
        snapshots=any(o.checkpoint_path for o, _ in opts),
    )


class PollCommands(Concern):
    @names_redis
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
        await self.styles_fresh()  # a style added or removed since the last request
        if not 2 <= len(levels) <= 10:
            raise BadInputError("a poll needs between 2 and 10 blend levels")
        specs = [parse_blend(lv) for lv in levels]
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await resolve_style(s, self.rt.models_dir, style, comm)
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
            params = PreviewParams(poll_id=poll.id, style_id=st.id, style=st.name, specs=tuple(specs))
            preview = NewJob(preview_key(poll.id), JobKind.PREVIEW, user.id, comm.id, params)
            await ledger.create_job(self.rt, preview, session=s)  # one commit: the poll never lacks its grid
            return await poll_info(s, poll.id)

    @names_redis
    async def start_snapshot_poll(
        self,
        actor: Actor,
        place: Place | None,
        style: str,
        *,
        duration_s: int = 86400,
        max_options: int = 6,
    ) -> PollInfo:
        """Admins: a poll between the snapshots of the fine-tune that made ``style`` (one of this community's own
        styles, draft or published), each rendered at the blend the community gets for it. At most
        ``max_options`` snapshots, evenly spread over the run and always with the last; the winner becomes the
        style's checkpoint when the poll closes."""
        if not (style or "").strip():
            raise BadInputError("name the fine-tuned style whose snapshots to vote on: /blend vote snapshots NAME")
        max_options = max(2, min(max_options, MAX_POLL_OPTIONS))
        async with self.rt.sessions() as s:
            user, comm = await require_admin(s, actor, place)
            st = await resolve_style(s, self.rt.models_dir, style, comm, drafts=True)
            if st.community_id != comm.id:
                raise BadInputError(
                    f"{st.name!r} is not a style this community fine-tuned; only those have snapshots to vote on"
                )
            job = await self._finetune_of(s, st)
            spec = await default_spec(s, st, comm)
            await s.commit()
            user_id, comm_id, style_id, style_name = user.id, comm.id, st.id, st.name
        data_dir = self.rt.settings.data_dir
        snapshots = [] if job is None else await asyncio.to_thread(finetune_snapshots, data_dir / "finetune" / job)
        if len(snapshots) < 2:
            raise BadInputError(
                f"the fine-tune of {style_name!r} kept {len(snapshots)} snapshot generator(s); a vote needs at least 2 "
                "(a longer fine-tune, or one with more frequent snapshots, keeps more)"
            )
        chosen = spread(snapshots, max_options)
        async with self.rt.sessions() as s:
            poll = Poll(
                community_id=comm_id,
                style_id=style_id,
                created_by=user_id,
                closes_at=utcnow() + timedelta(seconds=duration_s),
            )
            s.add(poll)
            await s.flush()
            paths = []
            for i, snap in enumerate(chosen):
                blend = Blend(
                    style_id=style_id,
                    community_id=comm_id,
                    spec=spec.to_json(),
                    label=_snapshot_label(snap),
                    created_by=user_id,
                )
                s.add(blend)
                await s.flush()
                paths.append(relative_to(snap.path, data_dir))
                s.add(PollOption(poll_id=poll.id, blend_id=blend.id, position=i + 1, checkpoint_path=paths[-1]))
            params = PreviewParams(
                poll_id=poll.id,
                style_id=style_id,
                style=style_name,
                specs=(spec,) * len(chosen),
                checkpoints=tuple(paths),
            )
            preview = NewJob(preview_key(poll.id), JobKind.PREVIEW, user_id, comm_id, params)
            await ledger.create_job(self.rt, preview, session=s)  # one commit: the poll never lacks its grid
            return await poll_info(s, poll.id)

    @staticmethod
    async def _finetune_of(s, style: StyleModel) -> str | None:
        """The id of the latest finished fine-tune job that made ``style``."""
        jobs = await s.scalars(
            sa.select(Job)
            .where(Job.kind == JobKind.FINETUNE, Job.status == JobStatus.DONE, Job.community_id == style.community_id)
            .order_by(Job.finished_at.desc())
        )
        return next((j.id for j in jobs if FinetuneParams.from_json(j.params).style_id == style.id), None)

    async def vote(self, actor: Actor, place: Place | None, poll_id: int, position: int) -> PollInfo:
        """One vote per member per poll; voting again changes it."""
        async with self.rt.sessions() as s:
            user = await get_user(s, actor)
            comm = await get_community(s, place, user, actor)
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
            return await poll_info(s, poll_id)

    async def close_poll(self, actor: Actor | None, place: Place | None, poll_id: int) -> PollInfo:
        """Close a poll (an admin, or ``actor=None`` for the deadline sweep); the winner becomes the default."""
        async with self.rt.sessions() as s:
            comm = None
            if actor is not None:
                user, comm = await require_admin(s, actor, place)
            poll = await s.get(Poll, poll_id)
            if poll is None or (comm is not None and poll.community_id != comm.id):
                raise NotFoundError("there is no such poll here")
            if poll.status == PollStatus.CLOSED:
                return await poll_info(s, poll_id)
            info = await poll_info(s, poll_id)
            style = await s.get(StyleModel, poll.style_id)
            before = await default_spec(s, style, comm or await s.get(Community, poll.community_id))
            owner = user.id if actor is not None else poll.created_by or style.created_by
            best = max(info.tally.values(), default=0)
            checkpoint_changed = False
            if best > 0:  # ties go to the earliest option
                position = min(p for p, n in info.tally.items() if n == best)
                option = await s.scalar(
                    sa.select(PollOption).where(PollOption.poll_id == poll_id, PollOption.position == position)
                )
                if option.checkpoint_path:  # a snapshot poll: the style's model changes, its blends do not
                    checkpoint_changed = await self._adopt_snapshot(s, style, poll, option.checkpoint_path)
                else:
                    await s.execute(
                        sa.update(Blend)
                        .where(Blend.style_id == poll.style_id, Blend.community_id == poll.community_id)
                        .values(is_default=Blend.id == option.blend_id)
                    )
                poll.winner_blend_id = option.blend_id
            poll.status = PollStatus.CLOSED
            after = await default_spec(s, style, await s.get(Community, poll.community_id))
            published = style.status == StyleStatus.PUBLISHED
            await s.commit()
            info = await poll_info(s, poll_id)
        if after == before and not (checkpoint_changed and published):
            return info
        job_id = await auto_distill(
            self.rt, style.id, after, user_id=owner, community_id=poll.community_id, reason="poll"
        )  # the community's new default blend gets its instant model
        return replace(info, distill_job_id=job_id)

    async def _adopt_snapshot(self, s, style: StyleModel, poll: Poll, checkpoint: str) -> bool:
        """Make the winning snapshot the style's checkpoint (copied beside the style's other checkpoints, so the
        fine-tune's folder may go); False when it is the checkpoint already. The style's instant models were made
        for the old checkpoint: they are marked stale."""
        from gan.checkpoints.native import native_metadata

        src = stored_path(self.rt.settings.data_dir, checkpoint)
        if not src.is_file():  # the poll still closes (a deadline sweep must not fail on it every minute)
            log.warning("poll %s: the winning snapshot %s is gone; the style keeps its checkpoint", poll.id, src)
            return False
        meta = await asyncio.to_thread(native_metadata, src)
        if meta.get("content_hash") and meta.get("content_hash") == style.content_hash:
            return False
        dst = self.rt.settings.data_dir / "styles" / f"{style.id}-poll{poll.id}-{src.name}"
        await asyncio.to_thread(copy_atomic, src, dst)
        style.checkpoint_path = str(dst)
        style.content_hash = meta.get("content_hash")
        style.lineage = list(meta.get("ancestors", []))
        await s.execute(sa.update(Student).where(Student.style_id == style.id).values(status="stale"))
        return True

    async def open_poll(self, place: Place | None) -> PollInfo | None:
        """The community's most recent open poll."""
        async with self.rt.sessions() as s:
            comm = await get_community(s, place)
            await s.commit()
            if comm is None:
                return None
            poll_id = await s.scalar(
                sa.select(Poll.id)
                .where(Poll.community_id == comm.id, Poll.status == PollStatus.OPEN)
                .order_by(Poll.created_at.desc())
                .limit(1)
            )
            return None if poll_id is None else await poll_info(s, poll_id)

    async def close_due_polls(self) -> list[PollInfo]:
        """Close every open poll past its deadline (run periodically by the worker)."""
        async with self.rt.sessions() as s:
            ids = (
                await s.scalars(sa.select(Poll.id).where(Poll.status == PollStatus.OPEN, Poll.closes_at <= utcnow()))
            ).all()
        return [await self.close_poll(None, None, i) for i in ids]
