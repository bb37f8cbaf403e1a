"""/chat threads: a mention in such a channel starts a thread, the reply goes there, and the
thread is a conversation of its own where every message is answered.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py); a reply that must keep the only slot busy is held open
by its script."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.discord_adapter.client import LlamaBot, PERMISSIONS
from bot.discord_adapter.intake import NO_THREAD_PERMISSION
from bot.discord_adapter.text import thread_name
from bot.discord_adapter.commands import NEED_ADMIN, NO_THREADS_IN_THREADS
from bot.conversations.store import ChatMode, Store
from bot.formats.templates import Message
from tests.conftest import JSON, World, mention, rows, scope
from tests.discord_helpers import ask, command
from tests.fakediscord import Permissions
from tests.scripted import Script, ScriptedBackend


async def threads_on(world: World, channel: JSON) -> str:
    interaction = await world.fake.invoke_command("chat", user=world.mod, channel=channel, options={"mode": "threads"})
    await interaction.wait_done()
    assert interaction.ephemeral
    return interaction.content


async def idle(world: World, bot: LlamaBot) -> None:
    await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0)


async def start_conversation(world: World, bot: LlamaBot, text: str) -> tuple[JSON, JSON, list[JSON]]:
    """Ann mentions the bot in #general: returns her message, the thread and the bot's reply there."""
    sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} {text}")
    [thread] = await world.fake.wait_for(lambda: [t for t in world.fake.threads_of(world.general) if t["id"] == sent["id"]])
    reply = await world.fake.wait_for_bot_message(thread)
    await idle(world, bot)
    return sent, thread, reply


async def test_a_mention_starts_a_thread_that_is_its_own_conversation(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then("Mango is sweet.", "Mango.", "Yellow.")
    async with start_bot(stream=False) as bot:
        db = bot.ctx.settings.database_path
        await ask(world, bot, world.general, world.ann, "My favourite fruit is mango.")  # before: answered in the channel
        assert (await threads_on(world, world.general)).startswith("OK: I now answer mentions here by starting a thread")
        in_channel = len(world.fake.bot_messages(world.general))

        sent, thread, [reply] = await start_conversation(world, bot, "What is my favourite fruit?\nPlease answer briefly.")
        assert thread["name"] == "What is my favourite fruit?" and thread["owner_id"] == world.fake.bot_user["id"]
        assert thread["parent_id"] == world.general["id"]
        assert len(world.fake.bot_messages(world.general)) == in_channel  # nothing more in the channel itself
        assert reply["content"] == "Mango." and not reply.get("message_reference")  # the thread is the context

        # In the thread every message is answered, without a mention.
        follow = await world.fake.send_message(thread, world.ann, "And what colour is it?")
        await world.fake.wait_for_bot_message(thread, after=follow)
        await idle(world, bot)
        # A message in the channel without a mention is still ignored (and starts no thread).
        await world.fake.send_message(world.general, world.ann, "just chatting")
        await asyncio.sleep(0.5)
        assert len(world.fake.threads_of(world.general)) == 1 and len(world.fake.bot_messages(world.general)) == in_channel

        channel_rows = rows(db, scope(world, world.general))
        thread_rows = rows(db, scope(world, thread))
        assert [r[2] for r in channel_rows if r[1] == "user"] == ["My favourite fruit is mango."]
        assert [r[2] for r in thread_rows if r[1] == "user"] == ["What is my favourite fruit?\nPlease answer briefly.", "And what colour is it?"]
        assert [r[1] for r in thread_rows] == ["user", "assistant", "user", "assistant"]
        prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, thread)))
        assert not any("mango" in m.content for m in prompt.messages)  # the channel's history stays there
        # The thread's reply carries the same buttons as any other.
        assert any(c["custom_id"].startswith(f"llamabot:regen:{follow['id']}:") for row in world.fake.bot_messages(thread)[-1]["components"] for c in row["components"])
    # What the model was asked in the thread: the thread's own history only.
    assert [c.key for c in scripted.calls] == [scope(world, world.general), scope(world, thread), scope(world, thread)]
    assert scripted.calls[2].messages[1:] == [
        Message("user", "What is my favourite fruit?\nPlease answer briefly."), Message("assistant", "Mango."), Message("user", "And what colour is it?"),
    ]


async def test_a_thread_the_bot_starts_takes_what_an_admin_chose_for_its_channel(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """The persona, template and settings set with /system, /template and /settings in a
    channel hold in the threads its mentions start; a thread's own choice stays its own."""
    scripted.then("Arr, a pirate.", "Roses are red.")
    async with start_bot(stream=False) as bot:
        await threads_on(world, world.general)
        await command(world, "system", world.mod, world.general, text="You are a pirate.")
        await (await world.fake.invoke_command("template", user=world.mod, channel=world.general, options={"name": "vicuna-chat"})).wait_done(60)
        await command(world, "settings", world.mod, world.general, temperature=0.3, reply_length=7)
        _, thread, [reply] = await start_conversation(world, bot, "Who are you?")
        assert reply["content"] == "Arr, a pirate."
        store = bot.ctx.chat.store
        own = await store.conversation(scope(world, thread))
        assert (own.template, own.system_prompt, own.temperature, own.n_predict) == ("vicuna-chat", "You are a pirate.", 0.3, 7)
        [call] = [c for c in scripted.calls if c.key == scope(world, thread)]
        assert call.messages[0] == Message("system", "You are a pirate.") and call.max_tokens == 7 and call.sampling.temperature == 0.3
        assert call.prompt.startswith("You are a pirate. USER: ")  # vicuna's layout, not the model's own template

        await command(world, "system", world.mod, thread, text="You are a poet.")
        follow = await world.fake.send_message(thread, world.ann, "Say a verse.")
        await world.fake.wait_for_bot_message(thread, after=follow)
        await idle(world, bot)
        assert scripted.calls[-1].messages[0] == Message("system", "You are a poet.")
        assert (await store.conversation(scope(world, world.general))).system_prompt == "You are a pirate."


async def test_threads_are_remembered_across_a_restart(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    async with start_bot(db=db) as bot:
        await threads_on(world, world.general)
        _, thread, _ = await start_conversation(world, bot, "Hello there!")
    async with start_bot(db=db) as bot:
        sent = await world.fake.send_message(thread, world.ann, "Are you still there?")
        await world.fake.wait_for_bot_message(thread, after=sent)
        await idle(world, bot)
        assert [r[2] for r in rows(db, scope(world, thread)) if r[1] == "user"] == ["Hello there!", "Are you still there?"]
        assert scripted.calls[-1].messages[1:] == [
            Message("user", "Hello there!"), Message("assistant", "You said: Hello there!"), Message("user", "Are you still there?"),
        ]  # the thread's history, from before the restart
        # A thread someone else started in that channel is theirs: only mentions are answered there.
        theirs = await world.fake.start_thread(world.general, world.ann, "my own thread")
        await world.fake.send_message(theirs, world.ann, "talking to myself")
        await asyncio.sleep(0.5)
        assert world.fake.bot_messages(theirs) == []
        # /chat on and off keep their meaning: off is mentions only, answered in the channel.
        off = await world.fake.invoke_command("chat", user=world.mod, channel=world.general, options={"mode": "off"})
        await off.wait_done()
        [answer] = await ask(world, bot, world.general, world.ann, "Say hi.")
        assert answer["channel_id"] == world.general["id"] and len(world.fake.threads_of(world.general)) == 2


async def test_a_waiting_thread_conversation_and_a_missed_mention_are_answered_after_a_restart(
    world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path
) -> None:
    db = tmp_path / "kept.sqlite3"
    hold = asyncio.Event()
    scripted.then(Script(["Once ", "upon ", "a ", "time."], hold=hold, hold_after=2))
    async with start_bot(db=db, parallel=1) as bot:  # one reply at a time: the second waits
        await threads_on(world, world.general)
        busy = await world.fake.send_message(world.random, world.ann, f"{mention(world.fake)} Write a long story about a dragon.")
        await world.fake.wait_for_bot_message(world.random, after=busy)  # held open: it keeps the only slot
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Hello from the waiting room!")
        [thread] = await world.fake.wait_for(lambda: world.fake.threads_of(world.general))
        [note] = await world.fake.wait_for_bot_message(thread)
        assert note["content"].startswith("\u23f3 Busy")
        hold.set()  # the shutdown lets the story finish; the waiting one is not started
    # Stopped while it waited: it is stored, pending, in the thread's conversation.
    assert rows(db, scope(world, thread)) == [(scope(world, thread), "user", "Hello from the waiting room!")]
    missed = await world.fake.send_message(world.general, world.mod, f"{mention(world.fake)} Did I miss anything?")  # nobody connected
    async with start_bot(db=db) as bot:
        await world.fake.wait_for(lambda: note["content"] and not note["content"].startswith("\u23f3"), 60)
        assert world.fake.bot_messages(thread) == [note]  # the note became the reply, in the thread
        [late] = await world.fake.wait_for(lambda: [t for t in world.fake.threads_of(world.general) if t["id"] == missed["id"]])
        await world.fake.wait_for_bot_message(late)
        await idle(world, bot)
        assert [r[1] for r in rows(db, scope(world, thread))] == ["user", "assistant"]
        assert [r[1:] for r in rows(db, scope(world, late))][0] == ("user", "Did I miss anything?")
        assert sent["id"] == thread["id"]
    assert note["content"] == "You said: Hello from the waiting room!"
    assert {c.key: c.messages[-1].content for c in scripted.calls[1:]} == {
        scope(world, thread): "Hello from the waiting room!", scope(world, late): "Did I miss anything?",
    }


async def test_after_a_crash_the_half_written_reply_in_a_thread_is_finished_in_place(world: World, start_bot, tmp_path: Path) -> None:
    """What a run killed mid-reply leaves: the message pending in its thread's conversation, and
    the bot's first message in the thread (posted, never recorded). It becomes the reply."""
    db = tmp_path / "kept.sqlite3"
    sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} What is the capital of France?")
    thread = await world.fake.start_thread(world.general, world.fake.bot_user, "What is the capital of France?", message=sent)
    half = await world.fake.send_message(thread, world.fake.bot_user, "The capital of")
    async with await Store.open(db) as store:
        conversation = await store.conversation(scope(world, thread), channel_id=thread["id"])
        await store.receive(conversation.id, "What is the capital of France?", author_id=world.ann["id"], author_name="ann", platform_message_id=sent["id"])
    async with start_bot(db=db, stream=False) as bot:
        await world.fake.wait_for(lambda: [r[1] for r in rows(db, scope(world, thread))] == ["user", "assistant"], 60)
        await idle(world, bot)
    answer = rows(db, scope(world, thread))[1][2]
    assert [m["id"] for m in world.fake.bot_messages(thread)] == [half["id"]]  # finished in place, not posted again
    assert world.fake.bot_messages(thread)[0]["content"] == answer == "You said: What is the capital of France?"
    assert world.fake.bot_messages(world.general) == []


async def test_without_the_thread_permission_the_answer_comes_in_the_channel(world: World, start_bot) -> None:
    assert PERMISSIONS.create_public_threads  # the invite link asks for it
    world.fake.set_role_permissions(world.guild, world.guild, Permissions.DEFAULT_EVERYONE & ~Permissions.CREATE_PUBLIC_THREADS)
    async with start_bot(stream=False) as bot:
        said = await threads_on(world, world.general)
        assert "Create Public Threads" in said
        [reply] = await ask(world, bot, world.general, world.ann, "Hello!")
        assert world.fake.threads_of(world.general) == []
        assert reply["content"] == f"You said: Hello!\n-# {NO_THREAD_PERMISSION}"
        assert [r[1] for r in rows(bot.ctx.settings.database_path, scope(world, world.general))] == ["user", "assistant"]


async def test_chat_threads_needs_an_admin_and_a_text_channel(world: World, start_bot) -> None:
    async with start_bot() as bot:
        world.fake.set_command_permissions(world.guild, "chat", {world.guild["id"]: True})  # shown to @everyone by a server admin
        refused = await world.fake.invoke_command("chat", user=world.ann, channel=world.general, options={"mode": "threads"})
        await refused.wait_done()
        assert refused.content == NEED_ADMIN.format(name="chat") and bot.ctx.chat.chat_mode(scope(world, world.general)) == ChatMode.OFF
        thread = await world.fake.start_thread(world.general, world.mod, "a thread")
        inside = await world.fake.invoke_command("chat", user=world.mod, channel=thread, options={"mode": "threads"})
        await inside.wait_done()
        assert inside.ephemeral and inside.content == NO_THREADS_IN_THREADS and bot.ctx.chat.chat_mode(scope(world, world.general)) == ChatMode.OFF


async def test_a_long_message_names_its_thread_within_discords_limit(world: World, start_bot) -> None:
    long = "Tell me " + "about the history of the lighthouse " * 5
    name = thread_name(long)
    assert len(name) == 100 and name.endswith("\u2026") and long.startswith(name[:-1])
    assert thread_name("  Hi   there \n second line") == "Hi there"
    async with start_bot() as bot:
        await threads_on(world, world.general)
        _, thread, _ = await start_conversation(world, bot, long)
        assert thread["name"] == name
