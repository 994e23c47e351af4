"""A local fake of the Telegram Bot API, served over real HTTP, for end-to-end tests of python-telegram-bot bots.

Point the bot at it with ``ApplicationBuilder().token(fake.token).base_url(fake.base_url)
.base_file_url(fake.base_file_url)``, inject user activity with :meth:`FakeTelegram.send_user_message` and
:meth:`FakeTelegram.press_button`, then assert on :attr:`FakeTelegram.calls` and
:meth:`FakeTelegram.sent_messages`.

What it models (enough for PTB to parse every answer into its own objects):

* ``getMe``, ``deleteWebhook``, ``getWebhookInfo``, long-poll ``getUpdates`` (``offset`` confirms, ``timeout`` waits);
* ``sendMessage``, ``editMessageText``, ``editMessageCaption``, ``editMessageReplyMarkup``, ``editMessageMedia``,
  ``deleteMessage``, ``sendPhoto``, ``sendDocument``, ``sendAnimation`` (a GIF or a soundless video: the message
  carries ``animation`` and, as Telegram's does, ``document``), ``sendPoll``, ``sendChatAction``;
* ``getFile`` plus downloads under ``/file/bot<token>/<file_path>``, ``answerCallbackQuery``;
* ``getChatMember``, ``getChatAdministrators``, ``setMyCommands``, ``getMyCommands``, ``deleteMyCommands``.

:meth:`FakeTelegram.slow_down` makes a method answer late (a slow upload), to widen the window of a test.

Errors use the real API's status codes and descriptions: 401 for a wrong token, 404 for an unknown method,
400 "message is not modified", "message to edit not found", "chat not found", "file is too big", and injected
429s with ``retry_after`` (:meth:`FakeTelegram.fail_next`).

PTB sends parameters form-encoded (``application/x-www-form-urlencoded``), or ``multipart/form-data`` as soon
as a file is uploaded; every non-string value (ints, bools, ``reply_markup``...) is JSON-encoded inside its form
field. The fake decodes both, and plain JSON bodies too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import socket
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_TOKEN = "123456:TEST"
MAX_DOWNLOAD_SIZE = 20 * 1024 * 1024  # getFile refuses bigger files ("file is too big")
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are exactly the same "
    "as a current content and reply markup of the message"
)

# Form fields that are plain strings: PTB does not JSON-encode str values, so "123" or "true" stay text here.
_STRING_PARAMS = frozenset(
    {
        "text",
        "caption",
        "parse_mode",
        "callback_query_id",
        "action",
        "photo",
        "document",
        "animation",
        "file_id",
        "url",
        "question",
        "emoji",
        "language_code",
        "inline_message_id",
        "business_connection_id",
        "message_effect_id",
        "explanation",
        "explanation_parse_mode",
        "question_parse_mode",
        "title",
        "description",
        "short_description",
        "name",
        "secret_token",
        "ip_address",
    }
)
_JSON_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null")
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
_PHOTO_SIDES = (90, 320, 800)  # thumbnail sizes Telegram generates below the original


@dataclass(frozen=True)
class FakeUser:
    """A Telegram user as the fake puts it into updates."""

    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False

    def to_api(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            data["username"] = self.username
        return data


@dataclass(frozen=True)
class UploadedFile:
    """One multipart file part of a request."""

    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Call:
    """One recorded Bot API request. Unpacks as ``method, params, files``."""

    method: str
    params: dict[str, Any]
    files: dict[str, UploadedFile]
    status: int = 200
    result: Any = None  # the ``result`` on success, else the error ``description``
    at: float = 0.0  # time.monotonic() when the request arrived

    def __iter__(self):
        return iter((self.method, self.params, self.files))

    @property
    def ok(self) -> bool:
        return self.status == 200

    def __repr__(self) -> str:
        params = {k: (v if len(repr(v)) < 80 else repr(v)[:77] + "...") for k, v in self.params.items()}
        files = {k: f"<{len(f.data)} bytes {f.filename!r}>" for k, f in self.files.items()}
        tail = "" if self.ok else f" -> {self.status} {self.result!r}"
        return f"Call({self.method} {params}{' ' + str(files) if files else ''}{tail})"


@dataclass(frozen=True)
class SentMessage:
    """A snapshot of the current state of one message the bot sent."""

    chat_id: int
    message_id: int
    text: str | None
    caption: str | None
    photo: bytes | None
    document: bytes | None
    document_name: str | None
    mime_type: str | None
    reply_markup: dict[str, Any] | None
    parse_mode: str | None
    reply_to_message_id: int | None
    edit_count: int
    deleted: bool
    poll: dict[str, Any] | None = None
    animation: bytes | None = None  # sendAnimation's file (its bytes are also ``document``)

    @property
    def buttons(self) -> list[tuple[str, str | None]]:
        """Inline keyboard buttons, row by row, as ``(text, callback_data)``."""
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [(b.get("text", ""), b.get("callback_data")) for row in rows for b in row]


@dataclass
class _StoredFile:
    file_id: str
    file_unique_id: str
    data: bytes
    file_path: str


@dataclass
class _Message:
    chat_id: int
    message_id: int
    sender: FakeUser
    date: int
    text: str | None = None
    entities: list[dict[str, Any]] | None = None
    caption: str | None = None
    caption_entities: list[dict[str, Any]] | None = None
    photo_sizes: list[dict[str, Any]] | None = None
    photo_bytes: bytes | None = None
    document: dict[str, Any] | None = None
    document_bytes: bytes | None = None
    animation: dict[str, Any] | None = None
    animation_bytes: bytes | None = None
    poll: dict[str, Any] | None = None
    reply_markup: dict[str, Any] | None = None
    parse_mode: str | None = None
    reply_to: _Message | None = None
    edit_count: int = 0
    edit_date: int | None = None
    deleted: bool = False
    media_ref: str | None = None  # the file_id string the media was sent with, if any

    @property
    def has_media(self) -> bool:
        return self.photo_sizes is not None or self.document is not None or self.animation is not None

    def to_api(self, chat: dict[str, Any], *, nested: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "message_id": self.message_id,
            "from": self.sender.to_api(),
            "chat": chat,
            "date": self.date,
        }
        for key in ("text", "entities", "caption", "caption_entities", "document", "animation", "poll", "reply_markup"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.photo_sizes is not None:
            data["photo"] = self.photo_sizes
        if self.edit_date is not None:
            data["edit_date"] = self.edit_date
        if self.reply_to is not None and not nested:
            data["reply_to_message"] = self.reply_to.to_api(chat, nested=True)
        return data

    def snapshot(self) -> SentMessage:
        return SentMessage(
            chat_id=self.chat_id,
            message_id=self.message_id,
            text=self.text,
            caption=self.caption,
            photo=self.photo_bytes,
            document=self.document_bytes,
            document_name=(self.document or {}).get("file_name"),
            mime_type=(self.document or {}).get("mime_type"),
            reply_markup=self.reply_markup,
            parse_mode=self.parse_mode,
            reply_to_message_id=self.reply_to.message_id if self.reply_to else None,
            edit_count=self.edit_count,
            deleted=self.deleted,
            poll=self.poll,
            animation=self.animation_bytes,
        )


class ApiError(Exception):
    """Raised inside method handlers; becomes ``{"ok": false, ...}`` with the given status."""

    def __init__(self, error_code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters


def _bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


def _decode_field(key: str, value: str) -> Any:
    if key in _STRING_PARAMS:
        return value
    stripped = value.strip()
    if stripped.startswith(("{", "[")) or _JSON_SCALAR.fullmatch(stripped):
        try:
            return json.loads(stripped)
        except ValueError:
            return value
    return value


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _command_entities(text: str | None) -> list[dict[str, Any]] | None:
    if not text or not text.startswith("/"):
        return None
    word = text.split(maxsplit=1)[0]
    return [{"type": "bot_command", "offset": 0, "length": _utf16_len(word)}]


def _photo_variants(data: bytes) -> list[tuple[bytes, int, int]]:
    """The sizes Telegram would list for a photo, smallest first; the last one is the original bytes.

    Decodable images get real JPEG thumbnails (so a bot that picks ``photo[0]`` gets a small picture, as in
    production); anything else is listed three times with nominal sizes, all pointing at the same bytes.
    """
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            variants = []
            for side in _PHOTO_SIDES:
                if side >= max(width, height):
                    break
                thumb = image.convert("RGB")
                thumb.thumbnail((side, side))
                buf = io.BytesIO()
                thumb.save(buf, format="JPEG", quality=80)
                variants.append((buf.getvalue(), *thumb.size))
            return [*variants, (data, width, height)]
    except Exception:
        return [(data, side, side) for side in _PHOTO_SIDES]


def _animation_type(data: bytes) -> str:
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "video/mp4"


def _animation_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, duration in whole seconds) of a GIF or WebP animation; nominal values for anything else."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            total_ms = 0
            for i in range(getattr(image, "n_frames", 1)):
                image.seek(i)
                total_ms += int(image.info.get("duration", 0) or 0)
            return width, height, max(1, round(total_ms / 1000))
    except Exception:
        return 320, 320, 1


class FakeTelegram:
    """A fake Bot API server on ``127.0.0.1`` (free port). Use as ``async with FakeTelegram() as fake:``."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        bot_username: str = "fake_test_bot",
        bot_first_name: str = "Fake Test Bot",
        max_file_size: int = MAX_DOWNLOAD_SIZE,
        record_get_updates: bool = False,
    ):
        self.token = token
        bot_id = int(token.split(":", 1)[0]) if token.split(":", 1)[0].isdigit() else 123456
        self.bot_user = FakeUser(bot_id, bot_first_name, bot_username, is_bot=True)
        self.max_file_size = max_file_size
        self.record_get_updates = record_get_updates
        self.calls: list[Call] = []
        self._chats: dict[int, dict[str, Any]] = {}
        self._members: dict[int, dict[int, FakeUser]] = defaultdict(dict)
        self._owners: dict[int, FakeUser] = {}
        self._admins: dict[int, dict[int, FakeUser]] = defaultdict(dict)
        self._users: dict[int, FakeUser] = {}
        self._messages: dict[tuple[int, int], _Message] = {}
        self._next_message_id: dict[int, int] = defaultdict(lambda: 1)
        self._files: dict[str, _StoredFile] = {}
        self._paths: dict[str, _StoredFile] = {}
        self._file_counter = itertools.count(1)
        self._update_counter = itertools.count(1)
        self._query_counter = itertools.count(1)
        self._updates: deque[dict[str, Any]] = deque()
        self._delivered_update_id = 0
        self._queries: dict[str, bool] = {}  # callback query id -> answered
        self._commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._failures: dict[str, deque[ApiError]] = defaultdict(deque)
        self._delays: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._handlers: dict[str, Callable[[dict[str, Any], dict[str, UploadedFile]], Any]] = {
            name.lower(): getattr(self, f"_m_{name}")
            for name in (
                "getMe",
                "deleteWebhook",
                "getWebhookInfo",
                "getUpdates",
                "sendMessage",
                "editMessageText",
                "editMessageCaption",
                "editMessageReplyMarkup",
                "editMessageMedia",
                "deleteMessage",
                "sendPhoto",
                "sendDocument",
                "sendAnimation",
                "sendPoll",
                "sendChatAction",
                "getFile",
                "answerCallbackQuery",
                "getChatMember",
                "getChatAdministrators",
                "setMyCommands",
                "getMyCommands",
                "deleteMyCommands",
            )
        }

    # ------------------------------------------------------------------ server lifecycle

    async def start(self) -> FakeTelegram:
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=64 * 1024 * 1024)  # aiohttp's default is 1 MiB: too small
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_download)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._closing = False
        return self

    async def stop(self) -> None:
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeTelegram is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # ------------------------------------------------------------------ test-side API

    def add_chat(
        self, chat_id: int, *, chat_type: str = "private", title: str | None = None, user: FakeUser | None = None
    ) -> dict[str, Any]:
        """Make a chat known (sending to an unknown chat fails with "chat not found", as in production)."""
        if chat_id in self._chats:
            return self._chats[chat_id]
        if chat_type == "private":
            user = user or self._users.get(chat_id) or FakeUser(chat_id, f"User {chat_id}")
            chat = {"id": chat_id, "type": "private", "first_name": user.first_name}
            if user.username:
                chat["username"] = user.username
        elif chat_type in ("group", "supergroup", "channel"):
            chat = {"id": chat_id, "type": chat_type, "title": title or f"Test {chat_type} {chat_id}"}
        else:
            raise ValueError(f"unknown chat type {chat_type!r}")
        self._chats[chat_id] = chat
        return chat

    def set_admins(
        self,
        chat_id: int,
        admins: Iterable[FakeUser],
        *,
        owner: FakeUser | None = None,
        chat_type: str = "supergroup",
        title: str | None = None,
    ) -> None:
        """Configure the administrators (and optionally the creator) of a group chat, adding the chat if new."""
        self.add_chat(chat_id, chat_type=chat_type, title=title)
        self._admins[chat_id] = {u.id: u for u in admins}
        for user in self._admins[chat_id].values():
            self._users.setdefault(user.id, user)
        if owner is not None:
            self._owners[chat_id] = owner
            self._users.setdefault(owner.id, owner)

    def add_file(self, data: bytes, *, file_path: str | None = None) -> str:
        """Store bytes as a Telegram file and return its file_id (``file_path`` defaults to ``photos/file_N.jpg``)."""
        pattern = file_path.replace("{", "{{").replace("}", "}}") if file_path else "photos/file_{n}.jpg"
        return self._store_file(data, pattern).file_id

    def file_bytes(self, file_id: str) -> bytes:
        return self._files[file_id].data

    def send_user_message(
        self,
        chat_id: int,
        user: FakeUser,
        text: str | None = None,
        *,
        photo: bytes | None = None,
        document: tuple[bytes, str, str] | None = None,
        caption: str | None = None,
        reply_to_message_id: int | None = None,
        chat_type: str = "private",
        chat_title: str | None = None,
    ) -> int:
        """Queue a ``message`` update from ``user`` in ``chat_id``; returns the update_id."""
        if text is None and photo is None and document is None:
            raise ValueError("a message needs text, photo or document")
        if text is not None and (photo is not None or document is not None):
            raise ValueError("text goes with neither photo nor document: use caption")
        self._users[user.id] = user
        chat = self.add_chat(chat_id, chat_type=chat_type, title=chat_title, user=user)
        if chat["type"] != chat_type:
            raise ValueError(f"chat {chat_id} is a {chat['type']}, not a {chat_type}")
        if chat_type != "private":
            self._members[chat_id][user.id] = user
        msg = self._new_message(chat_id, user)
        msg.text, msg.entities = text, _command_entities(text)
        if photo is not None or document is not None:
            msg.caption, msg.caption_entities = caption, _command_entities(caption)
        if photo is not None:
            msg.photo_bytes = photo
            msg.photo_sizes = self._photo_sizes(photo)
        if document is not None:
            data, filename, mime = document
            msg.document, msg.document_bytes = self._document_dict(data, filename, mime), data
        if reply_to_message_id is not None:
            msg.reply_to = self._get_message(chat_id, reply_to_message_id, "message to be replied not found")
        return self._queue_update({"message": msg.to_api(self._chats[chat_id])})

    def press_button(self, chat_id: int, user: FakeUser, message_id: int, data: str) -> int:
        """Queue a ``callback_query`` update for an inline button of a bot message; returns the update_id."""
        msg = self._messages.get((chat_id, message_id))
        if msg is None or msg.deleted:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        rows = (msg.reply_markup or {}).get("inline_keyboard", [])
        datas = [b.get("callback_data") for row in rows for b in row]
        if data not in datas:
            raise ValueError(f"message {message_id} has no button with callback_data {data!r} (has {datas})")
        self._users[user.id] = user
        query_id = f"{next(self._query_counter)}{user.id}"
        self._queries[query_id] = False
        query = {
            "id": query_id,
            "from": user.to_api(),
            "message": msg.to_api(self._chats[chat_id]),
            "chat_instance": f"ci{chat_id}",
            "data": data,
        }
        return self._queue_update({"callback_query": query})

    def sent_messages(self, chat_id: int, *, include_deleted: bool = False) -> list[SentMessage]:
        """The current state of every message the bot sent to ``chat_id``, oldest first."""
        return [
            m.snapshot()
            for (cid, _), m in sorted(self._messages.items())
            if cid == chat_id and m.sender.is_bot and (include_deleted or not m.deleted)
        ]

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def commands(self, *, scope: dict[str, Any] | None = None, language_code: str = "") -> list[dict[str, Any]]:
        return list(self._commands.get(self._commands_key(scope, language_code), []))

    def fail_next(
        self,
        method: str,
        times: int = 1,
        *,
        error_code: int = 429,
        description: str | None = None,
        retry_after: int = 1,
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail; by default with 429 and ``retry_after``."""
        parameters = {"retry_after": retry_after} if error_code == 429 else None
        if description is None:
            description = f"Too Many Requests: retry after {retry_after}" if error_code == 429 else "Bad Request"
        for _ in range(times):
            self._failures[method.lower()].append(ApiError(error_code, description, parameters))

    def slow_down(self, method: str, seconds: float) -> None:
        """Answer every later call of ``method`` only after ``seconds`` (0: at once again). The call is recorded on
        arrival and takes effect after the delay even when the client has gone meanwhile, like a request that
        reached Telegram just before the bot died."""
        self._delays[method.lower()] = seconds

    @property
    def pending_updates(self) -> int:
        return sum(1 for u in self._updates if u["update_id"] > self._delivered_update_id)

    async def wait_for(self, predicate: Callable[[list[Call]], Any], timeout: float = 30) -> Any:
        """Wait until ``predicate(calls)`` is truthy and return its value; TimeoutError shows the last calls."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(list(self.calls))
            if value:
                return value
            if time.monotonic() >= deadline:
                last = "\n  ".join(repr(c) for c in self.calls[-15:]) or "(none)"
                raise TimeoutError(f"condition not met within {timeout} s; last calls:\n  {last}")
            await asyncio.sleep(0.05)

    async def wait_for_call(self, method: str, *, count: int = 1, timeout: float = 30) -> Call:
        """Wait for the ``count``-th call of ``method`` (successful or not) and return it."""

        def nth(calls: list[Call]) -> Call | None:
            matching = [c for c in calls if c.method.lower() == method.lower()]
            return matching[count - 1] if len(matching) >= count else None

        return await self.wait_for(nth, timeout)

    async def wait_delivered(self, update_id: int, timeout: float = 30) -> None:
        """Wait until getUpdates has handed out ``update_id`` (the bot received it, maybe not handled it yet)."""
        deadline = time.monotonic() + timeout
        while self._delivered_update_id < update_id:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"update {update_id} not fetched within {timeout} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ HTTP layer

    def _error_response(self, error: ApiError) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": error.error_code, "description": error.description}
        if error.parameters:
            body["parameters"] = error.parameters
        return web.json_response(body, status=error.error_code)

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
        params: dict[str, Any] = {k: _decode_field(k, v) for k, v in request.query.items()}
        files: dict[str, UploadedFile] = {}
        if not request.body_exists:
            return params, files
        if request.content_type == "application/json":
            body = await request.json()
            if not isinstance(body, dict):
                raise _bad("parameters must be a JSON object")
            params.update(body)
        else:  # application/x-www-form-urlencoded or multipart/form-data
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = UploadedFile(value.filename, value.content_type, value.file.read())
                else:
                    params[key] = _decode_field(key, value if isinstance(value, str) else value.decode())
        return params, files

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._error_response(ApiError(401, "Unauthorized"))
        method = request.match_info["method"]
        call = Call(method, {}, {}, at=time.monotonic())
        try:
            call.params, call.files = await self._read_params(request)
            record = self.record_get_updates or method.lower() != "getupdates"
            if record:
                self.calls.append(call)
            handler = self._handlers.get(method.lower())
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            failures = self._failures.get(method.lower())
            if failures:
                raise failures.popleft()
            if self._delays.get(method.lower()):
                await asyncio.shield(asyncio.sleep(self._delays[method.lower()]))
            call.result = await handler(call.params, call.files)
        except ApiError as error:
            call.status, call.result = error.error_code, error.description
            return self._error_response(error)
        return web.json_response({"ok": True, "result": call.result})

    async def _handle_download(self, request: web.Request) -> web.Response:
        stored = self._paths.get(request.match_info["path"])
        if request.match_info["token"] != self.token or stored is None:
            return self._error_response(ApiError(404, "Not Found"))
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # ------------------------------------------------------------------ state helpers

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _queue_update(self, payload: dict[str, Any]) -> int:
        update_id = next(self._update_counter)
        self._updates.append({"update_id": update_id, **payload})
        self._notify()
        return update_id

    def _store_file(self, data: bytes, path_pattern: str) -> _StoredFile:
        n = next(self._file_counter)
        path = path_pattern.format(n=n)
        if path in self._paths:
            raise ValueError(f"file_path {path!r} is already used")
        stored = _StoredFile(f"FAKE-FILE-{n:05d}", f"U{n:05d}", data, path)
        self._files[stored.file_id] = stored
        self._paths[path] = stored
        return stored

    def _photo_sizes(self, data: bytes, existing: _StoredFile | None = None) -> list[dict[str, Any]]:
        sizes = []
        variants = _photo_variants(data)
        for i, (blob, width, height) in enumerate(variants):
            if existing is not None and i == len(variants) - 1:
                stored = existing
            else:
                stored = self._store_file(blob, "photos/file_{n}.jpg")
            sizes.append(
                {
                    "file_id": stored.file_id,
                    "file_unique_id": stored.file_unique_id,
                    "width": width,
                    "height": height,
                    "file_size": len(blob),
                }
            )
        return sizes

    def _document_dict(
        self, data: bytes, filename: str | None, mime: str | None, existing: _StoredFile | None = None
    ) -> dict[str, Any]:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename or "file")
        stored = existing or self._store_file(data, "documents/file_{n}_" + safe.replace("{", "").replace("}", ""))
        doc: dict[str, Any] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(data),
        }
        if filename:
            doc["file_name"] = filename
        if mime:
            doc["mime_type"] = mime
        return doc

    def _new_message(self, chat_id: int, sender: FakeUser) -> _Message:
        message_id = self._next_message_id[chat_id]
        self._next_message_id[chat_id] = message_id + 1
        msg = _Message(chat_id, message_id, sender, int(time.time()))
        self._messages[(chat_id, message_id)] = msg
        return msg

    def _get_message(self, chat_id: int, message_id: Any, missing: str) -> _Message:
        msg = self._messages.get((chat_id, message_id)) if isinstance(message_id, int) else None
        if msg is None or msg.deleted:
            raise _bad(missing)
        return msg

    def _chat_id(self, params: dict[str, Any]) -> int:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise _bad("chat_id is empty")
        if isinstance(raw, str) and raw.startswith("@"):
            for chat in self._chats.values():
                if chat.get("username", "").lower() == raw[1:].lower():
                    return chat["id"]
            raise _bad("chat not found")
        try:
            chat_id = int(raw)
        except (TypeError, ValueError):
            raise _bad("chat not found") from None
        if chat_id not in self._chats:
            raise _bad("chat not found")
        return chat_id

    def _user_id(self, params: dict[str, Any]) -> int:
        try:
            return int(params["user_id"])
        except (KeyError, TypeError, ValueError):
            raise _bad("invalid user_id specified") from None

    @staticmethod
    def _check_text(text: Any, *, caption: bool = False) -> str | None:
        if text is None:
            return None
        text = str(text)
        limit, what = (1024, "message caption is too long") if caption else (4096, "message is too long")
        if _utf16_len(text) > limit:
            raise _bad(what)
        return text

    @staticmethod
    def _check_markup(markup: Any) -> dict[str, Any] | None:
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _bad("can't parse reply keyboard markup JSON object")
        for row in markup.get("inline_keyboard", []):
            for button in row:
                data = button.get("callback_data")
                if data is not None and not 1 <= len(str(data).encode()) <= 64:
                    raise _bad("BUTTON_DATA_INVALID")
        return markup

    def _reply_target(self, chat_id: int, params: dict[str, Any]) -> _Message | None:
        reply = params.get("reply_parameters")
        allow = bool(params.get("allow_sending_without_reply"))
        target_id = params.get("reply_to_message_id")
        if isinstance(reply, dict):
            target_id = reply.get("message_id")
            allow = allow or bool(reply.get("allow_sending_without_reply"))
        if target_id is None:
            return None
        msg = self._messages.get((chat_id, target_id))
        if msg is None or msg.deleted:
            if allow:
                return None
            raise _bad("message to be replied not found")
        return msg

    def _resolve_media(self, value: Any, files: dict[str, UploadedFile], name: str) -> tuple[UploadedFile, Any]:
        """The upload for a media parameter, and the stored file when it was given by file_id."""
        if name in files and value is None:
            return files[name], None
        if isinstance(value, str) and value.startswith("attach://"):
            part = files.get(value.removeprefix("attach://"))
            if part is None:
                raise _bad(f"can't find attached file {value!r}")
            return part, None
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            raise _bad("failed to get HTTP URL content")
        if isinstance(value, str) and value:
            stored = self._files.get(value)
            if stored is None:
                raise _bad("wrong file identifier/HTTP URL specified")
            return UploadedFile(stored.file_path.rsplit("/", 1)[-1], None, stored.data), stored
        raise _bad(f"there is no {name} in the request")

    def _set_media(
        self, msg: _Message, kind: str, upload: UploadedFile, stored: _StoredFile | None, media_ref: str | None
    ) -> None:
        msg.photo_sizes = msg.photo_bytes = msg.document = msg.document_bytes = None
        msg.animation = msg.animation_bytes = None
        if kind == "photo":
            msg.photo_bytes = upload.data
            msg.photo_sizes = self._photo_sizes(upload.data, stored)
        elif kind == "document":
            mime = upload.content_type or "application/octet-stream"
            msg.document = self._document_dict(upload.data, upload.filename, mime, stored)
            msg.document_bytes = upload.data
        elif kind == "animation":
            mime = upload.content_type or _animation_type(upload.data)
            msg.document = self._document_dict(upload.data, upload.filename, mime, stored)
            msg.document_bytes = msg.animation_bytes = upload.data
            width, height, duration = _animation_size(upload.data)
            msg.animation = {**msg.document, "width": width, "height": height, "duration": duration}
        else:
            raise _bad(f"unsupported media type {kind!r}")
        msg.media_ref = media_ref

    def _editable(self, params: dict[str, Any]) -> _Message:
        if params.get("inline_message_id"):
            raise _bad("inline messages are not supported by the fake")
        chat_id = self._chat_id(params)
        msg = self._get_message(chat_id, params.get("message_id"), "message to edit not found")
        if not msg.sender.is_bot:
            raise _bad("message can't be edited")
        return msg

    def _after_edit(self, msg: _Message) -> dict[str, Any]:
        msg.edit_count += 1
        msg.edit_date = int(time.time())
        return msg.to_api(self._chats[msg.chat_id])

    @staticmethod
    def _commands_key(scope: Any, language_code: Any) -> tuple[str, str]:
        scope = scope or {"type": "default"}
        return json.dumps(scope, sort_keys=True), str(language_code or "")

    def _member(self, chat_id: int, user: FakeUser) -> dict[str, Any]:
        owner = self._owners.get(chat_id)
        if owner is not None and owner.id == user.id:
            return {"status": "creator", "user": user.to_api(), "is_anonymous": False}
        if user.id in self._admins.get(chat_id, {}):
            rights = dict.fromkeys(
                (
                    "can_manage_chat",
                    "can_delete_messages",
                    "can_manage_video_chats",
                    "can_restrict_members",
                    "can_change_info",
                    "can_invite_users",
                    "can_pin_messages",
                ),
                True,
            )
            flags = ("can_be_edited", "is_anonymous", "can_promote_members")
            rights |= dict.fromkeys((*flags, "can_post_stories", "can_edit_stories", "can_delete_stories"), False)
            return {"status": "administrator", "user": user.to_api(), **rights}
        chat = self._chats[chat_id]
        in_chat = (
            user.id == self.bot_user.id
            or user.id in self._members.get(chat_id, {})
            or (chat["type"] == "private" and user.id == chat_id)
        )
        return {"status": "member" if in_chat else "left", "user": user.to_api()}

    # ------------------------------------------------------------------ Bot API methods

    async def _m_getMe(self, params, files):
        return {
            **self.bot_user.to_api(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _m_deleteWebhook(self, params, files):
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _m_getWebhookInfo(self, params, files):
        return {"url": "", "has_custom_certificate": False, "pending_update_count": self.pending_updates}

    async def _m_getUpdates(self, params, files):
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = max(0.0, float(params.get("timeout") or 0))
        if offset > 0:
            while self._updates and self._updates[0]["update_id"] < offset:
                self._updates.popleft()
        elif offset < 0:
            while len(self._updates) > -offset:
                self._updates.popleft()
        deadline = time.monotonic() + timeout
        while not self._updates and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        batch = list(itertools.islice(self._updates, limit))
        if batch:
            self._delivered_update_id = max(self._delivered_update_id, batch[-1]["update_id"])
        return batch

    async def _m_sendMessage(self, params, files):
        chat_id = self._chat_id(params)
        text = self._check_text(params.get("text"))
        if not text or not text.strip():
            raise _bad("message text is empty")
        markup = self._check_markup(params.get("reply_markup"))
        reply_to = self._reply_target(chat_id, params)
        msg = self._new_message(chat_id, self.bot_user)
        msg.text, msg.entities, msg.parse_mode = text, params.get("entities"), params.get("parse_mode")
        msg.reply_markup, msg.reply_to = markup, reply_to
        return msg.to_api(self._chats[chat_id])

    async def _send_media(self, kind: str, params, files):
        chat_id = self._chat_id(params)
        caption = self._check_text(params.get("caption"), caption=True)
        markup = self._check_markup(params.get("reply_markup"))
        upload, stored = self._resolve_media(params.get(kind), files, kind)
        if not upload.data:
            raise _bad("file must be non-empty")
        reply_to = self._reply_target(chat_id, params)
        msg = self._new_message(chat_id, self.bot_user)
        self._set_media(msg, kind, upload, stored, params.get(kind) if stored else None)
        msg.caption, msg.caption_entities = caption, params.get("caption_entities")
        msg.parse_mode, msg.reply_markup, msg.reply_to = params.get("parse_mode"), markup, reply_to
        return msg.to_api(self._chats[chat_id])

    async def _m_sendPhoto(self, params, files):
        return await self._send_media("photo", params, files)

    async def _m_sendDocument(self, params, files):
        return await self._send_media("document", params, files)

    async def _m_sendAnimation(self, params, files):
        return await self._send_media("animation", params, files)

    async def _m_sendPoll(self, params, files):
        chat_id = self._chat_id(params)
        question = params.get("question")
        options = params.get("options") or []
        if not question:
            raise _bad("poll question must be non-empty")
        if not 2 <= len(options) <= 12:
            raise _bad(
                "poll must have at least 2 option" if len(options) < 2 else "poll can't have more than 12 options"
            )
        texts = [o.get("text") if isinstance(o, dict) else str(o) for o in options]
        msg = self._new_message(chat_id, self.bot_user)
        msg.poll = {
            "id": f"poll{chat_id}_{msg.message_id}",
            "question": str(question),
            "options": [{"text": t, "voter_count": 0, "persistent_id": str(i)} for i, t in enumerate(texts)],
            "total_voter_count": 0,
            "is_closed": bool(params.get("is_closed", False)),
            "is_anonymous": bool(params.get("is_anonymous", True)),
            "type": params.get("type") or "regular",
            "allows_multiple_answers": bool(params.get("allows_multiple_answers", False)),
            "allows_revoting": bool(params.get("allows_revoting", True)),  # required by Bot API 9.6 / PTB 22.8
            "members_only": bool(params.get("members_only", False)),  # required by Bot API 10.0
        }
        msg.reply_markup = self._check_markup(params.get("reply_markup"))
        return msg.to_api(self._chats[chat_id])

    async def _m_editMessageText(self, params, files):
        msg = self._editable(params)
        text = self._check_text(params.get("text"))
        if not text or not text.strip():
            raise _bad("message text is empty")
        if msg.text is None:
            raise _bad("there is no text in the message to edit")
        markup = self._check_markup(params.get("reply_markup"))
        entities = params.get("entities")
        old = (msg.text, msg.entities, msg.parse_mode, msg.reply_markup)
        if (text, entities, params.get("parse_mode"), markup) == old:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        msg.text, msg.entities, msg.parse_mode, msg.reply_markup = text, entities, params.get("parse_mode"), markup
        return self._after_edit(msg)

    async def _m_editMessageCaption(self, params, files):
        msg = self._editable(params)
        if not msg.has_media:
            raise _bad("there is no caption in the message to edit")
        caption = self._check_text(params.get("caption"), caption=True)
        markup = self._check_markup(params.get("reply_markup"))
        entities = params.get("caption_entities")
        if (caption, entities, markup) == (msg.caption, msg.caption_entities, msg.reply_markup):
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        msg.caption, msg.caption_entities, msg.reply_markup = caption, entities, markup
        msg.parse_mode = params.get("parse_mode")
        return self._after_edit(msg)

    async def _m_editMessageReplyMarkup(self, params, files):
        msg = self._editable(params)
        markup = self._check_markup(params.get("reply_markup"))
        if markup == msg.reply_markup:
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        msg.reply_markup = markup
        return self._after_edit(msg)

    async def _m_editMessageMedia(self, params, files):
        msg = self._editable(params)
        media = params.get("media")
        if not isinstance(media, dict) or "type" not in media:
            raise _bad("can't parse InputMedia JSON object")
        if msg.poll is not None or msg.text is not None:
            raise _bad("there is no media in the message to edit")
        kind = media["type"]
        upload, stored = self._resolve_media(media.get("media"), files, kind)
        caption = self._check_text(media.get("caption"), caption=True)
        markup = self._check_markup(params.get("reply_markup"))
        ref = media.get("media") if stored else None
        if ref is not None and (ref, caption, markup) == (msg.media_ref, msg.caption, msg.reply_markup):
            raise _bad(NOT_MODIFIED.removeprefix("Bad Request: "))
        self._set_media(msg, kind, upload, stored, ref)
        msg.caption, msg.caption_entities = caption, media.get("caption_entities")
        msg.parse_mode, msg.reply_markup = media.get("parse_mode"), markup
        return self._after_edit(msg)

    async def _m_deleteMessage(self, params, files):
        chat_id = self._chat_id(params)
        msg = self._get_message(chat_id, params.get("message_id"), "message to delete not found")
        msg.deleted = True
        return True

    async def _m_sendChatAction(self, params, files):
        self._chat_id(params)
        if not params.get("action"):
            raise _bad("wrong parameter action in request")
        return True

    async def _m_getFile(self, params, files):
        stored = self._files.get(params.get("file_id") or "")
        if stored is None:
            raise _bad("invalid file_id")
        if len(stored.data) > self.max_file_size:
            raise _bad("file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.data),
            "file_path": stored.file_path,
        }

    async def _m_answerCallbackQuery(self, params, files):
        query_id = str(params.get("callback_query_id") or "")
        if self._queries.get(query_id, True):
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        text = params.get("text")
        if text is not None and len(str(text)) > 200:
            raise _bad("MESSAGE_TOO_LONG")
        self._queries[query_id] = True
        return True

    async def _m_getChatMember(self, params, files):
        chat_id = self._chat_id(params)
        user_id = self._user_id(params)
        user = self.bot_user if user_id == self.bot_user.id else self._users.get(user_id)
        if user is None:
            raise _bad("user not found")
        return self._member(chat_id, user)

    async def _m_getChatAdministrators(self, params, files):
        chat_id = self._chat_id(params)
        if self._chats[chat_id]["type"] == "private":
            raise _bad("there are no administrators in the private chat")
        users = ([self._owners[chat_id]] if chat_id in self._owners else []) + list(self._admins[chat_id].values())
        return [self._member(chat_id, u) for u in users]

    async def _m_setMyCommands(self, params, files):
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad("can't parse commands JSON array" if not isinstance(commands, list) else "BOT_COMMANDS_TOO_MUCH")
        for command in commands:
            if not isinstance(command, dict) or not _COMMAND_NAME.fullmatch(str(command.get("command", ""))):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad("command description is empty" if not command.get("description") else "BOT_COMMAND_INVALID")
        self._commands[self._commands_key(params.get("scope"), params.get("language_code"))] = commands
        return True

    async def _m_getMyCommands(self, params, files):
        return self._commands.get(self._commands_key(params.get("scope"), params.get("language_code")), [])

    async def _m_deleteMyCommands(self, params, files):
        self._commands.pop(self._commands_key(params.get("scope"), params.get("language_code")), None)
        return True
