"""A local fake Discord (REST API + gateway websocket) for end-to-end tests of a discord.py 2.x bot.

It speaks real HTTP and a real websocket on 127.0.0.1, so the bot under test runs unmodified: point discord.py at
it with :func:`point_discord_py_at` (it sets ``discord.http.Route.BASE`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``) or, for a bot in another process, with the variables from
:meth:`FakeDiscord.env`.

What it models (shapes follow the Discord API v10):

* Gateway: HELLO, IDENTIFY -> READY (guilds unavailable) + one GUILD_CREATE per guild, heartbeat ACKs, RESUME with
  replay, REQUEST_GUILD_MEMBERS -> GUILD_MEMBERS_CHUNK, RECONNECT on demand, close 4004 (bad token) and 4014
  (privileged intents off). Frames are plain TEXT JSON: discord.py asks for ``compress=zlib-stream`` (or
  ``zstd-stream``) in the URL but only decompresses BINARY frames, so text frames need no compression.
* REST: login (``/users/@me``, ``/oauth2/applications/@me``), ``/gateway(/bot)``, application command sync, the
  interaction callback, the interaction webhook (``@original``, followups, webhook message edits), channel messages
  (bot token), ``GET /channels/{id}``, and downloads of every attachment it knows, uploaded or added by the test.
* Interaction lifecycle rules: one callback per interaction (40060), the optional 3 s callback deadline (10062),
  expired tokens (401, 50027), the first followup after a "thinking" defer replacing the loading message,
  content/embeds/size validation (50035, 50006, 40005).

Everything the bot does is recorded in :attr:`FakeDiscord.calls` and :attr:`FakeDiscord.messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import io
import json
import mimetypes
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

__all__ = [
    "ADMINISTRATOR",
    "DEFAULT_APP_PERMISSIONS",
    "DEFAULT_MEMBER_PERMISSIONS",
    "Call",
    "FakeAttachment",
    "FakeDiscord",
    "FakeMessage",
    "Upload",
    "point_discord_py_at",
]

DISCORD_EPOCH_MS = 1_420_070_400_000
API_VERSION = 10

# Gateway opcodes.
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# Gateway intents.
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_IS_COMPONENTS_V2 = 1 << 15
_SETTABLE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_IS_COMPONENTS_V2

# Interaction types and callback types.
INTERACTION_PING = 1
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
INTERACTION_MODAL_SUBMIT = 5
CALLBACK_PONG = 1
CALLBACK_CHANNEL_MESSAGE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE_MESSAGE = 6
CALLBACK_UPDATE_MESSAGE = 7
CALLBACK_AUTOCOMPLETE_RESULT = 8
CALLBACK_MODAL = 9

# Permission bits.
_P_ADD_REACTIONS = 1 << 6
_P_VIEW_CHANNEL = 1 << 10
_P_SEND_MESSAGES = 1 << 11
_P_EMBED_LINKS = 1 << 14
_P_ATTACH_FILES = 1 << 15
_P_READ_MESSAGE_HISTORY = 1 << 16
_P_USE_EXTERNAL_EMOJIS = 1 << 18
_P_USE_APPLICATION_COMMANDS = 1 << 31
_P_SEND_MESSAGES_IN_THREADS = 1 << 38
ADMINISTRATOR = "8"
#: What an ordinary member without roles may do in a text channel (the ``member.permissions`` string).
DEFAULT_MEMBER_PERMISSIONS = str(
    _P_ADD_REACTIONS
    | _P_VIEW_CHANNEL
    | _P_SEND_MESSAGES
    | _P_EMBED_LINKS
    | _P_ATTACH_FILES
    | _P_READ_MESSAGE_HISTORY
    | _P_USE_EXTERNAL_EMOJIS
    | _P_USE_APPLICATION_COMMANDS
    | _P_SEND_MESSAGES_IN_THREADS
)
#: What the bot may do in the channel (the interaction's ``app_permissions``).
DEFAULT_APP_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS

# Application flags: the three "limited" privileged-intent flags mean "enabled" for a bot in < 100 guilds.
_APP_FLAGS_PRIVILEGED = (1 << 13) | (1 << 15) | (1 << 19)
_APP_FLAG_COMMAND_BADGE = 1 << 23

_MAX_CONTENT = 2000
_MAX_EMBEDS = 10
_INTERACTION_TOKEN_PREFIX = "aW50ZXJhY3Rpb246"  # base64 of "interaction:", as real tokens start


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class _Snowflakes:
    """Real-shaped, strictly increasing snowflakes (so ``discord.utils.snowflake_time`` gives now)."""

    def __init__(self) -> None:
        self._last = 0
        self._increment = 0

    def __call__(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        self._increment = (self._increment + 1) & 0xFFF
        value = (ms << 22) | (1 << 17) | (1 << 12) | self._increment
        if value <= self._last:
            value = self._last + 1
        self._last = value
        return str(value)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height
    except Exception:
        return None, None


def _guess_type(filename: str, declared: str | None = None) -> str:
    guessed = mimetypes.guess_type(filename)[0]
    if guessed:
        return guessed
    if declared and declared != "application/octet-stream":
        return declared
    return "application/octet-stream"


def _walk_components(components: Iterable[dict]) -> Iterator[dict]:
    """Every component, nested ones included (action rows, sections, containers, labels)."""
    for comp in components or ():
        if not isinstance(comp, dict):
            continue
        yield comp
        yield from _walk_components(comp.get("components") or ())
        for key in ("accessory", "component"):
            if isinstance(comp.get(key), dict):
                yield from _walk_components([comp[key]])


class _HTTPError(Exception):
    def __init__(self, status: int, code: int, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors:
            self.body["errors"] = errors


def _form_error(field: str, code: str, message: str) -> _HTTPError:
    return _HTTPError(400, 50035, "Invalid Form Body", {field: {"_errors": [{"code": code, "message": message}]}})


def _unknown_message() -> _HTTPError:
    return _HTTPError(404, 10008, "Unknown Message")


@dataclasses.dataclass
class Upload:
    """A file part of a multipart request (``files[n]``)."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclasses.dataclass(eq=False)
class Call:
    """One HTTP request the fake received. Unpacks as ``method, path, json, files``.

    ``path`` is relative to ``/api/v10`` for API routes (``/interactions/1/tok/callback``) and the full path for
    attachment downloads (``/attachments/...``). ``json`` is the JSON body or the multipart ``payload_json``.
    """

    method: str
    path: str
    json: Any
    files: list[Upload]
    query: dict[str, str]
    status: int = 0
    response: Any = None
    at: float = dataclasses.field(default_factory=time.monotonic)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.method, self.path, self.json, self.files))


@dataclasses.dataclass(eq=False)
class FakeAttachment:
    id: str
    filename: str
    content_type: str
    data: bytes
    url: str
    proxy_url: str
    description: str | None = None
    width: int | None = None
    height: int | None = None
    ephemeral: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.proxy_url,
            "content_type": self.content_type,
        }
        if self.width is not None:
            payload["width"] = self.width
            payload["height"] = self.height
            payload["placeholder"] = "2PcFBQAAAAAAAAAAAAAAAAAAAAA="
            payload["placeholder_version"] = 1
        if self.description is not None:
            payload["description"] = self.description
        if self.ephemeral:
            payload["ephemeral"] = True
        return payload


@dataclasses.dataclass(eq=False)
class FakeMessage:
    """Current state of one message.

    ``via`` says how the bot made it: ``"interaction"`` (an interaction callback: the original response),
    ``"followup"`` (POST to the interaction webhook), ``"channel"`` (bot token, ``/channels/{id}/messages``), or
    ``"user"`` (a test-side :meth:`FakeDiscord.user_message`). ``history`` holds the payload of every earlier
    version; ``edits`` counts the edits.
    """

    id: str
    channel_id: str
    guild_id: str | None
    author: dict[str, Any]
    via: str
    type: int = 0
    content: str = ""
    embeds: list[dict] = dataclasses.field(default_factory=list)
    components: list[dict] = dataclasses.field(default_factory=list)
    attachments: list[FakeAttachment] = dataclasses.field(default_factory=list)
    flags: int = 0
    poll: dict | None = None
    message_reference: dict | None = None
    webhook_id: str | None = None
    application_id: str | None = None
    interaction_metadata: dict | None = None
    interaction_id: str | None = None
    interaction_token: str | None = None
    edits: int = 0
    deleted: bool = False
    timestamp: str = dataclasses.field(default_factory=_now_iso)
    edited_timestamp: str | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    @property
    def files(self) -> list[bytes]:
        """The bytes of each attachment, in order."""
        return [a.data for a in self.attachments]

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & FLAG_LOADING)

    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in _walk_components(self.components) if "custom_id" in c]

    def find_component(self, custom_id: str) -> dict | None:
        for comp in _walk_components(self.components):
            if comp.get("custom_id") == custom_id:
                return comp
        return None

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "content": self.content,
            "channel_id": self.channel_id,
            "author": self.author,
            "attachments": [a.to_payload() for a in self.attachments],
            "embeds": self.embeds,
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
            "mention_everyone": False,
            "tts": False,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "flags": self.flags,
            "components": self.components,
        }
        if self.webhook_id is not None:
            payload["webhook_id"] = self.webhook_id
        if self.application_id is not None:
            payload["application_id"] = self.application_id
        if self.interaction_metadata is not None:
            meta = self.interaction_metadata
            payload["interaction_metadata"] = meta
            if "name" in meta:  # the deprecated ``interaction`` field exists for application commands only
                payload["interaction"] = {k: meta[k] for k in ("id", "type", "name", "user")}
        if self.message_reference is not None:
            payload["message_reference"] = self.message_reference
        if self.poll is not None:
            payload["poll"] = self.poll
        return payload


@dataclasses.dataclass(eq=False)
class _Interaction:
    id: str
    token: str
    type: int
    payload: dict[str, Any]
    user: dict[str, Any]
    channel_id: str
    guild_id: str | None
    created: float
    token_expires_at: float
    name: str | None = None
    message_id: str | None = None  # the message a component / modal-from-component interaction came from
    expired: bool = False
    response_type: int | None = None
    response_data: Any = None
    original_id: str | None = None
    modal: dict | None = None


@dataclasses.dataclass(eq=False)
class _Session:
    id: str
    intents: int
    identify: dict[str, Any]
    ws: web.WebSocketResponse | None = None
    seq: int = 0
    frames: list[dict] = dataclasses.field(default_factory=list)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    closed: bool = False


class FakeDiscord:
    """A fake Discord on 127.0.0.1 (free port): REST under :attr:`api_url`, gateway at :attr:`gateway_url`.

    One guild (:attr:`guild_id`, with text channel :attr:`channel_id`) and one ordinary user (:attr:`user`) exist
    from the start; add more with :meth:`add_guild`, :meth:`add_channel` and :meth:`add_user` before the bot connects.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_name: str = "Toonify Test Bot",
        guild_name: str = "Fake Guild",
        heartbeat_interval: float = 41.25,
        callback_deadline: float | None = None,
        token_lifetime: float = 15 * 60,
        privileged_intents: bool = True,
        attachment_size_limit: int = 10 * 1024 * 1024,
        echo_bot_messages: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.callback_deadline = callback_deadline
        self.token_lifetime = token_lifetime
        self.privileged_intents = privileged_intents
        self.attachment_size_limit = attachment_size_limit
        self.echo_bot_messages = echo_bot_messages
        self.host = host
        self._snowflake = _Snowflakes()

        self.application_id = self._snowflake()
        bot_username = bot_name.lower().replace(" ", "_")
        self.bot_user: dict[str, Any] = self._make_user(bot_username, bot_name, self.application_id)
        self.bot_user["bot"] = True
        self.owner: dict[str, Any] = self._make_user("app_owner", "App Owner")

        self.users: dict[str, dict] = {self.bot_user["id"]: self.bot_user, self.owner["id"]: self.owner}
        self.guilds: dict[str, dict] = {}
        self.guild_id = self.add_guild(guild_name)["id"]
        self.channel_id = self.guilds[self.guild_id]["channels"][0]["id"]
        self.user: dict[str, Any] = self.add_user("tester", "Tester")

        #: Every HTTP request, in order of arrival.
        self.calls: list[Call] = []
        #: Calls to routes the fake does not implement (they got a 404).
        self.unhandled: list[Call] = []
        #: IDENTIFY payloads (``d``) received, in order.
        self.identifies: list[dict] = []
        #: Every gateway frame received from the bot.
        self.gateway_received: list[dict] = []
        #: One entry per websocket connection: ``{"path", "query"}``.
        self.gateway_connections: list[dict] = []
        self.global_commands: list[dict] = []
        self.guild_commands: dict[str, list[dict]] = {}

        self._messages: dict[str, FakeMessage] = {}
        self._blobs: dict[str, FakeAttachment] = {}
        self._interactions: dict[str, _Interaction] = {}  # by token
        self._sessions: dict[str, _Session] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._routes = self._route_table()

    # ------------------------------------------------------------------ lifecycle

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/gateway"

    @property
    def resume_gateway_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/gateway-resume"

    def env(self) -> dict[str, str]:
        """Environment variables that point a bot process at this fake."""
        return {"DISCORD_API_BASE_URL": self.api_url, "DISCORD_GATEWAY_URL": self.gateway_url}

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/gateway-resume", self._gateway)
        app.router.add_route("*", f"/api/v{API_VERSION}/{{tail:.*}}", self._rest)
        app.router.add_get(r"/{kind:(media/)?(ephemeral-)?attachments}/{channel}/{aid}/{filename}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"fake discord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ world set-up

    def _make_user(self, username: str, global_name: str | None = None, user_id: str | None = None) -> dict:
        return {
            "id": user_id or self._snowflake(),
            "username": username,
            "global_name": global_name,
            "discriminator": "0",
            "avatar": None,
            "avatar_decoration_data": None,
            "banner": None,
            "accent_color": None,
            "public_flags": 0,
            "flags": 0,
            "bot": False,
        }

    def _make_member(self, user: dict, roles: Iterable[str] = ()) -> dict:
        return {
            "user": user,
            "roles": list(roles),
            "nick": None,
            "avatar": None,
            "banner": None,
            "joined_at": _now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }

    def add_guild(self, name: str, *, channels: Iterable[str] = ("general",)) -> dict:
        """A guild with the bot as a member, the existing users, an @everyone role and one text channel per name."""
        gid = self._snowflake()
        everyone = {
            "id": gid,
            "name": "@everyone",
            "permissions": DEFAULT_MEMBER_PERMISSIONS,
            "position": 0,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }
        guild = {"id": gid, "name": name, "owner_id": self.owner["id"], "roles": [everyone]}
        guild.update(channels=[], members=[])
        self.guilds[gid] = guild
        for channel_name in channels:
            self.add_channel(gid, channel_name)
        for user in self.users.values():
            guild["members"].append(self._make_member(user))
        return guild

    def add_channel(self, guild_id: str, name: str, *, type: int = 0) -> dict:
        guild = self.guilds[str(guild_id)]
        channel = {
            "id": self._snowflake(),
            "type": type,
            "guild_id": guild["id"],
            "name": name,
            "position": len(guild["channels"]),
            "permission_overwrites": [],
            "parent_id": None,
            "nsfw": False,
            "topic": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }
        guild["channels"].append(channel)
        return channel

    def add_user(
        self, username: str, global_name: str | None = None, *, guild_ids: Iterable[str] | None = None
    ) -> dict:
        """A user who is a member of the given guilds (all guilds by default). Add users before the bot connects."""
        user = self._make_user(username, global_name)
        self.users[user["id"]] = user
        for gid in self.guilds if guild_ids is None else [str(g) for g in guild_ids]:
            self.guilds[gid]["members"].append(self._make_member(user))
        return user

    def channel(self, channel_id: str | int) -> dict:
        for guild in self.guilds.values():
            for channel in guild["channels"]:
                if channel["id"] == str(channel_id):
                    return channel
        raise KeyError(f"no channel {channel_id}")

    def member(self, guild_id: str | int, user_id: str | int) -> dict | None:
        for member in self.guilds[str(guild_id)]["members"]:
            if member["user"]["id"] == str(user_id):
                return member
        return None

    def add_attachment(
        self,
        data: bytes,
        filename: str = "image.png",
        content_type: str | None = None,
        *,
        channel_id: str | None = None,
        ephemeral: bool = True,
        description: str | None = None,
    ) -> dict:
        """Store bytes the fake will serve, and return a real-shaped attachment object (``url``/``proxy_url`` point
        here). ``ephemeral`` (default) is how Discord marks files uploaded as slash-command options."""
        self._require_started()
        return self._store_attachment(
            data, filename, content_type, channel_id or self.channel_id, ephemeral, description
        ).to_payload()

    def _store_attachment(
        self,
        data: bytes,
        filename: str,
        content_type: str | None,
        channel_id: str,
        ephemeral: bool,
        description: str | None,
    ) -> FakeAttachment:
        aid = self._snowflake()
        width, height = _image_size(data)
        kind = "ephemeral-attachments" if ephemeral else "attachments"
        ex = int(time.time()) + 86400
        signature = f"?ex={ex:x}&is={int(time.time()):x}&hm={secrets.token_hex(32)}&"
        path = f"{kind}/{channel_id}/{aid}/{filename}"
        att = FakeAttachment(
            id=aid,
            filename=filename,
            content_type=content_type or _guess_type(filename),
            data=bytes(data),
            url=f"{self.base_url}/{path}{signature}",
            proxy_url=f"{self.base_url}/media/{path}{signature}",
            description=description,
            width=width,
            height=height,
            ephemeral=ephemeral,
        )
        self._blobs[aid] = att
        return att

    def _require_started(self) -> None:
        if not self.base_url:
            raise RuntimeError("start the FakeDiscord first")

    # ------------------------------------------------------------------ test-side inspection

    @property
    def messages(self) -> dict[str, FakeMessage]:
        """Every message the bot created (by id, in creation order), with its current state."""
        return {mid: m for mid, m in self._messages.items() if m.via != "user"}

    def message(self, message_id: str | int) -> FakeMessage:
        return self._messages[str(message_id)]

    def find_calls(self, method: str | None = None, path: str | None = None) -> list[Call]:
        """Calls with this method and a path matching the regex ``path`` (``re.search``)."""
        return [
            c
            for c in self.calls
            if (method is None or c.method == method.upper()) and (path is None or re.search(path, c.path))
        ]

    def _interaction_for(self, interaction: Mapping | str) -> _Interaction:
        token = interaction if isinstance(interaction, str) else interaction["token"]
        return self._interactions[token]

    def callbacks(self, interaction: Mapping | str) -> list[Call]:
        """The callback requests (any status) made for this interaction."""
        it = self._interaction_for(interaction)
        return self.find_calls("POST", rf"^/interactions/{it.id}/[^/]+/callback$")

    def response_type(self, interaction: Mapping | str) -> int | None:
        """The accepted callback type (4, 5, 6, 7, 8 or 9), or None before one."""
        return self._interaction_for(interaction).response_type

    def original_message(self, interaction: Mapping | str) -> FakeMessage | None:
        it = self._interaction_for(interaction)
        return self._messages.get(it.original_id) if it.original_id else None

    def followups(self, interaction: Mapping | str) -> list[FakeMessage]:
        it = self._interaction_for(interaction)
        return [m for m in self._messages.values() if m.via == "followup" and m.interaction_token == it.token]

    def modal(self, interaction: Mapping | str) -> dict | None:
        """The modal the bot answered this interaction with (callback type 9)."""
        return self._interaction_for(interaction).modal

    def expire_token(self, interaction_or_token: Mapping | str) -> None:
        """Kill an interaction token: webhook calls get 401 ``Invalid Webhook Token`` (50027), a callback gets 404
        ``Unknown interaction`` (10062)."""
        self._interaction_for(interaction_or_token).expired = True

    async def wait_for(self, predicate: Callable[..., Any], timeout: float = 30.0) -> Any:
        """Wait until ``predicate()`` (or ``predicate(fake)``) is truthy, re-checking after every request and
        gateway frame and every 50 ms; return its value. Raises TimeoutError listing the last calls."""
        wants_arg = len(inspect.signature(predicate).parameters) >= 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate(self) if wants_arg else predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n".join(f"  {c.status} {c.method} {c.path}" for c in self.calls[-15:])
                raise TimeoutError(f"condition not met within {timeout}s; last calls:\n{recent}")
            # Wake on any request/frame, and poll too: the predicate may look at the bot's own state.
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.05))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        self.gateway_connections.append({"path": request.path, "query": dict(request.query)})
        session: _Session | None = None
        try:
            if request.query.get("encoding", "json") != "json":
                await ws.close(code=4002, message=b"only encoding=json is supported by the fake")
                return ws
            hello = {"heartbeat_interval": int(self.heartbeat_interval * 1000), "_trace": ["fake-gateway"]}
            await ws.send_str(json.dumps({"op": OP_HELLO, "d": hello, "s": None, "t": None}))
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                frame = json.loads(msg.data)
                self.gateway_received.append(frame)
                op, d = frame.get("op"), frame.get("d")
                if op == OP_HEARTBEAT:
                    await ws.send_str(json.dumps({"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None}))
                elif op == OP_IDENTIFY:
                    session = await self._identify(ws, d or {}, session)
                elif op == OP_RESUME:
                    session = await self._resume(ws, d or {}, session)
                elif op == OP_REQUEST_GUILD_MEMBERS and session is not None:
                    await self._members_chunk(session, d or {})
                self._notify()
        finally:
            self._sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
                # A close with 1000/1001 ends the session; any other code (discord.py uses 4000) keeps it resumable.
                if ws.close_code in (1000, 1001):
                    session.closed = True
            self._notify()
        return ws

    def _token_ok(self, token: str | None) -> bool:
        return token in (self.token, f"Bot {self.token}")

    async def _identify(self, ws: web.WebSocketResponse, d: dict, current: _Session | None) -> _Session | None:
        self.identifies.append(d)
        if current is not None:
            await ws.close(code=4005, message=b"Already authenticated.")
            return current
        if not self._token_ok(d.get("token")):
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        intents = d.get("intents")
        if not isinstance(intents, int):
            await ws.close(code=4013, message=b"Invalid intent(s).")
            return None
        if intents & PRIVILEGED_INTENTS and not self.privileged_intents:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        session = _Session(id=secrets.token_hex(16), intents=intents, identify=d, ws=ws)
        self._sessions[session.id] = session
        ready = {
            "v": API_VERSION,
            "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "email": None, "locale": "en-US"},
            "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_gateway_url,
            "shard": d.get("shard") or [0, 1],
            "application": {"id": self.application_id, "flags": self._application_flags()},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "user_settings": {},
            "auth": {},
            "_trace": ["fake-gateway"],
        }
        await self._send_dispatch(session, "READY", ready)
        for guild in self.guilds.values():
            await self._send_dispatch(session, "GUILD_CREATE", self._guild_create_payload(guild))
        return session

    async def _resume(self, ws: web.WebSocketResponse, d: dict, current: _Session | None) -> _Session | None:
        session = self._sessions.get(d.get("session_id") or "")
        if current is not None or session is None or session.closed or not self._token_ok(d.get("token")):
            await ws.send_str(json.dumps({"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None}))
            return current
        seq = d.get("seq") or 0
        async with session.lock:
            session.ws = ws
            for frame in session.frames:
                if frame["s"] > seq:
                    await ws.send_str(json.dumps(frame))
        await self._send_dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
        return session

    async def _members_chunk(self, session: _Session, d: dict) -> None:
        guild = self.guilds.get(str(d.get("guild_id")))
        if guild is None:
            return
        members = guild["members"]
        wanted = d.get("user_ids")
        if wanted:
            wanted = {str(u) for u in (wanted if isinstance(wanted, list) else [wanted])}
            members = [m for m in members if m["user"]["id"] in wanted]
        elif d.get("query"):
            members = [m for m in members if m["user"]["username"].startswith(d["query"])]
        chunk = {"guild_id": guild["id"], "members": members, "chunk_index": 0, "chunk_count": 1}
        if d.get("nonce") is not None:
            chunk["nonce"] = d["nonce"]
        await self._send_dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _application_flags(self) -> int:
        return _APP_FLAG_COMMAND_BADGE | (_APP_FLAGS_PRIVILEGED if self.privileged_intents else 0)

    def _guild_create_payload(self, guild: dict) -> dict:
        return {
            "id": guild["id"],
            "name": guild["name"],
            "owner_id": guild["owner_id"],
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "features": [],
            "roles": guild["roles"],
            "emojis": [],
            "stickers": [],
            "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in guild["channels"]],
            "threads": [],
            "members": guild["members"],
            "member_count": len(guild["members"]),
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "joined_at": _now_iso(),
            "large": False,
            "unavailable": False,
            "lazy": True,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "system_channel_id": guild["channels"][0]["id"] if guild["channels"] else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "max_members": 500000,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "vanity_url_code": None,
            "application_id": None,
            "incidents_data": None,
        }

    async def _send_dispatch(self, session: _Session, event: str, data: Any) -> None:
        async with session.lock:
            session.seq += 1
            frame = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
            session.frames.append(frame)
            if session.ws is not None and not session.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await session.ws.send_str(json.dumps(frame))
        self._notify()

    def _open_sessions(self) -> list[_Session]:
        return [s for s in self._sessions.values() if not s.closed]

    async def wait_until_connected(self, timeout: float = 10.0) -> None:
        """Wait until a bot has identified (READY was sent) and is connected."""
        await self.wait_for(lambda: any(s.ws is not None for s in self._open_sessions()), timeout)

    async def dispatch(self, event: str, data: Any, *, timeout: float = 10.0) -> None:
        """Send a DISPATCH frame (``t=event``, ``d=data``) to every open session (waiting up to ``timeout`` for one).
        A session that is between a disconnect and its RESUME gets the frame on resume."""
        if not self._open_sessions():
            await self.wait_until_connected(timeout)
        for session in self._open_sessions():
            await self._send_dispatch(session, event, data)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: discord.py closes (4000) and RESUMEs at ``resume_gateway_url``."""
        for session in self._open_sessions():
            if session.ws is not None:
                await session.ws.send_str(json.dumps({"op": OP_RECONNECT, "d": None, "s": None, "t": None}))

    async def _echo(self, event: str, msg: FakeMessage) -> None:
        """Tell the bot about its own messages, as Discord does (MESSAGE_CREATE/UPDATE/DELETE)."""
        if not self.echo_bot_messages or msg.ephemeral or msg.guild_id is None:
            return
        for session in self._open_sessions():
            if not session.intents & INTENT_GUILD_MESSAGES:
                continue
            if event == "MESSAGE_DELETE":
                data: dict[str, Any] = {"id": msg.id, "channel_id": msg.channel_id, "guild_id": msg.guild_id}
            else:
                data = {**msg.to_payload(), "guild_id": msg.guild_id}
                if msg.webhook_id is None:
                    member = self.member(msg.guild_id, msg.author["id"])
                    if member is not None:
                        data["member"] = {k: v for k, v in member.items() if k != "user"}
            await self._send_dispatch(session, event, data)

    # ------------------------------------------------------------------ test-side interactions

    def _find_command(self, name: str, guild_id: str | None, command_type: int = 1) -> dict | None:
        for cmd in self.guild_commands.get(guild_id or "", []):
            if cmd["name"] == name and cmd.get("type", 1) == command_type:
                return cmd
        for cmd in self.global_commands:
            if cmd["name"] == name and cmd.get("type", 1) == command_type:
                return cmd
        return None

    def _base_interaction(
        self,
        type: int,
        user: dict | None,
        guild_id: str | None,
        channel_id: str | None,
        member_permissions: str | int,
        app_permissions: str | int,
        locale: str,
    ) -> tuple[dict, dict]:
        self._require_started()
        user = user or self.user
        channel = self.channel(channel_id or self.channel_id)
        guild_id = str(guild_id or channel["guild_id"])
        member = self.member(guild_id, user["id"])
        if member is None:
            raise ValueError(f"user {user['username']} is not a member of guild {guild_id}")
        iid = self._snowflake()
        token = _INTERACTION_TOKEN_PREFIX + secrets.token_urlsafe(132)
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.application_id,
            "type": type,
            "token": token,
            "version": 1,
            "guild_id": guild_id,
            "guild": {"id": guild_id, "locale": "en-US", "features": []},
            "channel_id": channel["id"],
            "channel": {**channel, "permissions": str(member_permissions)},
            "member": {**member, "permissions": str(member_permissions)},
            "app_permissions": str(app_permissions),
            "locale": locale,
            "guild_locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild_id},
            "context": 0,
            "attachment_size_limit": self.attachment_size_limit,
        }
        return payload, user

    def _register_interaction(self, payload: dict, user: dict, token_lifetime: float | None, **kw: Any) -> None:
        now = time.monotonic()
        lifetime = self.token_lifetime if token_lifetime is None else token_lifetime
        self._interactions[payload["token"]] = _Interaction(
            id=payload["id"],
            token=payload["token"],
            type=payload["type"],
            payload=payload,
            user=user,
            channel_id=payload["channel_id"],
            guild_id=payload.get("guild_id"),
            created=now,
            token_expires_at=now + lifetime,
            **kw,
        )

    def _as_attachment(self, value: Any, channel_id: str, ephemeral: bool = True) -> FakeAttachment:
        if isinstance(value, FakeAttachment):
            return value
        if isinstance(value, Mapping):
            return self._blobs[str(value["id"])]
        if isinstance(value, bytes | bytearray):
            value = (bytes(value), "image.png")
        if isinstance(value, tuple):
            data, filename, *rest = value
            content_type = rest[0] if rest else None
            return self._store_attachment(data, filename, content_type, channel_id, ephemeral, None)
        raise TypeError(f"cannot make an attachment from {type(value).__name__}")

    async def slash_command(
        self,
        name: str,
        user: dict | None = None,
        guild_id: str | int | None = None,
        channel_id: str | int | None = None,
        options: list[dict] | Mapping[str, Any] | None = None,
        attachments: Mapping[str, Any] | None = None,
        member_permissions: str | int = DEFAULT_MEMBER_PERMISSIONS,
        *,
        app_permissions: str | int = DEFAULT_APP_PERMISSIONS,
        locale: str = "en-US",
        token_lifetime: float | None = None,
    ) -> dict:
        """Dispatch INTERACTION_CREATE for ``/name`` (the command must have been synced) and return the payload.

        ``options``: raw option dicts, or ``{name: value}`` typed from the synced schema (required options and
        choices are checked). ``attachments``: ``{option name: attachment}`` where the attachment is a dict from
        :meth:`add_attachment`, bytes, or ``(bytes, filename[, content_type])``; they become type-11 options with
        ``data.resolved.attachments``. ``token_lifetime`` (seconds) overrides the 15-minute webhook token lifetime
        for this interaction (``0``: the callback works, every webhook call after it gets 401).
        """
        payload, user = self._base_interaction(
            INTERACTION_APPLICATION_COMMAND,
            user,
            None if guild_id is None else str(guild_id),
            None if channel_id is None else str(channel_id),
            member_permissions,
            app_permissions,
            locale,
        )
        command = self._find_command(name, payload["guild_id"])
        if command is None:
            raise ValueError(f"/{name} is not registered (sync the command tree first)")
        resolved: dict[str, dict] = {}
        opts = self._build_options(command, options, attachments, payload["channel_id"], resolved)
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1}
        if opts:
            data["options"] = opts
        if resolved:
            data["resolved"] = resolved
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        payload["data"] = data
        self._register_interaction(payload, user, token_lifetime, name=name)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    def _build_options(
        self,
        command: dict,
        options: list[dict] | Mapping[str, Any] | None,
        attachments: Mapping[str, Any] | None,
        channel_id: str,
        resolved: dict[str, dict],
    ) -> list[dict]:
        schema = {o["name"]: o for o in command.get("options") or []}
        if isinstance(options, list):
            opts = [dict(o) for o in options]
        else:
            opts = []
            for opt_name, value in (options or {}).items():
                spec = schema.get(opt_name)
                if spec is None:
                    raise ValueError(f"/{command['name']} has no option {opt_name!r}; it has {sorted(schema)}")
                opt_type = spec.get("type", 3)
                if opt_type == 6 and isinstance(value, Mapping):
                    resolved.setdefault("users", {})[value["id"]] = dict(value)
                    value = value["id"]
                elif opt_type == 11:
                    att = self._as_attachment(value, channel_id)
                    resolved.setdefault("attachments", {})[att.id] = att.to_payload()
                    value = att.id
                choices = spec.get("choices")
                if choices and value not in [c["value"] for c in choices]:
                    raise ValueError(f"{value!r} is not a choice of option {opt_name!r}")
                opts.append({"name": opt_name, "type": opt_type, "value": value})
        for opt_name, value in (attachments or {}).items():
            if schema and opt_name not in schema:
                raise ValueError(f"/{command['name']} has no option {opt_name!r}; it has {sorted(schema)}")
            att = self._as_attachment(value, channel_id)
            resolved.setdefault("attachments", {})[att.id] = att.to_payload()
            opts.append({"name": opt_name, "type": 11, "value": att.id})
        if not any(o.get("type") in (1, 2) for o in opts):
            given = {o["name"] for o in opts}
            missing = [n for n, o in schema.items() if o.get("required") and n not in given]
            if missing:
                raise ValueError(f"/{command['name']} needs options {missing}")
        return opts

    def _resolve_message(self, message: FakeMessage | Mapping | str | int) -> FakeMessage:
        if isinstance(message, FakeMessage):
            mid = message.id
        elif isinstance(message, Mapping):
            mid = str(message["id"])
        else:
            mid = str(message)
        msg = self._messages.get(mid)
        if msg is None or msg.deleted:
            raise ValueError(f"no message {mid}")
        return msg

    async def press_button(
        self,
        message: FakeMessage | Mapping | str | int,
        custom_id: str,
        user: dict | None = None,
        *,
        values: list[str] | None = None,
        member_permissions: str | int = DEFAULT_MEMBER_PERMISSIONS,
        app_permissions: str | int = DEFAULT_APP_PERMISSIONS,
        locale: str = "en-US",
        token_lifetime: float | None = None,
    ) -> dict:
        """Dispatch a component interaction (type 3) for the component ``custom_id`` on ``message`` and return the
        payload. The component must exist and be enabled. ``values`` makes it a select-menu choice."""
        msg = self._resolve_message(message)
        comp = msg.find_component(custom_id)
        if comp is None:
            raise ValueError(f"message {msg.id} has no component {custom_id!r}; it has {msg.custom_ids()}")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        payload, user = self._base_interaction(
            INTERACTION_MESSAGE_COMPONENT,
            user,
            msg.guild_id,
            msg.channel_id,
            member_permissions,
            app_permissions,
            locale,
        )
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": comp["type"]}
        if "id" in comp:
            data["id"] = comp["id"]
        if values is not None or comp["type"] in (3, 5, 6, 7, 8):
            data["values"] = list(values or [])
        payload["data"] = data
        payload["message"] = msg.to_payload()
        self._register_interaction(payload, user, token_lifetime, message_id=msg.id)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def select(
        self, message: FakeMessage | Mapping | str | int, custom_id: str, values: list[str], **kw: Any
    ) -> dict:
        """Choose ``values`` in the select menu ``custom_id`` (a type-3 interaction); see :meth:`press_button`."""
        return await self.press_button(message, custom_id, values=values, **kw)

    async def submit_modal(
        self,
        interaction: Mapping | str,
        values: Mapping[str, str],
        user: dict | None = None,
        *,
        token_lifetime: float | None = None,
    ) -> dict:
        """Submit the modal the bot opened in answer to ``interaction`` (callback type 9), with text input values by
        custom_id; dispatches a type-5 interaction and returns it."""
        origin = self._interaction_for(interaction)
        if origin.modal is None:
            raise ValueError("the bot did not answer that interaction with a modal")
        modal = origin.modal
        rows: list[dict] = []
        given = dict(values)
        for top in modal.get("components") or []:
            inputs = [top["component"]] if top.get("type") == 18 else list(top.get("components") or [])
            answered = []
            for inp in inputs:
                if inp.get("type") != 4:
                    continue
                cid = inp["custom_id"]
                if cid not in given and inp.get("required", True):
                    raise ValueError(f"modal field {cid!r} is required")
                answered.append({"type": 4, "custom_id": cid, "value": given.pop(cid, ""), "id": inp.get("id", 0)})
            if not answered:
                continue
            if top.get("type") == 18:
                rows.append({"type": 18, "id": top.get("id", 0), "component": answered[0]})
            else:
                rows.append({"type": 1, "id": top.get("id", 0), "components": answered})
        if given:
            raise ValueError(f"the modal has no fields {sorted(given)}")
        payload, user = self._base_interaction(
            INTERACTION_MODAL_SUBMIT,
            user or origin.user,
            origin.guild_id,
            origin.channel_id,
            origin.payload["member"]["permissions"],
            origin.payload["app_permissions"],
            origin.payload["locale"],
        )
        payload["data"] = {"custom_id": modal["custom_id"], "components": rows}
        if origin.message_id is not None:
            payload["message"] = self._messages[origin.message_id].to_payload()
        self._register_interaction(payload, user, token_lifetime, message_id=origin.message_id)
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def user_message(
        self,
        content: str,
        user: dict | None = None,
        *,
        channel_id: str | int | None = None,
        attachments: Iterable[Any] = (),
        mention_bot: bool = False,
    ) -> FakeMessage:
        """A user posts a message: dispatches MESSAGE_CREATE. As on Discord, a session without the MESSAGE_CONTENT
        intent gets empty content/embeds/attachments/components unless the bot is mentioned."""
        self._require_started()
        user = user or self.user
        channel = self.channel(channel_id or self.channel_id)
        if mention_bot:
            content = f"<@{self.application_id}> {content}"
        msg = FakeMessage(
            id=self._snowflake(),
            channel_id=channel["id"],
            guild_id=channel["guild_id"],
            author=user,
            via="user",
            content=content,
        )
        msg.attachments = [self._as_attachment(value, channel["id"], ephemeral=False) for value in attachments]
        self._messages[msg.id] = msg
        if not self._open_sessions():
            await self.wait_until_connected()
        member = self.member(channel["guild_id"], user["id"]) or self._make_member(user)
        for session in self._open_sessions():
            if not session.intents & INTENT_GUILD_MESSAGES:
                continue
            data = {**msg.to_payload(), "guild_id": msg.guild_id}
            data["member"] = {k: v for k, v in member.items() if k != "user"}
            if mention_bot:
                data["mentions"] = [self.bot_user]
            elif not session.intents & INTENT_MESSAGE_CONTENT:
                data.update(content="", embeds=[], attachments=[], components=[])
            await self._send_dispatch(session, "MESSAGE_CREATE", data)
        return msg

    # ------------------------------------------------------------------ REST plumbing

    def _route_table(self) -> list[tuple[str, re.Pattern[str], bool, Callable[..., Any]]]:
        routes = [
            ("GET", r"/gateway", False, self._r_gateway),
            ("GET", r"/gateway/bot", True, self._r_gateway_bot),
            ("GET", r"/users/@me", True, self._r_me),
            ("GET", r"/users/(?P<user_id>\d+)", True, self._r_user),
            ("GET", r"/oauth2/applications/@me", True, self._r_application),
            ("GET", r"/applications/@me", True, self._r_application),
            ("GET|PUT|POST", r"/applications/(?P<app>\d+)(?:/guilds/(?P<guild>\d+))?/commands", True, self._r_commands),
            (
                "GET|PATCH|DELETE",
                r"/applications/(?P<app>\d+)(?:/guilds/(?P<guild>\d+))?/commands/(?P<cmd>\d+)",
                True,
                self._r_command,
            ),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", False, self._r_callback),
            ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", False, self._r_followup),
            (
                "GET|PATCH|DELETE",
                r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<mid>@original|\d+)",
                False,
                self._r_webhook_message,
            ),
            ("GET", r"/channels/(?P<cid>\d+)", True, self._r_channel),
            ("POST", r"/channels/(?P<cid>\d+)/messages", True, self._r_channel_post),
            ("GET|PATCH|DELETE", r"/channels/(?P<cid>\d+)/messages/(?P<mid>\d+)", True, self._r_channel_message),
            ("POST", r"/channels/(?P<cid>\d+)/typing", True, self._r_typing),
            ("GET", r"/guilds/(?P<gid>\d+)", True, self._r_guild),
            ("GET", r"/guilds/(?P<gid>\d+)/channels", True, self._r_guild_channels),
            ("GET", r"/guilds/(?P<gid>\d+)/members/(?P<uid>\d+)", True, self._r_guild_member),
        ]
        return [(m, re.compile(p + "$"), auth, fn) for m, p, auth, fn in routes]

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[Upload]]:
        uploads: list[Upload] = []
        if request.content_type == "multipart/form-data":
            body = None
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                data = await part.read(decode=True)  # type: ignore[union-attr]
                if part.filename is None and part.name == "payload_json":  # type: ignore[union-attr]
                    body = json.loads(data)
                elif part.filename is not None:  # type: ignore[union-attr]
                    declared = part.headers.get("Content-Type", "application/octet-stream")  # type: ignore[union-attr]
                    uploads.append(Upload(part.name or "", part.filename, declared, bytes(data)))  # type: ignore[union-attr]
            return body, uploads
        raw = await request.read()
        if not raw:
            return None, uploads
        try:
            return json.loads(raw), uploads
        except ValueError as exc:
            raise _HTTPError(400, 50109, "The request body contains invalid JSON.") from exc

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        call = Call(request.method, path, None, [], dict(request.query))
        self.calls.append(call)
        try:
            call.json, call.files = await self._read_body(request)
            for methods, pattern, auth, handler in self._routes:
                m = pattern.match(path)
                if m and request.method in methods.split("|"):
                    if auth and request.headers.get("Authorization") != f"Bot {self.token}":
                        raise _HTTPError(401, 0, "401: Unauthorized")
                    result = await handler(request, call, **{k: v for k, v in m.groupdict().items()})
                    break
            else:
                self.unhandled.append(call)
                raise _HTTPError(404, 0, "404: Not Found")
            status, body = result if isinstance(result, tuple) else (200, result)
        except _HTTPError as err:
            status, body = err.status, err.body
        call.status, call.response = status, body
        self._notify()
        if status == 204 or body is None:
            return web.Response(status=204)
        return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")

    async def _download(self, request: web.Request) -> web.StreamResponse:
        call = Call("GET", request.path, None, [], dict(request.query))
        self.calls.append(call)
        att = self._blobs.get(request.match_info["aid"])
        if att is None or att.filename != request.match_info["filename"]:
            call.status = 404
            self._notify()
            return web.Response(status=404, text="Not Found")
        call.status = 200
        self._notify()
        return web.Response(body=att.data, content_type=att.content_type)

    # ------------------------------------------------------------------ REST: login, gateway, commands

    async def _r_gateway(self, request: web.Request, call: Call) -> dict:
        return {"url": self.gateway_url}

    async def _r_gateway_bot(self, request: web.Request, call: Call) -> dict:
        limit = {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _r_me(self, request: web.Request, call: Call) -> dict:
        return {**self.bot_user, "verified": True, "mfa_enabled": False, "email": None, "locale": "en-US"}

    async def _r_user(self, request: web.Request, call: Call, user_id: str) -> dict:
        if user_id not in self.users:
            raise _HTTPError(404, 10013, "Unknown User")
        return self.users[user_id]

    async def _r_application(self, request: web.Request, call: Call) -> dict:
        return {
            "id": self.application_id,
            "name": self.bot_user["global_name"],
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot": self.bot_user,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "team": None,
            "verify_key": secrets.token_hex(32),
            "flags": self._application_flags(),
            "hook": True,
            "tags": [],
            "rpc_origins": [],
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        }

    def _check_app(self, app: str) -> None:
        if app != self.application_id:
            raise _HTTPError(403, 50001, "Missing Access")

    def _command_list(self, guild: str | None) -> list[dict]:
        if guild is None:
            return self.global_commands
        if guild not in self.guilds:
            raise _HTTPError(403, 50001, "Missing Access")
        return self.guild_commands.setdefault(guild, [])

    def _make_command(self, raw: Any, guild: str | None, existing: list[dict]) -> dict:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _form_error("name", "BASE_TYPE_REQUIRED", "This field is required")
        name, ctype = raw["name"], raw.get("type", 1)
        if not re.fullmatch(r"[-_\w]{1,32}", name) or (ctype == 1 and name != name.lower()):
            raise _form_error("name", "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}")
        if ctype == 1 and not 1 <= len(raw.get("description") or "") <= 100:
            raise _form_error("description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        if len(raw.get("options") or []) > 25:
            raise _form_error("options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        old = next((c for c in existing if c["name"] == name and c.get("type", 1) == ctype), None)
        perms = raw.get("default_member_permissions")
        cmd = {
            "name_localizations": None,
            "description_localizations": None,
            "nsfw": False,
            **raw,
            "id": old["id"] if old else self._snowflake(),
            "application_id": self.application_id,
            "version": self._snowflake(),
            "type": ctype,
            "description": raw.get("description", ""),
            "options": raw.get("options") or [],
            "default_member_permissions": None if perms is None else str(perms),
        }
        if guild is not None:
            cmd["guild_id"] = guild
        return cmd

    async def _r_commands(self, request: web.Request, call: Call, app: str, guild: str | None) -> Any:
        self._check_app(app)
        commands = self._command_list(guild)
        if request.method == "GET":
            return commands
        if request.method == "PUT":
            if not isinstance(call.json, list):
                raise _form_error("_", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
            names = [(c.get("name"), c.get("type", 1)) for c in call.json if isinstance(c, dict)]
            if len(names) != len(set(names)):
                raise _form_error("_", "APPLICATION_COMMANDS_DUPLICATE_NAME", "Command names must be unique")
            new = [self._make_command(raw, guild, commands) for raw in call.json]
            commands[:] = new
            return new
        cmd = self._make_command(call.json, guild, commands)
        kept = [c for c in commands if c["id"] != cmd["id"]]
        created = len(kept) == len(commands)
        commands[:] = [*kept, cmd]
        return (201 if created else 200), cmd

    async def _r_command(self, request: web.Request, call: Call, app: str, guild: str | None, cmd: str) -> Any:
        self._check_app(app)
        commands = self._command_list(guild)
        found = next((c for c in commands if c["id"] == cmd), None)
        if found is None:
            raise _HTTPError(404, 10063, "Unknown application command")
        if request.method == "GET":
            return found
        if request.method == "DELETE":
            commands.remove(found)
            return 204, None
        updated = self._make_command({**found, **(call.json or {})}, guild, commands)
        commands[commands.index(found)] = updated
        return updated

    # ------------------------------------------------------------------ REST: messages

    def _apply_message_body(self, msg: FakeMessage, body: Any, uploads: list[Upload], *, creating: bool) -> None:
        """Validate ``body`` (+ uploads) and apply it to ``msg``; on error nothing changes."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise _form_error("_", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        content = msg.content
        if "content" in body:
            content = "" if body["content"] is None else str(body["content"])
            if len(content) > _MAX_CONTENT:
                raise _form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {_MAX_CONTENT} or fewer in length.")
        embeds = msg.embeds
        if "embeds" in body or "embed" in body:
            embeds = body.get("embeds") if "embeds" in body else [body["embed"]] if body["embed"] else []
            embeds = [{"type": "rich", **e} for e in (embeds or [])]
            if len(embeds) > _MAX_EMBEDS:
                raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {_MAX_EMBEDS} or fewer in length.")
        components = msg.components
        if "components" in body:
            components = [json.loads(json.dumps(c)) for c in body["components"] or []]
            next_id = 1
            for comp in _walk_components(components):
                comp.setdefault("id", next_id)
                next_id = max(next_id, comp["id"]) + 1
        if sum(len(u.data) for u in uploads) > self.attachment_size_limit:
            raise _HTTPError(413, 40005, "Request entity too large")
        attachments = self._resolve_attachments(msg, body.get("attachments"), uploads, creating=creating)
        flags = msg.flags & ~FLAG_LOADING
        if "flags" in body and body["flags"] is not None:
            flags = (flags & ~_SETTABLE_FLAGS) | (int(body["flags"]) & _SETTABLE_FLAGS)
        poll = body.get("poll", msg.poll)
        has_stickers = bool(body.get("sticker_ids"))
        if not (content or embeds or attachments or components or poll or has_stickers):
            raise _HTTPError(400, 50006, "Cannot send an empty message")
        by_name = {a.filename: a for a in attachments}
        for embed in embeds:
            for key in ("image", "thumbnail"):
                url = (embed.get(key) or {}).get("url", "")
                if url.startswith("attachment://") and url[len("attachment://") :] in by_name:
                    att = by_name[url[len("attachment://") :]]
                    embed[key] = {**embed[key], "url": att.url, "proxy_url": att.proxy_url}
                    if att.width is not None:
                        embed[key].update(width=att.width, height=att.height, content_type=att.content_type)
        if not creating:
            msg.history.append(msg.to_payload())
            msg.edits += 1
            if not msg.loading:
                msg.edited_timestamp = _now_iso()
        msg.content, msg.embeds, msg.components = content, embeds, components
        msg.attachments, msg.flags, msg.poll = attachments, flags, poll
        if creating and body.get("message_reference"):
            msg.message_reference = body["message_reference"]
            msg.type = 19 if msg.type == 0 else msg.type

    def _resolve_attachments(
        self, msg: FakeMessage, listed: Any, uploads: list[Upload], *, creating: bool
    ) -> list[FakeAttachment]:
        by_index: dict[int, Upload] = {}
        for position, upload in enumerate(uploads):
            m = re.fullmatch(r"files\[(\d+)\]", upload.field)
            by_index[int(m.group(1)) if m else position] = upload
        existing = {a.id: a for a in msg.attachments}

        def new(upload: Upload, filename: str | None = None, description: str | None = None) -> FakeAttachment:
            filename = filename or upload.filename
            content_type = _guess_type(filename, upload.content_type)
            channel_id, ephemeral = msg.channel_id, msg.ephemeral
            return self._store_attachment(upload.data, filename, content_type, channel_id, ephemeral, description)

        if listed is None:
            kept = [] if creating else list(msg.attachments)
            return kept + [new(by_index[i]) for i in sorted(by_index)]
        if not isinstance(listed, list):
            raise _form_error("attachments", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
        result = []
        for entry in listed:
            aid = str(entry.get("id")) if isinstance(entry, dict) else ""
            if aid in existing:
                result.append(existing[aid])
            elif aid.isdigit() and int(aid) in by_index:
                result.append(new(by_index[int(aid)], entry.get("filename"), entry.get("description")))
            else:
                raise _form_error("attachments", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {aid!r}")
        return result

    def _new_message(self, channel_id: str, via: str, it: _Interaction | None = None) -> FakeMessage:
        channel = self.channel(channel_id)
        msg = FakeMessage(
            id=self._snowflake(),
            channel_id=channel_id,
            guild_id=channel.get("guild_id"),
            author=self.bot_user,
            via=via,
        )
        if it is not None:
            msg.type = 20 if it.type == INTERACTION_APPLICATION_COMMAND else 0
            msg.webhook_id = self.application_id
            msg.application_id = self.application_id
            msg.interaction_id, msg.interaction_token = it.id, it.token
            meta: dict[str, Any] = {
                "id": it.id,
                "type": it.type,
                "user": it.user,
                "authorizing_integration_owners": {"0": it.guild_id or "0"},
            }
            if it.name is not None:
                meta.update(name=it.name, command_type=1)
            if via == "followup" and it.original_id is not None:
                meta["original_response_message_id"] = it.original_id
            if it.message_id is not None:
                meta["interacted_message_id"] = it.message_id
            msg.interaction_metadata = meta
        return msg

    async def _create(
        self, msg: FakeMessage, body: Any, uploads: list[Upload], *, ephemeral: bool = False, loading: bool = False
    ) -> FakeMessage:
        msg.flags = FLAG_EPHEMERAL if ephemeral else 0
        if loading:
            msg.flags |= FLAG_LOADING
        else:
            self._apply_message_body(msg, body, uploads, creating=True)
        self._messages[msg.id] = msg
        with contextlib.suppress(KeyError):
            self.channel(msg.channel_id)["last_message_id"] = msg.id
        await self._echo("MESSAGE_CREATE", msg)
        return msg

    async def _edit(self, msg: FakeMessage, body: Any, uploads: list[Upload]) -> FakeMessage:
        self._apply_message_body(msg, body, uploads, creating=False)
        await self._echo("MESSAGE_UPDATE", msg)
        return msg

    async def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        await self._echo("MESSAGE_DELETE", msg)

    # ------------------------------------------------------------------ REST: interactions and webhooks

    async def _r_callback(self, request: web.Request, call: Call, iid: str, token: str) -> Any:
        it = self._interactions.get(token)
        if it is None or it.id != iid or it.expired:
            raise _HTTPError(404, 10062, "Unknown interaction")
        if self.callback_deadline is not None and time.monotonic() - it.created > self.callback_deadline:
            raise _HTTPError(404, 10062, "Unknown interaction")
        if it.response_type is not None:
            raise _HTTPError(400, 40060, "Interaction has already been acknowledged.")
        body = call.json if isinstance(call.json, dict) else {}
        rtype, data = body.get("type"), body.get("data") or {}
        is_component = it.message_id is not None
        allowed = {
            INTERACTION_APPLICATION_COMMAND: {4, 5, 9},
            INTERACTION_MESSAGE_COMPONENT: {4, 5, 6, 7, 9},
            INTERACTION_AUTOCOMPLETE: {8},
            INTERACTION_MODAL_SUBMIT: {4, 5, 6, 7} if is_component else {4, 5},
        }.get(it.type, set())
        if rtype not in allowed:
            raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", f"Callback type {rtype} not allowed here")
        message: FakeMessage | None = None
        ephemeral = bool(int(data.get("flags") or 0) & FLAG_EPHEMERAL)
        if rtype == CALLBACK_CHANNEL_MESSAGE:
            message = self._new_message(it.channel_id, "interaction", it)
            message = await self._create(message, data, call.files, ephemeral=ephemeral)
        elif rtype == CALLBACK_DEFERRED_CHANNEL_MESSAGE:
            message = self._new_message(it.channel_id, "interaction", it)
            message = await self._create(message, None, [], ephemeral=ephemeral, loading=True)
        elif rtype == CALLBACK_DEFERRED_UPDATE_MESSAGE:
            message = self._messages[it.message_id]  # type: ignore[index]
        elif rtype == CALLBACK_UPDATE_MESSAGE:
            message = await self._edit(self._messages[it.message_id], data, call.files)  # type: ignore[index]
        elif rtype == CALLBACK_MODAL:
            if not data.get("custom_id") or not data.get("title") or not data.get("components"):
                raise _form_error("data", "MODAL_INVALID", "A modal needs custom_id, title and components")
            it.modal = data
        it.response_type, it.response_data = rtype, data
        if message is not None:
            it.original_id = message.id
        if not _truthy(request.query.get("with_response")):
            return 204, None
        info: dict[str, Any] = {"id": it.id, "type": it.type}
        resource: dict[str, Any] = {"type": rtype}
        if message is not None:
            info.update(
                response_message_id=message.id,
                response_message_loading=message.loading,
                response_message_ephemeral=message.ephemeral,
            )
            if rtype != CALLBACK_DEFERRED_UPDATE_MESSAGE:
                resource["message"] = message.to_payload()
        return {"interaction": info, "resource": resource}

    def _webhook_interaction(self, app: str, token: str) -> _Interaction:
        if app != self.application_id:
            raise _HTTPError(404, 10015, "Unknown Webhook")
        it = self._interactions.get(token)
        if it is None or it.expired or time.monotonic() > it.token_expires_at:
            raise _HTTPError(401, 50027, "Invalid Webhook Token")
        return it

    async def _r_followup(self, request: web.Request, call: Call, app: str, token: str) -> Any:
        it = self._webhook_interaction(app, token)
        if it.response_type is None:
            raise _HTTPError(404, 10015, "Unknown Webhook")
        body = call.json if isinstance(call.json, dict) else {}
        original = self._messages.get(it.original_id or "")
        if it.response_type == CALLBACK_DEFERRED_CHANNEL_MESSAGE and original is not None and original.loading:
            # The first followup after a "thinking" defer replaces the loading message (keeping its ephemerality).
            msg = await self._edit(original, body, call.files)
        else:
            ephemeral = bool(int(body.get("flags") or 0) & FLAG_EPHEMERAL)
            msg = self._new_message(it.channel_id, "followup", it)
            msg = await self._create(msg, body, call.files, ephemeral=ephemeral)
        return msg.to_payload() if _truthy(request.query.get("wait")) else (204, None)

    async def _r_webhook_message(self, request: web.Request, call: Call, app: str, token: str, mid: str) -> Any:
        it = self._webhook_interaction(app, token)
        if mid == "@original":
            msg = self._messages.get(it.original_id or "")
        else:
            msg = self._messages.get(mid)
            if msg is not None and msg.interaction_token != token and msg.id != it.original_id:
                msg = None
        if msg is None or msg.deleted:
            raise _unknown_message()
        if request.method == "GET":
            return msg.to_payload()
        if request.method == "DELETE":
            await self._delete(msg)
            return 204, None
        return (await self._edit(msg, call.json, call.files)).to_payload()

    # ------------------------------------------------------------------ REST: channels and guilds

    def _channel_or_404(self, cid: str) -> dict:
        try:
            return self.channel(cid)
        except KeyError:
            raise _HTTPError(404, 10003, "Unknown Channel") from None

    async def _r_channel(self, request: web.Request, call: Call, cid: str) -> dict:
        return self._channel_or_404(cid)

    async def _r_channel_post(self, request: web.Request, call: Call, cid: str) -> dict:
        self._channel_or_404(cid)
        msg = await self._create(self._new_message(cid, "channel"), call.json, call.files)
        return msg.to_payload()

    async def _r_channel_message(self, request: web.Request, call: Call, cid: str, mid: str) -> Any:
        self._channel_or_404(cid)
        msg = self._messages.get(mid)
        if msg is None or msg.deleted or msg.channel_id != cid or msg.ephemeral:
            raise _unknown_message()
        if request.method == "GET":
            return msg.to_payload()
        if request.method == "DELETE":
            await self._delete(msg)
            return 204, None
        if msg.author["id"] != self.bot_user["id"]:
            raise _HTTPError(403, 50005, "Cannot edit a message authored by another user")
        return (await self._edit(msg, call.json, call.files)).to_payload()

    async def _r_typing(self, request: web.Request, call: Call, cid: str) -> Any:
        self._channel_or_404(cid)
        return 204, None

    def _guild_or_404(self, gid: str) -> dict:
        if gid not in self.guilds:
            raise _HTTPError(404, 10004, "Unknown Guild")
        return self.guilds[gid]

    async def _r_guild(self, request: web.Request, call: Call, gid: str) -> dict:
        payload = self._guild_create_payload(self._guild_or_404(gid))
        for key in ("channels", "members", "threads", "presences", "voice_states", "joined_at", "large", "lazy"):
            payload.pop(key, None)
        return payload

    async def _r_guild_channels(self, request: web.Request, call: Call, gid: str) -> list:
        return self._guild_or_404(gid)["channels"]

    async def _r_guild_member(self, request: web.Request, call: Call, gid: str, uid: str) -> dict:
        member = self.member(self._guild_or_404(gid)["id"], uid)
        if member is None:
            raise _HTTPError(404, 10007, "Unknown Member")
        return member


class point_discord_py_at:  # noqa: N801 - used like a function
    """Point discord.py (this process) at ``fake``: sets ``discord.http.Route.BASE`` and
    ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``, restoring both on exit. Works with ``with`` and
    ``async with`` (so it can sit in the same ``async with`` line as the fake)."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> FakeDiscord:
        import discord.gateway
        import discord.http
        import yarl

        self._saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.fake.api_url
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.fake.gateway_url)
        return self.fake

    def __exit__(self, *exc: object) -> None:
        import discord.gateway
        import discord.http

        assert self._saved is not None
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved
        self._saved = None

    async def __aenter__(self) -> FakeDiscord:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)
