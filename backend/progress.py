"""Job progress over Redis: workers publish, bots and the API watch.

Each job has a latest-state key (so a late watcher starts from the current state, not from nothing) and a pub/sub
channel (so watchers hear changes at once). Publishing is one Lua script that numbers the event (``seq``, per job,
assigned by Redis so concurrent publishers agree), stores it and publishes it atomically. Watchers use ``seq`` to
drop duplicates and stale re-reads, and re-read the state key every ``poll_s`` so a lost pub/sub message (a
dropped connection, a watcher that subscribed late) delays an update by at most ``poll_s`` instead of stalling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from backend import keys
from backend.redis import REDIS_DOWN, LuaScript

__all__ = [
    "PROGRESS_EVERY_S",
    "STATE_TTL_S",
    "STATUSES",
    "TERMINAL_STATUSES",
    "JobProgress",
    "ProgressEvent",
    "channel",
    "latest",
    "publish",
    "state_key",
    "watch",
]

log = logging.getLogger(__name__)

STATUSES = frozenset({"queued", "running", "done", "failed", "cancelled"})
TERMINAL_STATUSES = frozenset({"done", "failed", "cancelled"})
STATE_TTL_S = 86_400
PROGRESS_EVERY_S = 0.25  # a job publishes progress at most this often (its first and last step always go out)


state_key = keys.job_state  # the job's latest event as JSON
channel = keys.job_progress_channel  # every event of the job, as it happens


@dataclass(frozen=True)
class ProgressEvent:
    """One observable state of a job. ``seq`` is assigned by publish(); 0 means "not published through Redis"."""

    job_id: str
    status: str
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    message: str | None = None
    queue_position: int | None = None
    eta_s: float | None = None
    preview: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    ts: float = field(default_factory=time.time)
    seq: int = 0

    def __post_init__(self) -> None:
        status = str(self.status)  # accepts a StrEnum member, stores its plain value
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}; expected one of {sorted(STATUSES)}")
        object.__setattr__(self, "status", status)

    @property
    def terminal(self) -> bool:
        """True once the job can no longer change (done, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProgressEvent:
        """Build from a dict, ignoring unknown keys (so an older reader accepts a newer writer's events)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str | bytes) -> ProgressEvent:
        return cls.from_dict(json.loads(text))

    def same_content(self, other: ProgressEvent) -> bool:
        """Equal apart from ``ts`` and ``seq``: a republished identical state carries no news."""
        return dataclasses.replace(self, ts=0.0, seq=0) == dataclasses.replace(other, ts=0.0, seq=0)


# KEYS[1] state key; ARGV[1] event JSON without its opening brace and without seq; ARGV[2] TTL s; ARGV[3] channel.
# The sequence number continues from the stored state, so it needs no key of its own and expires with it.
_PUBLISH_LUA = """
local seq = 1
local old = redis.call('GET', KEYS[1])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' and tonumber(prev['seq']) then
    seq = math.floor(tonumber(prev['seq'])) + 1
  end
end
local payload = '{"seq":' .. string.format('%d', seq) .. ',' .. ARGV[1]
redis.call('SET', KEYS[1], payload, 'EX', tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], payload)
return seq
"""


_publish_script = LuaScript(_PUBLISH_LUA)


async def publish(redis: Redis, event: ProgressEvent, *, ttl_s: int = STATE_TTL_S) -> ProgressEvent:
    """Store ``event`` as the job's latest state and broadcast it, atomically; returns it with its ``seq``."""
    body = dataclasses.replace(event, seq=0).to_dict()
    del body["seq"]
    text = json.dumps(body, separators=(",", ":"))
    seq = await _publish_script(redis, [state_key(event.job_id)], [text[1:], int(ttl_s), channel(event.job_id)])
    return dataclasses.replace(event, seq=int(seq))


async def latest(redis: Redis, job_id: str) -> ProgressEvent | None:
    """The job's most recent published state, or None if there is none (never published, or expired)."""
    raw = await redis.get(state_key(job_id))
    if raw is None:
        return None
    try:
        return ProgressEvent.from_json(raw)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable progress state for job %s: %s", job_id, exc)
        return None


async def watch(
    redis: Redis,
    job_id: str,
    *,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    fallback: Callable[[], Awaitable[ProgressEvent | None]] | None = None,
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[ProgressEvent]:
    """Yield the job's current state, then each later change, until a terminal status.

    Subscribes first and only then reads the stored state, so an event published in between arrives at least
    once (and, thanks to ``seq``, is yielded at most once). Events are yielded in ``seq`` order: older or
    repeated ones are dropped, as is an event whose content equals the previous one. The stored state is
    re-read every ``poll_s`` seconds, covering lost pub/sub messages. ``fallback`` (e.g. a read of the SQL job
    row) is awaited at the same cadence; if it returns a terminal event, that event ends the watch, which covers
    a Redis state that expired or was never written. ``on_subscribed`` is awaited once the subscription is
    live, before the first read. Raises TimeoutError if ``timeout_s`` passes without a terminal event.

    While Redis is unreachable the watch does not fail: it awaits ``fallback`` every ``poll_s`` (so a job that
    ends meanwhile still ends the watch) and subscribes again once Redis answers.

    Use ``contextlib.aclosing(watch(...))`` when you may stop early, so the pub/sub connection is released.
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s}")
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    last: ProgressEvent | None = None

    def fresh(ev: ProgressEvent | None) -> bool:
        nonlocal last
        if ev is None or ev.job_id != job_id:
            return False
        if last is not None:
            if ev.seq and ev.seq <= last.seq:
                return False
            if ev.same_content(last):
                last = dataclasses.replace(last, seq=max(last.seq, ev.seq))
                return False
        last = ev if last is None else dataclasses.replace(ev, seq=max(ev.seq, last.seq))
        return True

    def remaining() -> float | None:
        return None if deadline is None else deadline - loop.time()

    async def ended_by_fallback() -> ProgressEvent | None:
        """The fallback's terminal event, if it has one not yet seen."""
        fb = None if fallback is None else await fallback()
        return fb if fb is not None and fb.terminal and fresh(fb) else None

    def check_deadline() -> None:
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")

    subscribed_once = False
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel(job_id))
            # Wait for the server's confirmation: only then is the subscription live for publishers.
            while True:
                left = remaining()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no subscription confirmation for job {job_id}")
                msg = await pubsub.get_message(timeout=5.0 if left is None else min(left, 5.0))
                if msg is not None and msg["type"] == "subscribe":
                    break
            if on_subscribed is not None and not subscribed_once:
                await on_subscribed()
            subscribed_once = True

            next_poll = loop.time()  # read the stored state immediately
            while True:
                now = loop.time()
                check_deadline()
                if now >= next_poll:
                    next_poll = now + poll_s
                    ev = await latest(redis, job_id)
                    if fresh(ev):
                        yield ev
                        if ev.terminal:
                            return
                    if (fb := await ended_by_fallback()) is not None:
                        yield fb
                        return
                    continue
                wait = next_poll - now if deadline is None else min(next_poll, deadline) - now
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=max(wait, 0.0))
                if msg is None or msg["type"] != "message":
                    continue
                try:
                    ev = ProgressEvent.from_json(msg["data"])
                except (ValueError, TypeError) as exc:
                    log.warning("ignoring unreadable progress message for job %s: %s", job_id, exc)
                    continue
                if fresh(ev):
                    yield ev
                    if ev.terminal:
                        return
        except REDIS_DOWN as exc:
            # Redis away: the fallback (the SQL row) still says when the job ends; subscribe again once it is back
            log.warning("progress of job %s: Redis unreachable (%s); reading the job row until it is back", job_id, exc)
            while True:
                check_deadline()
                if (fb := await ended_by_fallback()) is not None:
                    yield fb
                    return
                await asyncio.sleep(poll_s)
                try:
                    await redis.ping()
                except REDIS_DOWN:
                    continue
                if last is not None:  # a Redis that restarted empty numbers events from 1 again
                    last = dataclasses.replace(last, seq=0)
                break
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class JobProgress:
    """A running job's progress reporter: publishes (stage, step, total) at most every PROGRESS_EVERY_S, never an
    unchanged event. Called on the event loop (threads use ``loop.call_soon_threadsafe``). A publish that fails
    (Redis gone for a moment) is logged and dropped: progress is advisory, the SQL row is the truth."""

    def __init__(self, redis: Redis, job_id: str) -> None:
        self.redis, self.job_id, self.last, self.sent = redis, job_id, 0.0, None
        self.pending: set[asyncio.Task] = set()
        self.current: tuple[str, int] = ("start", 0)  # unthrottled: where the job is right now

    def __call__(self, stage: str, step: int, total: int, message: str | None = None) -> None:
        self.current = (stage, step)
        now = time.monotonic()
        key = (stage, step, total)
        if key == self.sent or (now - self.last < PROGRESS_EVERY_S and step not in (0, total)):
            return
        self.last, self.sent = now, key
        event = ProgressEvent(
            job_id=self.job_id, status="running", stage=stage, step=step, total=total, message=message
        )
        task = asyncio.get_running_loop().create_task(self._publish(event))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _publish(self, event: ProgressEvent) -> None:
        try:
            await publish(self.redis, event)
        except Exception as exc:
            log.warning("progress of job %s not published: %s", self.job_id, exc)

    async def flush(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
