"""Chaos benchmark: 20 people send a selfie while the worker is SIGTERMed or SIGKILLed every 10 seconds.

    python bench/chaos.py                          # 20 jobs, a kill every 10 s, embedded Redis, SQLite, CPU
    python bench/chaos.py --jobs 8 --every 5 --mode fast
    REDIS_URL=redis://127.0.0.1:6379/12 python bench/chaos.py

Real parts throughout: the fake Telegram Bot API server of the tests (real HTTP), one `toonify bot telegram`
process (no worker inside), one `toonify worker` process at a time, a Redis (embedded unless REDIS_URL is set) and
a SQLite file. Each of ``--jobs`` users sends a different photo with ``/toon``. Every ``--every`` seconds the
running worker gets SIGTERM or SIGKILL (alternately) and a fresh one starts at once, as a supervisor would do;
a SIGTERMed worker drains (grace ``--grace`` s, then hands its jobs back) while its successor already serves.

At the end it counts, per user, the photos the fake server received (a toon result is the pasted-back photo and
one crop) and prints: jobs delivered exactly once, duplicates, missing, the kills, attempts per job from the SQL
ledger, and the wall time. Nothing is asserted; the numbers are printed (and the exit status is 1 if a photo was
lost or sent twice, so a script can notice).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.redis import EmbeddedRedis  # noqa: E402
from tests.backend.stack import astronaut  # noqa: E402
from tests.fakes.telegram import FakeTelegram, FakeUser  # noqa: E402

PHOTOS_PER_TOON = 2  # the photo with the toon pasted back, and the toon crop (one face)


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from bots.cli import main; sys.exit(main({list(args)!r}))"]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as err:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


async def run(opts: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="toonify-chaos-"))
    embedded = None if os.environ.get("REDIS_URL") else EmbeddedRedis(work / "redis")
    redis_url = os.environ.get("REDIS_URL") or embedded.url
    users = [FakeUser(5000 + i, f"user{i}") for i in range(opts.jobs)]
    kills: collections.Counter[str] = collections.Counter()
    async with FakeTelegram() as fake:
        env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "DATABASE_URL")}
        env.update(
            TOONIFY_DATA_DIR=str(work / "data"),
            REDIS_URL=redis_url,
            TELEGRAM_TOKEN=fake.token,
            TELEGRAM_API_BASE_URL=fake.base_url,
            TELEGRAM_FILE_BASE_URL=fake.base_file_url,
            TOONIFY_DEVICE="cpu",
            TOONIFY_SHUTDOWN_GRACE_S=str(opts.grace),
            TOONIFY_WORKER_HEARTBEAT_TTL_S=str(opts.heartbeat_ttl),
            TOONIFY_QUOTA_USER_ACTIVE="4",
        )
        bot = start(command("bot", "telegram"), env, work / "bot.log")
        workers: list[subprocess.Popen] = []
        try:
            await fake.wait_for_call("setMyCommands", timeout=180)
            workers.append(start(command("worker", "--queues", "toon"), env, work / "worker.log"))
            t0 = time.perf_counter()
            for i, user in enumerate(users):
                fake.send_user_message(user.id, user, caption=f"/toon {opts.mode}", photo=astronaut(3 * i + 1))

            def delivered() -> int:
                return sum(len([m for m in fake.sent_messages(u.id) if m.photo]) >= PHOTOS_PER_TOON for u in users)

            next_kill, signals = time.perf_counter() + opts.every, [signal.SIGTERM, signal.SIGKILL]
            while delivered() < len(users) and time.perf_counter() - t0 < opts.timeout:
                await asyncio.sleep(0.2)
                if time.perf_counter() >= next_kill:
                    sig = signals[sum(kills.values()) % 2]
                    workers[-1].send_signal(sig)
                    kills[sig.name] += 1
                    workers.append(start(command("worker", "--queues", "toon"), env, work / "worker.log"))
                    next_kill += opts.every
            wall = time.perf_counter() - t0
            await asyncio.sleep(opts.settle)  # a duplicate would arrive now, if there were one
        finally:
            for p in [*workers, bot]:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in [*workers, bot]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=120)
                if p.poll() is None:
                    p.kill()
        counts = [len([m for m in fake.sent_messages(u.id) if m.photo]) for u in users]
        distinct = [len({m.photo for m in fake.sent_messages(u.id) if m.photo}) for u in users]
    with contextlib.closing(sqlite3.connect(work / "data" / "toonify.db")) as db:
        rows = db.execute("SELECT status, attempts FROM jobs WHERE kind = 'toon'").fetchall()
    if embedded is not None:
        embedded.close()
    exact = sum(c == PHOTOS_PER_TOON and d == PHOTOS_PER_TOON for c, d in zip(counts, distinct, strict=True))
    dupes = sum(max(0, c - PHOTOS_PER_TOON) for c in counts)
    missing = sum(max(0, PHOTOS_PER_TOON - c) for c in counts)
    attempts = collections.Counter(a for _, a in rows)
    statuses = collections.Counter(s for s, _ in rows)
    print(f"jobs: {opts.jobs}, mode {opts.mode}, a kill every {opts.every:g} s, grace {opts.grace} s")
    print(f"kills: {dict(kills)} ({len(workers)} worker processes in all)")
    print(f"delivered exactly once: {exact}/{opts.jobs}; duplicate photos: {dupes}; missing photos: {missing}")
    print(f"job rows: {dict(statuses)}; attempts per job: {dict(sorted(attempts.items()))}")
    print(f"wall time until every toon was delivered: {wall:.1f} s")
    print(f"logs: {work}")
    return 0 if exact == opts.jobs else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--every", type=float, default=10.0, help="seconds between worker kills")
    p.add_argument("--mode", default="balanced", choices=("fast", "balanced", "quality"))
    p.add_argument("--grace", type=int, default=30, help="TOONIFY_SHUTDOWN_GRACE_S for the workers")
    p.add_argument("--heartbeat-ttl", type=int, default=4, help="TOONIFY_WORKER_HEARTBEAT_TTL_S")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait for late duplicates")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: the bot and workers are stopped too
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
