"""What every part of the service shares: the runtime, the people and places behind each call, and the rule that
a lost Redis surfaces as an UnavailableError naming it (the database's engine does the same for SQL)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis.exceptions
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.models import Community, Membership, Platform, Role, User
from backend.errors import NotAllowedError
from backend.runtime import Runtime
from backend.service.types import Actor, Place

P = ParamSpec("P")
T = TypeVar("T")
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Concern:
    """One part of the service (styles, jobs, polls, privacy) over a shared Runtime."""

    rt: Runtime

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt


def names_redis(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A service method whose Redis failures raise UnavailableError naming the Redis."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _REDIS_DOWN as e:
            raise args[0].rt.redis_unavailable(e) from e  # type: ignore[attr-defined]

    return wrapper


def names_redis_iter(fn: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncIterator[T]]:
    """names_redis for an async generator method."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        try:
            async with contextlib.aclosing(fn(*args, **kwargs)) as items:  # closed with us, not by the GC
                async for item in items:
                    yield item
        except _REDIS_DOWN as e:
            raise args[0].rt.redis_unavailable(e) from e  # type: ignore[attr-defined]

    return wrapper


async def get_user(s: AsyncSession, actor: Actor) -> User:
    """The actor's row, created on first sight."""
    platform = Platform(actor.platform)
    user = await s.scalar(sa.select(User).where(User.platform == platform, User.platform_user_id == str(actor.user_id)))
    if user is None:
        user = User(platform=platform, platform_user_id=str(actor.user_id), display_name=actor.name[:128])
        s.add(user)
        try:
            await s.flush()
        except sa.exc.IntegrityError:  # created concurrently by another call
            await s.rollback()
            return await get_user(s, actor)
    return user


async def get_community(
    s: AsyncSession, place: Place | None, user: User | None = None, actor: Actor | None = None
) -> Community | None:
    """The place's row (created on first sight); with ``user`` and ``actor``, their membership kept in step."""
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
            return await get_community(s, place, user, actor)
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


async def require_admin(s: AsyncSession, actor: Actor, place: Place | None) -> tuple[User, Community]:
    """The actor and the community, or NotAllowedError unless the platform says the actor administers it."""
    if place is None:
        raise NotAllowedError("this command works in a server or group, not in a private chat")
    user = await get_user(s, actor)
    comm = await get_community(s, place, user, actor)
    if not actor.is_admin:
        raise NotAllowedError("only the admins of this community can do that")
    assert comm is not None
    return user, comm
