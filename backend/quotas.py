"""Quota admission: who may enqueue another job right now.

Every check and every counter update happens inside one Lua script, so admissions racing from many tasks,
processes or hosts can never overshoot a limit (a check-then-increment from Python could). Counted:

* per-user active jobs (queued or running): a sorted set of job ids scored by admission time;
* per-user and per-community jobs per UTC day: counters whose key carries the date and expires after 2 days;
* the global number of admitted, unreleased jobs (the queue cap), also a sorted set of job ids.

Jobs leave the active sets through ``release()`` when they end. A worker that dies without releasing would leak
a slot forever, so entries older than ``stale_after_s`` are dropped at the next admission.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from redis.asyncio import Redis

from backend import keys
from backend.redis import LuaScript

__all__ = [
    "QuotaExceededError",
    "QuotaKind",
    "QuotaLimits",
    "QuotaUsage",
    "Quotas",
]

_DAILY_TTL_S = 2 * 86_400


class QuotaKind(StrEnum):
    USER_ACTIVE = "user_active"
    USER_DAILY = "user_daily"
    COMMUNITY_DAILY = "community_daily"
    QUEUE = "queue"


class _LimitsLike(Protocol):
    user_active: int | None
    user_daily: int | None
    community_daily: int | None
    max_queue: int | None


@dataclass(frozen=True)
class QuotaLimits:
    """Limits per kind; None means unlimited. ``stale_after_s``: when a never-released job stops counting."""

    user_active: int | None = 2
    user_daily: int | None = 50
    community_daily: int | None = 1000
    max_queue: int | None = 200
    stale_after_s: float = 6 * 3600

    @classmethod
    def from_object(cls, obj: _LimitsLike) -> QuotaLimits:
        """Copy the limits from any object with these attribute names (e.g. the Settings' quota fields)."""
        return cls(
            user_active=obj.user_active,
            user_daily=obj.user_daily,
            community_daily=obj.community_daily,
            max_queue=obj.max_queue,
            stale_after_s=getattr(obj, "stale_after_s", cls.stale_after_s),
        )


def _format_duration(seconds: float) -> str:
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s} s"
    h, m = divmod((s + 59) // 60, 60)
    return f"{h} h {m} min" if h and m else f"{h} h" if h else f"{m} min"


class QuotaExceededError(Exception):
    """A job was refused; ``str(err)`` is a sentence fit to show the user.

    ``retry_after_s`` is when trying again can succeed (daily limits: the next UTC midnight) or None when it
    depends on other jobs finishing.
    """

    def __init__(self, kind: QuotaKind | str, limit: int, retry_after_s: float | None = None) -> None:
        self.kind = QuotaKind(kind)
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(self._message())

    def _message(self) -> str:
        n, plural = self.limit, "" if self.limit == 1 else "s"
        when = f" It resets at midnight UTC, in {_format_duration(self.retry_after_s)}." if self.retry_after_s else ""
        match self.kind:
            case QuotaKind.USER_ACTIVE:
                return f"You can have {n} job{plural} in progress at a time. Wait for one to finish, then try again."
            case QuotaKind.USER_DAILY:
                return f"You've used your {n} job{plural} for today.{when}"
            case QuotaKind.COMMUNITY_DAILY:
                return f"This community has used its {n} job{plural} for today.{when}"
            case _:  # QuotaKind.QUEUE
                return f"The queue is full ({n} job{plural}). Please try again in a few minutes."

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (arq, multiprocessing)
        return (type(self), (self.kind, self.limit, self.retry_after_s))


@dataclass(frozen=True)
class QuotaUsage:
    """Current counts, e.g. for a "/quota" command."""

    active: int
    user_daily: int
    community_daily: int | None
    queue: int


# KEYS: 1 user active zset, 2 user daily counter, 3 community daily counter (unused if ARGV[8] == '0'), 4 queue zset
# ARGV: 1 job id, 2 now, 3 stale cutoff, 4..7 limits (active, user daily, community daily, queue; -1 = none),
#       8 has community, 9 daily TTL, 10 active-set TTL
_ADMIT_LUA = """
local job = ARGV[1]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[3])
if redis.call('ZSCORE', KEYS[1], job) then
  return {'ok', 0}
end
local lim_active = tonumber(ARGV[4])
local lim_user = tonumber(ARGV[5])
local lim_comm = tonumber(ARGV[6])
local lim_queue = tonumber(ARGV[7])
local has_comm = ARGV[8] == '1'
if lim_active >= 0 and redis.call('ZCARD', KEYS[1]) >= lim_active then
  return {'user_active', lim_active}
end
if lim_user >= 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= lim_user then
  return {'user_daily', lim_user}
end
if has_comm and lim_comm >= 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= lim_comm then
  return {'community_daily', lim_comm}
end
if lim_queue >= 0 and redis.call('ZCARD', KEYS[4]) >= lim_queue then
  return {'queue', lim_queue}
end
redis.call('ZADD', KEYS[1], ARGV[2], job)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[10]))
redis.call('ZADD', KEYS[4], ARGV[2], job)
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[9]))
if has_comm then
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[9]))
end
return {'ok', 1}
"""

# KEYS: 1 user active zset, 2 queue zset, 3 user daily counter, 4 community daily counter
# ARGV: 1 job id, 2 refund ('1'/'0'), 3 has community
_RELEASE_LUA = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 and ARGV[2] == '1' then
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
  if ARGV[3] == '1' and tonumber(redis.call('GET', KEYS[4]) or '0') > 0 then redis.call('DECR', KEYS[4]) end
end
return removed
"""


_admit_script = LuaScript(_ADMIT_LUA)
_release_script = LuaScript(_RELEASE_LUA)


def _limit_arg(limit: int | None) -> int:
    return -1 if limit is None else max(int(limit), 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Quotas:
    """Atomic quota admission against one Redis. ``user_key`` / ``community_key`` are opaque strings (e.g. the
    SQL ids); ``clock`` returns Unix seconds and exists so tests can cross a UTC midnight."""

    def __init__(
        self, redis: Redis, limits: QuotaLimits | _LimitsLike, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.limits = limits if isinstance(limits, QuotaLimits) else QuotaLimits.from_object(limits)
        self.clock = clock

    # keys -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _day(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%d")

    def _active_key(self, user_key: str) -> str:
        return keys.quota_user_active(user_key)

    def _user_daily_key(self, user_key: str, ts: float) -> str:
        return keys.quota_user_daily(user_key, self._day(ts))

    def _community_daily_key(self, community_key: str, ts: float) -> str:
        return keys.quota_community_daily(community_key, self._day(ts))

    _queue_key = keys.QUOTA_QUEUE

    @staticmethod
    def _until_midnight(ts: float) -> float:
        now = dt.datetime.fromtimestamp(ts, dt.UTC)
        midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - now).total_seconds()

    # API --------------------------------------------------------------------------------------------------------
    async def admit(self, user_key: str, community_key: str | None, job_id: str) -> None:
        """Count ``job_id`` against every limit, or raise QuotaExceededError and count nothing.

        Idempotent per job: admitting a job that is already active succeeds without counting it twice.
        """
        now = self.clock()
        lim = self.limits
        redis_keys = [
            self._active_key(user_key),
            self._user_daily_key(user_key, now),
            self._community_daily_key(community_key, now) if community_key is not None else keys.QUOTA_NONE,
            self._queue_key,
        ]
        args = [
            job_id,
            repr(now),
            repr(now - lim.stale_after_s),
            _limit_arg(lim.user_active),
            _limit_arg(lim.user_daily),
            _limit_arg(lim.community_daily),
            _limit_arg(lim.max_queue),
            "1" if community_key is not None else "0",
            _DAILY_TTL_S,
            max(int(lim.stale_after_s), 1),
        ]
        verdict, limit = await _admit_script(self.redis, redis_keys, args)
        kind = _text(verdict)
        if kind == "ok":
            return
        kind = QuotaKind(kind)
        daily = kind in (QuotaKind.USER_DAILY, QuotaKind.COMMUNITY_DAILY)
        raise QuotaExceededError(kind, int(limit), self._until_midnight(now) if daily else None)

    async def release(
        self, user_key: str, job_id: str, *, community_key: str | None = None, refund: bool = False
    ) -> bool:
        """Free the job's active and queue slots when it ends; True if it held them (idempotent).

        With ``refund=True`` (a job that failed through no fault of the user) the daily counters of the day it
        was admitted are decremented too, at most once per job; pass ``community_key`` to refund that one.
        """
        admitted_at = await self.redis.zscore(self._active_key(user_key), job_id) if refund else None
        ts = self.clock() if admitted_at is None else float(admitted_at)
        redis_keys = [
            self._active_key(user_key),
            self._queue_key,
            self._user_daily_key(user_key, ts),
            self._community_daily_key(community_key, ts) if community_key is not None else keys.QUOTA_NONE,
        ]
        args = [job_id, "1" if refund else "0", "1" if community_key is not None else "0"]
        return bool(await _release_script(self.redis, redis_keys, args))

    async def active_jobs(self, user_key: str) -> list[str]:
        """Ids of the user's admitted, unreleased jobs, oldest first."""
        return [_text(m) for m in await self.redis.zrange(self._active_key(user_key), 0, -1)]

    async def usage(self, user_key: str, community_key: str | None = None) -> QuotaUsage:
        """Today's counts for a user (and community), plus the global queue length."""
        now = self.clock()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zcard(self._active_key(user_key))
        pipe.get(self._user_daily_key(user_key, now))
        pipe.get(self._community_daily_key(community_key, now) if community_key is not None else keys.QUOTA_NONE)
        pipe.zcard(self._queue_key)
        active, user_daily, community_daily, queue = await pipe.execute()
        return QuotaUsage(
            active=int(active),
            user_daily=int(user_daily or 0),
            community_daily=None if community_key is None else int(community_daily or 0),
            queue=int(queue),
        )
