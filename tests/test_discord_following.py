"""Following edits and deletes (bot/discord_adapter/following.py): the stored history follows
what people change on Discord, also while their message waits its turn or is being answered.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py). A message "waiting its turn" waits behind a reply the
script holds open; a reply "being written" is held open the same way."""

from __future__ import annotations

import asyncio

from bot.formats.templates import Message
from tests.conftest import World, mention, rows, scope
from tests.discord_helpers import answered, everything_stored, idle, prompt_of, replies_to, send
from tests.scripted import Script, ScriptedBackend

LONG = "Write a long story about a dragon."


async def test_edits_and_deletes_are_followed(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False) as bot:
        first = await send(world, world.general, world.ann, "My secret word is apple.")
        await world.fake.wait_for_bot_message(world.general, after=first)
        await idle(world.fake, bot)
        db = bot.ctx.settings.database_path
        await world.fake.edit_message(first, f"{mention(world.fake)} My secret word is banana.")
        await world.fake.wait_for(lambda: rows(db)[0][2] == "My secret word is banana.")
        await send(world, world.general, world.ann, "What is my secret word?")
        await idle(world.fake, bot)
        await world.fake.wait_for(lambda: len(scripted.calls) == 2)
        assert scripted.calls[1].messages[1] == Message("user", "My secret word is banana.")  # the edited text, not the old one
        await world.fake.delete_message(first)
        await world.fake.wait_for(lambda: [r[2] for r in rows(db)][0] != "My secret word is banana.")
        prompt = await prompt_of(bot, scope(world, world.general))
        assert not any("apple" in m.content or "banana" in m.content for m in prompt.messages)
        assert scope(world, world.general) in scripted.forgotten  # the model drops its cache of the old history


async def test_an_edit_is_stored_as_a_new_message_would_be(world: World, start_bot) -> None:
    """Mentions in edited text become names, exactly as in a new message, not raw <@id> markup."""
    text = f"{mention(world.fake)} Say hi to <@{world.mod['id']}>."
    async with start_bot(stream=False) as bot:
        first = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Say hi.")
        await world.fake.wait_for_bot_message(world.general, after=first)
        await idle(world.fake, bot)
        await world.fake.edit_message(first, text)
        db = bot.ctx.settings.database_path
        await world.fake.wait_for(lambda: rows(db)[0][2] != "Say hi.")
        second = await world.fake.send_message(world.general, world.ann, text)
        await world.fake.wait_for_bot_message(world.general, after=second)
        await idle(world.fake, bot)
        edited, fresh = [r[2] for r in rows(db) if r[1] == "user"]
        assert edited == fresh and edited.startswith("Say hi to @") and "<@" not in edited


async def test_edit_while_queued_is_answered_in_its_edited_form(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then(Script(["Once ", "upon ", "a ", "time."], hold=hold))
    async with start_bot(stream=False, parallel=1) as bot:
        await send(world, world.random, world.mod, LONG)  # holds the only slot
        await world.fake.wait_for(lambda: len(bot.ctx.replies))
        queued = await send(world, world.general, world.ann, "What is the capital of Spain?")
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, queued))  # "#1 in line"
        assert bot.ctx.scheduler.waiting == 1
        await world.fake.edit_message(queued, f"{mention(world.fake)} What is the capital of France?")
        await world.fake.wait_for(lambda: "France" in everything_stored(bot.ctx.settings.database_path))
        hold.set()
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path, scope(world, world.general))) == 2)
        await idle(world.fake, bot)
        db = bot.ctx.settings.database_path
    assert [r[2] for r in rows(db, scope(world, world.general))][0] == "What is the capital of France?"
    assert "Spain" not in everything_stored(db)
    [reply] = replies_to(world.fake, world.general, queued)
    assert reply["content"] == "You said: What is the capital of France?"
    assert scripted.calls[1].messages[-1] == Message("user", "What is the capital of France?")


async def test_delete_while_queued_is_never_answered(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then(Script(["Once ", "upon ", "a ", "time."], hold=hold))
    async with start_bot(stream=False, parallel=1) as bot:
        await send(world, world.random, world.mod, LONG)
        await world.fake.wait_for(lambda: len(bot.ctx.replies))
        queued = await send(world, world.general, world.ann, "Tell me a secret.")
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, queued))
        await world.fake.delete_message(queued)
        await world.fake.wait_for(lambda: "secret" not in everything_stored(bot.ctx.settings.database_path))
        hold.set()
        await idle(world.fake, bot)
        db = bot.ctx.settings.database_path
    assert rows(db, scope(world, world.general)) == []
    assert world.fake.bot_messages(world.general) == []  # the waiting note went with it
    assert len(scripted.calls) == 1  # the model was never asked


async def test_delete_during_generation_stops_it_and_stores_nothing(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script(["Once ", "upon ", "a ", "time."], hold=asyncio.Event(), hold_after=2))
    async with start_bot(stream=True) as bot:
        sent = await send(world, world.general, world.ann, LONG)
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, sent))  # it is being written (held open)
        generation = bot.ctx.replies.reply_in(scope(world, world.general)).generation
        await world.fake.delete_message(sent)
        await idle(world.fake, bot)
        assert generation.finish_reason == "cancelled" and generation.n_generated == 2
        db = bot.ctx.settings.database_path
        assert rows(db) == []
        assert world.fake.bot_messages(world.general) == []  # the half-written reply is gone too
        after = await send(world, world.general, world.ann, "Hi again")
        await world.fake.wait_for(lambda: answered(world.fake, world.general, after))
        await idle(world.fake, bot)
        assert [r[2] for r in rows(db) if r[1] == "user"] == ["Hi again"]
    assert scripted.calls[1].messages[1:] == [Message("user", "Hi again")]
