"""Instant toons through the bots: /toon runs the style's instant model (a distilled student) when one exists for
the blend, and /distill lets a community's admins train one. End to end against the fake Telegram and Discord
servers, with the real service, an in-process worker, Redis, SQLite and the demo models (a copy with a tiny student
listed in its manifest, for the tests that need one ready)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from backend.db.models import Job, JobKind
from backend.service import ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, running_worker
from tests.backend.student_fixtures import TINY
from tests.bots.test_discord_e2e import answer, discord_stack, photo, user
from tests.bots.test_telegram_e2e import ADA, ALICE, BOB, said, shown
from tests.fakes.discord import ADMINISTRATOR
from tests.fakes.telegram import FakeTelegram

TINY_KIMG = 0.032  # a few steps: enough to make a student with the right lineage, not a good one
SHOWN_KIMG = 0.4  # 25 steps: long enough that the throttled progress message shows the training
BOTH_QUEUES = ("toon", "finetune")  # distillation is long GPU work: it runs on the fine-tune queue


@pytest.fixture(scope="module")
def instant_models(tmp_path_factory) -> Path:
    """A copy of the demo models whose demo style lists a student for its default blend (a tiny one trained here
    unless the bundled models ship one)."""
    from gan.checkpoints import load_generator
    from gan.distill import DistillConfig, save_student, train_student
    from gan.styles import DEMO_DIR, StudentEntry, add_student_to_manifest, read_manifest

    out = tmp_path_factory.mktemp("instant_models")
    shutil.copytree(DEMO_DIR, out, dirs_exist_ok=True)
    demo = read_manifest(out).style("demo")
    if demo.student_for(demo.blend) is not None:
        return out
    base, toon = load_generator(demo.base), load_generator(demo.toon)
    student = train_student(base, toon, demo.blend, DistillConfig(**TINY))
    path = save_student(student, out / "students" / "demo_tiny.safetensors")
    add_student_to_manifest(out, "demo", StudentEntry.for_student(path, student, out))
    return out


async def toon_jobs(service: ToonService) -> list[Job]:
    async with service.rt.sessions() as s:
        rows = await s.scalars(sa.select(Job).where(Job.kind == JobKind.TOON).order_by(Job.created_at))
        return list(rows)


async def distill_jobs(service: ToonService) -> list[Job]:
    async with service.rt.sessions() as s:
        return list(await s.scalars(sa.select(Job).where(Job.kind == JobKind.DISTILL)))


def progress_texts(fake: FakeTelegram, chat_id: int) -> list[str]:
    return [c.params["text"] for c in fake.calls_to("editMessageText") if c.params.get("chat_id") == chat_id]


@pytest.mark.asyncio
async def test_toon_without_a_mode_is_instant_where_the_style_has_a_student(start_telegram, instant_models):
    fake, service = await start_telegram(TOONIFY_MODELS_DIR=str(instant_models))
    async with running_worker(service):
        fake.send_user_message(ALICE.id, ALICE, photo=astronaut(61), caption="/toon")
        result = await said(fake, ALICE.id, "Here you are", timeout=120)
        assert result.photo and "instant" in shown(result), shown(result)
        (job,) = await toon_jobs(service)
        assert job.params["mode"] == "instant"
        assert not any("Learning your face" in x for x in progress_texts(fake, ALICE.id)), "no projection"

        # Another blend has no student: projection, and the message does not claim otherwise.
        fake.send_user_message(ALICE.id, ALICE, photo=astronaut(62), caption="/toon 32")
        projected = await said(fake, ALICE.id, "blend 32)", timeout=120)
        assert "instant" not in shown(projected)
        # Asking for quality projects even where a student exists.
        fake.send_user_message(ALICE.id, ALICE, photo=astronaut(63), caption="/toon quality")
        await said(fake, ALICE.id, "blend 16)", timeout=180)  # the default blend, projected
        modes = [j.params["mode"] for j in await toon_jobs(service)]
        assert modes == ["instant", "balanced", "quality"]


@pytest.mark.asyncio
async def test_distill_is_for_admins_and_says_so(start_telegram):
    fake, service = await start_telegram()
    group = -100501
    fake.set_admins(group, [ADA], title="Instant club")
    fake.send_user_message(group, BOB, "/distill demo 16", chat_type="supergroup")
    await said(fake, group, "only the admins")
    fake.send_user_message(BOB.id, BOB, "/distill")
    await said(fake, BOB.id, "works in a server or group")
    assert await distill_jobs(service) == [], "nothing was queued"

    fake.send_user_message(ALICE.id, ALICE, "/help")
    help_text = await said(fake, ALICE.id, "/distill")
    assert "instant" in help_text.text


@pytest.mark.asyncio
async def test_admin_distills_then_toons_at_that_blend_are_instant(start_telegram, monkeypatch):
    fake, service = await start_telegram()
    monkeypatch.setattr(service.rt, "settings", replace(service.rt.settings, distill_kimg=SHOWN_KIMG))  # test-sized
    group = -100601
    fake.set_admins(group, [ADA], title="Instant club")
    async with running_worker(service, BOTH_QUEUES):
        fake.send_user_message(group, ALICE, photo=astronaut(64), caption="/toon 32", chat_type="supergroup")
        before = await said(fake, group, "blend 32)", timeout=120)  # no student for 32 yet: projection

        fake.send_user_message(group, ADA, "/distill@fake_test_bot demo 32", chat_type="supergroup")
        await said(fake, group, "instant model is queued")
        done = await said(fake, group, "has an instant model for blend 32", timeout=300)
        assert "demo" in done.text
        (job,) = await distill_jobs(service)
        assert job.status.value == "done"
        assert any("Training the instant model" in x for x in progress_texts(fake, group))

        fake.send_user_message(group, ALICE, photo=astronaut(65), caption="/toon 32", chat_type="supergroup")
        after = await said(fake, group, "blend 32, instant)", timeout=120)
        assert after.photo and after.message_id > before.message_id
        assert [j.params["mode"] for j in await toon_jobs(service)] == ["balanced", "instant"]


@pytest.mark.asyncio
async def test_a_poll_that_picks_a_new_default_blend_trains_its_instant_model(start_telegram, monkeypatch):
    fake, service = await start_telegram()
    monkeypatch.setattr(service.rt, "settings", replace(service.rt.settings, distill_kimg=TINY_KIMG))
    group = -100701
    fake.set_admins(group, [ADA], title="Poll club")
    async with running_worker(service, BOTH_QUEUES):
        fake.send_user_message(group, ADA, "/blend vote 8 16", chat_type="supergroup")
        poll = await fake.wait_for(
            lambda _: next((m for m in fake.sent_messages(group) if m.photo and m.buttons), None), timeout=120
        )
        fake.press_button(group, ALICE, poll.message_id, poll.buttons[0][1])  # blend 8, not the default 16
        await said(fake, group, "Votes: 1: 1")
        fake.send_user_message(group, ADA, "/poll close", chat_type="supergroup")
        await said(fake, group, "Winner: 1")
        await said(fake, group, "Training an instant model for it now")
        await said(fake, group, "has an instant model for blend 8", timeout=300)
        (job,) = await distill_jobs(service)
        assert job.params["reason"] == "poll" and job.params["spec"]["resolution"] == 8

        fake.send_user_message(group, BOB, photo=astronaut(66), caption="/toon", chat_type="supergroup")
        await said(fake, group, "blend 8, instant)", timeout=120)  # the community's new default, instant


@pytest.mark.asyncio
async def test_discord_distill_options_rights_and_instant_mode_choice(tmp_path, redis_url, redis):  # noqa: F811
    grace = {"TOONIFY_SHUTDOWN_GRACE_S": "2"}  # the distill job below waits (no worker): the bot stops anyway
    async with discord_stack(tmp_path, redis_url, grace) as stack:
        fake, service = stack.fake, stack.service
        commands = {c["name"]: c for c in fake.guild_commands[fake.guild_id]}
        distill = commands["distill"]
        assert [(o["name"], o["type"]) for o in distill["options"]] == [("style", 3), ("blend", 4)]
        assert distill["default_member_permissions"] is not None, "hidden from members by default"
        mode = next(o for o in commands["toon"]["options"] if o["name"] == "mode")
        assert [c["value"] for c in mode["choices"]] == ["instant", "fast", "balanced", "quality"]

        refused = await fake.slash_command("distill", user(fake, "bob"), options={"style": "demo", "blend": 16})
        assert "only the admins" in (await answer(fake, refused, "admins")).content
        assert await distill_jobs(service) == []

        # No student for blend 32 (the demo ships one for its own blend, 16): asking for instant says so plainly.
        options = {"mode": "instant", "blend": 32}
        asked = await fake.slash_command("toon", options=options, attachments=photo(astronaut(71)))
        assert "no instant model for blend 32" in (await answer(fake, asked, "instant")).content

        queued = await fake.slash_command(
            "distill", user(fake, "ada"), options={"style": "demo", "blend": 32}, member_permissions=ADMINISTRATOR
        )
        await answer(fake, queued, "instant model is queued")
        (job,) = await distill_jobs(service)
        assert job.params["style"] == "demo" and job.params["spec"]["resolution"] == 32
        assert fake.unhandled == []
