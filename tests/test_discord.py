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


async def test_reconnect_mid_conversation_loses_nothing(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Tell me a fact about the moon.")
        await world.fake.request_reconnect()  # op 7 while the reply is being generated
        second = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} And one about the sun.")
        replies = await world.fake.wait_for_bot_message(world.general, after=sent, count=2, timeout=120)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 120)
        await asyncio.sleep(1.0)
        replies = [m for m in world.fake.bot_messages(world.general) if int(m["id"]) > int(sent["id"])]
        assert len(replies) == 2  # each message answered exactly once
        assert {r["message_reference"]["message_id"] for r in replies} == {sent["id"], second["id"]}
        assert world.fake.resume_count >= 1
        stored = rows(bot.ctx.settings.database_path)
        assert [r[1] for r in stored] == ["user", "assistant", "user", "assistant"]


async def test_edits_and_deletes_are_followed(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        first = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} My secret word is apple.")
        await world.fake.wait_for_bot_message(world.general, after=first)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
        db = bot.ctx.settings.database_path
        await world.fake.edit_message(first, f"{mention(world.fake)} My secret word is banana.")
        await world.fake.wait_for(lambda: rows(db)[0][2] == "My secret word is banana.")
        await world.fake.delete_message(first)
        await world.fake.wait_for(lambda: [r[1] for r in rows(db)] == ["assistant"])
        prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, world.general)))
        assert not any("apple" in m.content or "banana" in m.content for m in prompt.messages)


async def test_an_edit_is_stored_as_a_new_message_would_be(world: World, start_bot) -> None:
    """Mentions in edited text become names, exactly as in a new message, not raw <@id> markup."""
    text = f"{mention(world.fake)} Say hi to <@{world.mod['id']}>."
    async with start_bot(stream=False) as bot:
        first = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Say hi.")
        await world.fake.wait_for_bot_message(world.general, after=first)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
        await world.fake.edit_message(first, text)
        db = bot.ctx.settings.database_path
        await world.fake.wait_for(lambda: rows(db)[0][2] != "Say hi.")
        second = await world.fake.send_message(world.general, world.ann, text)
        await world.fake.wait_for_bot_message(world.general, after=second)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
        edited, fresh = [r[2] for r in rows(db) if r[1] == "user"]
        assert edited == fresh and edited.startswith("Say hi to @") and "<@" not in edited


async def test_text_with_attachment_is_answered_with_a_note(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        sent = await world.fake.send_message(
            world.general, world.ann, f"{mention(world.fake)} What is 2+2?", attachments=[{"filename": "a.bin", "data": b"\x00\x01", "content_type": None}]
        )
        [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert reply["content"].endswith("-# I did not read a.bin (not a text file).")
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
        assert [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"] == ["What is 2+2?"]
