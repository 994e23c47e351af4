"""The command core against the real service, worker, Redis and SQLite (front ends are tested end to end
against fake platform servers elsewhere; here the Conversation records what a platform would show)."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from backend.config import Settings
from backend.service import Actor, Place, ToonService
from bots.core import ORIGIN, Command, CommandCore, Reply, Upload, parse_text_command, progress_bar
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.backend.stack import astronaut, blank_photo, running_worker

GUILD = Place("telegram", "-100", "group")


@dataclass
class Recorder:
    """A Conversation that keeps every message and each of its versions."""

    upload_limit: int = 20 << 20
    photos_per_message: int = 10
    messages: list[list[Reply]] = field(default_factory=list)  # per message: its versions, first = as sent
    origin: list[Reply] = field(default_factory=list)
    working_calls: int = 0

    async def send(self, reply: Reply) -> Any:
        self.messages.append([reply])
        return len(self.messages) - 1

    async def edit(self, handle: Any, reply: Reply) -> None:
        (self.origin if handle == ORIGIN else self.messages[handle]).append(reply)

    async def working(self) -> None:
        self.working_calls += 1

    def address(self, handle: Any) -> None:
        return None  # lives in this test only: nothing to resume

    @property
    def last(self) -> Reply:
        return self.messages[-1][-1]


def upload(data: bytes, name: str = "photo.png", size: int | None = None) -> Upload:
    async def fetch() -> bytes:
        return data

    return Upload(name, "image/png", len(data) if size is None else size, fetch)


def cmd(text: str, who: Actor, data: bytes | None = None, **kw) -> Command:
    name, args = parse_text_command(text)
    return Command(name, args, who, GUILD, upload(data, **kw) if data is not None else None)


@pytest_asyncio.fixture
async def core(tmp_path, redis_url, redis):  # noqa: F811
    settings = Settings.from_env(
        {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url, "TOONIFY_QUOTA_USER_ACTIVE": "1"}
    )
    service = await ToonService.open(settings)
    try:
        yield CommandCore(service, progress_interval_s=0.2, working_every_s=0.5)
    finally:
        await service.close()


ALICE = Actor("telegram", "1", "alice")
ADMIN = Actor("telegram", "9", "admin", is_admin=True)


def test_text_command_parsing():
    assert parse_text_command("/toon@ToonBot disney 32", "toonbot") == ("toon", ["disney", "32"])
    assert parse_text_command("/toon@OtherBot", "toonbot") is None
    assert parse_text_command("hello") is None
    assert progress_bar(5, 10, width=4) == "▰▰▱▱"


@pytest.mark.asyncio
async def test_toon_progress_then_result_then_reblend_button(core):
    conv = Recorder()
    async with running_worker(core.service):
        await core.run(cmd("/toon 32", ALICE, astronaut()), conv)
        progress, result = conv.messages[0], conv.messages[1][0]
        texts = [r.text for r in progress]
        assert len(texts) >= 3 and any("Learning your face" in x for x in texts)
        assert all((a.text, a.buttons) != (b.text, b.buttons) for a, b in itertools.pairwise(progress))  # no no-op edit
        assert "blend 32" in result.text
        with Image.open(io.BytesIO(result.images[0][1])) as im:
            assert im.size == (512, 512)
        actions = [b.action for row in result.buttons for b in row]
        assert "b:8" in actions and "b:32" not in actions

        assert progress[-1].text == "Done."

        again = Recorder()
        await core.press("b:8", ALICE, GUILD, again)
        assert "blend 8" in again.messages[-1][0].text and again.messages[-1][0].images

        same = Recorder()  # the same photo and options again: the same job, and the picture once more
        await core.run(cmd("/toon 32", ALICE, astronaut()), same)
        assert "already sent this one" in same.messages[0][0].text
        assert same.messages[1][0].images


@pytest.mark.asyncio
async def test_bad_inputs_and_rights_get_clear_replies(core):
    conv = Recorder()
    await core.run(cmd("/toon", ALICE, None), conv)
    assert "Attach a photo" in conv.last.text
    await core.run(cmd("/toon", ALICE, b"not an image at all"), conv)
    assert "not an image" in conv.last.text
    await core.run(cmd("/toon", ALICE, astronaut(), size=50 << 20), conv)
    assert "limit" in conv.last.text
    await core.run(cmd("/finetune mystyle", ALICE, b"PK..."), conv)
    assert "admins" in conv.last.text
    await core.run(cmd("/blend", ALICE), conv)
    assert "/blend followed by a number" in conv.last.text
    await core.run(cmd("/frobnicate", ALICE), conv)
    assert "/help" in conv.last.text

    async with running_worker(core.service):
        await core.run(cmd("/toon", ALICE, blank_photo()), conv)
        assert "No face found" in conv.messages[-1][-1].text


@pytest.mark.asyncio
async def test_second_toon_over_quota_is_told_to_wait(core):
    first, second = Recorder(), Recorder()
    ticket = await core.service.submit_toon(ALICE, GUILD, astronaut(1))  # no worker: it stays queued
    assert ticket.status == "queued"
    await core.run(cmd("/toon", ALICE, astronaut(2)), second)
    assert "in progress at a time" in second.last.text
    await core.run(cmd("/cancel", ALICE), first)
    assert "Stopping" in first.last.text


@pytest.mark.asyncio
async def test_vote_poll_and_admin_commands(core):
    admin_conv = Recorder()
    async with running_worker(core.service):
        await core.run(cmd("/blend vote 8 16", ADMIN), admin_conv)
        poll_msg = admin_conv.messages[0]
        assert poll_msg[-1].images, "the grid of candidates is added once the worker drew it"
        vote_actions = [b.action for row in poll_msg[0].buttons for b in row]
        assert len(vote_actions) == 2 and vote_actions[0].startswith("v:")

        voter = Recorder()
        await core.press(vote_actions[1], ALICE, GUILD, voter)
        assert "option 2" in voter.last.text and "2: 1" in voter.origin[-1].text

        await core.run(cmd("/poll close", ALICE), voter)
        assert "admins" in voter.last.text
        await core.run(cmd("/poll close", ADMIN), admin_conv)
        assert "Winner: 2" in admin_conv.last.text

    await core.run(cmd("/style demo", ALICE), admin_conv)
    assert "default style is now demo" in admin_conv.last.text
    await core.run(cmd("/styles", ALICE), admin_conv)
    assert "demo" in admin_conv.last.text
    bad_zip = io.BytesIO()
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("a.txt", "no images")
    await core.run(cmd("/finetune mystyle", ADMIN, bad_zip.getvalue(), name="set.zip"), admin_conv)
    assert "at least 8" in admin_conv.last.text
    await core.run(cmd("/forget", ALICE), admin_conv)
    assert "deleted" in admin_conv.last.text


@pytest.mark.asyncio
async def test_a_database_that_does_not_answer_gets_a_plain_message_naming_no_host(tmp_path, redis_url, redis):  # noqa: F811
    from sqlalchemy.engine import make_url

    from tests.backend.test_unavailable import _HOLD_SQLITE_LOCK

    settings = Settings.from_env(
        {"TOONIFY_DATA_DIR": str(tmp_path / "data"), "REDIS_URL": redis_url, "TOONIFY_DB_STATEMENT_TIMEOUT_S": "1"}
    )
    service = await ToonService.open(settings)
    holder = subprocess.Popen(  # another process holds SQLite's write lock: every write waits, then times out
        [sys.executable, "-c", _HOLD_SQLITE_LOCK, make_url(settings.database_url).database],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        conv = Recorder()
        await CommandCore(service).run(cmd("/toon", Actor("telegram", "77", "newcomer"), astronaut()), conv)
        text = conv.last.text
        assert text == "Toonify can't reach its database right now; please try again in a few minutes.", text
        assert str(tmp_path) not in text
    finally:
        holder.communicate("\n", timeout=30)
        await service.close()
