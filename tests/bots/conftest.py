"""Fixtures the bot tests share."""

from __future__ import annotations

import contextlib

import pytest_asyncio

from backend.service import ToonService
from tests.backend.redis_fixtures import embedded_redis, redis, redis_url  # noqa: F401
from tests.bots.test_telegram_e2e import telegram_stack
from tests.fakes.telegram import FakeTelegram


@pytest_asyncio.fixture
async def start_telegram(tmp_path, redis_url, redis):  # noqa: F811
    """``fake, service = await start_telegram(**env)``: the Telegram bot runs until the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**env: str) -> tuple[FakeTelegram, ToonService]:
            return await stack.enter_async_context(telegram_stack(tmp_path, redis_url, env))

        yield start
