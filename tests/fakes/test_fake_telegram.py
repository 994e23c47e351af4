"""The fake Bot API server, proven against a real python-telegram-bot Application over HTTP (no Toonify code)."""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
import pytest
import pytest_asyncio
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, InputMediaPhoto, Update
from telegram.constants import ChatAction
from telegram.error import BadRequest, InvalidToken
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from tests.fakes.telegram import NOT_MODIFIED, FakeTelegram, FakeUser

ALICE = FakeUser(1001, "Alice", "alice")
BOB = FakeUser(1002, "Bob")
GROUP = -100123


def jpeg(width: int = 200, height: int = 150) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest_asyncio.fixture
async def fake():
    async with FakeTelegram() as server:
        yield server


def build_app(fake: FakeTelegram, **kw) -> Application:
    builder = ApplicationBuilder().token(fake.token).base_url(fake.base_url).base_file_url(fake.base_file_url)
    if "rate_limiter" in kw:
        builder = builder.rate_limiter(kw["rate_limiter"])
    return builder.build()


def bot_for(fake: FakeTelegram) -> Bot:
    return Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)


@pytest.mark.asyncio
async def test_raw_http_errors_and_encodings(fake: FakeTelegram):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{fake.port}/bot999:WRONG/getMe") as resp:
            assert resp.status == 401
            assert await resp.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        async with http.post(f"{fake.base_url}{fake.token}/noSuchMethod") as resp:
            assert resp.status == 404
            assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        async with http.get(f"{fake.base_url}{fake.token}/getMe") as resp:
            me = (await resp.json())["result"]
            assert me["is_bot"] and me["id"] == 123456 and me["username"] == "fake_test_bot"

        fake.add_chat(ALICE.id)
        # JSON body: values arrive typed.
        async with http.post(f"{fake.base_url}{fake.token}/sendMessage", json={"chat_id": ALICE.id, "text": "1"}) as r:
            assert (await r.json())["result"]["message_id"] == 1
        # Form body, PTB style: strings raw, everything else JSON-encoded; "2" stays text.
        markup = '{"inline_keyboard": [[{"text": "go", "callback_data": "go"}]]}'
        form = {"chat_id": str(ALICE.id), "text": "2", "reply_markup": markup}
        async with http.post(f"{fake.base_url}{fake.token}/sendMessage", data=form) as r:
            result = (await r.json())["result"]
            assert result["text"] == "2" and result["message_id"] == 2 and result["from"]["is_bot"]
        assert fake.calls[-1].params == {"chat_id": ALICE.id, "text": "2", "reply_markup": {"inline_keyboard": [
            [{"text": "go", "callback_data": "go"}]]}}  # fmt: skip
        # Unknown chat, and a download of a missing file.
        async with http.post(f"{fake.base_url}{fake.token}/sendMessage", json={"chat_id": 5, "text": "x"}) as r:
            assert r.status == 400 and (await r.json())["description"] == "Bad Request: chat not found"
        async with http.get(f"{fake.base_file_url}{fake.token}/photos/nope.jpg") as r:
            assert r.status == 404

        # Long poll: returns as soon as an update arrives, and offset confirms earlier ones.
        first = fake.send_user_message(ALICE.id, ALICE, "hi")
        async with http.post(f"{fake.base_url}{fake.token}/getUpdates", data={"timeout": "5"}) as r:
            updates = (await r.json())["result"]
        assert [u["update_id"] for u in updates] == [first]
        assert updates[0]["message"]["text"] == "hi" and updates[0]["message"]["message_id"] == 3

        started = time.monotonic()
        pending = http.post(f"{fake.base_url}{fake.token}/getUpdates", data={"offset": str(first + 1), "timeout": "5"})
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0.2)
        second = fake.send_user_message(ALICE.id, ALICE, "/start now")
        async with await task as r:
            updates = (await r.json())["result"]
        assert time.monotonic() - started < 2
        assert [u["update_id"] for u in updates] == [second]
        assert updates[0]["message"]["entities"] == [{"type": "bot_command", "offset": 0, "length": 6}]
        assert fake.pending_updates == 0


@pytest.mark.asyncio
async def test_application_end_to_end(fake: FakeTelegram):
    not_modified: list[str] = []
    errors: list[BaseException] = []
    downloaded: list[bytes] = []

    async def start(update: Update, context) -> None:
        msg = await update.message.reply_text("Hello")
        msg = await msg.edit_text("Hello, working")
        try:
            await msg.edit_text("Hello, working")
        except BadRequest as exc:
            not_modified.append(exc.message)

    async def on_photo(update: Update, context) -> None:
        await update.message.reply_chat_action(ChatAction.UPLOAD_PHOTO)
        file = await update.message.photo[-1].get_file()
        data = bytes(await file.download_as_bytearray())
        downloaded.append(data)
        keyboard = InlineKeyboardMarkup(
            [[InlineKeyboardButton("Again", callback_data="again"), InlineKeyboardButton("Done", callback_data="done")]]
        )
        await update.message.reply_photo(data, caption="Your toon", reply_markup=keyboard)

    async def on_button(update: Update, context) -> None:
        query = update.callback_query
        await query.answer(f"chose {query.data}")
        await query.edit_message_caption(f"Chose {query.data}")

    async def on_error(update, context) -> None:
        errors.append(context.error)

    app = build_app(fake)
    app.add_handler(CommandHandler("start", start))
    app.add_handler(MessageHandler(filters.PHOTO, on_photo))
    app.add_handler(CallbackQueryHandler(on_button))
    app.add_error_handler(on_error)

    photo = jpeg()
    async with app:
        await app.start()
        await app.updater.start_polling(poll_interval=0.0, timeout=1)
        try:
            await fake.wait_delivered(fake.send_user_message(ALICE.id, ALICE, "/start"), timeout=10)
            await fake.wait_for_call("editMessageText", count=2, timeout=10)

            fake.send_user_message(ALICE.id, ALICE, photo=photo, caption="me")
            sent_photo = await fake.wait_for_call("sendPhoto", timeout=10)

            reply = fake.sent_messages(ALICE.id)[-1]
            assert reply.buttons == [("Again", "again"), ("Done", "done")]
            fake.press_button(ALICE.id, ALICE, reply.message_id, "done")
            await fake.wait_for_call("editMessageCaption", timeout=10)

            # Group chat: commands come addressed to the bot.
            fake.send_user_message(GROUP, BOB, "/start@fake_test_bot", chat_type="group")
            await fake.wait_for(lambda calls: any(c.params.get("chat_id") == GROUP for c in calls), timeout=10)
            await fake.wait_for_call("editMessageText", count=4, timeout=10)
        finally:
            await app.updater.stop()
            await app.stop()

    assert errors == []
    # PTB strips "Bad Request: " and capitalises what is left.
    assert not_modified == ["M" + NOT_MODIFIED.removeprefix("Bad Request: m")] * 2  # private chat, then the group
    methods = [c.method for c in fake.calls if c.method not in ("getMe", "deleteWebhook")]
    assert methods[:9] == [
        "sendMessage",
        "editMessageText",
        "editMessageText",
        "sendChatAction",
        "getFile",
        "sendPhoto",
        "answerCallbackQuery",
        "editMessageCaption",
        "sendMessage",
    ]
    edits = fake.calls_to("editMessageText")
    assert [c.status for c in edits] == [200, 400, 200, 400]

    # The text message: sent, edited once (the identical edit did not count).
    text_msg = fake.sent_messages(ALICE.id)[0]
    assert (text_msg.message_id, text_msg.text, text_msg.edit_count) == (2, "Hello, working", 1)

    # The photo went out as a multipart upload of exactly the bytes the bot downloaded.
    assert downloaded == [photo]
    assert sent_photo.files["photo"].data == photo and sent_photo.params["caption"] == "Your toon"
    assert fake.calls_to("sendChatAction")[0].params["action"] == "upload_photo"
    photo_msg = fake.sent_messages(ALICE.id)[-1]
    assert photo_msg.photo == photo and photo_msg.caption == "Chose done" and photo_msg.edit_count == 1
    assert photo_msg.reply_markup is None  # editing the caption without a keyboard removes it, as in production
    answer = fake.calls_to("answerCallbackQuery")[0]
    assert answer.ok and answer.params["text"] == "chose done"

    # Message ids count per chat: user /start=1, bot reply=2, user photo=3, bot photo=4; the group starts over.
    assert [m.message_id for m in fake.sent_messages(ALICE.id)] == [2, 4]
    assert [m.message_id for m in fake.sent_messages(GROUP)] == [2]


@pytest.mark.asyncio
async def test_rate_limiter_retries_after_429(fake: FakeTelegram, monkeypatch):
    monkeypatch.setenv("PTB_TIMEDELTA", "1")  # opt in to RetryAfter.retry_after as a timedelta (silences a warning)
    fake.add_chat(ALICE.id)
    fake.fail_next("sendMessage", retry_after=1)
    app = build_app(fake, rate_limiter=AIORateLimiter(max_retries=2))
    async with app:
        msg = await app.bot.send_message(ALICE.id, "after the limit")
    calls = fake.calls_to("sendMessage")
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].result == "Too Many Requests: retry after 1"
    assert calls[1].at - calls[0].at >= 1.0
    assert msg.message_id == 1 and fake.sent_messages(ALICE.id)[0].text == "after the limit"


@pytest.mark.asyncio
async def test_files_edits_members_and_commands(fake: FakeTelegram):
    fake.send_user_message(ALICE.id, ALICE, document=(b"%PDF-1.4 tiny", "cv.pdf", "application/pdf"))
    fake.send_user_message(ALICE.id, ALICE, photo=jpeg(), caption="/toon arcane")
    async with bot_for(fake) as bot:
        updates = await bot.get_updates(timeout=0)
        doc_msg, photo_msg = (u.message for u in updates)
        assert doc_msg.document.file_name == "cv.pdf" and doc_msg.document.mime_type == "application/pdf"
        assert doc_msg.document.file_size == len(b"%PDF-1.4 tiny")
        assert [(p.width, p.height) for p in photo_msg.photo] == [(90, 68), (200, 150)]
        assert photo_msg.caption_entities[0].type == "bot_command"

        # The smallest size is a real thumbnail; the largest is the original bytes.
        small = await (await photo_msg.photo[0].get_file()).download_as_bytearray()
        assert bytes(small) != jpeg() and bytes(small)[:2] == b"\xff\xd8"

        # Send a document by upload, then the same file again by file_id.
        sent = await bot.send_document(ALICE.id, b"toon-bytes", filename="toon.png", caption="done")
        assert fake.calls[-1].files["document"].filename == "toon.png"
        again = await bot.send_document(ALICE.id, sent.document.file_id)
        assert fake.sent_messages(ALICE.id)[-1].document == b"toon-bytes" and again.message_id == sent.message_id + 1
        with pytest.raises(BadRequest, match=r"(?i)wrong file identifier"):
            await bot.send_photo(ALICE.id, "no-such-file")

        # A file the test put there, fetched and re-sent by file_id.
        file_id = fake.add_file(b"stored {bytes}", file_path="documents/{odd} name.bin")
        got = await bot.get_file(file_id)
        assert got.file_path.endswith("/documents/{odd} name.bin")
        assert bytes(await got.download_as_bytearray()) == b"stored {bytes}"
        await bot.send_photo(ALICE.id, file_id)
        assert fake.calls[-1].params["photo"] == file_id and fake.sent_messages(ALICE.id)[-1].photo == b"stored {bytes}"

        # getFile size limit, like the real 20 MB cap.
        fake.max_file_size = 10
        with pytest.raises(BadRequest, match=r"(?i)file is too big"):
            await bot.get_file(doc_msg.document.file_id)
        fake.max_file_size = 20 * 1024 * 1024

        # Edits: text on a media message, keyboard, media, delete.
        with pytest.raises(BadRequest, match=r"(?i)there is no text in the message to edit"):
            await bot.edit_message_text("x", chat_id=ALICE.id, message_id=sent.message_id)
        keyboard = InlineKeyboardMarkup.from_button(InlineKeyboardButton("Cancel", callback_data="cancel:42"))
        await bot.edit_message_reply_markup(ALICE.id, sent.message_id, reply_markup=keyboard)
        with pytest.raises(BadRequest, match=r"(?i)message is not modified"):
            await bot.edit_message_reply_markup(ALICE.id, sent.message_id, reply_markup=keyboard)
        with pytest.raises(BadRequest, match=r"(?i)BUTTON_DATA_INVALID"):
            too_long = InlineKeyboardButton("x", callback_data="x" * 65)
            await bot.send_message(ALICE.id, "too long data", reply_markup=InlineKeyboardMarkup([[too_long]]))
        new_photo = jpeg(64, 64)
        edited = await bot.edit_message_media(InputMediaPhoto(new_photo, caption="v2"), ALICE.id, sent.message_id)
        assert edited.caption == "v2" and edited.photo[-1].width == 64
        state = fake.sent_messages(ALICE.id)[0]
        assert state.photo == new_photo and state.document is None and state.edit_count == 2
        assert await bot.delete_message(ALICE.id, sent.message_id)
        with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
            await bot.edit_message_caption(ALICE.id, sent.message_id, caption="gone")
        assert [m.message_id for m in fake.sent_messages(ALICE.id)] == [again.message_id, again.message_id + 1]
        assert fake.sent_messages(ALICE.id, include_deleted=True)[0].deleted

        # Chat members and admins.
        fake.set_admins(GROUP, [BOB], owner=ALICE)
        admins = await bot.get_chat_administrators(GROUP)
        assert [(a.status, a.user.id) for a in admins] == [("creator", ALICE.id), ("administrator", BOB.id)]
        assert (await bot.get_chat_member(GROUP, BOB.id)).status == "administrator"
        assert (await bot.get_chat_member(ALICE.id, ALICE.id)).status == "member"
        with pytest.raises(BadRequest, match=r"(?i)no administrators in the private chat"):
            await bot.get_chat_administrators(ALICE.id)

        # Commands are recorded per scope and language.
        await bot.set_my_commands([("start", "Start"), ("toon", "Cartoonify a selfie")])
        assert [c.command for c in await bot.get_my_commands()] == ["start", "toon"]
        assert fake.commands() == [
            {"command": "start", "description": "Start"},
            {"command": "toon", "description": "Cartoonify a selfie"},
        ]
        poll = await bot.send_poll(GROUP, "Which style?", ["Arcane", "Pixar"])
        assert [o.text for o in poll.poll.options] == ["Arcane", "Pixar"]

        # Replying to a message, and answering a callback query twice.
        reply = await bot.send_message(ALICE.id, "re", reply_to_message_id=doc_msg.message_id)
        assert reply.reply_to_message.message_id == doc_msg.message_id
        with_keyboard = await bot.send_message(ALICE.id, "pick", reply_markup=keyboard)
        with pytest.raises(ValueError, match="no button"):
            fake.press_button(ALICE.id, BOB, with_keyboard.message_id, "cancel:43")
        update_id = fake.press_button(ALICE.id, BOB, with_keyboard.message_id, "cancel:42")
        (update,) = await bot.get_updates(offset=update_id, timeout=0)
        assert update.callback_query.message.reply_markup == keyboard and update.callback_query.from_user.id == BOB.id
        assert await update.callback_query.answer()
        with pytest.raises(BadRequest, match=r"(?i)query is too old"):
            await bot.answer_callback_query(update.callback_query.id)


@pytest.mark.asyncio
async def test_wait_for_times_out_with_the_last_calls(fake: FakeTelegram):
    fake.add_chat(ALICE.id)
    async with bot_for(fake) as bot:
        await bot.send_message(ALICE.id, "only this")
        with pytest.raises(TimeoutError, match="only this"):
            await fake.wait_for(lambda calls: len(fake.calls_to("sendPhoto")) > 0, timeout=0.2)
    with pytest.raises(InvalidToken):  # initialize() calls getMe; the 401 becomes InvalidToken
        async with Bot("1:bad", base_url=fake.base_url):
            pass
