"""The Discord front end end to end: ``run_discord`` as deployed, against the fake Discord (REST + gateway), with the
real service, an in-process worker, Redis, SQLite and the bundled demo models."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import bots.discord as discord_bot
from backend.config import Settings
from backend.service import Actor, Place, ToonService
from bots.discord import run_discord
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, blank_photo, long_enough_to_show_progress, running_worker
from tests.fakes.discord import ADMINISTRATOR, FakeDiscord, FakeMessage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMANDS = {"toon", "blend", "blendvote", "style", "styles", "cancel", "forget", "help", "finetune", "publish"}


class Stack:
    """The fake Discord and the service, with the bot started and stopped on demand (a restart keeps the fake)."""

    def __init__(self, fake: FakeDiscord, service: ToonService, monkeypatch: pytest.MonkeyPatch | None) -> None:
        self.fake, self.service, self.monkeypatch = fake, service, monkeypatch
        self.stop: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def start_bot(self) -> None:
        fake = self.fake
        if self.monkeypatch is None:
            kw = {"api_base_url": fake.api_url, "gateway_url": fake.gateway_url, "guild_ids": [int(fake.guild_id)]}
        else:
            kw = {}
            for name, value in {**fake.env(), "DISCORD_GUILD_IDS": fake.guild_id, "DISCORD_SHARDED": "1"}.items():
                self.monkeypatch.setenv(name, value)
        connected = len(fake.identifies)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(run_discord(self.service, fake.token, self.stop, **kw))

        def up() -> bool:  # commands synced (at login) and the gateway identified
            return self.task.done() or bool(fake.guild_commands.get(fake.guild_id) and len(fake.identifies) > connected)

        await fake.wait_for(up)
        assert not self.task.done(), self.task.exception()

    async def stop_bot(self) -> None:
        if self.task is not None:
            self.stop.set()
            await asyncio.wait_for(self.task, 30)  # also re-raises whatever stopped the bot early
            self.task = None


@contextlib.asynccontextmanager
async def discord_stack(
    tmp_path, url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch | None = None
) -> AsyncIterator[Stack]:
    """The bot on the fake; with ``monkeypatch`` it finds the fake (and its guild) through DISCORD_* variables."""
    settings = Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": url, **env})
    service = await ToonService.open(settings)
    try:
        async with FakeDiscord() as fake:
            fake.add_user("bob", "Bob")  # members must exist before the bot connects
            fake.add_user("ada", "Ada")  # the admin, when her interactions say so
            stack = Stack(fake, service, monkeypatch)
            await stack.start_bot()
            try:
                yield stack
            finally:
                await stack.stop_bot()
    finally:
        await service.close()


@pytest_asyncio.fixture
async def start_bot(tmp_path, redis_url, redis, monkeypatch):  # noqa: F811
    """``stack = await start_bot(via_env=False, **env)``: the bot runs until the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(via_env: bool = False, **env: str) -> Stack:
            patch = monkeypatch if via_env else None
            return await stack.enter_async_context(discord_stack(tmp_path, redis_url, env, patch))

        yield start


def user(fake: FakeDiscord, username: str) -> dict:
    return next(u for u in fake.users.values() if u["username"] == username)


def versions(msg: FakeMessage) -> list[str]:
    """The message's text as sent and after each edit (the loading 'thinking' state left out)."""
    return [h["content"] for h in msg.history if not h["flags"] & 128] + [msg.content]


async def answer(fake: FakeDiscord, inter: dict, needle: str, timeout: float = 30) -> FakeMessage:
    """Wait until the interaction's response or one of its followups reads ``needle``; return that message."""

    def find() -> FakeMessage | None:
        candidates = [fake.original_message(inter), *fake.followups(inter)]
        return next((m for m in candidates if m is not None and needle in m.content), None)

    return await fake.wait_for(find, timeout)


async def with_image(fake: FakeDiscord, inter: dict, timeout: float = 120) -> FakeMessage:
    return await fake.wait_for(lambda: next((m for m in fake.followups(inter) if m.files), None), timeout)


def photo(data: bytes, name: str = "me.png", content_type: str = "image/png") -> dict:
    return {"image": (data, name, content_type)}


@pytest.mark.asyncio
async def test_toon_progress_result_reblend_and_button(start_bot, monkeypatch):
    long_enough_to_show_progress(monkeypatch)
    stack = await start_bot()
    fake, service = stack.fake, stack.service
    synced = {c["name"] for c in fake.guild_commands[fake.guild_id]}
    assert COMMANDS | {"pollclose"} <= synced and not fake.global_commands  # to the guild only, once
    assert len(fake.find_calls("PUT", r"/commands$")) == 1
    toon = next(c for c in fake.guild_commands[fake.guild_id] if c["name"] == "toon")
    assert [(o["name"], o["type"]) for o in toon["options"]][:2] == [("image", 11), ("style", 3)]

    async with running_worker(service):
        # balanced, named (the default is instant where the style has a student)
        inter = await fake.slash_command("toon", options={"mode": "balanced"}, attachments=photo(astronaut(21)))
        result = await with_image(fake, inter)
        assert fake.callbacks(inter)[0].json == {"type": 5}  # deferred, publicly, with "thinking…"
        original = fake.original_message(inter)
        await fake.wait_for(lambda: original.content == "Done.")  # the progress message is closed after the result
        texts = versions(original)
        assert texts[0].startswith("Starting") and texts[-2:] == ["Almost there…", "Done."]
        assert any("Learning your face" in x for x in texts), texts
        assert all(a != b for a, b in itertools.pairwise(texts))  # never an identical edit
        token = inter["token"]
        edits = fake.find_calls("PATCH", rf"/webhooks/{fake.application_id}/{token}/messages/@original$")
        posts = fake.find_calls("POST", rf"/webhooks/{fake.application_id}/{token}$")
        assert all(c.status == 200 for c in edits) and edits[-2].at <= posts[-1].at  # progress first, then the result
        assert "toonify:c:" in original.history[1]["components"][0]["components"][0]["custom_id"]
        assert original.components == []  # the cancel button goes when the job ends
        assert "Here you are" in result.content and not result.ephemeral
        assert result.files[0].startswith(PNG_MAGIC) and result.attachments[0].filename == "toon.png"
        assert "toonify:b:8" in result.custom_ids() and len(fake.find_calls("GET", r"/ephemeral-attachments/")) == 1

        # /blend 16: a re-render of the same photo, no new upload.
        again = await fake.slash_command("blend", fake.user, options={"resolution": 16})
        redrawn = await with_image(fake, again)
        assert "blend 16" in redrawn.content and len(fake.find_calls("GET", r"/ephemeral-attachments/")) == 1

        # The result's button: a deferred update, then the core's replies as followups of the press.
        press = await fake.press_button(result, "toonify:b:8")
        pressed = await with_image(fake, press)
        assert fake.callbacks(press)[0].json == {"type": 6}
        assert "blend 8" in pressed.content and result.content.startswith("Here you are")  # the old one unchanged

        # Buttons outlive the bot: after a restart, a press on a message from before still reaches the core.
        await stack.stop_bot()
        await stack.start_bot()
        after = await fake.press_button(result, "toonify:b:64")
        assert "blend 64" in (await with_image(fake, after)).content
        assert fake.unhandled == []


@pytest.mark.asyncio
async def test_bad_inputs_rights_and_help_get_clear_replies(start_bot):
    stack = await start_bot(via_env=True)  # found through DISCORD_API_BASE_URL and friends, sharded
    fake, service = stack.fake, stack.service
    assert fake.find_calls("GET", "^/gateway/bot$") and fake.identifies[0]["shard"] == [0, 1]

    # /style's autocomplete (the fake has no helper for type-4 interactions: built from its parts).
    payload, who = fake._base_interaction(4, None, None, None, "0", "0", "en-US")
    command = next(c for c in fake.guild_commands[fake.guild_id] if c["name"] == "style")
    payload["data"] = {"id": command["id"], "name": "style", "type": 1, "guild_id": fake.guild_id}
    payload["data"]["options"] = [{"name": "name", "type": 3, "value": "de", "focused": True}]
    fake._register_interaction(payload, who, None, name="style")
    await fake.dispatch("INTERACTION_CREATE", payload)
    await fake.wait_for(lambda: fake.response_type(payload))
    assert fake.callbacks(payload)[0].json == {"type": 8, "data": {"choices": [{"name": "demo", "value": "demo"}]}}

    help_ = await fake.slash_command("help")
    shown = await answer(fake, help_, "/blendvote")
    assert shown.ephemeral and fake.callbacks(help_)[0].json == {"type": 5, "data": {"flags": 64}}

    styles = await fake.slash_command("styles")
    assert (await answer(fake, styles, "demo")).ephemeral
    chosen = await fake.slash_command("style", options={"name": "demo"})
    assert (await answer(fake, chosen, "default style is now demo")).ephemeral

    text = await fake.slash_command("toon", attachments=photo(b"not an image at all", "notes.txt", "text/plain"))
    assert "not an image" in (await answer(fake, text, "image")).content

    big = astronaut(22)
    fake.attachment_size_limit = len(big) - 1  # this member's upload limit, as the payload states it
    try:
        oversized = await fake.slash_command("toon", attachments=photo(big))
    finally:
        fake.attachment_size_limit = 10 << 20
    assert "the limit here is" in (await answer(fake, oversized, "limit")).content
    assert not fake.find_calls("GET", r"/ephemeral-attachments/.*/me\.png$"), "too big: never downloaded"

    dataset = {"dataset": (b"PK\x05\x06" + bytes(18), "set.zip", "application/zip")}
    refused = await fake.slash_command("finetune", user(fake, "bob"), options={"name": "mystyle"}, attachments=dataset)
    assert "only the admins" in (await answer(fake, refused, "admins")).content

    # A failure inside a handler (here: the 3-second deadline missed) is logged; the bot goes on.
    fake.callback_deadline = 0.0
    late = await fake.slash_command("help")
    await fake.wait_for(lambda: fake.callbacks(late) and fake.callbacks(late)[-1].status == 404)
    fake.callback_deadline = None
    assert (await answer(fake, await fake.slash_command("help"), "/pollclose")).ephemeral

    async with running_worker(service):
        faceless = await fake.slash_command("toon", options={"mode": "fast"}, attachments=photo(blank_photo()))
        reply = await answer(fake, faceless, "No face found", timeout=120)
        assert reply is fake.original_message(faceless) and not reply.files
    assert fake.unhandled == []


@pytest.mark.asyncio
async def test_vote_poll_with_buttons_then_admin_closes_it(start_bot):
    stack = await start_bot()
    fake, service = stack.fake, stack.service
    async with running_worker(service):
        vote = await fake.slash_command(
            "blendvote", user(fake, "ada"), options={"levels": "8 16"}, member_permissions=ADMINISTRATOR
        )
        poll = await answer(fake, vote, "Vote for this community")
        assert not poll.ephemeral
        buttons = [c for c in poll.custom_ids() if c.startswith("toonify:v:")]
        assert len(buttons) == 2
        await fake.wait_for(lambda: poll.files, timeout=120)  # the grid of candidates, once the worker drew it

        first = await fake.press_button(poll, buttons[1], fake.user)
        assert (await answer(fake, first, "Your vote: option 2")).ephemeral
        await fake.wait_for(lambda: "2: 1" in poll.content)
        second = await fake.press_button(poll, buttons[1], user(fake, "bob"))
        assert (await answer(fake, second, "option 2")).ephemeral
        await fake.wait_for(lambda: "2: 2" in poll.content)
        assert poll.files and poll.custom_ids() == buttons  # the grid and the buttons stay as the tally changes

        refused = await fake.slash_command("pollclose", user(fake, "bob"))
        assert "only the admins" in (await answer(fake, refused, "admins")).content
        closed = await fake.slash_command("pollclose", user(fake, "ada"), member_permissions=ADMINISTRATOR)
        assert "Winner: 2" in (await answer(fake, closed, "Winner")).content
    assert fake.unhandled == []


@pytest.mark.asyncio
async def test_quota_then_expired_token_falls_back_to_the_channel(start_bot, monkeypatch):
    stack = await start_bot(TOONIFY_QUOTA_USER_ACTIVE="1")
    fake, service = stack.fake, stack.service
    me = Actor("discord", fake.user["id"], "Tester")
    ticket = await service.submit_toon(me, Place("discord", fake.guild_id, "Fake Guild"), astronaut(31))
    assert ticket.status == "queued"  # no worker yet: it stays queued
    second = await fake.slash_command("toon", attachments=photo(astronaut(32)))
    assert "in progress at a time" in (await answer(fake, second, "at a time")).content
    cancel = await fake.slash_command("cancel")
    assert (await answer(fake, cancel, "Stopping")).ephemeral

    async with running_worker(service):
        # The token dies at once: the defer works, every webhook call gets 401; the bot goes on with its own token.
        late = await fake.slash_command(
            "toon", options={"mode": "fast"}, attachments=photo(astronaut(33)), token_lifetime=0
        )

        def posted() -> FakeMessage | None:
            return next((m for m in fake.messages.values() if m.via == "channel" and m.files), None)

        result = await fake.wait_for(posted, timeout=120)
        assert "Here you are" in result.content and f"<@{fake.user['id']}>" in result.content
        assert "toonify:b:8" in result.custom_ids()
        original = fake.original_message(late)  # the "thinking" message became the progress message
        await fake.wait_for(lambda: original.content == "Done.")
        webhook = fake.find_calls(None, rf"^/webhooks/{fake.application_id}/{late['token']}")
        assert [c.status for c in webhook] == [401]  # tried once, then never again
        assert fake.find_calls("PATCH", rf"^/channels/{fake.channel_id}/messages/{original.id}$")

    # Near the end of the token's life the bot stops using it before it fails.
    monkeypatch.setattr(discord_bot, "TOKEN_SAFE_S", -1)
    old = await fake.slash_command(
        "publish", user(fake, "ada"), options={"name": "nosuchstyle"}, member_permissions=ADMINISTRATOR
    )
    reply = await fake.wait_for(lambda: (m := fake.original_message(old)) and not m.loading and m, timeout=30)
    assert "nosuchstyle" in reply.content
    assert not fake.find_calls(None, rf"^/webhooks/{fake.application_id}/{old['token']}")
    assert fake.unhandled == []


@pytest.mark.asyncio
async def test_stopping_refuses_new_commands_and_the_next_start_delivers(start_bot):
    stack = await start_bot(TOONIFY_SHUTDOWN_GRACE_S="4")
    fake, service = stack.fake, stack.service
    inter = await fake.slash_command("toon", options={"mode": "fast"}, attachments=photo(astronaut(51)))
    original = await fake.wait_for(
        lambda: (m := fake.original_message(inter)) and m.content.startswith("Starting") and m
    )
    stack.stop.set()  # no worker yet: the /toon waits through the grace period, then its delivery is released
    await asyncio.sleep(1)
    late = await fake.slash_command("help")
    assert (await answer(fake, late, "restarting")).ephemeral
    await stack.stop_bot()
    assert "toonify:c:" in str(original.components), "still queued when the bot stopped: Cancel stays"

    await stack.start_bot()
    async with running_worker(service):

        def posted() -> FakeMessage | None:
            return next((m for m in fake.messages.values() if m.via == "channel" and m.files), None)

        result = await fake.wait_for(posted, timeout=120)  # the interaction is gone: through the channel
        assert "Here you are" in result.content and f"<@{fake.user['id']}>" in result.content
        assert len(result.files) == 2  # the composite and the face, in one message
        await fake.wait_for(lambda: original.content == "Done.")
        assert original.components == []
    assert not fake.followups(inter), "the first bot sent no result"
    assert fake.unhandled == []
