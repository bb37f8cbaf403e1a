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
from tests.test_engine import GREEDY, chat_tokens

STORY = "Write a long story about a dragon."


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def statuses(db) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status FROM messages ORDER BY id").fetchall()


async def test_streamed_reply_appears_early_respects_edit_rate_and_ends_exact(world: World, start_bot) -> None:
    async with start_bot(n_predict=700, stream=True) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a long Python program with many functions for a to-do list app.")
        [first] = await world.fake.wait_for_bot_message(world.general, after=sent, timeout=60)
        assert bot.ctx.scheduler.running == 1  # visible while still being generated
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout=180)
        final = rows(bot.ctx.settings.database_path)[1][2]
        pages = [m for m in world.fake.bot_messages(world.general) if int(m["id"]) > int(sent["id"])]
    assert len(final) > LIMIT
    assert [p["content"] for p in pages] == split_message(final)  # the final text is exact, page by page
    assert len(first["_edits"]) >= 2  # it grew by edits
    assert max_edits_in_window(world, world.general) <= EDITS_PER_WINDOW  # Discord's per-channel budget
    edits = world.fake.requests_to("PATCH", r"/channels/\d+/messages/\d+$")
    assert edits and all(e["json"]["allowed_mentions"]["parse"] == [] for e in edits), [e["json"].get("allowed_mentions") for e in edits]


async def test_edit_budget_with_four_channels_streaming(world: World, start_bot) -> None:
    channels = [world.general, world.random] + [world.fake.add_channel(world.guild, f"extra-{i}") for i in range(2)]
    async with start_bot(n_predict=250, stream=True, parallel=4) as bot:
        for channel in channels:
            await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {STORY}")
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 8, timeout=180)
        assert bot.ctx.chat.backend.engine.batched_steps > 0  # the four were decoded together
    edits = world.fake.requests_to("PATCH", r"/channels/\d+/messages/\d+$")
    times = sorted(e["time"] for e in edits)
    assert max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times)) <= BOT_EDITS_PER_S  # bot-wide
    for channel in channels:  # each channel within its own budget, and every reply still ends exact
        assert max_edits_in_window(world, channel) <= EDITS_PER_WINDOW
        stored = [r[2] for r in rows(bot.ctx.settings.database_path, scope(world, channel)) if r[1] == "assistant"]
        assert [m["content"] for m in world.fake.bot_messages(channel)] == split_message(stored[0])


async def test_reset_and_template_invalidate_the_cache(chat: ChatService) -> None:
    first = await chat.respond(UserMessage("dm:cache", "Hello there"))
    await first.save()
    follow = await chat.respond(UserMessage("dm:cache", "And again"))
    await follow.save()
    assert follow.generation.n_cached > 0
    await chat.reset("dm:cache")
    after_reset = await chat.respond(UserMessage("dm:cache", "Hello there"))
    await after_reset.save()
    assert after_reset.generation.n_cached == 0
    await chat.set_template("dm:cache", "chatml")
    after_switch = await chat.respond(UserMessage("dm:cache", "Hi"))
    await after_switch.save()
    assert after_switch.generation.n_cached == 0


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
