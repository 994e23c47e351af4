"""`toonify up`: one process with the embedded defaults (its own Redis, SQLite), a worker and the Telegram bot,
driven through the fake Bot API: a photo in, a toon out; SIGTERM stops everything, embedded Redis included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.backend.stack import astronaut
from tests.fakes.telegram import FakeTelegram, FakeUser

ROOT = Path(__file__).resolve().parents[2]


def test_up_serves_a_toon_on_embedded_defaults(tmp_path):
    async def scenario() -> tuple[int, list, int]:
        async with FakeTelegram() as fake:
            env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "DISCORD_TOKEN")}
            env.update(
                TOONIFY_DATA_DIR=str(tmp_path / "data"),
                TELEGRAM_TOKEN=fake.token,
                TELEGRAM_API_BASE_URL=fake.base_url,
                TELEGRAM_FILE_BASE_URL=fake.base_file_url,
                TOONIFY_DEVICE="cpu",
            )
            code = "import sys; from bots.cli import main; sys.exit(main(['up']))"
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                await fake.wait_for_call("setMyCommands", timeout=90)
                fake.send_user_message(8, FakeUser(8, "Uma"), caption="/toon fast", photo=astronaut(5))
                sent = await fake.wait_for_call("sendPhoto", timeout=120)
                edits = len(fake.calls_to("editMessageText"))
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = await asyncio.to_thread(proc.wait, 60)
            return rc, sent, edits

    rc, sent, edits = asyncio.run(scenario())
    assert rc == 0
    assert sent.files["photo"].data[:8] == b"\x89PNG\r\n\x1a\n" and edits >= 1
    assert (tmp_path / "data" / "toonify.db").is_file()  # SQLite: the embedded default
    pidfile = tmp_path / "data" / "redis" / "redis-server.pid"
    assert not pidfile.exists()  # the embedded Redis was stopped with the process
