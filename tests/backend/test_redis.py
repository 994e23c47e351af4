"""backend.redis: the embedded server starts, answers, stops without leaving a process; connect() wires arq."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from arq.connections import create_pool

from backend.redis import (
    EmbeddedRedis,
    EmbeddedRedisError,
    LuaScript,
    connect,
    ping,
    redis_server_executable,
    redis_settings,
    running_embedded_url,
)
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url, with_db  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """Exited (a zombie awaiting its new parent's reaping counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state in {"Z", "X"}


def _alive(pid: int) -> bool:
    """True while the process exists (our child is reaped on close, so no zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_executable_found() -> None:
    exe = Path(redis_server_executable())
    assert exe.name == "redis-server"
    assert os.access(exe, os.X_OK)


def test_embedded_start_ping_close(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    pid = server.pid
    try:
        assert server.running
        assert server.url.startswith("redis://127.0.0.1:")
        assert ping(server.url)
        info = json.loads((tmp_path / "r" / "redis-server.pid").read_text())
        assert info == {"pid": pid, "owner": os.getpid(), "port": server.port}
        assert running_embedded_url(tmp_path / "r") == server.url
    finally:
        server.close()
    assert not server.running
    assert not _alive(pid)
    assert not ping(server.url, timeout_s=0.2)
    assert not (tmp_path / "r" / "redis-server.pid").exists()
    assert running_embedded_url(tmp_path / "r") is None
    server.close()  # idempotent


def test_embedded_context_manager_and_no_persistence(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        pid = server.pid
        assert ping(server.url)
    assert not _alive(pid)
    assert not any(p.suffix in {".rdb", ".aof"} for p in tmp_path.iterdir())


def test_embedded_refuses_to_start_beside_a_live_one(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        with pytest.raises(EmbeddedRedisError, match="already runs"):
            EmbeddedRedis(tmp_path)
        assert ping(first.url)


_DIE_WITHOUT_CLOSE = """
import os, sys
from backend.redis import EmbeddedRedis
server = EmbeddedRedis(sys.argv[1])
print(server.pid, flush=True)
os._exit(0)  # no finalizers: the server outlives its owner
"""


def test_embedded_reaps_a_server_left_by_a_dead_owner(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _DIE_WITHOUT_CLOSE, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    orphan = int(out.stdout.split()[0])
    try:
        assert _alive(orphan)
        assert running_embedded_url(tmp_path) is None  # its owner is dead: nobody should attach to it
        with EmbeddedRedis(tmp_path) as second:
            assert ping(second.url)
            assert _gone(orphan)
    finally:
        if not _gone(orphan):  # only if the test failed: never leave it behind
            os.kill(orphan, signal.SIGKILL)


@pytest.mark.asyncio
async def test_arq_pool_on_embedded(embedded_redis: EmbeddedRedis) -> None:  # noqa: F811
    """Whatever Redis the other tests use, the embedded path is exercised here."""
    pool = await create_pool(redis_settings(with_db(embedded_redis.url, 1)))
    try:
        await pool.flushdb()
        assert await pool.ping()
        await pool.set("k", "v")
        assert await pool.get("k") == b"v"
        job = await pool.enqueue_job("some_task", 1, _job_id="job-1")
        assert job is not None and job.job_id == "job-1"
        assert await pool.enqueue_job("some_task", 1, _job_id="job-1") is None  # arq's own job-id dedup
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_connect_embedded_and_close(tmp_path: Path) -> None:
    handle = await connect(None, tmp_path)
    assert handle.embedded is not None
    pid = handle.embedded.pid
    assert await handle.pool.ping()
    # a second process of the deployment (here: a second connect) attaches instead of starting another
    other = await connect(None, tmp_path)
    assert other.embedded is None and other.url == handle.url
    await other.pool.set("shared", "1")
    await other.close()
    assert await handle.pool.get("shared") == b"1"  # closing the attached handle left the server up
    await handle.close()
    assert handle.embedded is None
    assert not _alive(pid)
    await handle.close()  # idempotent apart from the pool


@pytest.mark.asyncio
async def test_connect_url(redis_url: str) -> None:  # noqa: F811
    async with await connect(redis_url) as handle:
        assert handle.embedded is None
        assert handle.url == redis_url
        assert await handle.pool.ping()


@pytest.mark.asyncio
async def test_connect_embedded_needs_data_dir() -> None:
    with pytest.raises(ValueError, match="data_dir"):
        await connect(None)


def test_redis_settings_urls() -> None:
    s = redis_settings("redis://10.0.0.2:6380/3")
    assert (s.host, s.port, s.database) == ("10.0.0.2", 6380, 3)
    u = redis_settings("unix:///run/redis.sock?db=2")
    assert (u.unix_socket_path, u.database) == ("/run/redis.sock", 2)
    assert with_db("redis://h:1/0", 15) == "redis://h:1/15"
    assert with_db("unix:///s.sock?db=1", 15) == "unix:///s.sock?db=15"


@pytest.mark.asyncio
async def test_lua_script_loads_itself(redis) -> None:  # noqa: F811
    script = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await redis.script_flush()
    assert await script(redis, ["n"], [2]) == 2  # NOSCRIPT -> EVAL
    assert await script(redis, ["n"], [3]) == 5  # EVALSHA
