"""Warm while typing (bot/discord_adapter/warming.py): TYPING_START from the local Discord API
asks the chat layer to make a conversation ready, only where the typist's message would be
answered, at most once per conversation while they keep typing, never with WARM_ON_TYPING=0.

The scripted model records what it was asked to warm; one test runs the real engine, where
the warmed state is what the next reply starts from."""

from __future__ import annotations

import asyncio

from bot.engine.local import LocalBackend
from tests.conftest import World, mention, rows, scope
from tests.scripted import ScriptedBackend


async def _talk_once(world: World, channel: dict, text: str, bot) -> None:  # noqa: ANN001
    """A message and its reply, stored."""
    sent = await world.fake.send_message(channel, world.ann, text)
    await world.fake.wait_for_bot_message(channel, after=sent, timeout=60)
    db = bot.ctx.settings.database_path
    await world.fake.wait_for(lambda: len(bot.ctx.replies) == 0 and rows(db)[-1][1] == "assistant", 60)


async def test_typing_after_a_mention_warms_that_channel_with_its_history(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot() as bot:
        await _talk_once(world, world.general, f"{mention(world.fake)} What is a dragon?", bot)
        await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)) is None, 30)
        await world.fake.start_typing(world.general, world.ann)
        [(key, prompt)] = await world.fake.wait_for(lambda: scripted.warmed, 30)
        assert key == scope(world, world.general)
        assert "What is a dragon?" in prompt and "You said: What is a dragon?" in prompt  # the history the next message extends
        assert not prompt.rstrip().endswith("<|im_start|>assistant")  # no generation prompt: a message comes next

        await world.fake.start_typing(world.general, world.ann)  # Discord repeats it while they type
        await asyncio.sleep(0.5)
        assert len(scripted.warmed) == 1


async def test_no_warm_up_where_the_message_would_not_be_answered(world: World, start_bot, scripted: ScriptedBackend) -> None:
    blocked = world.fake.add_user("troll", global_name="Troll")
    world.fake.add_member(world.guild, blocked)
    async with start_bot(blocked_user_ids=frozenset({int(blocked["id"])})) as bot:
        await _talk_once(world, world.general, f"{mention(world.fake)} Hello", bot)
        await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)) is None, 30)
        await world.fake.start_typing(world.random, world.ann)  # never addressed the bot there
        await world.fake.start_typing(world.general, blocked)  # never answered
        await world.fake.send_message(world.general, world.ann, "just chatting, no mention")
        await asyncio.sleep(0.2)
        await world.fake.start_typing(world.general, world.ann)  # their last message here was not for the bot
        await asyncio.sleep(1.0)
        assert scripted.warmed == []


async def test_chat_channels_and_dms_are_warmed(world: World, start_bot, scripted: ScriptedBackend) -> None:
    dm = world.fake.dm_channel(world.ann)
    async with start_bot(chat_channels=frozenset({int(world.random["id"])})) as bot:
        await _talk_once(world, world.random, "Hello, chat channel", bot)
        await _talk_once(world, dm, "Hello in private", bot)
        await world.fake.wait_for(lambda: len(bot.ctx.replies) == 0, 30)
        await world.fake.start_typing(world.random, world.ann)
        await world.fake.start_typing(dm, world.ann)
        warmed = await world.fake.wait_for(lambda: len(scripted.warmed) == 2 and scripted.warmed, 30)
        assert {key for key, _ in warmed} == {scope(world, world.random), f"dm:{world.ann['id']}"}


async def test_warm_on_typing_off_asks_discord_for_no_typing_events(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(warm_on_typing=False) as bot:
        assert not bot.intents.guild_typing and not bot.intents.dm_typing
        await _talk_once(world, world.general, f"{mention(world.fake)} Hello", bot)
        await world.fake.start_typing(world.general, world.ann)
        await asyncio.sleep(1.0)
        assert scripted.warmed == []
    async with start_bot() as bot:
        assert bot.intents.guild_typing and bot.intents.dm_typing  # on by default (not privileged)


async def test_a_warmed_state_is_what_the_real_reply_starts_from(world: World, start_bot, real: LocalBackend) -> None:
    """The real engine: the channel's state is dropped (as after a restart with no disk tier),
    the member types, the history is evaluated ahead, and the reply reads only the new message."""
    engine = real.engine
    async with start_bot(backend=real, n_predict=4) as bot:
        where = scope(world, world.general)
        await _talk_once(world, world.general, f"{mention(world.fake)} Name three colours of the rainbow, please.", bot)
        await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(where) is None, 60)
        engine.forget(where)
        used = engine.warm_stats.used
        started = engine.warm_stats.started
        await world.fake.start_typing(world.general, world.ann)
        await world.fake.wait_for(lambda: engine.warm_stats.started > started and engine.warming == 0, 60)
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} And two more?")
        await world.fake.wait_for_bot_message(world.general, after=sent, timeout=60)
        reply = bot.ctx.chat.last_replies[where]
        assert engine.warm_stats.used == used + 1
        history = reply.generation.n_prompt - reply.generation.n_cached
        assert reply.generation.n_cached > 0 and history < 40  # only the new message (and its turn markup) was read
