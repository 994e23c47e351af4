"""The command core: every command and button, for every platform. Front ends only translate.

A front end turns a platform event into a :class:`Command` (or a button press) plus a :class:`Conversation`
that knows how to send and edit messages there; the core parses and validates, calls the service, and renders
replies, progress and errors as :class:`Reply` objects. Progress goes into one message, edited at most every
``progress_interval_s`` and never with unchanged content; the result is sent as a new message with buttons for
the next step. Button actions are short strings (Telegram's callback data holds at most 64 bytes):
``b:<level>`` re-blend my last toon, ``e:<direction>:<strength>`` edit my last toon, ``v:<poll>:<option>`` vote,
``c:<job>`` cancel.

A fine-tune's progress message also gets a new message per snapshot: its preview grid with its KID and identity
line, as the worker publishes them; the final message carries the last snapshot's metrics.

Results are delivered through :mod:`backend.delivery`: following a job records where its result goes, each photo
is marked sent once the platform confirmed it, and a restarted bot (:func:`keep_deliveries`) carries on what a
stopped or dead one left: it watches the job again, sends the photos not yet sent, and finishes the progress
message. On shutdown, :func:`drain` lets running commands finish within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend import metrics
from backend.delivery import Address, DeliveryBook, DeliveryRecord
from backend.errors import ServiceError
from backend.service import Actor, Place, PollInfo, ToonService
from bots.strings import STRINGS, t

log = logging.getLogger("toonify.bots")
MODES = ("instant", "fast", "balanced", "quality")  # words /toon understands; none named: the service decides
EXPLAINED_STAGES = ("reproject",)  # progress that explains a wait: shown at once, whatever the throttle
SNAPSHOT_WORDS = ("snapshots", "snapshot")  # /blend vote snapshots STYLE: a vote between a fine-tune's snapshots
BLEND_BUTTONS = (8, 16, 32, 64)
ORIGIN = "origin"  # Conversation.edit(ORIGIN, …): the message whose button was pressed
IN_FLIGHT_WAIT_S = 30.0  # at shutdown, how long a message already on its way may take to be confirmed


@dataclass(frozen=True)
class Upload:
    """A file attached to a command: metadata first, bytes only when the core asks (after the size check)."""

    filename: str
    content_type: str | None
    size: int | None
    fetch: Callable[[], Awaitable[bytes]]


@dataclass(frozen=True)
class Button:
    label: str
    action: str  # at most 64 bytes

    def __post_init__(self) -> None:
        if len(self.action.encode()) > 64:
            raise ValueError(f"button action longer than 64 bytes: {self.action!r}")


@dataclass
class Reply:
    text: str
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (filename, PNG bytes)
    animation: tuple[str, bytes] | None = None  # (filename, GIF or WebP bytes): /sweep; sent alone, not edited in
    buttons: list[list[Button]] = field(default_factory=list)  # rows of buttons
    ephemeral: bool = False  # only the actor sees it, where the platform can do that
    continues: bool = False  # more photos of the result just sent: no reply to the command again

    def same_as(self, other: Reply | None) -> bool:
        same = other is not None and (self.text, self.buttons) == (other.text, other.buttons)
        return same and not self.images and self.animation is None


class Conversation(Protocol):
    """How the core talks back on one platform, in one chat, for one command or button press."""

    upload_limit: int  # bytes the platform lets the bot download for this actor
    photos_per_message: int  # how many photos one sent message carries (each message is confirmed whole)

    async def send(self, reply: Reply) -> Any: ...  # returns a handle for edit()

    async def edit(self, handle: Any, reply: Reply) -> None: ...

    async def working(self) -> None: ...  # a "typing…" hint; a no-op where there is none

    def address(self, handle: Any) -> Address | None: ...  # where a message is, for a restarted bot; None: nowhere


@dataclass(frozen=True)
class Command:
    name: str  # without the slash, lower case
    args: list[str]
    actor: Actor
    place: Place | None  # None in a private chat
    upload: Upload | None = None
    locale: str = "en"
    options: dict[str, Any] = field(default_factory=dict)  # typed options (Discord slash commands)


def parse_text_command(text: str, bot_username: str | None = None) -> tuple[str, list[str]] | None:
    """'/toon@MyBot disney 32' -> ('toon', ['disney', '32']); None when the text is no command (for this bot)."""
    text = (text or "").strip()
    if not text.startswith("/"):
        return None
    head, *args = text.split()
    name, _, target = head[1:].partition("@")
    if target and bot_username and target.lower() != bot_username.lower():
        return None
    return name.lower(), args


def progress_bar(step: int | None, total: int | None, width: int = 12) -> str:
    if not total:
        return ""
    done = round(width * min(step or 0, total) / total)
    return "▰" * done + "▱" * (width - done)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "a moment"
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


class CommandCore:
    """``await core.run(command, conversation)`` and ``await core.press(action, actor, place, conversation)``."""

    def __init__(
        self,
        service: ToonService,
        *,
        progress_interval_s: float = 1.5,
        working_every_s: float = 4.0,
        deliveries: DeliveryBook | None = None,
    ):
        self.service = service
        self.progress_interval_s = progress_interval_s
        self.working_every_s = working_every_s
        self.deliveries = deliveries or DeliveryBook(service.rt)

    # ------------------------------------------------------------------------------------------ dispatch

    async def run(self, cmd: Command, conv: Conversation) -> None:
        handler = {
            "start": self._help,
            "help": self._help,
            "toon": self._toon,
            "blend": self._blend,
            "style": self._style,
            "styles": self._styles,
            "cancel": self._cancel,
            "forget": self._forget,
            "finetune": self._finetune,
            "distill": self._distill,
            "publish": self._publish,
            "poll": self._poll,
            "edit": self._edit,
            "sweep": self._sweep,
        }.get(cmd.name)
        metrics.BOT_COMMANDS.labels(platform=cmd.actor.platform, command=cmd.name if handler else "unknown").inc()
        try:
            if handler is None:
                await conv.send(Reply(t("unknown", cmd.locale), ephemeral=True))
                return
            await handler(cmd, conv)
        except ServiceError as e:
            metrics.BOT_ERRORS.labels(platform=cmd.actor.platform, kind=e.code).inc()
            await conv.send(Reply(e.public_message, ephemeral=True))
        except Exception:
            metrics.BOT_ERRORS.labels(platform=cmd.actor.platform, kind="internal").inc()
            log.exception("command /%s failed", cmd.name)
            await conv.send(Reply(t("error", cmd.locale), ephemeral=True))

    async def press(self, action: str, actor: Actor, place: Place | None, conv: Conversation, locale: str = "en"):
        kind, _, rest = action.partition(":")
        metrics.BOT_COMMANDS.labels(platform=actor.platform, command=f"button:{kind}").inc()
        try:
            if kind == "b":
                await self._reblend(actor, place, int(rest), conv, locale)
            elif kind == "e":
                direction, _, strength = rest.rpartition(":")
                ticket = await self.service.edit_last(actor, place, direction, float(strength))
                await self.follow(ticket.job_id, conv, locale)
            elif kind == "v":
                poll_id, _, position = rest.partition(":")
                info = await self.service.vote(actor, place, int(poll_id), int(position))
                await conv.edit(ORIGIN, self._poll_reply(info, locale))
                await conv.send(Reply(t("vote_ok", locale, position=position), ephemeral=True))
            elif kind == "c":
                stopped = await self.service.cancel(actor, rest)
                await conv.send(Reply(t("cancel_ok" if stopped else "cancel_none", locale), ephemeral=True))
            else:
                await conv.send(Reply(t("unknown", locale), ephemeral=True))
        except ServiceError as e:
            await conv.send(Reply(e.public_message, ephemeral=True))
        except Exception:
            log.exception("button %s failed", action)
            await conv.send(Reply(t("error", locale), ephemeral=True))

    # ------------------------------------------------------------------------------------------ commands

    async def _help(self, cmd: Command, conv: Conversation) -> None:
        key = f"help_{cmd.actor.platform}"  # a platform that spells the commands differently (Discord: /blendvote)
        await conv.send(Reply(t(key if key in STRINGS["en"] else "help", cmd.locale)))

    async def _toon(self, cmd: Command, conv: Conversation) -> None:
        if cmd.upload is None:
            await conv.send(Reply(t("need_photo", cmd.locale), ephemeral=True))
            return
        style, blend, mode = _style_blend_mode(cmd, modes=MODES)
        data = await self._download(cmd, conv)
        if data is None:
            return
        # No mode named (None): the service picks, instant where the style has a student for the blend.
        ticket = await self.service.submit_toon(cmd.actor, cmd.place, data, style=style, blend=blend, mode=mode)
        note = t("already", cmd.locale) if ticket.duplicate else None
        await self.follow(ticket.job_id, conv, cmd.locale, note=note)

    async def _download(self, cmd: Command, conv: Conversation) -> bytes | None:
        up = cmd.upload
        limit = min(conv.upload_limit, self.service.rt.settings.max_upload_bytes)
        if up.size is not None and up.size > limit:
            size, mb = f"{up.size / 2**20:.1f}", f"{limit / 2**20:.0f}"
            await conv.send(Reply(t("too_big", cmd.locale, size=size, limit=mb)))
            return None
        return await up.fetch()

    async def _blend(self, cmd: Command, conv: Conversation) -> None:
        level = cmd.options.get("resolution")
        if level is None and cmd.args and cmd.args[0].lower() == "vote":
            words = [a for a in cmd.args[1:] if not a.isdigit()]
            if cmd.options.get("snapshots") or (words and words[0].lower() in SNAPSHOT_WORDS):
                style = cmd.options.get("style") or next(iter(words[1:]), None)
                await self._start_poll(cmd, conv, (), snapshots_of=style or "")
                return
            levels = tuple(int(a) for a in cmd.args[1:] if a.isdigit()) or (8, 16, 32)
            await self._start_poll(cmd, conv, levels)
            return
        if level is None:
            if not cmd.args or not cmd.args[0].isdigit():
                await conv.send(Reply(t("blend_usage", cmd.locale), ephemeral=True))
                return
            level = int(cmd.args[0])
        await self._reblend(cmd.actor, cmd.place, int(level), conv, cmd.locale, style=cmd.options.get("style"))

    async def _reblend(
        self, actor: Actor, place: Place | None, level: int, conv: Conversation, locale: str, style: str | None = None
    ) -> None:
        ticket = await self.service.reblend(actor, place, level, style=style)
        await self.follow(ticket.job_id, conv, locale)

    async def _edit(self, cmd: Command, conv: Conversation) -> None:
        """``/edit NAME STRENGTH``: the last toon moved along a named direction of its style (no new upload);
        ``/edit`` alone lists the directions."""
        name = cmd.options.get("direction") or (cmd.args[0] if cmd.args else None)
        strength = cmd.options.get("strength")
        if strength is None and len(cmd.args) > 1:
            try:
                strength = float(cmd.args[1].replace(",", "."))
            except ValueError:
                strength = None
        if not name or strength is None:
            found = await self.service.directions(cmd.actor, cmd.place)
            names = ", ".join(found.names)
            key = "edit_usage" if found.names else "edit_no_directions"
            await conv.send(Reply(t(key, cmd.locale, style=found.style, names=names), ephemeral=True))
            return
        ticket = await self.service.edit_last(cmd.actor, cmd.place, name, float(strength))
        await self.follow(ticket.job_id, conv, cmd.locale)

    async def _sweep(self, cmd: Command, conv: Conversation) -> None:
        """``/sweep [style]``: an animation of the last toon (or probe faces) over the blend levels."""
        style = cmd.options.get("style") or (cmd.args[0] if cmd.args else None)
        ticket = await self.service.sweep(cmd.actor, cmd.place, style=style)
        await self.follow(ticket.job_id, conv, cmd.locale)

    async def _style(self, cmd: Command, conv: Conversation) -> None:
        name = cmd.options.get("name") or (cmd.args[0] if cmd.args else None)
        if not name:
            await conv.send(Reply(t("style_usage", cmd.locale), ephemeral=True))
            return
        info = await self.service.set_style(cmd.actor, cmd.place, name)
        await conv.send(Reply(t("style_set", cmd.locale, style=info.name), ephemeral=True))

    async def _styles(self, cmd: Command, conv: Conversation) -> None:
        styles = await self.service.list_styles(cmd.place)
        names = ", ".join(s.name for s in styles)
        await conv.send(Reply(t("styles", cmd.locale, names=names) if styles else t("no_styles", cmd.locale)))

    async def _cancel(self, cmd: Command, conv: Conversation) -> None:
        job_id = await self.service.active_job(cmd.actor)
        stopped = job_id is not None and await self.service.cancel(cmd.actor, job_id)
        await conv.send(Reply(t("cancel_ok" if stopped else "cancel_none", cmd.locale), ephemeral=True))

    async def _forget(self, cmd: Command, conv: Conversation) -> None:
        r = await self.service.forget_user(cmd.actor)
        await conv.send(Reply(t("forgot", cmd.locale, jobs=r.jobs, files=r.files, votes=r.votes), ephemeral=True))

    async def _finetune(self, cmd: Command, conv: Conversation) -> None:
        await self.service.require_admin(cmd.actor, cmd.place)  # before downloading anything
        name = cmd.options.get("name") or (cmd.args[0] if cmd.args else None)
        if not name or cmd.upload is None:
            await conv.send(Reply(t("finetune_usage", cmd.locale), ephemeral=True))
            return
        data = await self._download(cmd, conv)
        if data is None:
            return
        ticket = await self.service.start_finetune(cmd.actor, cmd.place, name, data)
        await conv.send(Reply(t("finetune_queued", cmd.locale, name=name)))
        await self.follow(ticket.job_id, conv, cmd.locale)

    async def _distill(self, cmd: Command, conv: Conversation) -> None:
        """Admins: train the instant model (a student network) for a style and blend; progress like /finetune."""
        style, blend, _ = _style_blend_mode(cmd, modes=())
        ticket = await self.service.start_distill(cmd.actor, cmd.place, style, blend)  # NotAllowedError: not admin
        if ticket.duplicate:  # the same model is in training already: follow that job
            await self.follow(ticket.job_id, conv, cmd.locale, note=t("distill_already", cmd.locale))
            return
        await conv.send(Reply(t("distill_queued", cmd.locale)))
        await self.follow(ticket.job_id, conv, cmd.locale)

    async def _publish(self, cmd: Command, conv: Conversation) -> None:
        name = cmd.options.get("name") or (cmd.args[0] if cmd.args else "")
        info = await self.service.publish_style(cmd.actor, cmd.place, name)
        await conv.send(Reply(t("published", cmd.locale, name=info.name)))
        await self._follow_distill(info.distill_job_id, conv, cmd.locale)

    async def _poll(self, cmd: Command, conv: Conversation) -> None:
        if not cmd.args or cmd.args[0].lower() != "close":
            await conv.send(Reply(t("poll_close_usage", cmd.locale), ephemeral=True))
            return
        info = await self.service.open_poll(cmd.place)
        if info is None:
            await conv.send(Reply(t("no_open_poll", cmd.locale), ephemeral=True))
            return
        closed = await self.service.close_poll(cmd.actor, cmd.place, info.poll_id)
        await conv.send(self._poll_reply(closed, cmd.locale))
        await self._follow_distill(closed.distill_job_id, conv, cmd.locale)

    async def _follow_distill(self, job_id: str | None, conv: Conversation, locale: str) -> None:
        """A publish or a poll's new default blend queued the training of an instant model: show it like /distill."""
        if job_id is not None:
            await conv.send(Reply(t("distill_auto", locale)))
            await self.follow(job_id, conv, locale)

    async def _start_poll(
        self, cmd: Command, conv: Conversation, levels: tuple[int, ...], snapshots_of: str | None = None
    ) -> None:
        if snapshots_of is not None:  # /blend vote snapshots STYLE: the fine-tune's snapshots at the style's blend
            info = await self.service.start_snapshot_poll(cmd.actor, cmd.place, snapshots_of)
        else:
            style = cmd.options.get("style")
            info = await self.service.start_blend_poll(cmd.actor, cmd.place, style=style, levels=levels)
        handle = await conv.send(self._poll_reply(info, cmd.locale))
        if info.preview_job_id:  # the grid of candidates arrives when the worker has drawn it
            async for ev in self.service.watch(info.preview_job_id, timeout_s=600):
                if ev.terminal:
                    break
            if ev.status == "done":
                grid = await self.service.result(info.preview_job_id)
                await conv.edit(handle, self._poll_reply(info, cmd.locale, grid=grid.composite))

    def _poll_reply(self, info: PollInfo, locale: str, grid: bytes | None = None) -> Reply:
        labels = ", ".join(f"{o.position}: {o.label}" for o in info.options)
        tally = ", ".join(f"{p}: {n}" for p, n in sorted(info.tally.items()))
        if info.status == "closed":
            if info.winner is None:
                text = t("poll_closed_none", locale)
            else:
                text = t("poll_closed", locale, winner=f"{info.winner} ({info.options[info.winner - 1].label})")
                if info.snapshots:
                    text += "\n" + t("poll_snapshot_won", locale, style=info.style)
            return Reply(f"{text}\n{t('poll_tally', locale, tally=tally)}")
        closes = info.closes_at.strftime("%Y-%m-%d %H:%M UTC")
        key = "poll_snapshots" if info.snapshots else "poll"
        text = t(key, locale, style=info.style, labels=labels, closes=closes)
        text += "\n" + t("poll_tally", locale, tally=tally)
        buttons = [
            [
                Button(t("button_vote", locale, position=o.position), f"v:{info.poll_id}:{o.position}")
                for o in info.options
            ]
        ]
        return Reply(text, images=[("poll.png", grid)] if grid else [], buttons=buttons)

    # ------------------------------------------------------------------------------------------ progress

    async def follow(self, job_id: str, conv: Conversation, locale: str, note: str | None = None) -> None:
        """One message edited with progress until the job ends, then the result (or the error) and a final edit.

        Where the conversation has an address, the delivery is recorded first, so that a bot restarted halfway
        carries it on (:meth:`resume`). Every request gets its result, a repeated one too."""
        cancel = self._cancel_buttons(job_id, locale)
        first = Reply((note + "\n" if note else "") + t("starting", locale), buttons=cancel)
        handle = await conv.send(first)
        address = conv.address(handle)
        delivery_id = await self.deliveries.open(job_id, address, locale) if address is not None else None
        await self._carry(job_id, conv, handle, locale, delivery_id, shown=first)

    async def resume(self, record: DeliveryRecord, conv: Conversation, handle: Any) -> None:
        """Carry on a delivery this process took over from a stopped or dead one."""
        log.info(
            "resuming the delivery of job %s to %s %s", record.job_id, record.address.platform, record.address.chat_id
        )
        await self._carry(record.job_id, conv, handle, record.locale, record.id, shown=None)

    async def _carry(
        self, job_id: str, conv: Conversation, handle: Any, locale: str, delivery_id: int | None, shown: Reply | None
    ) -> None:
        try:
            final = await self._watch(job_id, conv, handle, locale, shown)
            await self._conclude(job_id, final, conv, handle, locale, delivery_id)
        except asyncio.CancelledError:
            if delivery_id is not None:  # shutting down: whoever starts next takes it over at once
                await asyncio.shield(self.deliveries.release(delivery_id))
            raise
        except Exception:
            if delivery_id is not None:  # tried again later (a bounded number of times)
                await self.deliveries.fail(delivery_id)
            raise

    def _cancel_buttons(self, job_id: str, locale: str) -> list[list[Button]]:
        return [[Button(t("button_cancel", locale), f"c:{job_id}")]]

    async def _watch(self, job_id: str, conv: Conversation, handle: Any, locale: str, shown: Reply | None):
        """Progress edits (throttled, never unchanged) until the job ends; returns its last event (None: no end)."""
        cancel = self._cancel_buttons(job_id, locale)
        last_edit, last_working = (time.monotonic() if shown else 0.0), 0.0
        posted: set[str] = set()  # snapshot previews already posted
        shown_stage: str | None = None
        async with contextlib.aclosing(self.service.watch(job_id, timeout_s=3600)) as events:
            async for ev in events:
                if ev.terminal:
                    return ev
                if ev.preview and ev.preview not in posted:  # a fine-tune snapshot: its grid and metrics
                    posted.add(ev.preview)
                    await self._post_snapshot(conv, ev, locale)
                now = time.monotonic()
                if now - last_working >= self.working_every_s:
                    last_working = now
                    with contextlib.suppress(Exception):
                        await conv.working()
                reply = Reply(self._progress_text(ev, locale), buttons=cancel)
                news = ev.stage in EXPLAINED_STAGES and ev.stage != shown_stage  # says why this takes a while
                if reply.same_as(shown) or (now - last_edit < self.progress_interval_s and not news):
                    continue  # throttled, and never an identical edit
                await self._safe_edit(conv, handle, reply)
                shown, last_edit, shown_stage = reply, now, ev.stage
        return None

    async def _post_snapshot(self, conv: Conversation, ev, locale: str) -> None:
        """One message per fine-tune snapshot: the preview grid, captioned with its KID and identity line."""
        try:
            grid = await self.service.read_preview(ev.preview)
            text = t("finetune_snapshot", locale, line=ev.message or "", step=ev.step or 0, total=ev.total or 0)
            await conv.send(Reply(text, images=[("snapshot.png", grid)], continues=True))
        except Exception:  # a lost preview must never stop the progress and the result that follow
            log.warning("posting a snapshot preview failed", exc_info=True)

    async def _conclude(
        self, job_id: str, final, conv: Conversation, handle: Any, locale: str, delivery_id: int | None
    ) -> None:
        """The result (its unsent photos), then the progress message's final state, then the delivery is done."""
        if final is None or final.status != "done":
            text = (
                t("cancelled", locale)
                if final and final.status == "cancelled"
                else t("failed", locale, error=(final.error if final else "no answer from the workers"))
            )
            await self._safe_edit(conv, handle, Reply(text))
        elif "checkpoint" in (final.result or {}):  # a fine-tune
            result = final.result
            text = t(
                "finetune_done",
                locale,
                name=result.get("style"),
                images=result.get("images"),
                steps=result.get("steps"),
            )
            if result.get("summary"):  # the last snapshot's KID and identity line
                text += "\n" + t("finetune_metrics", locale, line=result["summary"])
            await self._safe_edit(conv, handle, Reply(text))
        elif "animation" in (final.result or {}):  # a /sweep
            await self._safe_edit(conv, handle, Reply(t("stage_upload", locale)))
            if not await self._send_animation(job_id, conv, locale, delivery_id):
                return
            await self._safe_edit(conv, handle, Reply(t("delivered", locale)))
        elif "student" in (final.result or {}):  # a distillation: the style's instant model
            result = final.result
            blend = (result.get("blend") or {}).get("resolution", "?")
            text = t("distill_done", locale, style=result.get("style"), blend=blend)
            await self._safe_edit(conv, handle, Reply(text))
        else:
            await self._safe_edit(conv, handle, Reply(t("stage_upload", locale)))  # no cancel button any more
            if not await self._send_result(job_id, conv, locale, delivery_id):
                return  # another process holds the delivery now: it finishes it
            await self._safe_edit(conv, handle, Reply(t("delivered", locale)))
        if delivery_id is not None:
            await self.deliveries.finish(delivery_id)

    async def _send_result(self, job_id: str, conv: Conversation, locale: str, delivery_id: int | None) -> bool:
        """Send the photos not yet sent, a message at a time, each marked sent once the platform confirmed it.
        False when this process lost the delivery's lease on the way (it must not send then)."""
        out = await self.service.result(job_id)
        photos = [("toon.png", out.composite)] + [(f"face{i + 1}.png", c) for i, c in enumerate(out.crops)]
        if delivery_id is not None:
            items = await self.deliveries.items(delivery_id)
            pending = [(it.position, it.id) for it in items if not it.sent and it.position < len(photos)]
        else:
            pending = [(i, None) for i in range(len(photos))]
        per_message = max(1, conv.photos_per_message)
        for start in range(0, len(pending), per_message):
            batch = pending[start : start + per_message]
            if delivery_id is not None and not await self.deliveries.keep(delivery_id):
                log.warning("job %s: the delivery was taken over by another process; leaving it", job_id)
                return False
            images = [photos[position] for position, _ in batch]
            if batch[0][0] == 0:  # the composite carries the text and the buttons
                reply = self._result_reply(out, locale, images)
            else:
                reply = Reply("", images=images, continues=True)
            item_ids = [item_id for _, item_id in batch if item_id is not None]
            await _finish_in_flight(self._send_and_mark(conv, reply, item_ids))
        return True

    async def _send_animation(self, job_id: str, conv: Conversation, locale: str, delivery_id: int | None) -> bool:
        """A sweep's animation, once (marked sent as the one item of its delivery); False: the lease was lost."""
        out = await self.service.sweep_result(job_id)
        item_ids: list[int] = []
        if delivery_id is not None:
            items = await self.deliveries.items(delivery_id)
            if all(it.sent for it in items):
                return True
            if not await self.deliveries.keep(delivery_id):
                log.warning("job %s: the delivery was taken over by another process; leaving it", job_id)
                return False
            item_ids = [it.id for it in items]
        levels = ", ".join(str(lv) for lv in out.levels)
        key = "sweep_done" if out.source == "toon" else "sweep_done_probe"
        text = t(key, locale, style=out.style, levels=levels)
        await _finish_in_flight(
            self._send_and_mark(conv, Reply(text, animation=(out.filename, out.animation)), item_ids)
        )
        return True

    async def _send_and_mark(self, conv: Conversation, reply: Reply, item_ids: list[int]) -> None:
        await conv.send(reply)
        if item_ids:
            await self.deliveries.mark_sent(item_ids)

    def _result_reply(self, out, locale: str, images: list[tuple[str, bytes]]) -> Reply:
        blend = out.spec.get("resolution", "?")
        key = "done" if out.faces <= 1 else "done_faces"
        how = t("mode_instant", locale) if out.mode == "instant" else ""  # named where it tells something
        if out.edits:
            how += t("edited", locale, edits=edit_words(out.edits))
        text = t(key, locale, style=out.style, blend=blend, faces=out.faces, how=how)
        if out.too_small:
            text += t("too_small_note", locale, n=out.too_small)
        if out.edits:  # the last direction a step either way (a re-blend would drop the edit)
            name, strength = out.edits[-1]
            steps = [(name, strength - 1), (name, strength + 1)]
            buttons = [[Button(t("button_edit", locale, edit=edit_words(((n, s),))), f"e:{n}:{s:g}") for n, s in steps]]
        else:
            buttons = [[Button(t("button_blend", locale, level=lv), f"b:{lv}") for lv in BLEND_BUTTONS if lv != blend]]
        return Reply(text, images=images, buttons=buttons)

    @staticmethod
    async def _safe_edit(conv: Conversation, handle: Any, reply: Reply) -> None:
        try:
            await conv.edit(handle, reply)
        except Exception:  # a lost progress edit must never lose the result that follows
            log.warning("progress edit failed", exc_info=True)

    @staticmethod
    def _progress_text(ev, locale: str) -> str:
        if ev.status == "queued":
            if ev.queue_position:
                return t("queued", locale, ahead=ev.queue_position, eta=_eta(ev.eta_s))
            return t("queued_next", locale)
        stage = ev.stage or "start"
        key = f"stage_{stage}"
        try:
            return t(key, locale, bar=progress_bar(ev.step, ev.total), step=ev.step or 0, total=ev.total or 0)
        except KeyError:
            return t("starting", locale)


def edit_words(edits) -> str:
    """``(("smile", 2.0), ("age", -1.5))`` → ``smile +2, age -1.5``."""
    return ", ".join(f"{name} {strength:+g}" for name, strength in edits)


def _style_blend_mode(cmd: Command, modes: tuple[str, ...]) -> tuple[str | None, int | None, str | None]:
    """(style, blend, mode) from the typed options (Discord) and the words after the command, in any order:
    a number is the blend, one of ``modes`` the mode, anything else the style."""
    style, blend, mode = cmd.options.get("style"), cmd.options.get("blend"), cmd.options.get("mode")
    for arg in cmd.args:
        if arg.isdigit():
            blend = int(arg)
        elif arg.lower() in modes:
            mode = arg.lower()
        else:
            style = arg
    return style, blend, mode


async def _finish_in_flight(step: Awaitable[None]) -> None:
    """Run ``step`` (send a message, then mark its photos sent) to its end even when the caller is cancelled at
    shutdown, for up to :data:`IN_FLIGHT_WAIT_S`: a photo on its way is neither cut off nor sent twice later."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, IN_FLIGHT_WAIT_S)
        raise


async def run_command(core: CommandCore, cmd: Command, conv: Conversation) -> asyncio.Task:
    """Run a command in its own task (a slow toon must never block the front end's update loop)."""
    return asyncio.create_task(core.run(cmd, conv), name=f"/{cmd.name} by {cmd.actor.user_id}")


async def keep_deliveries(
    core: CommandCore,
    platform: str,
    reopen: Callable[[DeliveryRecord], tuple[Conversation, Any]],
    keep: Callable[[asyncio.Task], None],
    stop: asyncio.Event,
) -> None:
    """Until ``stop``: renew this process's delivery leases, and take over the deliveries of ``platform`` that a
    stopped or dead process left (at once, then every third of a lease). ``reopen`` makes the conversation and
    progress-message handle of a recorded delivery; ``keep`` tracks the task that carries it on."""
    book = core.deliveries
    while not stop.is_set():
        try:
            await book.renew()
            for record in await book.claim_orphans(platform):
                try:
                    conv, handle = reopen(record)
                except Exception:
                    log.exception("delivery %s cannot be reopened; giving it up", record.id)
                    await book.finish(record.id)
                    continue
                keep(asyncio.create_task(core.resume(record, conv, handle), name=f"resume delivery {record.id}"))
        except Exception:  # the database blinked: try again next round, the leases outlive a round
            log.warning("renewing or claiming deliveries failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), book.lease_s / 3)


async def drain(tasks: set[asyncio.Task], grace_s: float) -> int:
    """Let running command tasks finish for up to ``grace_s``, then cancel the rest (their deliveries are released
    for the next process). Returns how many were cancelled."""
    deadline = time.monotonic() + grace_s
    while tasks and (left := deadline - time.monotonic()) > 0:
        await asyncio.wait(list(tasks), timeout=left)  # tasks started meanwhile are waited for too
    late = [t for t in tasks if not t.done()]
    for task in late:
        task.cancel()
    if late:
        log.info("%d command(s) still running after %.0f s: stopped; a restarted bot carries on", len(late), grace_s)
        await asyncio.gather(*late, return_exceptions=True)
    return len(late)
