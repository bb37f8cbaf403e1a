"""The Discord bot, end to end: the real discord.py client against the local fake Discord
API, answering with the real model and storing in a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from bot.conversations.store import ChatMode
from bot.discord_adapter.client import LlamaBot
from bot.discord_adapter.intake import BUSY, MENTION_ONLY, NO_TEXT
from bot.discord_adapter.commands import NEED_ADMIN
from bot.discord_adapter.output import LIMIT, split_message
from tests.conftest import JSON, World, mention, rows, scope


async def ask(world: World, bot: LlamaBot, channel: JSON, author: JSON, text: str, *, timeout: float = 60) -> list[JSON]:
    """Send a message (mentioning the bot in guilds); wait for the reply and for the bot to be idle."""
    content = text if "guild_id" not in channel else f"{mention(world.fake)} {text}"
    sent = await world.fake.send_message(channel, author, content)
    await world.fake.wait_for_bot_message(channel, after=sent, timeout=timeout)
    await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, timeout)
    return [m for m in world.fake.bot_messages(channel) if int(m["id"]) > int(sent["id"])]


async def test_text_with_attachment_is_answered_with_a_note(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        sent = await world.fake.send_message(
            world.general, world.ann, f"{mention(world.fake)} What is 2+2?", attachments=[{"filename": "a.bin", "data": b"\x00\x01", "content_type": None}]
        )
        [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert reply["content"].endswith("-# I did not read a.bin (not a text file).")
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
        assert [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"] == ["What is 2+2?"]
