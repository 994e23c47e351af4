"""Redis fixtures for backend tests: the machine's Redis when one answers, else an embedded redis-server.

A machine Redis (REDIS_URL, else redis://127.0.0.1:6379) is used on a spare database, 15 down to 8
(TOONIFY_TEST_REDIS_DB pins one), emptied before each test. Test sessions running at the same time (a developer's
and an agent's, or xdist workers) must not flush each other's data, so a session leases its database with a key
(SET NX, with a TTL a background thread keeps renewing) and takes the next one when it is held; when none is
free it falls back to the embedded server. TOONIFY_TEST_EMBEDDED_REDIS=1 forces the embedded server, which is
started once per session and stopped at its end. Import into a test module:

    from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import pytest_asyncio
import redis as redis_lib
from arq.connections import ArqRedis, create_pool

from backend.redis import EmbeddedRedis, ping, redis_settings

DEFAULT_URL = "redis://127.0.0.1:6379"
LEASE_KEY = "toonify:test:lease"
LEASE_TTL_S = 120
# Empty the database but keep (renew) our lease, atomically, so no other session can claim it in between.
_FLUSH_LUA = "redis.call('FLUSHDB') redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def with_db(url: str, db: int) -> str:
    """``url`` pointed at database ``db`` (path for redis://, ?db= for unix://)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"]
    if parts.scheme == "unix":
        return f"unix://{parts.path}?{urlencode([*query, ('db', str(db))])}"
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


def force_embedded() -> bool:
    return os.environ.get("TOONIFY_TEST_EMBEDDED_REDIS", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Lease:
    """This session's claim on a database of the machine's Redis, renewed until release()."""

    url: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_renewing(self) -> None:
        threading.Thread(target=self._renew, name="redis-test-lease", daemon=True).start()

    def _renew(self) -> None:
        client = redis_lib.Redis.from_url(self.url, socket_timeout=2)
        try:
            while not self._stop.wait(LEASE_TTL_S / 4):
                with contextlib.suppress(redis_lib.RedisError):
                    client.set(LEASE_KEY, self.token, ex=LEASE_TTL_S)
        finally:
            client.close()

    def release(self) -> None:
        self._stop.set()
        client = redis_lib.Redis.from_url(self.url, socket_timeout=2)
        try:
            with contextlib.suppress(redis_lib.RedisError):
                client.eval(_RELEASE_LUA, 1, LEASE_KEY, self.token)
        finally:
            client.close()


def claim_machine_db() -> Lease | None:
    """Lease a free test database on the machine's Redis if one answers PING within 0.5 s, else None."""
    if force_embedded():
        return None
    base = os.environ.get("REDIS_URL") or DEFAULT_URL
    pinned = os.environ.get("TOONIFY_TEST_REDIS_DB")
    dbs = [int(pinned)] if pinned else list(range(15, 7, -1))
    if not ping(with_db(base, dbs[0]), timeout_s=0.5):
        return None
    for db in dbs:
        lease = Lease(with_db(base, db))
        client = redis_lib.Redis.from_url(lease.url, socket_timeout=2)
        try:
            if client.set(LEASE_KEY, lease.token, nx=True, ex=LEASE_TTL_S):
                lease.start_renewing()
                return lease
        except redis_lib.RedisError:  # e.g. fewer databases configured
            continue
        finally:
            client.close()
    return None


class _Shared:
    """One value per test process, however many modules import these fixtures.

    Each importing module gets its own copy of a session fixture, so without this every module would start its
    own server or lease its own database. The value is made on first use and closed when the last user ends.
    """

    def __init__(self) -> None:
        self.value: object = None
        self.users = 0
        self.close = lambda: None

    def enter(self, make) -> object:
        if self.users == 0:
            self.value, self.close = make()
        self.users += 1
        return self.value

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            close, self.value, self.close = self.close, None, lambda: None
            close()


_EMBEDDED = _Shared()
_MACHINE = _Shared()
_LEASES: dict[str, Lease] = {}  # url -> this session's lease on it


def _start_embedded(root) -> tuple[EmbeddedRedis, object]:
    server = EmbeddedRedis(root)
    return server, server.close


def _claim() -> tuple[Lease | None, object]:
    lease = claim_machine_db()
    if lease is None:
        return None, lambda: None
    _LEASES[lease.url] = lease

    def release() -> None:
        _LEASES.pop(lease.url, None)
        lease.release()

    return lease, release


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A redis-server private to this test session (started only when a test asks for it)."""
    server = _EMBEDDED.enter(lambda: _start_embedded(tmp_path_factory.mktemp("redis")))
    try:
        yield server
    finally:
        _EMBEDDED.leave()


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the Redis the tests use: a leased machine database, or the session's embedded server."""
    lease = _MACHINE.enter(_claim)
    try:
        yield lease.url if lease is not None else request.getfixturevalue("embedded_redis").url
    finally:
        _MACHINE.leave()


def flush_sync(url: str) -> None:
    """Empty the test database at ``url`` (keeping this session's lease on it) from synchronous code."""
    lease = _LEASES.get(url)
    client = redis_lib.Redis.from_url(url)
    try:
        if lease is not None:
            client.eval(_FLUSH_LUA, 1, LEASE_KEY, lease.token, LEASE_TTL_S)
        else:
            client.flushdb()
    finally:
        client.close()


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    """An arq pool on an empty test database, closed after the test."""
    pool = await create_pool(redis_settings(redis_url))
    lease = _LEASES.get(redis_url)
    if lease is not None:
        await pool.eval(_FLUSH_LUA, 1, LEASE_KEY, lease.token, LEASE_TTL_S)
    else:
        await pool.flushdb()
    try:
        yield pool
    finally:
        await pool.aclose()
