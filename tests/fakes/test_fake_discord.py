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


class EchoBot(commands.Bot):
    def __init__(self) -> None:
        # guild_ready_timeout: discord.py waits this long after the last GUILD_CREATE before on_ready (default 2 s).
        super().__init__(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.05)
        self.events: list[tuple] = []

    async def setup_hook(self) -> None:
        await self.add_cog(EchoCog(self))
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
async def test_slash_command_followup_button_and_expired_token() -> None:
    async with FakeDiscord() as fake, point_discord_py_at(fake), running_bot(fake) as bot:
        # Login, gateway, sync.
        assert fake.find_calls("GET", "^/users/@me$") and fake.find_calls("GET", "^/oauth2/applications/@me$")
        assert fake.identifies[0]["intents"] == discord.Intents.default().value
        assert fake.gateway_connections[0]["query"]["v"] == "10"
        assert bot.get_guild(int(fake.guild_id)).get_channel(int(fake.channel_id)) is not None
        (sync,) = fake.find_calls("PUT", rf"^/applications/{fake.application_id}/guilds/{fake.guild_id}/commands$")
        assert sync.status == 200 and [c["name"] for c in fake.guild_commands[fake.guild_id]] == ["echo"]
        assert sync.json[0]["options"][0]["type"] == 11  # attachment option

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
        async with aiohttp.ClientSession() as http:  # the URL discord.py got serves the uploaded bytes
            async with http.get(urls[0]) as resp:
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
