"""Operations: health checks, Prometheus metrics from running processes, structured logs, and two worker
processes sharing one queue (every job done exactly once, both workers used)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from backend.config import Settings
from backend.db import upgrade
from backend.db.models import Job, JobStatus
from backend.logs import JOB_ID, configure_logging
from backend.service import Place, ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import actor, astronaut, events_until_done, free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = "import sys; from bots.cli import main; sys.exit(main(sys.argv[1:]))"


def toonify(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw
    )


def scrape(port: int, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            got = head[len(name) :].strip("{}")
            if all(part in got.split(",") for part in want.split(",") if part):
                return float(value)
    raise AssertionError(f"{name}{{{want}}} not in the scrape")


def test_health_fails_clearly_when_redis_or_sql_is_down_and_passes_when_up(tmp_path, redis_url):  # noqa: F811
    base = {**os.environ, "TOONIFY_DATA_DIR": str(tmp_path / "data")}
    down = toonify(
        "health",
        env={
            **base,
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        },
    )
    assert down.returncode == 1
    assert "FAIL redis    no answer from redis://127.0.0.1:1/0" in down.stdout
    assert (
        "FAIL database the database at postgresql://nobody@127.0.0.1:1/none is unreachable: connection refused"
        in down.stdout
    )

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}"
    not_migrated = toonify("health", env={**base, "REDIS_URL": redis_url, "DATABASE_URL": db_url})
    assert not_migrated.returncode == 1 and "toonify db upgrade" in not_migrated.stdout
    upgrade(db_url)
    up = toonify("health", "--models", env={**base, "REDIS_URL": redis_url, "DATABASE_URL": db_url})
    assert up.returncode == 0, up.stdout + up.stderr
    assert [line.split()[:2] for line in up.stdout.splitlines()] == [
        ["ok", "redis"],
        ["ok", "database"],
        ["ok", "models"],
    ]
    no_worker = toonify("health", "--worker", env={**base, "REDIS_URL": redis_url, "DATABASE_URL": db_url})
    assert no_worker.returncode == 1 and "no worker heartbeat" in no_worker.stdout


def test_json_logs_carry_the_job_id(capsys):
    configure_logging("INFO", "json")
    try:
        log = logging.getLogger("toonify.test")
        token = JOB_ID.set("job-123")
        log.info("projecting %d faces", 2)
        JOB_ID.reset(token)
        log.warning("idle")
    finally:
        configure_logging("WARNING", "text")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "projecting 2 faces" and lines[0]["job_id"] == "job-123" and lines[0]["level"] == "info"
    assert "job_id" not in lines[1]


@pytest.mark.asyncio
async def test_two_worker_processes_share_a_queue_and_expose_metrics(tmp_path, redis_url, redis):  # noqa: F811
    env = {
        **os.environ,
        "TOONIFY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",  # not the caller's
        "REDIS_URL": redis_url,
        "TOONIFY_DEVICE": "cpu",
        "TOONIFY_TOON_MAX_JOBS": "1",
        "TOONIFY_QUOTA_MAX_QUEUE": "100",
    }
    svc = await ToonService.open(Settings.from_env(env))
    ports = [free_port(), free_port()]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CLI, "worker", "--queues", "toon"],
            cwd=ROOT,
            env={**env, "TOONIFY_METRICS_PORT": str(p)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p in ports:  # both are up (their /metrics answers) before any job exists
            scrape(p, timeout_s=60)
        place = Place("discord", "77")
        tickets = [await svc.submit_toon(actor(i), place, astronaut(i), mode="balanced") for i in range(6)]
        for t in tickets:
            assert (await events_until_done(svc, t.job_id, timeout_s=300))[-1].status == "done"
        async with svc.rt.sessions() as s:
            rows = (await s.scalars(sa.select(Job))).all()
        assert len(rows) == 6 and all(r.status == JobStatus.DONE and r.attempts == 1 for r in rows)  # exactly once
        assert len({r.worker_id for r in rows}) == 2  # both workers took jobs

        scrapes = [scrape(p) for p in ports]
        done = [metric(text, "toonify_jobs_total", kind="toon", status="done") for text in scrapes]
        assert sum(done) == 6 and all(d >= 1 for d in done)
        assert (
            sum(
                metric(text, "toonify_job_seconds_count", kind="toon", mode="balanced", status="done")
                for text in scrapes
            )
            == 6
        )
        community = str(rows[0].community_id)
        assert sum(metric(text, "toonify_gpu_seconds_total", community=community) for text in scrapes) > 0
        assert "toonify_queue_depth" in scrapes[0] and "toonify_model_cache_total" in scrapes[0]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
        await svc.close()


def test_a_running_bot_exposes_command_metrics(tmp_path, redis_url):  # noqa: F811
    from tests.fakes.telegram import FakeTelegram, FakeUser

    async def scenario() -> str:
        async with FakeTelegram() as fake:
            port = free_port()
            env = {
                **os.environ,
                "TOONIFY_DATA_DIR": str(tmp_path / "data"),
                "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}",
                "REDIS_URL": redis_url,
                "TELEGRAM_TOKEN": fake.token,
                "TELEGRAM_API_BASE_URL": fake.base_url,
                "TELEGRAM_FILE_BASE_URL": fake.base_file_url,
                "TOONIFY_METRICS_PORT": str(port),
            }
            bot = subprocess.Popen(
                [sys.executable, "-c", CLI, "bot", "telegram"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                await fake.wait_for_call("setMyCommands", timeout=60)
                fake.send_user_message(5, FakeUser(5, "Eve"), "/help")
                await fake.wait_for_call("sendMessage", timeout=30)
                return await asyncio.to_thread(scrape, port)
            finally:
                bot.terminate()
                bot.wait(timeout=30)

    text = asyncio.run(scenario())
    assert metric(text, "toonify_bot_commands_total", platform="telegram", command="help") == 1
