"""Blend polls: admins offer a few blends of a style, members vote, the winner becomes the community default."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend import ledger
from backend.db.models import Blend, Community, Job, JobKind, Poll, PollOption, PollStatus, StyleModel, Vote, utcnow
from backend.errors import BadInputError, ConflictError, NotFoundError
from backend.jobs import PreviewParams
from backend.ledger import NewJob
from backend.service.base import Concern, get_community, get_user, names_redis, require_admin
from backend.service.students import auto_distill
from backend.service.styles import default_spec, resolve_style
from backend.service.types import Actor, Place, PollInfo, PollOptionInfo, parse_blend


def preview_key(poll_id: int) -> str:
    return f"preview:poll:{poll_id}"


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
            after = await default_spec(s, style, await s.get(Community, poll.community_id))
            await s.commit()
            info = await poll_info(s, poll_id)
        if after == before:
            return info
        job_id = await auto_distill(
            self.rt, style.id, after, user_id=owner, community_id=poll.community_id, reason="poll"
        )  # the community's new default blend gets its instant model
        return replace(info, distill_job_id=job_id)

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
