"""The fake Discord driven by a real discord.py ``commands.Bot`` (no Toonify code): a slash command with an attachment
option that defers, downloads, edits its response, sends a followup with a file and a persistent button; the button;
an expired interaction token with the bot-token fallback; a user message; a gateway RESUME."""

from __future__ import annotations

import asyncio
import contextlib
import io

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.fakes.discord import ADMINISTRATOR, FakeDiscord, point_discord_py_at

BUTTON_ID = "echo:again"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 120, 40)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class EchoView(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Again", style=discord.ButtonStyle.primary, custom_id=BUTTON_ID)
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        interaction.client.events.append(("button", interaction.user.id, interaction.message.id))
        await interaction.response.edit_message(content="pressed", view=self)


class EchoCog(commands.Cog):
    def __init__(self, bot: EchoBot) -> None:
        self.bot = bot

    @app_commands.command(name="echo", description="Echo an image back")
    async def echo(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        events = self.bot.events
        perms = interaction.permissions
        events.append(("invoked", image.filename, image.size, image.content_type, perms.administrator))
        await interaction.response.defer(thinking=True)
        data = await image.read()
        try:
            await interaction.edit_original_response(content="working…")
            await interaction.edit_original_response(content=f"got {len(data)} bytes")
        except discord.HTTPException as exc:
            events.append(("edit_failed", exc.status, exc.code))
            # Fallback with the bot token: post in the channel, then edit that message.
            msg = await interaction.channel.send("token expired, posting here")
            await msg.edit(content="done", attachments=[discord.File(io.BytesIO(data), "echo.png")])
            events.append(("fallback", msg.id))
            return
        followup = await interaction.followup.send(
            "here it is", file=discord.File(io.BytesIO(data), "echo.png"), view=EchoView(), wait=True
        )
        events.append(("followup", followup.id, [a.url for a in followup.attachments]))

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.id != self.bot.user.id:
            self.bot.events.append(("message", message.author.id, message.content))


class DescribeModal(discord.ui.Modal, title="Describe yourself"):
    name = discord.ui.TextInput(label="Name", custom_id="name")
    bio = discord.ui.TextInput(label="Bio", custom_id="bio", required=False, style=discord.TextStyle.paragraph)

    def __init__(self, style: str, strength: float) -> None:
        super().__init__(custom_id="describe")
        self.style, self.strength = style, strength

    async def on_submit(self, interaction: discord.Interaction) -> None:
        interaction.client.events.append(("submitted", self.name.value, self.bio.value))
        await interaction.response.send_message(f"{self.style} {self.strength} {self.name.value}")


class MoreCog(commands.Cog):
    """Other response paths: an immediate ephemeral reply with a file and a select, a thinking defer answered by a
    followup, a modal."""

    def __init__(self, bot: EchoBot) -> None:
        self.bot = bot

    @app_commands.command(name="quick", description="Answer at once")
    async def quick(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=60)
        select = discord.ui.Select(
            custom_id="style", options=[discord.SelectOption(label=s, value=s) for s in ("arcane", "pixar")]
        )

        async def chosen(inter: discord.Interaction) -> None:
            self.bot.events.append(("chosen", list(select.values)))
            await inter.response.defer()  # type 6: @original is now the message the select is on
            await inter.edit_original_response(content=f"style {select.values[0]}", view=None)

        select.callback = chosen
        view.add_item(select)
        file = discord.File(io.BytesIO(PNG), "quick.png")
        await interaction.response.send_message("quick", file=file, view=view, ephemeral=True)
        msg = await interaction.original_response()
        self.bot.events.append(("quick", msg.id, msg.flags.ephemeral, msg.attachments[0].filename))

    @app_commands.command(name="think", description="Think, then answer")
    async def think(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        msg = await interaction.followup.send("done thinking", wait=True)
        self.bot.events.append(("think", msg.id))
        await interaction.delete_original_response()

    @app_commands.command(name="ask", description="Open a form")
    @app_commands.choices(style=[app_commands.Choice(name=s.title(), value=s) for s in ("arcane", "pixar")])
    async def ask(self, interaction: discord.Interaction, style: app_commands.Choice[str], strength: float = 0.5):
        await interaction.response.send_modal(DescribeModal(style.value, strength))


class EchoBot(commands.Bot):
    def __init__(self) -> None:
        # guild_ready_timeout: discord.py waits this long after the last GUILD_CREATE before on_ready (default 2 s).
        super().__init__(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.events: list[tuple] = []

    async def setup_hook(self) -> None:
        await self.add_cog(EchoCog(self))
        await self.add_cog(MoreCog(self))

        @self.tree.error
        async def on_app_command_error(interaction: discord.Interaction, error: Exception) -> None:
            original = getattr(error, "original", error)
            self.events.append(("error", interaction.command.name, getattr(original, "code", None)))

        self.add_view(EchoView())  # persistent: routed by custom_id, even for messages from before a restart


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord):
    bot = EchoBot()
    await bot.login(fake.token)
    task = asyncio.create_task(bot.connect())
    try:
        await asyncio.wait_for(bot.wait_until_ready(), 10)
        guild = discord.Object(int(fake.guild_id))
        bot.tree.copy_global_to(guild=guild)
        await bot.tree.sync(guild=guild)
        yield bot
    finally:
        await bot.close()
        await asyncio.wait_for(task, 10)


def events_of(bot: EchoBot, kind: str) -> list[tuple]:
    return [e for e in bot.events if e[0] == kind]


@pytest.mark.asyncio
async def test_slash_command_followup_button_and_expired_token(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeDiscord() as fake, point_discord_py_at(fake), running_bot(fake) as bot:
        # Login, gateway, sync.
        assert fake.find_calls("GET", "^/users/@me$") and fake.find_calls("GET", "^/oauth2/applications/@me$")
        assert fake.identifies[0]["intents"] == discord.Intents.default().value
        assert fake.gateway_connections[0]["query"]["v"] == "10"
        assert bot.get_guild(int(fake.guild_id)).get_channel(int(fake.channel_id)) is not None
        (sync,) = fake.find_calls("PUT", rf"^/applications/{fake.application_id}/guilds/{fake.guild_id}/commands$")
        assert sync.status == 200 and "echo" in [c["name"] for c in fake.guild_commands[fake.guild_id]]
        assert next(c for c in sync.json if c["name"] == "echo")["options"][0]["type"] == 11  # attachment option

        # /echo image:<png>
        att = fake.add_attachment(PNG, "face.png", "image/png")
        inter = await fake.slash_command(
            "echo", fake.user, attachments={"image": att}, member_permissions=ADMINISTRATOR
        )
        followup = await fake.wait_for(lambda: fake.followups(inter))
        assert events_of(bot, "invoked") == [("invoked", "face.png", len(PNG), "image/png", True)]

        token = inter["token"]
        (callback,) = fake.callbacks(inter)
        assert callback.status == 200 and callback.json == {"type": 5}
        assert callback.query == {"with_response": "1"}
        assert fake.find_calls("GET", rf"/ephemeral-attachments/{fake.channel_id}/{att['id']}/face\.png$")
        edits = fake.find_calls("PATCH", rf"^/webhooks/{fake.application_id}/{token}/messages/@original$")
        assert [e.json["content"] for e in edits] == ["working…", f"got {len(PNG)} bytes"]
        original = fake.original_message(inter)
        assert (original.via, original.content, original.edits, original.loading) == (
            "interaction",
            f"got {len(PNG)} bytes",
            2,
            False,
        )
        assert len(original.history) == 2 and original.history[0]["flags"] & 128  # the "thinking" message

        (post,) = fake.find_calls("POST", rf"^/webhooks/{fake.application_id}/{token}$")
        assert post.query["wait"] == "1" and [f.data for f in post.files] == [PNG]
        assert [f.filename for f in post.files] == ["echo.png"]
        (msg,) = followup
        assert msg.via == "followup" and msg.files == [PNG] and msg.attachments[0].content_type == "image/png"
        assert msg.custom_ids() == [BUTTON_ID]
        (_, followup_id, urls) = (await fake.wait_for(lambda: events_of(bot, "followup")))[0]
        assert followup_id == int(msg.id)
        async with aiohttp.ClientSession() as http, http.get(urls[0]) as resp:  # the URL discord.py got
            assert await resp.read() == PNG

        # Press the persistent button: callback type 7 edits the message in place.
        press = await fake.press_button(msg, BUTTON_ID, fake.user)
        await fake.wait_for(lambda: fake.response_type(press))
        (button_cb,) = fake.callbacks(press)
        assert button_cb.json["type"] == 7 and button_cb.json["data"]["content"] == "pressed"
        assert (msg.content, msg.edits, msg.files) == ("pressed", 1, [PNG])
        assert events_of(bot, "button") == [("button", int(fake.user["id"]), int(msg.id))]

        # An expired token: the defer works, the webhook edits get 401 and the bot falls back to the bot token.
        inter2 = await fake.slash_command("echo", attachments={"image": (PNG, "again.png")}, token_lifetime=0)
        await fake.wait_for(lambda: events_of(bot, "fallback"))
        assert events_of(bot, "edit_failed") == [("edit_failed", 401, 50027)]
        assert fake.callbacks(inter2)[0].status == 200
        failed = fake.find_calls("PATCH", rf"/webhooks/{fake.application_id}/{inter2['token']}/messages/@original")
        assert [c.status for c in failed] == [401]
        assert failed[0].response == {"message": "Invalid Webhook Token", "code": 50027}
        (posted,) = [m for m in fake.messages.values() if m.via == "channel"]
        assert (posted.content, posted.files, posted.edits, posted.author["id"]) == (
            "done",
            [PNG],
            1,
            fake.bot_user["id"],
        )
        assert fake.find_calls("PATCH", rf"^/channels/{fake.channel_id}/messages/{posted.id}$")[0].files[0].data == PNG

        # A second callback for the same interaction is refused, as on Discord.
        async with aiohttp.ClientSession() as http:
            url = f"{fake.api_url}/interactions/{inter['id']}/{token}/callback"
            async with http.post(url, json={"type": 6}) as resp:
                assert resp.status == 400 and (await resp.json())["code"] == 40060

        # A user's message: without the message_content intent the bot gets it with empty content.
        await fake.user_message("hello bot")
        await fake.wait_for(lambda: events_of(bot, "message"))
        assert events_of(bot, "message") == [("message", int(fake.user["id"]), "")]

        # RECONNECT -> discord.py RESUMEs at resume_gateway_url and still gets events.
        await fake.request_reconnect()
        await fake.wait_for(lambda: len(fake.gateway_connections) == 2 and fake.gateway_received[-1]["op"] in (1, 6))
        await fake.user_message("again", mention_bot=True)
        await fake.wait_for(lambda: len(events_of(bot, "message")) == 2)
        assert fake.gateway_connections[1]["path"] == "/gateway-resume"
        assert any(f["op"] == 6 for f in fake.gateway_received)
        assert fake.unhandled == []
    assert bot.is_closed()
    assert not [r for r in caplog.records if r.name.startswith("discord") and r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.asyncio
async def test_immediate_reply_select_thinking_followup_modal_and_deadline(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeDiscord() as fake, point_discord_py_at(fake), running_bot(fake) as bot:
        # Callback type 4 with a file (multipart), ephemeral; GET @original.
        quick = await fake.slash_command("quick")
        (_, msg_id, ephemeral, filename) = (await fake.wait_for(lambda: events_of(bot, "quick")))[0]
        (callback,) = fake.callbacks(quick)
        assert callback.json["type"] == 4 and callback.json["data"]["flags"] == 64
        assert [(f.field, f.filename, f.data) for f in callback.files] == [("files[0]", "quick.png", PNG)]
        original = fake.original_message(quick)
        assert (int(original.id), ephemeral, filename, original.files) == (msg_id, True, "quick.png", [PNG])
        assert fake.find_calls("GET", rf"/webhooks/{fake.application_id}/{quick['token']}/messages/@original$")

        # A select: deferred update (6), then @original edits the message the select is on.
        with pytest.raises(ValueError, match="no component"):
            await fake.press_button(original, "nope")
        chose = await fake.select(original, "style", ["pixar"])
        await fake.wait_for(lambda: original.content == "style pixar")
        assert fake.callbacks(chose)[0].json == {"type": 6}
        assert events_of(bot, "chosen") == [("chosen", ["pixar"])] and original.components == []

        # A thinking defer: the first followup replaces the loading message; then it is deleted.
        think = await fake.slash_command("think")
        await fake.wait_for(lambda: events_of(bot, "think") and fake.original_message(think).deleted)
        answer = fake.original_message(think)
        assert events_of(bot, "think") == [("think", int(answer.id))] and fake.followups(think) == []
        assert (answer.content, answer.ephemeral, answer.loading) == ("done thinking", True, False)

        # Options typed from the synced schema (choices checked), a modal, its submission.
        with pytest.raises(ValueError, match="not a choice"):
            await fake.slash_command("ask", options={"style": "anime"})
        with pytest.raises(ValueError, match="needs options"):
            await fake.slash_command("ask", options={"strength": 1.0})
        ask = await fake.slash_command("ask", options={"style": "pixar", "strength": 0.8})
        modal = await fake.wait_for(lambda: fake.modal(ask))
        assert modal["custom_id"] == "describe" and fake.response_type(ask) == 9
        submit = await fake.submit_modal(ask, {"name": "Ada"})
        reply = await fake.wait_for(lambda: fake.original_message(submit))
        assert reply.content == "pixar 0.8 Ada" and events_of(bot, "submitted") == [("submitted", "Ada", "")]

        # The 3-second rule: a late callback gets 404 Unknown interaction (10062) and the bot sees NotFound.
        fake.callback_deadline = 0.0
        late = await fake.slash_command("think")
        await fake.wait_for(lambda: events_of(bot, "error"))
        assert events_of(bot, "error") == [("error", "think", 10062)]
        assert fake.callbacks(late)[0].status == 404
        assert fake.unhandled == []
    assert not [r for r in caplog.records if r.name.startswith("discord") and r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.asyncio
async def test_login_and_gateway_refusals() -> None:
    async with FakeDiscord(privileged_intents=False) as fake, point_discord_py_at(fake):
        bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
        with pytest.raises(discord.LoginFailure):
            await bot.login("wrong-token")
        await bot.close()

        bot = commands.Bot(command_prefix="!", intents=discord.Intents.all())
        await bot.login(fake.token)
        with pytest.raises(discord.PrivilegedIntentsRequired):  # with reconnect=False it is a bare ConnectionClosed
            await asyncio.wait_for(bot.connect(), 10)
        await bot.close()
        assert fake.identifies[-1]["intents"] == discord.Intents.all().value
