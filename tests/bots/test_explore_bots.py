"""The latent space in chat, end to end against the fake Telegram and Discord servers with the real service, an
in-process worker, Redis, SQLite and the demo models (a copy whose demo style has named directions):

* ``/edit NAME STRENGTH`` edits the last toon with no new upload (and lists the directions, or says a name is
  unknown); a toon made in instant mode is projected first, and the progress says so;
* ``/sweep`` sends an animated GIF (Telegram: sendAnimation; Discord: an attachment);
* a fine-tune posts each snapshot's preview grid with its KID and identity line, and its final message carries the
  metrics; ``/blend vote snapshots STYLE`` lets members pick a snapshot, which becomes the style's checkpoint.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from backend.db.models import Job, JobKind, StyleModel
from backend.service import ToonService
from gan.checkpoints.native import native_metadata
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, running_worker
from tests.backend.test_explore_service import add_demo_directions
from tests.backend.test_finetune_job import dataset_zip
from tests.bots.test_discord_e2e import answer, discord_stack, photo, user, with_image
from tests.bots.test_instant import instant_models  # noqa: F401 - a copy of the demo models with a student
from tests.bots.test_telegram_e2e import ADA, ALICE, BOB, said, shown
from tests.fakes.discord import ADMINISTRATOR
from tests.fakes.telegram import FakeTelegram

BOTH_QUEUES = ("toon", "finetune")
SWEEP_LEVELS = 5  # 4, 8, 16, 32 and 64 px: the demo models' levels


@pytest.fixture(scope="module")
def explore_models(instant_models, tmp_path_factory) -> Path:  # noqa: F811
    """The demo models with a student for the demo style's blend and two named directions (smile, age)."""
    out = tmp_path_factory.mktemp("explore_bot_models")
    shutil.copytree(instant_models, out, dirs_exist_ok=True)
    add_demo_directions(out)
    return out


def gif_frames(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "GIF"
        return im.n_frames


def edit_texts(fake: FakeTelegram, chat_id: int) -> list[str]:
    return [c.params["text"] for c in fake.calls_to("editMessageText") if c.params.get("chat_id") == chat_id]


async def jobs_of(service: ToonService, kind: JobKind) -> list[Job]:
    async with service.rt.sessions() as s:
        return list(await s.scalars(sa.select(Job).where(Job.kind == kind).order_by(Job.created_at)))


@pytest.mark.asyncio
async def test_telegram_edit_and_sweep_the_last_toon_without_a_new_upload(start_telegram, explore_models):
    fake, service = await start_telegram(TOONIFY_MODELS_DIR=str(explore_models))
    chat = ALICE.id
    async with running_worker(service):
        fake.send_user_message(chat, ALICE, photo=astronaut(91), caption="/toon balanced")
        toon = await said(fake, chat, "Here you are", timeout=120)

        fake.send_user_message(chat, ALICE, "/edit")
        await said(fake, chat, "Named directions of demo: age, smile")
        fake.send_user_message(chat, ALICE, "/edit frown 2")
        refused = await said(fake, chat, "no direction called 'frown'")
        assert "age, smile" in refused.text

        before = len(edit_texts(fake, chat))
        fake.send_user_message(chat, ALICE, "/edit smile 2")
        edited = await said(fake, chat, "edited: smile +2", timeout=120)
        assert edited.photo and edited.photo != toon.photo and edited.message_id > toon.message_id
        assert edited.buttons == [("smile +1", "e:smile:1"), ("smile +3", "e:smile:3")]
        assert len(fake.calls_to("getFile")) == 1, "an edit needs no new upload"
        assert not any("your face" in x for x in edit_texts(fake, chat)[before:]), "the toon's latents were kept"

        fake.press_button(chat, ALICE, edited.message_id, "e:smile:3")
        await said(fake, chat, "edited: smile +3", timeout=120)

        fake.send_user_message(chat, ALICE, "/sweep")
        swept = await said(fake, chat, "every blend level of demo", timeout=120)
        (call,) = fake.calls_to("sendAnimation")
        assert call.ok and swept.animation and gif_frames(swept.animation) == SWEEP_LEVELS
        assert "4, 8, 16, 32, 64 px" in shown(swept) and swept.reply_to_message_id is not None
        assert len(fake.calls_to("getFile")) == 1
    (sweep,) = await jobs_of(service, JobKind.SWEEP)
    assert sweep.result["source"] == "toon" and sweep.result["edits"] == [["smile", 3.0]]


@pytest.mark.asyncio
async def test_telegram_edit_of_an_instant_toon_says_it_projects_first(start_telegram, explore_models):
    fake, service = await start_telegram(TOONIFY_MODELS_DIR=str(explore_models))
    chat = BOB.id
    async with running_worker(service):
        fake.send_user_message(chat, BOB, "/sweep")  # no toon yet: the probe faces
        await said(fake, chat, "the probe faces at every blend level", timeout=120)

        fake.send_user_message(chat, BOB, photo=astronaut(92), caption="/toon")
        await said(fake, chat, "instant)", timeout=120)  # the style's student: no latents kept
        fake.send_user_message(chat, BOB, "/edit age -1")
        await said(fake, chat, "edited: age -1", timeout=180)
        assert any("Your last toon was instant" in x for x in edit_texts(fake, chat)), edit_texts(fake, chat)

        before = len(edit_texts(fake, chat))
        fake.send_user_message(chat, BOB, "/edit smile 1.5")
        await said(fake, chat, "edited: age -1, smile +1.5", timeout=120)
        assert not any("instant" in x for x in edit_texts(fake, chat)[before:]), "projected once, kept since"
    modes = [j.params["source_mode"] for j in await jobs_of(service, JobKind.EDIT)]
    assert modes == ["instant", "balanced"]


@pytest.mark.asyncio
async def test_telegram_finetune_posts_snapshots_then_a_snapshot_vote_picks_the_model(start_telegram):
    fake, service = await start_telegram(TOONIFY_FINETUNE_STEPS="8", TOONIFY_FINETUNE_SNAPSHOT_EVERY="4")
    group = -100801
    fake.set_admins(group, [ADA], title="Snapshot club")
    zipped = (dataset_zip(), "set.zip", "application/zip")
    async with running_worker(service, BOTH_QUEUES):
        fake.send_user_message(group, ADA, document=zipped, caption="/finetune mystyle", chat_type="supergroup")
        done = await said(fake, group, "'mystyle' is trained", timeout=600)
        assert "Last snapshot: snapshot at 0.06 kimg: KID" in done.text, done.text

        snapshots = [m for m in fake.sent_messages(group) if m.photo and "Snapshot at step" in shown(m)]
        assert [shown(m).split(":")[0] for m in snapshots] == [
            "Snapshot at step 0/8",  # the base model: where training starts from
            "Snapshot at step 4/8",
            "Snapshot at step 8/8",
        ]
        assert all("KID" in shown(m) for m in snapshots)
        posts = [i for i, c in enumerate(fake.calls) if c.method == "sendPhoto" and "Snapshot" in c.params["caption"]]
        final = next(i for i, c in enumerate(fake.calls) if "is trained" in c.params.get("text", ""))
        assert len(posts) == 3 and max(posts) < final, "each snapshot as it came, then the final message"

        fake.send_user_message(group, BOB, "/blend vote snapshots mystyle", chat_type="supergroup")
        await said(fake, group, "only the admins")
        fake.send_user_message(group, ADA, "/blend vote snapshots mystyle", chat_type="supergroup")
        poll = await fake.wait_for(
            lambda _: next((m for m in fake.sent_messages(group) if m.photo and "snapshot of mystyle" in shown(m)
                            and m.buttons), None),
            timeout=120,
        )  # fmt: skip
        assert "1: snapshot 0.032 kimg" in shown(poll) and "2: snapshot 0.064 kimg" in shown(poll)
        votes = [data for _, data in poll.buttons]
        fake.press_button(group, ALICE, poll.message_id, votes[0])
        fake.press_button(group, BOB, poll.message_id, votes[0])
        await said(fake, group, "Votes: 1: 2, 2: 0")
        fake.send_user_message(group, ADA, "/poll close", chat_type="supergroup")
        closed = await said(fake, group, "Winner: 1 (snapshot 0.032 kimg")
        assert "'mystyle' uses that snapshot from now on" in closed.text

    async with service.rt.sessions() as s:
        style = await s.scalar(sa.select(StyleModel).where(StyleModel.name == "mystyle"))
    (tune,) = await jobs_of(service, JobKind.FINETUNE)
    early = service.rt.settings.data_dir / "finetune" / tune.id / "snapshots" / "kimg000000.032.safetensors"
    assert native_metadata(style.checkpoint_path)["content_hash"] == native_metadata(early)["content_hash"]


@pytest.mark.asyncio
async def test_discord_edit_and_sweep(tmp_path, redis_url, redis, explore_models):  # noqa: F811
    env = {"TOONIFY_MODELS_DIR": str(explore_models)}
    async with discord_stack(tmp_path, redis_url, env) as stack:
        fake, service = stack.fake, stack.service
        commands = {c["name"]: c for c in fake.guild_commands[fake.guild_id]}
        assert [(o["name"], o["type"]) for o in commands["edit"]["options"]] == [("direction", 3), ("strength", 10)]
        assert [o["name"] for o in commands["blendvote"]["options"]] == ["levels", "style", "snapshots"]

        async with running_worker(service):
            toon = await fake.slash_command("toon", options={"mode": "balanced"}, attachments=photo(astronaut(93)))
            first = await with_image(fake, toon)

            listed = await fake.slash_command("edit")
            assert "Named directions of demo: age, smile" in (await answer(fake, listed, "Named")).content
            unknown = await fake.slash_command("edit", options={"direction": "frown", "strength": 1.0})
            assert "age, smile" in (await answer(fake, unknown, "frown")).content

            edit = await fake.slash_command("edit", options={"direction": "smile", "strength": 2.0})
            edited = await with_image(fake, edit)
            assert "edited: smile +2" in edited.content and edited.files[0] != first.files[0]
            assert {"toonify:e:smile:1", "toonify:e:smile:3"} <= set(edited.custom_ids())

            pressed = await fake.press_button(edited, "toonify:e:smile:3", fake.user)
            assert "edited: smile +3" in (await with_image(fake, pressed)).content

            sweep = await fake.slash_command("sweep")
            swept = await with_image(fake, sweep)
            (gif,) = swept.attachments
            assert gif.filename == "sweep.gif" and gif_frames(gif.data) == SWEEP_LEVELS
            assert "every blend level of demo" in swept.content

            refused = await fake.slash_command(
                "blendvote", user(fake, "ada"), options={"snapshots": True, "style": "demo"},
                member_permissions=ADMINISTRATOR,
            )  # fmt: skip
            assert "not a style this community fine-tuned" in (await answer(fake, refused, "fine-tuned")).content
        assert fake.unhandled == []
