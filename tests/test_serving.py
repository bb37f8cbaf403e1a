"""Serving many channels: streaming edits within rate limits, the fair queue, /stop, cache invalidation.

The real bot, model and SQLite, through the local fake Discord API (fixtures from test_discord)."""

from __future__ import annotations

import sqlite3

from bot.conversations.service import ChatService, UserMessage
from bot.discord_adapter.replies import STOPPED
from bot.discord_adapter.output import BOT_EDITS_PER_S, EDITS_PER_WINDOW, LIMIT, split_message
from bot.engine.local import Engine
from tests.conftest import World, mention, rows, scope
from tests.test_discord_output import max_edits_in_window
from tests.test_engine_local import GREEDY, chat_tokens

STORY = "Write a long story about a dragon."


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def statuses(db) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status FROM messages ORDER BY id").fetchall()


async def test_a_long_prompt_shares_steps_with_a_generating_channel_one_micro_batch_at_a_time(engine: Engine) -> None:
    """Alone, a prompt is read in one decode (n_batch 2048). While another channel generates,
    it goes at most n_ubatch (512) tokens a step, so that channel's next token never waits
    for more than one micro-batch."""
    long = chat_tokens(engine, "Please summarise: " + "the history of the world in many words " * 90)
    assert engine.n_ubatch < len(long) <= engine.n_batch
    before = engine.steps
    alone = await engine.generate("micro-alone", long, max_tokens=1, sampling=GREEDY).wait()
    assert alone.n_evaluated == len(long) and engine.steps - before == 1
    story = engine.generate("micro-story", chat_tokens(engine, STORY), max_tokens=300, sampling=GREEDY)
    async for _ in story.stream():
        break  # it is generating now
    before = engine.batched_steps
    read = await engine.generate("micro-read", long, max_tokens=1, sampling=GREEDY).wait()
    batched = engine.batched_steps - before
    story.cancel()
    await story.wait()
    assert read.n_evaluated == len(long)
    assert batched == -(-len(long) // (engine.n_ubatch - 1))  # one step per micro-batch: the story's next token + 511 of the prompt
