"""Messages in (bot/discord_adapter/intake.py): which messages are answered, where, with
which history, and the short notes for messages that cannot be.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py): a reply says exactly what the script says, and
`scripted.calls` shows the prompt the bot built for it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.conversations.service import CUT_NOTE
from bot.discord_adapter.intake import BUSY, MENTION_ONLY, NO_TEXT, ArrivalLine
from bot.formats.templates import Message
from tests.conftest import World, mention, rows, scope
from tests.discord_helpers import answered, ask, idle, replies_to, send, table
from tests.scripted import Script, ScriptedBackend

SYSTEM = Message("system", "You are a helpful assistant.")


async def test_mention_gets_a_reply_in_the_right_channel_and_is_stored(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    async with start_bot(stream=False) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} What is the capital of France?")
        [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert reply["content"] == "You said: What is the capital of France?"  # the scripted model's echo
        assert reply["message_reference"]["message_id"] == sent["id"]  # a reply to the triggering message
        assert world.fake.bot_messages(world.random) == []
        assert world.fake.typing and world.fake.typing[0][0] == world.general["id"]
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 2)
    [call] = scripted.calls
    assert call.key == scope(world, world.general)
    assert call.messages == [SYSTEM, Message("user", "What is the capital of France?")]  # the mention is not part of the text
    stored = rows(tmp_path / "bot.sqlite3")
    assert stored == [
        (scope(world, world.general), "user", "What is the capital of France?"),
        (scope(world, world.general), "assistant", reply["content"]),
    ]
    with sqlite3.connect(tmp_path / "bot.sqlite3") as conn:
        assert conn.execute("SELECT author_name, platform_message_id FROM messages WHERE role='user'").fetchone() == ("Ann", sent["id"])
    assert world.fake.unknown_routes == []


async def test_messages_that_are_not_for_the_bot_are_ignored(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot() as bot:
        await world.fake.send_message(world.general, world.ann, "just chatting, no mention")
        await world.fake.send_message(world.general, world.other_bot, f"{mention(world.fake)} hello from a bot")
        await world.fake.send_message(world.general, world.ann, "joined", type=7)  # a system message
        # the bot's own echoed message must not trigger it either: make it talk once, then wait
        await ask(world, bot, world.random, world.ann, "Say hi.")
        await asyncio.sleep(1.0)
        assert world.fake.bot_messages(world.general) == []
        assert [m["content"] for m in world.fake.bot_messages(world.random)] == ["You said: Say hi."]
        assert [r[1] for r in rows(bot.ctx.settings.database_path)] == ["user", "assistant"]
    assert [c.messages[-1].content for c in scripted.calls] == ["Say hi."]  # the model was asked once


async def test_two_channels_keep_separate_histories(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then("Mango is lovely.", "Teal is calm.", "Mango.")
    async with start_bot(stream=False) as bot:
        await ask(world, bot, world.general, world.ann, "My favourite fruit is mango.")
        await ask(world, bot, world.random, world.mod, "My favourite colour is teal.")
        [reply] = await ask(world, bot, world.general, world.mod, "What is Ann's favourite fruit?")
        db = bot.ctx.settings.database_path
        general = rows(db, scope(world, world.general))
        random = rows(db, scope(world, world.random))
        assert [r[2] for r in general if r[1] == "user"] == ["My favourite fruit is mango.", "What is Ann's favourite fruit?"]
        assert [r[2] for r in random if r[1] == "user"] == ["My favourite colour is teal."]
    assert reply["content"] == "Mango."
    # What the model was asked the third time: general's history only, with names (two people talk there).
    assert scripted.calls[2].key == scope(world, world.general)
    assert scripted.calls[2].messages == [
        SYSTEM,
        Message("user", "Ann: My favourite fruit is mango."),
        Message("assistant", "Mango is lovely."),
        Message("user", "Mod: What is Ann's favourite fruit?"),
    ]
    assert scripted.calls[1].messages == [SYSTEM, Message("user", "My favourite colour is teal.")]


async def test_dm_conversation(world: World, start_bot, scripted: ScriptedBackend) -> None:
    dm = world.fake.dm_channel(world.ann)
    scripted.then("Nice to meet you, Zanzibar.", "Your name is Zanzibar.")
    async with start_bot(stream=False) as bot:
        await ask(world, bot, dm, world.ann, "My name is Zanzibar.")
        [reply] = await ask(world, bot, dm, world.ann, "What is my name?")
        stored = rows(bot.ctx.settings.database_path, f"dm:{world.ann['id']}")
        assert [r[1] for r in stored] == ["user", "assistant", "user", "assistant"]
        reset = await (await world.fake.invoke_command("reset", user=world.ann, channel=dm)).wait_done()
        assert reset.content == "Conversation cleared (4 messages)."  # anyone may /reset their own DM
    assert reply["content"] == "Your name is Zanzibar." and "message_reference" in reply
    assert scripted.calls[1].key == f"dm:{world.ann['id']}"
    assert scripted.calls[1].messages == [
        SYSTEM, Message("user", "My name is Zanzibar."), Message("assistant", "Nice to meet you, Zanzibar."), Message("user", "What is my name?"),
    ]


async def test_threads_are_their_own_conversation(world: World, start_bot, scripted: ScriptedBackend) -> None:
    thread = world.fake.add_channel(world.guild, "a-thread", type=11, parent_id=world.general["id"])
    async with start_bot(stream=False) as bot:
        await ask(world, bot, world.general, world.ann, "Hello in the channel.")
        [reply] = await ask(world, bot, thread, world.ann, "Hello in the thread.")
        db = bot.ctx.settings.database_path
        assert [r[2] for r in rows(db, scope(world, thread)) if r[1] == "user"] == ["Hello in the thread."]
        assert [r[2] for r in rows(db, scope(world, world.general)) if r[1] == "user"] == ["Hello in the channel."]
    assert reply["channel_id"] == thread["id"] and reply["content"] == "You said: Hello in the thread."
    assert scripted.calls[1].messages == [SYSTEM, Message("user", "Hello in the thread.")]  # nothing from the channel


async def test_chat_channels_answer_every_message(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(chat_channels=frozenset({int(world.random["id"])})) as bot:
        sent = await world.fake.send_message(world.random, world.ann, "no mention needed here")
        [reply] = await world.fake.wait_for_bot_message(world.random, after=sent)
        assert reply["content"] == "You said: no mention needed here"
        on = await (await world.fake.invoke_command("chat", user=world.mod, channel=world.general, options={"mode": "on"})).wait_done()
        assert on.content.startswith("OK: I now answer every message")
        sent = await world.fake.send_message(world.general, world.ann, "and now here too")
        await world.fake.wait_for(lambda: answered(world.fake, world.general, sent))
        await idle(world.fake, bot)
        assert [m["content"] for m in replies_to(world.fake, world.general, sent)] == ["You said: and now here too"]


async def test_busy_channel_messages_wait_their_turn_in_order(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """One reply at a time and room for one to wait: the first is held open (the script),
    so the second waits and the third is turned away, whatever the CPU."""
    hold = asyncio.Event()
    scripted.then(Script(["One, ", "two, ", "three."], hold=hold), "Apple.")
    async with start_bot(stream=False, parallel=1, max_queue=1) as bot:
        first = await send(world, world.general, world.ann, "Count to three.")
        second = await send(world, world.general, world.mod, "Name a fruit.")
        third = await send(world, world.general, world.ann, "Name a car.")
        [busy] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, third))
        assert busy["content"] == BUSY
        [note] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, second))
        assert note["content"] == "\u23f3 Busy: you're #1 in line."
        assert bot.ctx.scheduler.running == 1 and bot.ctx.scheduler.waiting == 1
        hold.set()
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 4)
        await idle(world.fake, bot)
        users = [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"]
        assert users == ["Count to three.", "Name a fruit."]  # turned away: nothing stored as if answered
        assert [m["content"] for m in replies_to(world.fake, world.general, first)] == ["One, two, three."]
        assert replies_to(world.fake, world.general, second) == [note] and note["content"] == "Apple."  # the waiting note became the reply
    assert [c.messages[-1].content for c in scripted.calls] == ["Count to three.", "Mod: Name a fruit."]  # the car was never asked


async def test_empty_and_attachment_only_messages_get_a_short_note(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.sees = False  # (pictures alone, for a model that sees: tests/test_discord_images.py)
    async with start_bot() as bot:
        sent = await world.fake.send_message(world.general, world.ann, mention(world.fake))
        [note] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert note["content"] == MENTION_ONLY
        sent = await world.fake.send_message(
            world.general, world.ann, mention(world.fake), attachments=[{"filename": "cat.png", "data": b"\x89PNG", "content_type": "image/png"}]
        )
        [note] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert note["content"] == f"{NO_TEXT}\n-# I did not read cat.png ({scripted.image_support()})."  # and how to make it see
        assert rows(bot.ctx.settings.database_path) == []  # nothing stored as if answered
    assert scripted.calls == []


# --- odd input ---------------------------------------------------------------------------------

ODD = {
    "emoji-only": "\U0001f389\U0001f389\U0001f44d",
    "zalgo": "Z\u0338\u0322\u031ba\u0337l\u0334g\u0335o\u0336 t\u0337e\u0334x\u0335t\u0336 h\u0334e\u0335r\u0336e\u0337",
    "right-to-left": "\u0645\u0631\u062d\u0628\u0627\u060c \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f",
    "4000 characters": "Please read this. " + "word " * 796,
    "one huge code block": "```python\n" + "print('hello world')\n" * 150 + "```",
}
"""Odd but real text; tests/test_conversations_service.py reads the same through the real tokenizer."""


@pytest.mark.parametrize("content", list(ODD.values()), ids=list(ODD))
async def test_odd_but_real_text_is_answered_and_stored(world: World, start_bot, scripted: ScriptedBackend, content: str) -> None:
    scripted.then("Got it.")
    async with start_bot(stream=False) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, content)
        stored = table(bot.ctx.settings.database_path)
        assert [(r[0], r[1]) for r in stored] == [("user", "ok"), ("assistant", "ok")]
        assert stored[0][2] == content.strip() and stored[1][2] == "Got it."  # stored whole, even when the prompt had to cut it
    [call] = scripted.calls
    asked = call.messages[-1].content
    assert asked and content.strip().startswith(asked)  # the prompt holds it, or its beginning when it is too long
    cut = asked != content.strip()
    assert cut == (content.startswith("Please read this."))  # only the 4,000 characters overflow the 1,024-token window
    assert reply["content"] == "Got it." + (f"\n-# {CUT_NOTE}" if cut else "")


@pytest.mark.parametrize(
    ("content", "extra", "note"),
    [
        ("   \t  ", {}, MENTION_ONLY),
        ("", {"sticker_items": [{"id": "111", "name": "wave", "format_type": 1}]}, NO_TEXT),
        ("", {"attachments": [{"filename": "cat.png", "data": b"\x89PNG", "content_type": "image/png"}]}, NO_TEXT),
    ],
    ids=["whitespace-only", "sticker-only", "attachment-only"],
)
async def test_messages_without_text_get_a_short_note_and_nothing_is_stored(
    world: World, start_bot, scripted: ScriptedBackend, content: str, extra: dict, note: str
) -> None:
    scripted.sees = False
    async with start_bot() as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)}{content}", **extra)
        [reply] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, sent))
        await idle(world.fake, bot)
        skipped = [f"-# I did not read {a['filename']} ({scripted.image_support()})." for a in extra.get("attachments", [])]
        assert reply["content"].split("\n") == [note, *skipped]
        assert table(bot.ctx.settings.database_path) == []
    assert scripted.calls == []


async def test_messages_held_by_the_catch_up_pass_in_arrival_order() -> None:
    """The line's own logic (pure asyncio): messages that waited for the catch-up pass first and
    in order, also before one that arrives in the very step the catch-up ends (the flood test
    above lost its first message to such a one about half the time); a message cancelled in
    line lets the next one through; with nobody in line nothing waits."""
    opened = asyncio.Event()
    line = ArrivalLine(opened)
    passed: list[str] = []

    async def message(name: str) -> None:
        await line.wait()
        passed.append(name)

    waiting = [asyncio.create_task(message(f"m{i}")) for i in range(5)]
    gone = asyncio.create_task(message("gone"))
    waiting.append(asyncio.create_task(message("m5")))
    await asyncio.sleep(0)
    assert passed == []
    gone.cancel()
    # A message arrives in the very step the catch-up ends: its task is scheduled before the
    # waiting ones are woken (as when the gateway's event and the catch-up's end share a loop turn).
    waiting.append(asyncio.create_task(message("late")))
    opened.set()
    await asyncio.gather(*waiting)
    assert passed == ["m0", "m1", "m2", "m3", "m4", "m5", "late"]
    await message("after")  # nobody in line: straight through
    assert passed[-1] == "after"
