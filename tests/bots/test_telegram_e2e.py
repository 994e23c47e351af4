"""The Telegram front end end to end: ``run_telegram`` as deployed, against the fake Bot API over HTTP, with the
real service, an in-process worker, Redis, SQLite and the bundled demo models."""

from __future__ import annotations

import asyncio
import contextlib
import io
import zipfile
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from backend.config import Settings
from backend.service import Actor, Place, ToonService
from bots.telegram import COMMANDS, run_telegram
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, blank_photo, long_enough_to_show_progress, running_worker
from tests.fakes.telegram import FakeTelegram, FakeUser, SentMessage

ALICE = FakeUser(1001, "Alice", "alice")
BOB = FakeUser(1002, "Bob")
ADA = FakeUser(1009, "Ada", "ada")  # an administrator of the groups below


@contextlib.asynccontextmanager
async def telegram_stack(
    tmp_path, url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch | None = None
) -> AsyncIterator[tuple[FakeTelegram, ToonService]]:
    """The bot on the fake; with ``monkeypatch``, it finds the fake through TELEGRAM_*_BASE_URL instead."""
    settings = Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": url, **env})
    service = await ToonService.open(settings)
    try:
        async with FakeTelegram() as fake:
            stop = asyncio.Event()
            if monkeypatch is None:
                urls = {"base_url": fake.base_url, "base_file_url": fake.base_file_url}
            else:
                monkeypatch.setenv("TELEGRAM_API_BASE_URL", fake.base_url)
                monkeypatch.setenv("TELEGRAM_FILE_BASE_URL", fake.base_file_url)
                urls = {}
            bot = asyncio.create_task(run_telegram(service, fake.token, stop, **urls))
            try:
                await fake.wait_for(lambda calls: bot.done() or fake.calls_to("setMyCommands"), timeout=20)
                yield fake, service
            finally:
                stop.set()
                await asyncio.wait_for(bot, 30)  # also re-raises whatever stopped the bot early
    finally:
        await service.close()


@pytest_asyncio.fixture
async def start_bot(tmp_path, redis_url, redis, monkeypatch):  # noqa: F811
    """``fake, service = await start_bot(via_env=False, **env)``: the bot runs until the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(via_env: bool = False, **env: str) -> tuple[FakeTelegram, ToonService]:
            patch = monkeypatch if via_env else None
            return await stack.enter_async_context(telegram_stack(tmp_path, redis_url, env, patch))

        yield start


def shown(m: SentMessage) -> str:
    return m.text or m.caption or ""


async def said(fake: FakeTelegram, chat_id: int, needle: str, timeout: float = 60) -> SentMessage:
    """Wait until a bot message in ``chat_id`` reads ``needle`` (as sent or after an edit); return it."""

    def find(_calls) -> SentMessage | None:
        return next((m for m in fake.sent_messages(chat_id) if needle in shown(m)), None)

    return await fake.wait_for(find, timeout)


def calls_in(fake: FakeTelegram, method: str, chat_id: int) -> list:
    return [c for c in fake.calls_to(method) if c.params.get("chat_id") == chat_id]


@pytest.mark.asyncio
async def test_toon_progress_result_then_reblend_without_upload(start_bot, monkeypatch):
    long_enough_to_show_progress(monkeypatch)
    fake, service = await start_bot()
    assert [c["command"] for c in fake.commands()] == list(COMMANDS)
    photo = astronaut(11)
    async with running_worker(service):
        # balanced, named (the default is instant where the style has a student)
        fake.send_user_message(ALICE.id, ALICE, photo=photo, caption="/toon balanced")
        await fake.wait_for_call("editMessageText", timeout=60)  # the job is under way
        fake.send_user_message(ALICE.id, ALICE, "/help")  # answered while the toon is still running
        result = await said(fake, ALICE.id, "Here you are", timeout=120)
        help_msg = await said(fake, ALICE.id, "/blend vote")
        assert help_msg.message_id < result.message_id, "a slow toon must not hold up other commands"

        # Progress: one message, edited (never identically) before the result photo went out.
        first_photo = fake.calls.index(calls_in(fake, "sendPhoto", ALICE.id)[0])
        edits = [c for c in fake.calls[:first_photo] if c.method == "editMessageText"]
        assert len(edits) >= 2 and all(c.ok for c in edits)
        assert len({c.params["message_id"] for c in edits}) == 1
        assert any("Learning your face" in c.params["text"] for c in edits)
        assert calls_in(fake, "sendChatAction", ALICE.id)[0].params["action"] == "upload_photo"
        # The largest size was downloaded, and the result answers the command with blend buttons.
        (get_file,) = fake.calls_to("getFile")
        assert fake.file_bytes(get_file.params["file_id"]) == photo
        assert result.photo and result.reply_to_message_id is not None
        assert ("Blend 8", "b:8") in result.buttons and all(len(d.encode()) <= 64 for _, d in result.buttons)

        photos_before = len(calls_in(fake, "sendPhoto", ALICE.id))
        fake.send_user_message(ALICE.id, ALICE, "/blend 32")
        again = await said(fake, ALICE.id, "blend 32)", timeout=120)
        assert again.photo and len(calls_in(fake, "sendPhoto", ALICE.id)) > photos_before
        assert len(fake.calls_to("getFile")) == 1, "a re-blend needs no new upload"

        fake.press_button(ALICE.id, ALICE, again.message_id, "b:64")
        await said(fake, ALICE.id, "blend 64)", timeout=120)
        answer = fake.calls_to("answerCallbackQuery")[0]
        assert answer.ok and answer.params.get("text") is None  # a plain acknowledgement: the answer is a message


@pytest.mark.asyncio
async def test_vote_poll_by_buttons_closed_by_the_admin(start_bot):
    fake, service = await start_bot()
    group = -100201
    fake.set_admins(group, [ADA], title="Toon club")
    async with running_worker(service):
        fake.send_user_message(group, ADA, "/blend@fake_test_bot vote 8 16", chat_type="supergroup")
        poll = await fake.wait_for(
            lambda _: next((m for m in fake.sent_messages(group) if m.photo and m.buttons), None), timeout=120
        )
    assert "Vote for this community's" in poll.caption
    (text_version,) = [m for m in fake.sent_messages(group, include_deleted=True) if m.deleted]
    assert "Vote for" in text_version.text, "the text poll made way for the photo with the grid"
    votes = [data for _, data in poll.buttons]
    assert len(votes) == 2 and all(v.startswith("v:") for v in votes)

    fake.press_button(group, ALICE, poll.message_id, votes[1])
    await fake.wait_for_call("answerCallbackQuery")
    fake.press_button(group, BOB, poll.message_id, votes[1])
    await fake.wait_for_call("answerCallbackQuery", count=2)
    tally = await said(fake, group, "Votes: 1: 0, 2: 2")
    assert tally.message_id == poll.message_id and tally.buttons == poll.buttons
    answers = [c.params.get("text") for c in fake.calls_to("answerCallbackQuery")]
    assert answers == ["Your vote: option 2."] * 2, "the confirmation is a toast only the voter sees"

    fake.send_user_message(group, BOB, "/toon@some_other_bot", chat_type="supergroup")  # not for us
    fake.send_user_message(group, BOB, "/frobnicate", chat_type="supergroup")  # maybe another bot's
    fake.send_user_message(group, ALICE, "/poll close", chat_type="supergroup")
    await said(fake, group, "only the admins")
    fake.send_user_message(group, ADA, "/poll@fake_test_bot close", chat_type="supergroup")
    closed = await said(fake, group, "Winner: 2")
    assert "2: 2" in closed.text
    members = fake.calls_to("getChatMember")
    assert {c.params["user_id"] for c in members} >= {ADA.id, ALICE.id, BOB.id}
    assert not any("don't know" in shown(m) for m in fake.sent_messages(group))


@pytest.mark.asyncio
async def test_bad_files_and_rights_get_clear_replies(start_bot):
    fake, service = await start_bot()
    chat = ALICE.id
    fake.send_user_message(chat, ALICE, document=(b"%PDF-1.4 a CV", "cv.pdf", "application/pdf"), caption="/toon")
    await said(fake, chat, "not an image")

    huge = b"\x89PNG" + bytes(21 << 20)
    fake.send_user_message(chat, ALICE, document=(huge, "huge.png", "image/png"), caption="/toon")
    await said(fake, chat, "That file is 21.0 MB; the limit here is 20 MB")
    assert len(fake.calls_to("getFile")) == 1, "an oversized file is refused before any download"

    fake.max_file_size = 1000  # Telegram's getFile refuses it: the same clear answer
    photo = astronaut(31)
    fake.send_user_message(chat, ALICE, photo=photo, caption="/toon")
    await said(fake, chat, f"That file is {len(photo) / 2**20:.1f} MB; the limit here is 20 MB")
    assert fake.calls_to("getFile")[-1].result == "Bad Request: file is too big"
    fake.max_file_size = 20 << 20

    async with running_worker(service):
        no_face = (blank_photo(), "wall.png", "image/png")  # an image sent as a file
        fake.send_user_message(chat, ALICE, document=no_face, caption="/toon fast")
        await said(fake, chat, "No face found", timeout=120)

    group = -100301  # a fresh group, so the first message below is message 1
    fake.set_admins(group, [ADA], title="Dataset club")
    dataset = io.BytesIO()
    with zipfile.ZipFile(dataset, "w") as zf:
        zf.writestr("a.txt", "no images")
    zipped = (dataset.getvalue(), "set.zip", "application/zip")
    fake.send_user_message(group, ADA, document=zipped, chat_type="supergroup")  # message 1: no command
    downloads = len(fake.calls_to("getFile"))
    fake.send_user_message(group, BOB, document=zipped, caption="/finetune x", chat_type="supergroup")
    await said(fake, group, "only the admins")
    assert len(fake.calls_to("getFile")) == downloads, "nothing is downloaded for someone without the right"
    fake.send_user_message(group, ADA, "/finetune mystyle", reply_to_message_id=1, chat_type="supergroup")
    await said(fake, group, "a fine-tune needs at least 8 images")
    assert len(fake.calls_to("getFile")) == downloads + 1


@pytest.mark.asyncio
async def test_second_toon_while_one_waits_is_told_to_wait(start_bot, monkeypatch):
    monkeypatch.setenv("PTB_TIMEDELTA", "1")  # RetryAfter.retry_after as a timedelta (silences a warning)
    fake, service = await start_bot(via_env=True, TOONIFY_QUOTA_USER_ACTIVE="1")
    group = -100401
    place = Place("telegram", str(group), "Queue club")
    waiting = await service.submit_toon(Actor("telegram", str(ALICE.id), "Alice"), place, astronaut(41))
    assert waiting.status == "queued"  # no worker: it stays queued

    fake.send_user_message(group, ALICE, photo=astronaut(42), chat_type="supergroup")  # message 1: no command
    fake.send_user_message(group, ALICE, "/toon", reply_to_message_id=1, chat_type="supergroup")
    await said(fake, group, "in progress at a time")
    assert len(fake.calls_to("getFile")) == 1, "the photo replied to was the upload"
    fake.send_user_message(ALICE.id, ALICE, photo=astronaut(43))  # in a private chat a bare photo is a /toon
    await said(fake, ALICE.id, "in progress at a time")
    fake.send_user_message(group, ALICE, "/cancel", chat_type="supergroup")
    await said(fake, group, "Stopping your job")

    # Telegram's flood control answers 429: the rate limiter waits and retries.
    fake.fail_next("sendMessage", retry_after=1)
    fake.send_user_message(ALICE.id, ALICE, "/styles")
    await said(fake, ALICE.id, "Styles here: demo")
    assert [c.status for c in fake.calls_to("sendMessage")[-2:]] == [429, 200]
    # A reply that cannot be sent at all is logged; the bot carries on.
    fake.fail_next("sendMessage", times=2, error_code=400, description="Bad Request: not enough rights")
    fake.send_user_message(ALICE.id, ALICE, "/style demo")
    await fake.wait_for(lambda calls: [c.status for c in fake.calls_to("sendMessage")[-2:]] == [400, 400])
    fake.send_user_message(ALICE.id, ALICE, "hello")  # a private chat: no command gets the help
    await said(fake, ALICE.id, "Send a selfie with /toon")
