"""`toonify up`: one process with the embedded defaults (its own Redis, SQLite), a worker and the Telegram bot,
driven through the fake Bot API: a photo in, a toon out; SIGTERM stops everything, embedded Redis included.

Restarts: SIGTERM or SIGKILL while a 6-face result is being sent, or while the toon is projecting, and a second
`toonify up` on the same data directory delivers every photo (exactly once after SIGTERM; after SIGKILL the one
photo on its way may come twice) and leaves the progress message in its final state."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.backend.stack import astronaut
from tests.fakes.telegram import FakeTelegram, FakeUser, SentMessage

ROOT = Path(__file__).resolve().parents[2]
UMA = FakeUser(8, "Uma")
FACES = 6
PHOTOS = FACES + 1  # the composite and one crop per face


def up_env(fake: FakeTelegram, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "DISCORD_TOKEN")}
    env.update(
        TOONIFY_DATA_DIR=str(data_dir),
        TELEGRAM_TOKEN=fake.token,
        TELEGRAM_API_BASE_URL=fake.base_url,
        TELEGRAM_FILE_BASE_URL=fake.base_file_url,
        TOONIFY_DEVICE="cpu",
        **extra,
    )
    return env


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen:
    code = "import sys; from bots.cli import main; sys.exit(main(['up']))"
    with log.open("a") as err:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


async def stop_up(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
    proc.send_signal(sig)
    return await asyncio.to_thread(proc.wait, timeout)


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], log: Path, fake: FakeTelegram, *, setups: int):
    """A `toonify up` that is polling (its ``setups``-th setMyCommands came); SIGTERMed on the way out if alive."""
    proc = start_up(env, log)
    try:
        await fake.wait_for_call("setMyCommands", count=setups, timeout=120)
        yield proc
    finally:
        if proc.poll() is None:
            await stop_up(proc)


def group_photo() -> bytes:
    """Six astronauts, 3 x 2, each a little brighter than the last (so each crop is a different picture)."""
    tiles = [Image.open(io.BytesIO(astronaut(8 * i))) for i in range(FACES)]
    w, h = tiles[0].size
    group = Image.new("RGB", (3 * w, 2 * h))
    for i, tile in enumerate(tiles):
        group.paste(tile, ((i % 3) * w, (i // 3) * h))
    buf = io.BytesIO()
    group.save(buf, format="PNG")
    return buf.getvalue()


def photos(fake: FakeTelegram) -> list[SentMessage]:
    return [m for m in fake.sent_messages(UMA.id) if m.photo]


def progress_message(fake: FakeTelegram) -> SentMessage:
    return fake.sent_messages(UMA.id)[0]  # the first thing the bot says to a /toon


def progress_text(fake: FakeTelegram) -> str:
    sent = fake.sent_messages(UMA.id)
    return (sent[0].text or "") if sent else ""


def log_tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


def test_up_serves_a_toon_on_embedded_defaults(tmp_path):
    async def scenario() -> tuple[int, list, int]:
        async with FakeTelegram() as fake:
            proc = start_up(up_env(fake, tmp_path / "data"), tmp_path / "up.log")
            try:
                await fake.wait_for_call("setMyCommands", timeout=90)
                fake.send_user_message(8, FakeUser(8, "Uma"), caption="/toon fast", photo=astronaut(5))
                sent = await fake.wait_for_call("sendPhoto", timeout=120)
                edits = len(fake.calls_to("editMessageText"))
            finally:
                rc = await stop_up(proc, timeout=60)
            return rc, sent, edits

    rc, sent, edits = asyncio.run(scenario())
    assert rc == 0
    assert sent.files["photo"].data[:8] == b"\x89PNG\r\n\x1a\n" and edits >= 1
    assert (tmp_path / "data" / "toonify.db").is_file()  # SQLite: the embedded default
    pidfile = tmp_path / "data" / "redis" / "redis-server.pid"
    assert not pidfile.exists()  # the embedded Redis was stopped with the process


def test_sigterm_while_a_group_result_is_sent_then_restart_delivers_each_photo_once(tmp_path):
    log = tmp_path / "up.log"

    async def scenario() -> tuple[int, list[SentMessage], SentMessage, list[SentMessage], SentMessage, int]:
        async with FakeTelegram() as fake:
            fake.slow_down("sendPhoto", 1.5)  # 7 photos take > 10 s: the 1 s grace period ends halfway
            env = up_env(fake, tmp_path / "data", TOONIFY_SHUTDOWN_GRACE_S="1")
            async with serving(env, log, fake, setups=1) as proc:
                fake.send_user_message(UMA.id, UMA, caption="/toon fast", photo=group_photo())
                await fake.wait_for_call("sendPhoto", timeout=240)  # the first photo is on its way
                rc = await stop_up(proc)
            before, progress_before = photos(fake), progress_message(fake)
            async with serving(env, log, fake, setups=2) as again:
                await fake.wait_for(lambda _: progress_text(fake) == "Done.", timeout=120)
                rc_again = await stop_up(again)
            return rc, before, progress_before, photos(fake), progress_message(fake), rc_again

    rc, before, progress_before, after, progress, rc_again = asyncio.run(scenario())
    assert rc == 0 and rc_again == 0, log_tail(log)
    assert 1 <= len(before) < PHOTOS, "the scenario needs SIGTERM to land while the result is being sent"
    assert progress_before.text == "Almost there…" and not progress_before.buttons  # no Cancel once it is done
    assert len(after) == PHOTOS and len({m.photo for m in after}) == PHOTOS, "every photo exactly once"
    assert [m for m in after if m.caption and "6 faces" in m.caption] == after[:1]  # the composite leads
    assert progress.text == "Done." and not progress.buttons


def test_sigkill_while_a_group_result_is_sent_then_restart_delivers_the_rest(tmp_path):
    log = tmp_path / "up.log"

    async def scenario() -> tuple[int, list[SentMessage], list[SentMessage], SentMessage]:
        async with FakeTelegram() as fake:
            fake.slow_down("sendPhoto", 1.5)
            env = up_env(fake, tmp_path / "data", TOONIFY_DELIVERY_LEASE_S="3")  # the dead bot's lease lapses soon
            async with serving(env, log, fake, setups=1) as proc:
                fake.send_user_message(UMA.id, UMA, caption="/toon fast", photo=group_photo())
                await fake.wait_for_call("sendPhoto", count=2, timeout=240)  # one confirmed, one on its way
                rc = await stop_up(proc, signal.SIGKILL)
            await asyncio.sleep(2)  # the photo on its way arrives although its sender is gone
            before = photos(fake)
            async with serving(env, log, fake, setups=2):
                await fake.wait_for(lambda _: progress_text(fake) == "Done.", timeout=120)
            return rc, before, photos(fake), progress_message(fake)

    rc, before, after, progress = asyncio.run(scenario())
    assert rc == -signal.SIGKILL
    assert 2 <= len(before) < PHOTOS, "the scenario needs SIGKILL to land while the result is being sent"
    counts = collections.Counter(m.photo for m in after)
    assert len(counts) == PHOTOS, "every photo arrived"
    assert sum(counts.values()) <= PHOTOS + 1, "only the photo on its way at the kill may come twice"
    assert all(n == 1 for p, n in counts.items() if p != before[-1].photo)
    assert progress.text == "Done." and not progress.buttons


def _job_row(data_dir: Path) -> tuple[str, str | None]:
    with contextlib.closing(sqlite3.connect(data_dir / "toonify.db")) as db:
        return db.execute("SELECT status, error FROM jobs ORDER BY created_at DESC LIMIT 1").fetchone()


def test_sigterm_while_projecting_then_restart_delivers(tmp_path):
    log = tmp_path / "up.log"
    data_dir = tmp_path / "data"

    async def scenario() -> tuple[int, list[SentMessage], list[SentMessage], SentMessage]:
        async with FakeTelegram() as fake:
            env = up_env(fake, data_dir, TOONIFY_SHUTDOWN_GRACE_S="1")
            async with serving(env, log, fake, setups=1) as proc:
                # quality mode: 300 projection steps, far more than the 1 s grace periods, so the job is handed back
                fake.send_user_message(UMA.id, UMA, caption="/toon quality", photo=astronaut(3))
                await fake.wait_for(lambda _: "Learning your face" in progress_text(fake), timeout=240)
                rc = await stop_up(proc)
            before = photos(fake)
            async with serving(env, log, fake, setups=2):
                try:
                    await fake.wait_for(lambda _: progress_text(fake) == "Done.", timeout=400)
                except TimeoutError:
                    status, error = _job_row(data_dir)
                    if status == "failed" and "job timeout" in (error or ""):
                        pytest.xfail("the worker does not hand an interrupted job back yet: " + error)
                    raise
            return rc, before, photos(fake), progress_message(fake)

    rc, before, after, progress = asyncio.run(scenario())
    assert rc == 0, log_tail(log)
    assert before == []  # nothing had been sent before the restart
    assert len(after) == 2 and "Here you are" in (after[0].caption or "")
    assert progress.text == "Done." and not progress.buttons
