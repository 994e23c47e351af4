"""Every Redis key, channel and queue name the backend uses, in one place.

Workers, bots and the service of one deployment share a Redis, so two modules spelling a name differently
would silently stop talking to each other. Everything starts with ``toonify:``; arq's own keys
(``arq:job:<id>``…) are arq's.
"""

from __future__ import annotations

PREFIX = "toonify"

# queues (arq sorted sets), by the role a worker serves
QUEUE_NAMES = {"toon": f"{PREFIX}:queue:toon", "finetune": f"{PREFIX}:queue:finetune"}

# cancellation: a flag per job (read between steps) plus a broadcast (wakes the worker running it at once)
CANCEL_CHANNEL = f"{PREFIX}:cancel"

# EWMA of toon job run time in seconds, for queue wait estimates
STATS_KEY = f"{PREFIX}:stats:toon_seconds"

# worker liveness: one key per worker process, refreshed well within its TTL
WORKER_HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"

# quota admission (backend.quotas)
QUOTA_PREFIX = f"{PREFIX}:quota"
QUOTA_QUEUE = f"{QUOTA_PREFIX}:queue"  # admitted, unreleased jobs of everyone
QUOTA_NONE = f"{QUOTA_PREFIX}:none"  # a placeholder key for "no community" (Lua scripts take fixed KEYS)


def job_state(job_id: str) -> str:
    """The job's latest progress event (JSON), for late watchers."""
    return f"{PREFIX}:job:{job_id}:state"


def job_progress_channel(job_id: str) -> str:
    """Pub/sub channel with every progress event of the job."""
    return f"{PREFIX}:job:{job_id}:progress"


def job_cancel(job_id: str) -> str:
    """Set when someone asked to cancel the job."""
    return f"{PREFIX}:job:{job_id}:cancel"


def worker_heartbeat(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def quota_user_active(user_key: str) -> str:
    """Sorted set of the user's admitted, unreleased job ids."""
    return f"{QUOTA_PREFIX}:user:{user_key}:active"


def quota_user_daily(user_key: str, day: str) -> str:
    """The user's job count on ``day`` (YYYYMMDD, UTC)."""
    return f"{QUOTA_PREFIX}:user:{user_key}:daily:{day}"


def quota_community_daily(community_key: str, day: str) -> str:
    return f"{QUOTA_PREFIX}:community:{community_key}:daily:{day}"


def job_deaths(job_id: str) -> str:
    """How often a worker died (heartbeat lapsed) while running the job: the poison-job guard's count."""
    return f"{PREFIX}:job:{job_id}:deaths"
