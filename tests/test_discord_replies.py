"""Answering (bot/discord_adapter/replies.py): a reply delivered once, pinging nobody;
/stop; the fair queue across channels; faults on the way to Discord and in the model.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py). Replies that must still be running when a /stop
arrives are held open by their script, not made long."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.discord_adapter.commands import NOT_YOUR_REPLY
from bot.discord_adapter.replies import SORRY, STOPPED, UNDELIVERED
from bot.formats.templates import Message
from tests.conftest import World, rows, scope
from tests.discord_helpers import answered, ask, bob, command, idle, replies_to, send, table
from tests.scripted import Script, ScriptedBackend


async def test_model_output_never_pings(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(f"Hello @everyone and @here and <@{world.mod['id']}>!")
    async with start_bot(stream=False) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "Copy this text exactly: @everyone @here")
    assert reply["content"] == f"Hello @everyone and @here and <@{world.mod['id']}>!"  # shown as written...
    assert reply["_pinged"] == [] and reply["mention_everyone"] is False  # ...and nobody was pinged
    posts = world.fake.requests_to("POST", r"/channels/\d+/messages$")
    assert posts and all(p["json"]["allowed_mentions"] == {"parse": [], "replied_user": False} for p in posts)


# --- /stop -----------------------------------------------------------------------------------


async def test_stop_mid_reply_keeps_what_was_written(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script(["Once ", "upon ", "a ", "time"], hold=asyncio.Event(), hold_after=2), "You are welcome.")
    async with start_bot(stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Write a long story about a dragon.")
        await world.fake.wait_for_bot_message(world.general, after=sent)  # shown while it is written (held open)
        refused = await command(world, "stop", bob(world), world.general)
        assert refused.ephemeral and refused.content == NOT_YOUR_REPLY
        assert bot.ctx.replies.reply_in(scope(world, world.general)) is not None  # still writing
        stop = await command(world, "stop", world.ann, world.general)
        assert stop.ephemeral and stop.content == "Stopped."
        await idle(world.fake, bot)
        [reply] = replies_to(world.fake, world.general, sent)
        assert reply["content"] == "Once upon" + STOPPED
        assert table(bot.ctx.settings.database_path) == [("user", "ok", "Write a long story about a dragon."), ("assistant", "stopped", "Once upon")]
        [generation] = [c.generation for c in scripted.calls]
        assert generation.finish_reason == "cancelled" and generation.n_generated == 2
        again = await send(world, world.general, world.ann, "Thanks!")
        [thanks] = await world.fake.wait_for_bot_message(world.general, after=again)
        await idle(world.fake, bot)
    assert thanks["content"] == "You are welcome."
    assert scripted.calls[1].messages[-2:] == [Message("assistant", "Once upon"), Message("user", "Thanks!")]  # what was written is history


async def test_stop_before_the_first_token(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """A reply stopped before it wrote anything (the engine still reading the prompt):
    "(stopped)" alone, nothing stored as said. (The engine's own cancel while it reads a
    prompt: tests/test_engine_local.py.)"""
    scripted.then(Script(["Never", " shown"], hold=asyncio.Event(), hold_after=0))
    async with start_bot(stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Please summarise: " + "the history of the world in many words " * 50)
        await world.fake.wait_for(lambda: len(bot.ctx.replies))  # generation started, no text yet
        stop = await command(world, "stop", world.ann, world.general)
        assert stop.content == "Stopped."
        await idle(world.fake, bot)
        [reply] = replies_to(world.fake, world.general, sent)
        assert reply["content"] == STOPPED.strip()
        assert [(r[0], r[1]) for r in table(bot.ctx.settings.database_path)] == [("user", "ok")]  # nothing written, nothing stored as said
        assert len(bot.ctx.replies) == 0
    [call] = scripted.calls
    assert call.generation.finish_reason == "cancelled" and call.generation.n_generated == 0


# --- the fair queue ----------------------------------------------------------------------------


async def test_fair_queue_serves_a_quiet_channel_before_a_busy_one(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then(Script(["Zero."], hold=hold, hold_after=0))  # the first question holds the only slot until all have arrived
    async with start_bot(stream=False, parallel=1, max_queue=16) as bot:  # 4 may wait per channel
        flood = [await send(world, world.general, world.ann, f"Question {i}?") for i in range(4)]
        quiet = await send(world, world.random, world.mod, "Hello from a quiet channel.")
        [note] = await world.fake.wait_for(lambda: replies_to(world.fake, world.random, quiet))
        assert note["content"] == "\u23f3 Busy: you're #2 in line."  # a waiting user sees their position
        await world.fake.wait_for(lambda: bot.ctx.scheduler.waiting == 4)
        hold.set()
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 10)
        await idle(world.fake, bot)
        order = [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"]
        # round-robin: the quiet channel waited for one busy-channel message, not for all of them
        assert order == ["Question 0?", "Question 1?", "Hello from a quiet channel.", "Question 2?", "Question 3?"]
        assert [c.messages[-1].content for c in scripted.calls] == order  # answered in that order
        assert replies_to(world.fake, world.random, quiet) == [note] and note["content"] == "You said: Hello from a quiet channel."
        assert all(len(answered(world.fake, world.general, m)) == 1 for m in flood)


# --- faults on the way to Discord -----------------------------------------------------------


async def test_429_and_500_on_the_reply_are_retried_and_delivered_once(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        world.fake.fail_next("POST", r"/channels/\d+/messages$", 429)
        [reply] = await ask(world, bot, world.general, world.ann, "Hello!")
        world.fake.fail_next("POST", r"/channels/\d+/messages$", 500)
        [reply2] = await ask(world, bot, world.general, world.ann, "Hello again!")
        assert world.fake.injected_failures == 2
        assert [r[1] for r in table(bot.ctx.settings.database_path)] == ["ok"] * 4
        assert [m["content"] for m in world.fake.bot_messages(world.general)] == ["You said: Hello!", "You said: Hello again!"]  # each delivered exactly once


async def test_reply_that_finally_fails_is_kept_undelivered_and_hidden_from_the_model(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then("The secret number is 7.")
    async with start_bot(stream=False) as bot:
        world.fake.fail_next("POST", r"/channels/\d+/messages$", 503)  # discord.py does not retry a 503
        [note] = await ask(world, bot, world.general, world.ann, "Tell me a secret number.")
        assert note["content"] == UNDELIVERED
        assert table(bot.ctx.settings.database_path) == [
            ("user", "ok", "Tell me a secret number."), ("assistant", "undelivered", "The secret number is 7."),
        ]
        await ask(world, bot, world.general, world.ann, "Hello?")
    # The model never sees the undelivered answer as said: the two questions are one user turn.
    assert scripted.calls[1].messages == [Message("system", "You are a helpful assistant."), Message("user", "Tell me a secret number.\n\nHello?")]
    assert "secret number is" not in scripted.calls[1].prompt


async def test_a_failed_generation_apologises_and_keeps_serving(world: World, start_bot, scripted: ScriptedBackend, caplog: pytest.LogCaptureFixture) -> None:
    """The model fails mid-reply (on the real engine: tests/test_end_to_end.py injects a decode fault)."""
    scripted.then(Script(["Hel", "lo"], finish="error", error="llama_decode failed (-1)"))
    async with start_bot(stream=False) as bot:
        with caplog.at_level(logging.ERROR):
            [apology] = await ask(world, bot, world.general, world.ann, "Hello!")
        assert apology["content"] == SORRY
        assert "generation failed for message" in caplog.text and scope(world, world.general) in caplog.text and "llama_decode failed (-1)" in caplog.text
        [other] = await ask(world, bot, world.random, world.ann, "Hi from another channel")
        [again] = await ask(world, bot, world.general, world.ann, "Hello?")
        assert other["content"] == "You said: Hi from another channel"
        assert again["content"] == "You said: Hello!\n\nHello?"  # the apologised-for message stays in the history, joined to the next
        # The failed turn is part of the history (so a restart does not answer it again); no answer was stored for it.
        assert [(r[0], r[1]) for r in table(bot.ctx.settings.database_path) if r[2] in ("Hello!", "Hel", "Hello")] == [("user", "ok")]
    assert [m.content for m in scripted.calls[2].messages[1:]] == ["Hello!\n\nHello?"]


async def test_disk_full_at_write_time_apologises_then_recovers(world: World, start_bot, caplog: pytest.LogCaptureFixture) -> None:
    async with start_bot(stream=False) as bot:
        db = bot.ctx.chat.store._db
        pages = (await (await db.execute("PRAGMA page_count")).fetchone())[0]
        await db.execute(f"PRAGMA max_page_count = {int(pages)}")  # SQLite answers SQLITE_FULL, as on a full disk
        filler = "x" * 3000
        with caplog.at_level(logging.ERROR):
            for i in range(40):  # fill the last free pages
                sent = await send(world, world.general, world.ann, f"{filler} {i}")
                await world.fake.wait_for(lambda: replies_to(world.fake, world.general, sent))
                await idle(world.fake, bot)
                if replies_to(world.fake, world.general, sent)[0]["content"] == SORRY:
                    break
            else:
                pytest.fail("the database never filled up")
        assert "database or disk is full" in caplog.text
        await db.execute("PRAGMA max_page_count = 1073741823")  # space is back
        [reply] = await ask(world, bot, world.general, world.ann, "Still there?")
        assert reply["content"] == "You said: Still there?"
