"""A database or Redis that is down, silent or lost mid-request: a clear error naming it, within the timeouts, and
nothing left behind (no quota slot taken, no job row, no photo file that no row accounts for).

The faults are real: a port with nothing listening, a TCP server that accepts and never answers, a proxy in
front of PostgreSQL that stops forwarding, backends killed with pg_terminate_backend, a second process holding
SQLite's write lock, and the ``toonify`` CLI run as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.db import upgrade
from backend.db.models import Blob, Job
from backend.errors import UnavailableError
from backend.quotas import Quotas
from backend.service import Place, ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = "import sys; from bots.cli import main; sys.exit(main(sys.argv[1:]))"
GUILD = Place(platform="discord", community_id="7", name="faults")
HANG_GUARD_S = 60  # far above every timeout configured here: reaching it means the call hung


class SilentServer:
    """Accepts TCP connections and never sends a byte (a database that stopped answering)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


class FreezableProxy:
    """Forwards TCP to ``target``; ``freeze()`` stops passing bytes on (connections stay open, like a server
    that hangs), ``thaw()`` lets them through again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.thaw()
        self.sock.close()
        for c in self.conns:
            c.close()


class HookedQuotas(Quotas):
    """Real quota admission, then ``after_admit`` (the test's fault) right where the job row is written next."""

    after_admit: Callable[[], Awaitable[None]] | None = None

    async def admit(self, user_key: str, community_key: str | None, job_id: str) -> None:
        await super().admit(user_key, community_key, job_id)
        if self.after_admit is not None:
            await self.after_admit()


def settings_for(tmp_path: Path, redis_at: str, database_url: str | None, **env: str) -> Settings:
    base = {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_at, **env}
    if database_url:
        base["DATABASE_URL"] = database_url
    return Settings.from_env(base)


async def open_hooked(settings: Settings) -> tuple[ToonService, HookedQuotas]:
    svc = await ToonService.open(settings)
    quotas = HookedQuotas(svc.rt.pool, settings.quotas)
    svc.rt.quotas = quotas
    return svc, quotas


async def nothing_left_behind(svc: ToonService, settings: Settings) -> None:
    """No job row, no quota slot or daily count, and every stored file accounted for by a blob row."""
    async with svc.rt.sessions() as s:
        assert await s.scalar(sa.select(sa.func.count()).select_from(Job)) == 0
        user_ids = (await s.scalars(sa.select(Blob.owner_user_id))).all()
        rows = set((await s.scalars(sa.select(Blob.sha256))).all())
    for uid in set(user_ids) | {1}:
        usage = await svc.rt.quotas.usage(f"user:{uid}")
        assert (usage.active, usage.user_daily, usage.queue) == (0, 0, 0)
    files = {p.name for p in settings.blobs_dir.rglob("*") if p.is_file()}
    assert files <= rows, f"files with no row: {files - rows}"


@pytest.fixture
def pg_url(postgres_database) -> Iterator[str]:
    if postgres_database is None:
        pytest.skip("no PostgreSQL here")
    from tests.backend.conftest import reset_postgres

    reset_postgres(postgres_database)
    yield postgres_database.render_as_string(hide_password=False)


# ------------------------------------------------------------------------------------------- down or silent


@pytest.mark.asyncio
async def test_a_database_nobody_listens_on_is_named_without_its_password(tmp_path, redis_url, redis):  # noqa: F811
    port = free_port()
    settings = settings_for(tmp_path, redis_url, f"postgresql+asyncpg://toon:s3cret@127.0.0.1:{port}/toonify")
    with pytest.raises(UnavailableError) as err:
        await asyncio.wait_for(ToonService.open(settings), HANG_GUARD_S)
    message = str(err.value)
    assert message.startswith(f"the database at postgresql://toon@127.0.0.1:{port}/toonify is unreachable")
    assert "s3cret" not in message and "s3cret" not in err.value.public_message
    assert err.value.part == "database" and "database" in err.value.public_message


@pytest.mark.asyncio
async def test_a_silent_database_fails_at_the_connect_timeout_instead_of_hanging(tmp_path, redis_url, redis):  # noqa: F811
    silent = SilentServer()
    try:
        url = f"postgresql://toon@127.0.0.1:{silent.port}/toonify"
        settings = settings_for(tmp_path, redis_url, url, TOONIFY_DB_CONNECT_TIMEOUT_S="1")
        with pytest.raises(UnavailableError, match=r"is unreachable: no answer within 1 s"):
            await asyncio.wait_for(ToonService.open(settings), HANG_GUARD_S)
    finally:
        silent.close()


@pytest.mark.asyncio
async def test_an_unreachable_redis_is_named(tmp_path):
    port = free_port()
    settings = settings_for(tmp_path, f"redis://:pw@127.0.0.1:{port}/0", None)
    with pytest.raises(UnavailableError) as err:
        await asyncio.wait_for(ToonService.open(settings), HANG_GUARD_S)
    assert str(err.value).startswith(f"Redis at redis://127.0.0.1:{port}/0 is unreachable")
    assert err.value.part == "redis" and ":pw@" not in str(err.value)


# ------------------------------------------------------------------------------ lost during a submission


@pytest.mark.asyncio
async def test_database_frozen_after_quota_admission(tmp_path, redis_url, redis, pg_url):  # noqa: F811
    """The proxy stops answering between quota admission and the job insert: the insert times out as an
    UnavailableError, the slot and the day's count are given back, and no row or unaccounted file remains."""
    u = make_url(pg_url)
    proxy = FreezableProxy(u.host or "127.0.0.1", u.port or 5432)
    via_proxy = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = settings_for(tmp_path, redis_url, via_proxy, TOONIFY_DB_STATEMENT_TIMEOUT_S="1")
    svc, quotas = await open_hooked(settings)

    async def freeze() -> None:
        proxy.freeze()

    try:
        quotas.after_admit = freeze
        for _ in range(3):  # more failures than the user has slots (2): none may stay taken
            with pytest.raises(UnavailableError, match=r"stopped answering: no answer within 1 s"):
                await asyncio.wait_for(svc.submit_toon(actor(1), GUILD, astronaut()), HANG_GUARD_S)
            proxy.thaw()
        quotas.after_admit = None
        await nothing_left_behind(svc, settings)
        ticket = await svc.submit_toon(actor(1), GUILD, astronaut())  # the database is back: it works
        assert not ticket.duplicate and await quotas.active_jobs("user:1") == [ticket.job_id]
    finally:
        proxy.close()
        await svc.close()


@pytest.mark.asyncio
async def test_database_silent_from_the_start_stores_no_photo(tmp_path, redis_url, redis, pg_url):  # noqa: F811
    u = make_url(pg_url)
    proxy = FreezableProxy(u.host or "127.0.0.1", u.port or 5432)
    via_proxy = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = settings_for(
        tmp_path, redis_url, via_proxy, TOONIFY_DB_STATEMENT_TIMEOUT_S="1", TOONIFY_DB_CONNECT_TIMEOUT_S="1"
    )
    svc = await ToonService.open(settings)
    try:
        proxy.freeze()  # the pooled connection's ping goes unanswered, and so does a new connection
        with pytest.raises(UnavailableError, match=r"the database at postgresql://\S+ is unreachable: no answer"):
            await asyncio.wait_for(svc.submit_toon(actor(1), GUILD, astronaut()), HANG_GUARD_S)
        proxy.thaw()
        await nothing_left_behind(svc, settings)
        assert not any(p.is_file() for p in settings.blobs_dir.rglob("*"))  # no row was written: no file either
    finally:
        proxy.close()
        await svc.close()


@pytest.mark.asyncio
async def test_backends_terminated_after_quota_admission(tmp_path, redis_url, redis, pg_url):  # noqa: F811
    settings = settings_for(tmp_path, redis_url, pg_url)
    svc, quotas = await open_hooked(settings)
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def terminate_backends() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        assert killed >= 1

    try:
        quotas.after_admit = terminate_backends
        for _ in range(3):
            with pytest.raises(UnavailableError, match=r"the database at postgresql://\S+ stopped answering"):
                await asyncio.wait_for(svc.submit_toon(actor(1), GUILD, astronaut()), HANG_GUARD_S)
        quotas.after_admit = None
        await nothing_left_behind(svc, settings)
    finally:
        await svc.close()


_HOLD_SQLITE_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


@pytest.mark.asyncio
async def test_sqlite_write_lock_held_by_another_process(tmp_path, redis_url, redis):  # noqa: F811
    settings = settings_for(tmp_path, redis_url, None, TOONIFY_DB_STATEMENT_TIMEOUT_S="1")
    svc, quotas = await open_hooked(settings)
    db_file = make_url(settings.database_url).database
    holder: list[subprocess.Popen] = []

    async def lock() -> None:
        p = subprocess.Popen(
            [sys.executable, "-c", _HOLD_SQLITE_LOCK, db_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        holder.append(p)
        assert await asyncio.to_thread(p.stdout.readline) == "locked\n"

    def unlock() -> None:
        while holder:
            p = holder.pop()
            p.communicate("\n", timeout=30)

    try:
        quotas.after_admit = lock
        with pytest.raises(UnavailableError, match=r"stayed locked by another writer for 1 s"):
            await asyncio.wait_for(svc.submit_toon(actor(1), GUILD, astronaut()), HANG_GUARD_S)
        unlock()
        quotas.after_admit = None
        await nothing_left_behind(svc, settings)
    finally:
        unlock()
        await svc.close()


# ------------------------------------------------------------------------------------------------- the CLI


def toonify(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_submit_worker_and_bots_name_the_unreachable_database(tmp_path):
    photo = tmp_path / "me.png"
    photo.write_bytes(astronaut())
    port = free_port()
    env = {
        **os.environ,
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"postgresql://toon:s3cret@127.0.0.1:{port}/toonify",
        "TELEGRAM_TOKEN": "123:not-used",  # the bot stops at the database before it talks to Telegram
    }
    line = f"toonify: the database at postgresql://toon@127.0.0.1:{port}/toonify is unreachable"
    submit = ("submit", str(photo), "--out", str(tmp_path / "out.png"), "--no-worker")
    for args in (submit, ("worker",), ("bot", "telegram"), ("up",)):
        done = toonify(*args, env=env)
        assert done.returncode == 3, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(line), done.stderr  # after the worker's log lines
        assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


def test_cli_submit_names_the_unreachable_redis(tmp_path):
    photo = tmp_path / "me.png"
    photo.write_bytes(astronaut())
    port = free_port()
    env = {
        **os.environ,
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
    }
    upgrade(env["DATABASE_URL"])
    done = toonify("submit", str(photo), "--out", str(tmp_path / "out.png"), "--no-worker", env=env)
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"toonify: Redis at redis://127.0.0.1:{port}/0 is unreachable"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.asyncio
async def test_a_statement_cancelled_while_waiting_stays_a_cancellation(tmp_path, redis_url, redis):  # noqa: F811
    """Shutting down cancels tasks mid-statement: that must not read as 'the database stopped answering', or a
    loop that retries on database errors would never stop."""
    settings = settings_for(tmp_path, redis_url, None, TOONIFY_DB_STATEMENT_TIMEOUT_S="5")
    svc = await ToonService.open(settings)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SQLITE_LOCK, make_url(settings.database_url).database],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"

        async def write() -> None:
            async with svc.rt.sessions() as s:
                await s.execute(sa.text("UPDATE jobs SET error = 'x'"))
                await s.commit()

        task = asyncio.create_task(write())
        await asyncio.sleep(0.5)  # waiting on the lock now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        holder.communicate("\n", timeout=30)
        await svc.close()
