"""/stop follows the Stop button's rule: the author of the message being answered, or an admin,
may stop a reply; anyone else gets a short refusal only they see, and the reply goes on."""

from __future__ import annotations

import asyncio

from bot.discord_adapter.commands import NOT_YOUR_REPLY
from tests.conftest import World, mention, scope
from tests.scripted import Script, ScriptedBackend


async def test_only_the_author_or_an_admin_can_stop_a_reply_with_slash_stop(world: World, start_bot, scripted: ScriptedBackend) -> None:
    bob = world.fake.add_user("bob", global_name="Bob")  # may use the bot, did not write the message, no moderator
    world.fake.add_member(world.guild, bob)
    release = asyncio.Event()
    scripted.then(Script.text("Once upon a time there was a dragon who", hold=release, hold_after=3))
    async with start_bot() as bot:
        where = scope(world, world.general)
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Tell me a story.")
        reply = await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(where), 30)
        await world.fake.wait_for(lambda: reply.generation.n_generated == 3, 30)  # written up to the hold

        refused = await world.fake.invoke_command("stop", user=bob, channel=world.general)
        await refused.wait_done()
        assert refused.ephemeral and refused.content == NOT_YOUR_REPLY
        await asyncio.sleep(0.2)
        assert not reply.generation.done and bot.ctx.replies.reply_in(where) is reply  # the reply goes on

        stopped = await world.fake.invoke_command("stop", user=world.mod, channel=world.general)  # a moderator may
        await stopped.wait_done()
        assert stopped.ephemeral and stopped.content == "Stopped."
        await reply.generation.wait()
        assert reply.finish_reason == "cancelled"
        [shown] = await world.fake.wait_for_bot_message(world.general, after=sent)
        await world.fake.wait_for(lambda: "(stopped)" in (world.fake.message(shown["id"]) or {}).get("content", ""), 30)


async def test_the_author_may_stop_their_own_reply_with_slash_stop(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script.text("A long answer that", hold=asyncio.Event(), hold_after=2))
    async with start_bot() as bot:
        where = scope(world, world.general)
        await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Explain everything.")
        reply = await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(where), 30)
        stopped = await world.fake.invoke_command("stop", user=world.ann, channel=world.general)
        await stopped.wait_done()
        assert stopped.content == "Stopped."
        await reply.generation.wait()
        assert reply.finish_reason == "cancelled"
