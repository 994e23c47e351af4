"""The Telegram front end: python-telegram-bot v22 in front of the command core.

Commands come as text (``/blend 16``, ``/edit smile 2``, ``/toon@Bot`` in groups), as a photo or file caption
(``/toon fast``),
or as a reply to a photo or file (``/toon`` answering a photo, ``/finetune name`` answering a .zip). Each command
and each button press runs as its own task, so a slow toon never holds up anyone else.

Telegram has no ephemeral messages. A button press answers its callback query with the core's first ephemeral
reply (a toast only the presser sees); every other ephemeral reply is an ordinary message answering the command.

``TELEGRAM_API_BASE_URL`` / ``TELEGRAM_FILE_BASE_URL`` point the bot at a local Bot API server
(e.g. ``http://localhost:8081/bot`` and ``http://localhost:8081/file/bot``), which lifts the 20 MB download cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from telegram import (
    Bot,
    BotCommand,
    CallbackQuery,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    ReplyParameters,
    Update,
    User,
)
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.error import BadRequest, TelegramError
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, CallbackQueryHandler, MessageHandler, filters

from backend.delivery import Address, DeliveryRecord
from backend.errors import BadInputError
from backend.service import Actor, Place, ToonService
from bots.core import (
    ORIGIN,
    Command,
    CommandCore,
    Reply,
    Upload,
    drain,
    keep_deliveries,
    parse_text_command,
    run_command,
)
from bots.strings import t

log = logging.getLogger("toonify.bots.telegram")

PUBLIC_API = "https://api.telegram.org/bot"
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile on the public Bot API
LOCAL_DOWNLOAD_LIMIT = 2000 * 1000 * 1000  # a local Bot API server
PHOTO_LIMIT = 10 * 1000 * 1000  # sendPhoto; bigger results go out as files
CAPTION_LIMIT, TEXT_LIMIT, ANSWER_LIMIT = 1024, 4096, 200
ANSWER_DEADLINE_S = 5.0  # a callback query left unanswered for long shows the user a spinner, then expires
POLL_TIMEOUT_S = 20
COMMANDS = {  # the menu set with setMyCommands (texts in bots.strings); /start is Telegram's own: /help
    name: t(f"cmd_{name}")
    for name in (
        *("toon", "blend", "edit", "sweep", "style", "styles", "cancel", "forget", "help"),
        *("finetune", "distill", "publish", "poll"),  # admins
    )
}
KNOWN = {*COMMANDS, "start"}


@dataclass
class MessageRef:
    """A message the bot sent; ``media`` when its text is a caption (photo or file)."""

    chat_id: int
    message_id: int
    media: bool


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int) -> str:
    """``text`` cut to Telegram's limit, which counts UTF-16 code units."""
    if _utf16_len(text) <= limit:
        return text
    out, used = [], 1  # room for the ellipsis
    for ch in text:
        used += _utf16_len(ch)
        if used > limit:
            break
        out.append(ch)
    return "".join(out) + "…"


def _keyboard(reply: Reply) -> InlineKeyboardMarkup | None:
    if not reply.buttons:
        return None  # editing without a keyboard removes the old one (the cancel button, say)
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(b.label, callback_data=b.action) for b in row] for row in reply.buttons]
    )


def _not_modified(e: BadRequest) -> bool:
    return "not modified" in e.message.lower()


class TelegramConversation:
    """The core's Conversation in one chat: for a command (replies answer its message) or a button press."""

    photos_per_message = 1  # each photo is its own message (only the first carries text and buttons)

    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        *,
        upload_limit: int,
        reply_to: int | None = None,
        thread_id: int | None = None,
        query: CallbackQuery | None = None,
        origin: MessageRef | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.upload_limit = upload_limit
        self.reply_to = reply_to
        self.thread_id = thread_id
        self.query = query
        self.origin = origin
        self._answered = query is None
        self._answer_lock = asyncio.Lock()

    # ------------------------------------------------------------------ callback queries

    async def answer(self, text: str | None = None) -> bool:
        """Answer the button's callback query once (True when this call did), with ``text`` as a toast."""
        async with self._answer_lock:
            if self._answered:
                return False
            self._answered = True
        long = text is not None and len(text) > ANSWER_LIMIT
        try:
            await self.query.answer(_fit(text, ANSWER_LIMIT) if text else None, show_alert=long)
        except TelegramError as e:  # an expired query must not stop the work behind it
            log.info("answering a callback query failed: %s", e)
        return True

    async def answer_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.answer()

    # ------------------------------------------------------------------ Conversation

    async def send(self, reply: Reply) -> MessageRef | None:
        if self.query is not None:
            if reply.ephemeral and not reply.images and await self.answer(reply.text):
                return None  # shown to the presser alone
            await self.answer()
        if reply.animation is not None:
            return await self._send_animation(reply)
        if not reply.images:
            msg = await self.bot.send_message(
                self.chat_id,
                _fit(reply.text, TEXT_LIMIT),
                reply_markup=_keyboard(reply),
                **self._where(reply=not reply.continues),
            )
            return MessageRef(self.chat_id, msg.message_id, media=False)
        return await self._send_images(reply)

    async def edit(self, handle: Any, reply: Reply) -> None:
        ref: MessageRef | None = self.origin if handle == ORIGIN else handle
        if ref is None:
            return  # an ephemeral reply has nothing to edit
        markup = _keyboard(reply)
        try:
            if reply.images and not ref.media:
                # A text message cannot become a photo: post the photo, move the handle there, drop the text.
                new = await self._send_images(reply)
                old, ref.message_id, ref.media = ref.message_id, new.message_id, True
                with contextlib.suppress(TelegramError):
                    await self.bot.delete_message(ref.chat_id, old)
            elif reply.images:
                name, data = reply.images[0]
                media = InputMediaPhoto(data, caption=_fit(reply.text, CAPTION_LIMIT), filename=name)
                await self.bot.edit_message_media(media, ref.chat_id, ref.message_id, reply_markup=markup)
            elif ref.media:
                caption = _fit(reply.text, CAPTION_LIMIT)
                await self.bot.edit_message_caption(ref.chat_id, ref.message_id, caption=caption, reply_markup=markup)
            else:
                text = _fit(reply.text, TEXT_LIMIT)
                await self.bot.edit_message_text(text, ref.chat_id, ref.message_id, reply_markup=markup)
        except BadRequest as e:
            if not _not_modified(e):
                raise

    async def working(self) -> None:
        await self.bot.send_chat_action(self.chat_id, ChatAction.UPLOAD_PHOTO, message_thread_id=self.thread_id)

    def address(self, handle: Any) -> Address | None:
        if not isinstance(handle, MessageRef):
            return None  # an ephemeral reply (a toast): nothing to come back to
        extra = {"thread_id": self.thread_id, "media": handle.media, "upload_limit": self.upload_limit}
        reply_to = str(self.reply_to) if self.reply_to is not None else None
        return Address("telegram", str(handle.chat_id), str(handle.message_id), reply_to, extra)

    @classmethod
    def reopen(cls, bot: Bot, record: DeliveryRecord) -> tuple[TelegramConversation, MessageRef]:
        """The conversation and progress message of a recorded delivery (after a restart)."""
        a = record.address
        conv = cls(
            bot,
            int(a.chat_id),
            upload_limit=int(a.extra.get("upload_limit") or DOWNLOAD_LIMIT),
            reply_to=int(a.reply_to) if a.reply_to else None,
            thread_id=a.extra.get("thread_id"),
        )
        return conv, MessageRef(int(a.chat_id), int(a.progress_message_id), bool(a.extra.get("media")))

    # ------------------------------------------------------------------ helpers

    def _where(self, *, reply: bool = True) -> dict[str, Any]:
        where: dict[str, Any] = {"message_thread_id": self.thread_id}
        if reply and self.reply_to is not None:
            where["reply_parameters"] = ReplyParameters(self.reply_to, allow_sending_without_reply=True)
        return where

    async def _send_images(self, reply: Reply) -> MessageRef:
        """The first image carries the text and the buttons; the others (face crops) follow as plain photos."""
        (name, data), *rest = reply.images
        fits = _utf16_len(reply.text) <= CAPTION_LIMIT
        caption = (reply.text or None) if fits else None
        where = self._where(reply=not reply.continues)
        first = await self._send_image(name, data, caption, _keyboard(reply), where)
        if not fits:
            await self.bot.send_message(self.chat_id, _fit(reply.text, TEXT_LIMIT), **self._where(reply=False))
        for extra_name, extra in rest:
            await self._send_image(extra_name, extra, None, None, self._where(reply=False))
        return MessageRef(self.chat_id, first.message_id, media=True)

    async def _send_animation(self, reply: Reply) -> MessageRef:
        """A /sweep: sendAnimation (a GIF plays in the chat), captioned with the text when it fits."""
        name, data = reply.animation
        fits = _utf16_len(reply.text) <= CAPTION_LIMIT
        where = self._where(reply=not reply.continues)
        msg = await self.bot.send_animation(
            self.chat_id,
            data,
            caption=(reply.text or None) if fits else None,
            filename=name,
            reply_markup=_keyboard(reply),
            **where,
        )
        if not fits:
            await self.bot.send_message(self.chat_id, _fit(reply.text, TEXT_LIMIT), **self._where(reply=False))
        return MessageRef(self.chat_id, msg.message_id, media=True)

    async def _send_image(
        self, name: str, data: bytes, caption: str | None, markup: InlineKeyboardMarkup | None, where: dict[str, Any]
    ) -> Message:
        if len(data) <= PHOTO_LIMIT:
            try:
                return await self.bot.send_photo(
                    self.chat_id, data, caption=caption, filename=name, reply_markup=markup, **where
                )
            except BadRequest as e:  # e.g. PHOTO_INVALID_DIMENSIONS: a file still gets through
                if "photo" not in e.message.lower():
                    raise
        return await self.bot.send_document(
            self.chat_id, data, caption=caption, filename=name, reply_markup=markup, **where
        )


class TelegramFrontEnd:
    """Turns updates into core commands and button presses; keeps the tasks they run in."""

    def __init__(self, core: CommandCore, *, upload_limit: int) -> None:
        self.core = core
        self.upload_limit = upload_limit
        self.tasks: set[asyncio.Task] = set()

    def install(self, app: Application) -> None:
        app.add_handler(
            MessageHandler(
                filters.UpdateType.MESSAGE & (filters.TEXT | filters.PHOTO | filters.Document.ALL), self.on_message
            )
        )
        app.add_handler(CallbackQueryHandler(self.on_button))
        app.add_error_handler(self.on_error)

    # ------------------------------------------------------------------ updates

    async def on_message(self, update: Update, context: Any) -> None:
        msg = update.message
        if msg is None or msg.from_user is None:
            return
        chat, user, bot = msg.chat, msg.from_user, context.bot
        text = msg.text or msg.caption or ""
        parsed = parse_text_command(text, bot.username)
        if parsed is None:
            if chat.type != ChatType.PRIVATE:
                return  # groups: commands only (and not another bot's)
            image = msg.photo or (msg.document and (msg.document.mime_type or "").startswith("image/"))
            if not image and (not msg.text or msg.text.startswith("/")):
                return  # some other file, or another bot's command
            parsed = ("toon", []) if image else ("help", [])  # a private chat: a photo means /toon
        name, args = parsed
        if chat.type != ChatType.PRIVATE and name not in KNOWN and "@" not in text.split(maxsplit=1)[0]:
            return  # another bot's command in a shared group
        locale = user.language_code or "en"
        cmd = Command(
            name=name,
            args=args,
            actor=await self._actor(bot, user, chat, msg),
            place=self._place(chat),
            upload=self._upload(msg, locale) or (msg.reply_to_message and self._upload(msg.reply_to_message, locale)),
            locale=locale,
        )
        thread = msg.message_thread_id if msg.is_topic_message else None
        conv = TelegramConversation(
            bot, chat.id, upload_limit=self.upload_limit, reply_to=msg.message_id, thread_id=thread
        )
        self.keep(await run_command(self.core, cmd, conv))

    async def on_button(self, update: Update, context: Any) -> None:
        query = update.callback_query
        msg = query.message
        if msg is None or not query.data:  # an inline-mode message: not ours
            await query.answer()
            return
        chat, user = msg.chat, query.from_user
        media = isinstance(msg, Message) and bool(msg.photo or msg.document)
        thread = msg.message_thread_id if isinstance(msg, Message) and msg.is_topic_message else None
        conv = TelegramConversation(
            context.bot,
            chat.id,
            upload_limit=self.upload_limit,
            reply_to=msg.message_id,
            thread_id=thread,
            query=query,
            origin=MessageRef(chat.id, msg.message_id, media),
        )
        actor = await self._actor(context.bot, user, chat, None)
        press = self._press(query.data, actor, self._place(chat), conv, user.language_code or "en")
        self.keep(asyncio.create_task(press, name=f"button {query.data} by {user.id}"))

    async def on_error(self, update: object, context: Any) -> None:
        log.error("telegram update failed: %s", update, exc_info=context.error)

    async def _press(
        self, action: str, actor: Actor, place: Place | None, conv: TelegramConversation, locale: str
    ) -> None:
        deadline = asyncio.create_task(conv.answer_after(ANSWER_DEADLINE_S))
        try:
            await self.core.press(action, actor, place, conv, locale)
        finally:
            deadline.cancel()
            await conv.answer()  # always answered, even when the core said nothing

    # ------------------------------------------------------------------ translation

    @staticmethod
    async def _actor(bot: Bot, user: User, chat: Chat, msg: Message | None) -> Actor:
        return Actor("telegram", str(user.id), user.full_name, await _is_admin(bot, user, chat, msg))

    @staticmethod
    def _place(chat: Chat) -> Place | None:
        if chat.type == ChatType.PRIVATE:
            return None
        return Place("telegram", str(chat.id), chat.title or "")

    @staticmethod
    def _upload(msg: Message, locale: str) -> Upload | None:
        if msg.photo:
            media, filename, content_type = msg.photo[-1], "photo.jpg", "image/jpeg"  # the largest size
        elif msg.document:
            media = msg.document
            filename, content_type = media.file_name or "file", media.mime_type
        else:
            return None

        async def fetch() -> bytes:
            try:
                file = await media.get_file()
            except BadRequest as e:
                if "too big" not in e.message.lower():
                    raise
                size = f"{media.file_size / 2**20:.1f}" if media.file_size else f"over {DOWNLOAD_LIMIT >> 20}"
                raise BadInputError(t("too_big", locale, size=size, limit=DOWNLOAD_LIMIT >> 20)) from e
            return bytes(await file.download_as_bytearray())

        return Upload(filename, content_type, media.file_size, fetch)

    # ------------------------------------------------------------------ tasks

    def keep(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())


async def _is_admin(bot: Bot, user: User, chat: Chat, msg: Message | None) -> bool:
    """Whether the chat's administrators include ``user`` (never in a private chat)."""
    if chat.type not in (ChatType.GROUP, ChatType.SUPERGROUP):
        return False
    if msg is not None and msg.sender_chat is not None and msg.sender_chat.id == chat.id:
        return True  # an anonymous admin, posting as the group itself
    try:
        member = await bot.get_chat_member(chat.id, user.id)
    except TelegramError as e:
        log.warning("getChatMember(%s, %s) failed: %s", chat.id, user.id, e)
        return False
    return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)


def build_application(token: str, *, base_url: str | None = None, base_file_url: str | None = None) -> Application:
    builder = (
        ApplicationBuilder()
        .token(token)
        .rate_limiter(AIORateLimiter(max_retries=3))
        .concurrent_updates(True)  # a slow command never queues the next update behind it
        .media_write_timeout(120)  # a big result on a slow link takes longer than the 20 s default
    )
    if base_url:
        builder = builder.base_url(base_url)
    if base_file_url:
        builder = builder.base_file_url(base_file_url)
    return builder.build()


async def run_telegram(
    service: ToonService,
    token: str,
    stop: asyncio.Event,
    *,
    base_url: str | None = None,
    base_file_url: str | None = None,
) -> None:
    """Long-poll Telegram with ``token`` until ``stop`` is set; then stop polling, let the running commands finish
    for ``shutdown_grace_s`` (what is left is released for the next start to carry on), and stop the app."""
    base_url = base_url or os.environ.get("TELEGRAM_API_BASE_URL") or None
    base_file_url = base_file_url or os.environ.get("TELEGRAM_FILE_BASE_URL") or None
    local = bool(base_url) and not base_url.startswith(PUBLIC_API)
    core = CommandCore(service)
    front = TelegramFrontEnd(core, upload_limit=LOCAL_DOWNLOAD_LIMIT if local else DOWNLOAD_LIMIT)
    app = build_application(token, base_url=base_url, base_file_url=base_file_url)
    front.install(app)
    stop_resuming = asyncio.Event()
    async with app:
        try:
            await app.bot.set_my_commands([BotCommand(name, text) for name, text in COMMANDS.items()])
        except TelegramError as e:  # the menu is a nicety: the bot works without it
            log.warning("setMyCommands failed: %s", e)
        await app.start()
        resuming = asyncio.create_task(
            keep_deliveries(
                core, "telegram", lambda r: TelegramConversation.reopen(app.bot, r), front.keep, stop_resuming
            ),
            name="telegram deliveries",
        )
        try:
            await app.updater.start_polling(
                timeout=POLL_TIMEOUT_S, allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY]
            )
            log.info("telegram: polling as @%s", app.bot.username)
            await stop.wait()
        finally:
            if app.updater.running:  # no new updates; those fetched so far are confirmed and still handled
                await app.updater.stop()
            stop_resuming.set()
            await resuming
            await drain(front.tasks, service.rt.settings.shutdown_grace_s)
            await app.stop()
