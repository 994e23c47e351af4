"""The Discord front end: a discord.py 2.x bot (slash commands in a Cog, persistent buttons) in front of the core.

Every slash command is deferred at once (Discord allows 3 s) and then runs as its own task through the command
core; the deferred "thinking" message becomes the core's first reply and later replies are followups. Deferrals are
public for the commands whose answer concerns the channel (/toon, /blend, /edit, /sweep, /blendvote, /finetune,
/distill, /publish, /pollclose) and ephemeral for personal ones (/style, /styles, /cancel, /forget, /help). Discord
cannot turn a public deferral into an ephemeral message, so an ephemeral first reply to a public command (an error,
mostly) is shown publicly in place of the "thinking" message; later ephemeral replies are ephemeral followups.

An interaction token lives 15 minutes. A conversation older than :data:`TOKEN_SAFE_S`, or whose webhook calls fail
with 401 / 50027 / Not Found, switches to the bot token: it edits its (non-ephemeral) messages through the channel
and posts new ones there, mentioning the user (an ephemeral reply then becomes a public one: there is no other way).

Buttons carry ``toonify:<core action>`` custom ids and are :class:`discord.ui.DynamicItem` s registered with the
bot, so a press on a message from before a restart still reaches the core.

``DISCORD_API_BASE_URL`` / ``DISCORD_GATEWAY_URL`` point the bot elsewhere (a proxy, a test fake);
``DISCORD_GUILD_IDS`` (comma separated) syncs the commands to those guilds instead of globally;
``DISCORD_SHARDED=1`` runs an AutoShardedBot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands
from discord.ext import commands

from backend.delivery import Address, DeliveryRecord
from backend.service import Actor, Place, ToonService
from bots.core import ORIGIN, Command, CommandCore, Reply, Upload, drain, keep_deliveries, run_command
from bots.strings import t

log = logging.getLogger("toonify.bots.discord")

TOKEN_SAFE_S = 14 * 60  # interaction tokens die after 15 min; switch to the bot token a minute before
TEXT_LIMIT = 2000
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
MAX_FILES = 10
BUTTONS_PER_ROW, MAX_ROWS = 5, 5
COG_NAME = "Toonify"
STYLE_CHOICES = 25  # Discord shows at most 25 autocomplete choices
_TOKEN_GONE_CODES = {50027, 10015, 10062}  # invalid webhook token, unknown webhook, unknown interaction
UNKNOWN_MESSAGE = 10008


def _fit(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def _token_gone(e: discord.HTTPException) -> bool:
    """The interaction webhook refuses us: expired (401/50027) or unknown. A deleted message (10008) is not that:
    the bot token could not edit it either."""
    if e.status == 401 or e.code in _TOKEN_GONE_CODES:
        return True
    return isinstance(e, discord.NotFound) and e.code != UNKNOWN_MESSAGE


# ---------------------------------------------------------------------------------------------------- buttons


class ActionButton(discord.ui.DynamicItem[discord.ui.Button], template=r"toonify:(?P<action>.+)"):
    """A button whose custom id holds the core's action string: it survives restarts without stored views."""

    def __init__(self, action: str, label: str, *, row: int | None = None) -> None:
        kind = action.partition(":")[0]
        style = {"c": discord.ButtonStyle.danger, "v": discord.ButtonStyle.primary}.get(
            kind, discord.ButtonStyle.secondary
        )
        super().__init__(discord.ui.Button(label=label[:80], style=style, custom_id=f"toonify:{action}"), row=row)
        self.action = action

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> ActionButton:
        return cls(match["action"], item.label or "…")

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog(COG_NAME)
        if isinstance(cog, ToonCog):
            await cog.press(interaction, self.action)


def _view(reply: Reply) -> discord.ui.View | None:
    if not reply.buttons:
        return None
    view = discord.ui.View(timeout=None)
    row = 0
    for buttons in reply.buttons:  # the core's rows may be longer than Discord's five buttons
        for start in range(0, len(buttons), BUTTONS_PER_ROW):
            if row >= MAX_ROWS:
                break
            for b in buttons[start : start + BUTTONS_PER_ROW]:
                view.add_item(ActionButton(b.action, b.label, row=row))
            row += 1
    return view


def _files(reply: Reply, limit: int) -> list[discord.File]:
    """The images that fit in one message: at most ten, together within the upload limit (a huge composite is
    left out rather than failing the whole message)."""
    files, total = [], 0
    attached = [*reply.images, *([reply.animation] if reply.animation else [])]  # a /sweep's GIF: an attachment
    for name, data in attached[:MAX_FILES]:
        if total + len(data) > limit:
            log.warning("%s (%d bytes) is over the upload limit of %d bytes: not sent", name, len(data), limit)
            continue
        total += len(data)
        files.append(discord.File(io.BytesIO(data), filename=name))
    return files


def _edit_kwargs(reply: Reply, limit: int) -> dict[str, Any]:
    """Fresh each call (a discord.File is read once). Without images an edit keeps the message's attachments
    (a poll's grid stays when the tally changes); without buttons it removes the old ones."""
    kw: dict[str, Any] = {"content": _fit(reply.text), "view": _view(reply)}
    if reply.images or reply.animation:
        kw["attachments"] = _files(reply, limit)
    return kw


def _send_kwargs(reply: Reply, limit: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"content": _fit(reply.text)} if reply.text else {}  # more photos of a result: no text
    view = _view(reply)
    if view is not None:
        kw["view"] = view
    if reply.images or reply.animation:
        kw["files"] = _files(reply, limit)
    return kw


# ---------------------------------------------------------------------------------------------- conversation


@dataclass(frozen=True)
class Sent:
    """A message this conversation made (the handle the core edits)."""

    message_id: int
    original: bool = False  # the interaction's own response (the deferred message)
    ephemeral: bool = False
    by_bot: bool = False  # made with the bot token: edit it through the channel


class DiscordConversation:
    """The core's Conversation for one interaction (a slash command or a button press)."""

    photos_per_message = MAX_FILES

    def __init__(
        self,
        interaction: discord.Interaction,
        *,
        fills_original: bool,
        original_id: int | None = None,
        original_ephemeral: bool = False,
    ) -> None:
        self.interaction = interaction
        # attachment_size_limit from the payload (discord.py 2.5+), else Discord's default per attachment
        self.upload_limit: int = getattr(interaction, "filesize_limit", None) or DEFAULT_UPLOAD_LIMIT
        self._fill_original = fills_original  # a deferred "thinking" message waits for the first reply
        self._original_id = original_id
        self._original_ephemeral = original_ephemeral
        self._bot_token = False

    def _webhook_usable(self, ephemeral: bool = False) -> bool:
        """False once the token failed, or is near its end; an ephemeral message has no other way, so it still
        tries the webhook until that fails."""
        if self._bot_token:
            return False
        age = (discord.utils.utcnow() - self.interaction.created_at).total_seconds()
        if age > TOKEN_SAFE_S and not ephemeral:
            self._switch("the interaction token is about to expire")
        return not self._bot_token

    def _switch(self, why: str) -> None:
        if not self._bot_token:
            log.info("interaction %s: %s; using the bot token from now on", self.interaction.id, why)
        self._bot_token = True

    def _for_edit(self, reply: Reply) -> dict[str, Any]:
        return _edit_kwargs(reply, self.upload_limit)

    def _for_send(self, reply: Reply) -> dict[str, Any]:
        return _send_kwargs(reply, self.upload_limit)

    def _channel(self) -> Any:  # a channel (or DM) of the interaction: send() and get_partial_message()
        channel = self.interaction.channel
        if channel is None or not hasattr(channel, "send"):
            raise RuntimeError("the interaction token expired and there is no channel to post in")
        return channel

    async def send(self, reply: Reply) -> Sent:
        fill, self._fill_original = self._fill_original, False
        it = self.interaction
        ephemeral = self._original_ephemeral if fill else reply.ephemeral
        if self._webhook_usable(ephemeral):
            try:
                if fill:
                    msg = await it.edit_original_response(**self._for_edit(reply))
                    return Sent(msg.id, original=True, ephemeral=self._original_ephemeral)
                msg = await it.followup.send(**self._for_send(reply), ephemeral=reply.ephemeral, wait=True)
                return Sent(msg.id, ephemeral=reply.ephemeral)
            except discord.HTTPException as e:
                if not _token_gone(e):
                    raise
                self._switch(f"webhook answered {e.status}/{e.code}")
        channel = self._channel()
        if fill and self._original_id is not None and not self._original_ephemeral:
            try:  # replace the "thinking" message rather than leave it spinning
                await channel.get_partial_message(self._original_id).edit(**self._for_edit(reply))
                return Sent(self._original_id, original=True, by_bot=True)
            except discord.HTTPException:
                log.info("could not edit the deferred message %s; posting a new one", self._original_id)
        kw = self._for_send(reply)
        kw["content"] = _fit(f"{it.user.mention} {kw.get('content', '')}")  # out of the interaction: say whom
        msg = await channel.send(**kw, allowed_mentions=discord.AllowedMentions(users=[it.user]))
        return Sent(msg.id, by_bot=True)

    async def edit(self, handle: Any, reply: Reply) -> None:
        it = self.interaction
        if handle == ORIGIN:  # after a deferred update, @original is the message the button is on
            message = it.message
            if message is None:
                raise RuntimeError("no message to edit: this interaction came from no button")
            handle = Sent(message.id, original=True, ephemeral=message.flags.ephemeral)
        if not handle.by_bot and self._webhook_usable(handle.ephemeral):
            try:
                if handle.original:
                    await it.edit_original_response(**self._for_edit(reply))
                else:
                    await it.followup.edit_message(handle.message_id, **self._for_edit(reply))
                return
            except discord.HTTPException as e:
                if not _token_gone(e):
                    raise
                self._switch(f"webhook answered {e.status}/{e.code}")
        if handle.ephemeral:
            log.warning("interaction %s: cannot edit ephemeral message %s any more", it.id, handle.message_id)
            return
        await self._channel().get_partial_message(handle.message_id).edit(**self._for_edit(reply))

    async def working(self) -> None:
        """Nothing: the deferred "thinking" message and the progress edits already show it."""

    def address(self, handle: Any) -> Address | None:
        channel_id = self.interaction.channel_id
        if not isinstance(handle, Sent) or handle.ephemeral or channel_id is None:
            return None  # only its own interaction could edit an ephemeral message
        extra = {"user_id": str(self.interaction.user.id), "upload_limit": self.upload_limit}
        return Address("discord", str(channel_id), str(handle.message_id), None, extra)


class ChannelConversation:
    """The core's Conversation for a delivery taken over after a restart: the interaction is gone, so messages go
    through the channel with the bot token, mentioning the person who asked."""

    photos_per_message = MAX_FILES

    def __init__(self, bot: commands.Bot, channel_id: int, user_id: int, upload_limit: int) -> None:
        self.channel = bot.get_partial_messageable(channel_id)
        self.user = discord.Object(user_id)
        self.upload_limit = upload_limit

    @classmethod
    def reopen(cls, bot: commands.Bot, record: DeliveryRecord) -> tuple[ChannelConversation, Sent]:
        a = record.address
        limit = int(a.extra.get("upload_limit") or DEFAULT_UPLOAD_LIMIT)
        conv = cls(bot, int(a.chat_id), int(a.extra.get("user_id") or 0), limit)
        return conv, Sent(int(a.progress_message_id), by_bot=True)

    async def send(self, reply: Reply) -> Sent:
        kw = _send_kwargs(reply, self.upload_limit)
        if not reply.continues:
            kw["content"] = _fit(f"<@{self.user.id}> {kw.get('content', '')}")
        msg = await self.channel.send(**kw, allowed_mentions=discord.AllowedMentions(users=[self.user]))
        return Sent(msg.id, by_bot=True)

    async def edit(self, handle: Any, reply: Reply) -> None:
        await self.channel.get_partial_message(handle.message_id).edit(**_edit_kwargs(reply, self.upload_limit))

    async def working(self) -> None:
        """Nothing: the progress edits show it."""

    def address(self, handle: Any) -> Address | None:
        return None  # its delivery is recorded already


# ---------------------------------------------------------------------------------------------- the cog


def actor_of(interaction: discord.Interaction) -> Actor:
    user = interaction.user
    admin = False
    if interaction.guild_id is not None:
        perms = interaction.permissions  # the member's permissions here, as the payload states them
        admin = perms.administrator or perms.manage_guild
    return Actor(platform="discord", user_id=str(user.id), name=user.display_name, is_admin=admin)


def place_of(interaction: discord.Interaction) -> Place | None:
    if interaction.guild_id is None:
        return None
    guild = interaction.guild
    return Place(platform="discord", community_id=str(interaction.guild_id), name=guild.name if guild else "")


def upload_of(attachment: discord.Attachment) -> Upload:
    return Upload(attachment.filename, attachment.content_type, attachment.size, attachment.read)


async def style_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The styles visible here whose names contain what was typed so far."""
    cog = interaction.client.get_cog(COG_NAME)
    if not isinstance(cog, ToonCog):
        return []
    try:
        styles = await cog.core.service.list_styles(place_of(interaction))
    except Exception:  # an autocomplete must answer quickly or not at all; never raise into discord.py
        log.warning("style autocomplete failed", exc_info=True)
        return []
    needle = current.lower()
    names = [s.name for s in styles if needle in s.name.lower()]
    return [app_commands.Choice(name=n, value=n) for n in names[:STYLE_CHOICES]]


async def direction_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The named directions of the style of the user's last toon whose names contain what was typed so far."""
    cog = interaction.client.get_cog(COG_NAME)
    if not isinstance(cog, ToonCog):
        return []
    try:
        found = await cog.core.service.directions(actor_of(interaction), place_of(interaction))
    except Exception:  # an autocomplete must answer quickly or not at all
        log.warning("direction autocomplete failed", exc_info=True)
        return []
    names = [n for n in found.names if current.lower() in n.lower()]
    return [app_commands.Choice(name=n, value=n) for n in names[:STYLE_CHOICES]]


def _options(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


class ToonCog(commands.Cog, name=COG_NAME):
    """The slash commands. Each handler defers, builds the core's Command and starts it in its own task."""

    def __init__(self, core: CommandCore) -> None:
        self.core = core
        self.tasks: set[asyncio.Task] = set()
        self.accepting = True  # False while stopping: new commands are told to come back in a minute

    # ------------------------------------------------------------------ plumbing

    def keep(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the core answers errors; this is a lost reply
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def shutdown(self, grace_s: float) -> None:
        """Take no new commands; let the running ones finish for ``grace_s``, then stop them (their jobs go on in
        the workers, their deliveries are carried on by the next start)."""
        self.accepting = False
        await drain(self.tasks, grace_s)

    async def _refuse_while_stopping(self, interaction: discord.Interaction) -> bool:
        if self.accepting:
            return False
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.send_message(t("restarting", str(interaction.locale)), ephemeral=True)
        return True

    async def _run(
        self,
        interaction: discord.Interaction,
        name: str,
        args: list[str] | None = None,
        *,
        options: dict[str, Any] | None = None,
        upload: Upload | None = None,
        ephemeral: bool = False,
    ) -> None:
        if await self._refuse_while_stopping(interaction):
            return
        answer = await interaction.response.defer(thinking=True, ephemeral=ephemeral)  # first: the 3-second rule
        conv = DiscordConversation(
            interaction,
            fills_original=True,
            original_id=getattr(answer, "message_id", None),  # discord.py < 2.5 returns nothing
            original_ephemeral=ephemeral,
        )
        cmd = Command(
            name,
            args or [],
            actor_of(interaction),
            place_of(interaction),
            upload,
            locale=str(interaction.locale),
            options=options or {},
        )
        self.keep(await run_command(self.core, cmd, conv))

    async def press(self, interaction: discord.Interaction, action: str) -> None:
        """A button: acknowledge without a new message (the core's replies are followups), then the core."""
        if await self._refuse_while_stopping(interaction):
            return
        try:
            await interaction.response.defer()
        except discord.HTTPException as e:  # too late (10062) or already answered: the user can press again
            log.error("could not acknowledge button %s: %s", action, e)
            return
        conv = DiscordConversation(interaction, fills_original=False)
        actor, place, locale = actor_of(interaction), place_of(interaction), str(interaction.locale)
        task = asyncio.create_task(self.core.press(action, actor, place, conv, locale), name=f"button {action}")
        self.keep(task)

    # ------------------------------------------------------------------ everyone

    @app_commands.command(name="toon", description=t("cmd_toon_discord"))
    @app_commands.describe(
        image="A photo with a face",
        style="Which style (default: yours, or this server's)",
        blend="Blend resolution: small = more toon",
        mode="instant, fast, balanced or quality (default: instant where the style has an instant model)",
    )
    @app_commands.autocomplete(style=style_choices)
    async def toon(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        style: str | None = None,
        blend: app_commands.Range[int, 4, 256] | None = None,
        mode: Literal["instant", "fast", "balanced", "quality"] | None = None,
    ) -> None:
        opts = _options(style=style, blend=blend, mode=mode)
        await self._run(interaction, "toon", options=opts, upload=upload_of(image))

    @app_commands.command(name="blend", description=t("cmd_blend_discord"))
    @app_commands.describe(resolution="Blend resolution: small = more toon", style="Another style, if you like")
    @app_commands.autocomplete(style=style_choices)
    async def blend(
        self,
        interaction: discord.Interaction,
        resolution: app_commands.Range[int, 4, 256],
        style: str | None = None,
    ) -> None:
        await self._run(interaction, "blend", options=_options(resolution=resolution, style=style))

    @app_commands.command(name="edit", description=t("cmd_edit"))
    @app_commands.describe(
        direction="A named direction of your last toon's style (leave it out to list them)",
        strength="How far: 2 is strong, negative goes the other way, 0 takes it out",
    )
    @app_commands.autocomplete(direction=direction_choices)
    async def edit(
        self,
        interaction: discord.Interaction,
        direction: str | None = None,
        strength: app_commands.Range[float, -10.0, 10.0] | None = None,
    ) -> None:
        await self._run(interaction, "edit", options=_options(direction=direction, strength=strength))

    @app_commands.command(name="sweep", description=t("cmd_sweep"))
    @app_commands.describe(style="Another style, if you like")
    @app_commands.autocomplete(style=style_choices)
    async def sweep(self, interaction: discord.Interaction, style: str | None = None) -> None:
        await self._run(interaction, "sweep", options=_options(style=style))

    @app_commands.command(name="style", description=t("cmd_style"))
    @app_commands.describe(name="A style name (see /styles)")
    @app_commands.autocomplete(name=style_choices)
    async def style(self, interaction: discord.Interaction, name: str) -> None:
        await self._run(interaction, "style", options={"name": name}, ephemeral=True)

    @app_commands.command(name="styles", description=t("cmd_styles"))
    async def styles(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "styles", ephemeral=True)

    @app_commands.command(name="cancel", description=t("cmd_cancel"))
    async def cancel(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "cancel", ephemeral=True)

    @app_commands.command(name="forget", description=t("cmd_forget"))
    async def forget(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "forget", ephemeral=True)

    @app_commands.command(name="help", description=t("cmd_help"))
    async def show_help(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "help", ephemeral=True)

    # ------------------------------------------------------------------ admins (hidden from others by default;
    # the service checks the rights again, since server admins can re-assign command permissions)

    @app_commands.command(name="blendvote", description=t("cmd_blendvote"))
    @app_commands.describe(
        levels="Blend levels to vote on, e.g. 8 16 32",
        style="Which style (default: the default; with snapshots: the fine-tuned style)",
        snapshots="Vote between the snapshots of this server's fine-tune of the style instead",
    )
    @app_commands.autocomplete(style=style_choices)
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def blendvote(
        self,
        interaction: discord.Interaction,
        levels: str | None = None,
        style: str | None = None,
        snapshots: bool | None = None,
    ) -> None:
        args = ["vote", *re.findall(r"\d+", levels or "")]
        await self._run(interaction, "blend", args, options=_options(style=style, snapshots=snapshots or None))

    @app_commands.command(name="pollclose", description=t("cmd_pollclose"))
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def pollclose(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "poll", ["close"])

    @app_commands.command(name="finetune", description=t("cmd_finetune"))
    @app_commands.describe(name="The new style's name", dataset="A .zip of 8 or more images")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def finetune(self, interaction: discord.Interaction, name: str, dataset: discord.Attachment) -> None:
        await self._run(interaction, "finetune", options={"name": name}, upload=upload_of(dataset))

    @app_commands.command(name="distill", description=t("cmd_distill"))
    @app_commands.describe(
        style="Which style (default: this server's)", blend="Blend resolution (default: the style's)"
    )
    @app_commands.autocomplete(style=style_choices)
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def distill(
        self,
        interaction: discord.Interaction,
        style: str | None = None,
        blend: app_commands.Range[int, 4, 256] | None = None,
    ) -> None:
        await self._run(interaction, "distill", options=_options(style=style, blend=blend))

    @app_commands.command(name="publish", description=t("cmd_publish"))
    @app_commands.describe(name="The style to publish")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def publish(self, interaction: discord.Interaction, name: str) -> None:
        await self._run(interaction, "publish", options={"name": name})


# ---------------------------------------------------------------------------------------------- the bot


async def _on_tree_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """Log, and answer the user if Discord still lets us (the bot keeps running either way)."""
    name = interaction.command.name if interaction.command else "?"
    log.error("/%s failed", name, exc_info=error)
    text = t("error", str(interaction.locale))
    with contextlib.suppress(discord.HTTPException):
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)


def build_bot(service: ToonService, guild_ids: list[int], *, sharded: bool = False) -> commands.Bot:
    """The bot with its cog, buttons, error handler and start-up command sync (not yet logged in)."""
    for flag in ("warn_nacl", "warn_dave"):  # this bot has no voice: no warnings about voice libraries
        if hasattr(discord.VoiceClient, flag):
            setattr(discord.VoiceClient, flag, False)
    intents = discord.Intents.none()
    intents.guilds = True  # slash commands and buttons need no message intents
    cls = commands.AutoShardedBot if sharded else commands.Bot
    bot = cls(command_prefix=commands.when_mentioned, intents=intents, help_command=None)
    core = CommandCore(service)

    async def setup_hook() -> None:
        await bot.add_cog(ToonCog(core))
        bot.add_dynamic_items(ActionButton)
        bot.tree.on_error = _on_tree_error
        # Once per start: Discord allows only 200 command creates per day per guild.
        try:
            if guild_ids:
                for gid in guild_ids:
                    guild = discord.Object(gid)
                    bot.tree.copy_global_to(guild=guild)
                    await bot.tree.sync(guild=guild)
            else:
                await bot.tree.sync()
        except discord.HTTPException:
            log.exception("syncing the slash commands failed; the ones synced before stay in use")

    bot.setup_hook = setup_hook  # discord.py calls it at login, before the gateway connects
    return bot


def _env_guild_ids() -> list[int]:
    raw = os.environ.get("DISCORD_GUILD_IDS", "")
    return [int(g) for g in re.split(r"[,\s]+", raw.strip()) if g]


async def run_discord(
    service: ToonService,
    token: str,
    stop: asyncio.Event,
    *,
    api_base_url: str | None = None,
    gateway_url: str | None = None,
    guild_ids: list[int] | None = None,
) -> None:
    """Run the Discord bot on ``service`` until ``stop`` is set; then refuse new commands, let the running ones
    finish for ``shutdown_grace_s`` (what is left is carried on by the next start), and close."""
    api_base_url = api_base_url or os.environ.get("DISCORD_API_BASE_URL") or None
    gateway_url = gateway_url or os.environ.get("DISCORD_GATEWAY_URL") or None
    guild_ids = _env_guild_ids() if guild_ids is None else guild_ids
    sharded = os.environ.get("DISCORD_SHARDED", "").strip().lower() in ("1", "true", "yes")
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    if api_base_url:
        discord.http.Route.BASE = api_base_url.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    bot = build_bot(service, guild_ids, sharded=sharded)
    gateway: asyncio.Task | None = None
    resuming: asyncio.Task | None = None
    stop_resuming = asyncio.Event()
    stopping = asyncio.create_task(stop.wait())
    try:
        await bot.login(token)
        cog = bot.get_cog(COG_NAME)
        if isinstance(cog, ToonCog):  # deliveries a stopped or dead process left: carried on through the channel
            reopen = functools.partial(ChannelConversation.reopen, bot)
            resuming = asyncio.create_task(
                keep_deliveries(cog.core, "discord", reopen, cog.keep, stop_resuming), name="discord deliveries"
            )
        gateway = asyncio.create_task(bot.connect(reconnect=True), name="discord gateway")
        await asyncio.wait({gateway, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if gateway.done() and not stop.is_set():
            gateway.result()  # re-raise what ended it (a bad token, disallowed intents)
            raise RuntimeError("the Discord gateway connection ended")
    finally:
        stopping.cancel()
        stop_resuming.set()
        if resuming is not None:
            await resuming
        cog = bot.get_cog(COG_NAME)
        if isinstance(cog, ToonCog):
            await cog.shutdown(service.rt.settings.shutdown_grace_s)
        await bot.close()
        if gateway is not None:
            await asyncio.wait({gateway}, timeout=10)  # close() ends connect(); never raises here
            if gateway.done() and not gateway.cancelled():
                gateway.exception()  # retrieved: raised above when it mattered
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved
