"""Who may use the bot, where and how often (bot/discord_adapter/access.py): blocked users,
allowed channels and roles, DMs, the per-user cooldown, and conversations kept apart.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py): `scripted.calls` shows that nothing of a refused
message, or of another conversation, reached the model."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

from bot.discord_adapter.access import REFUSED_BLOCKED, REFUSED_CHANNEL, REFUSED_DMS, REFUSED_ROLE, SLOW_DOWN, refusal
from bot.formats.templates import Message
from tests.conftest import World, make_settings, mention, rows, scope
from tests.discord_helpers import ask, command, replies_to, user_rows
from tests.scripted import ScriptedBackend


async def test_a_blocked_user_gets_no_answer_at_all(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False, blocked_user_ids=frozenset({int(world.ann["id"])})) as bot:
        ignored = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Hello?")
        dm = world.fake.dm_channel(world.ann)
        in_dm = await world.fake.send_message(dm, world.ann, "Hello in private?")
        await ask(world, bot, world.general, world.mod, "Hello from mod.")  # answered, and after ann's message
        assert not [m for m in world.fake.bot_messages(world.general) if m.get("message_reference", {}).get("message_id") == ignored["id"]]
        assert world.fake.bot_messages(dm) == [] and in_dm["channel_id"] == dm["id"]
        assert [r[0] for r in user_rows(bot.ctx.settings.database_path)] == ["Hello from mod."]
        status = await command(world, "status", world.ann, world.general)
        assert status.ephemeral and status.content == REFUSED_BLOCKED
    assert [c.messages[1:] for c in scripted.calls] == [[Message("user", "Hello from mod.")]]  # nothing of Ann's reached the model


async def test_allowed_channels_and_roles_are_enforced(world: World, start_bot, scripted: ScriptedBackend) -> None:
    thread = world.fake.add_channel(world.guild, "a-thread", type=11, parent_id=world.general["id"])
    dm = world.fake.dm_channel(world.ann)
    async with start_bot(stream=False, allowed_channel_ids=frozenset({int(world.general["id"])})) as bot:
        outside = await world.fake.send_message(world.random, world.ann, f"{mention(world.fake)} Hello from random.")
        private = await world.fake.send_message(dm, world.ann, "Hello in a DM.")
        await ask(world, bot, world.general, world.ann, "Hello from general.")
        await ask(world, bot, thread, world.ann, "Hello from the thread.")  # its parent is allowed
        await asyncio.sleep(0.5)
        assert world.fake.bot_messages(world.random) == [] and world.fake.bot_messages(dm) == []
        assert [r[0] for r in user_rows(bot.ctx.settings.database_path)] == ["Hello from general.", "Hello from the thread."]
        assert int(outside["id"]) and int(private["id"])
        assert (await command(world, "status", world.ann, world.random)).content == REFUSED_CHANNEL
        assert (await command(world, "settings", world.ann, dm)).content == REFUSED_DMS
        assert (await command(world, "settings", world.ann, thread)).content.startswith("Settings here:")

    members = world.fake.add_role(world.guild, "llm-users")
    world.fake.add_member(world.guild, world.ann, roles=[members])
    async with start_bot(stream=False, allowed_role_ids=frozenset({int(members["id"])}), allow_dms=True) as bot:
        refused = await world.fake.send_message(world.general, world.mod, f"{mention(world.fake)} I lack the role.")
        await ask(world, bot, world.general, world.ann, "I have the role.")
        await ask(world, bot, dm, world.ann, "And DMs are open (ALLOW_DMS=1).")
        assert not [m for m in world.fake.bot_messages(world.general) if m.get("message_reference", {}).get("message_id") == refused["id"]]
        assert (await command(world, "status", world.mod, world.general)).content == REFUSED_ROLE
    asked = [c.messages[-1].content for c in scripted.calls]
    assert asked == ["Hello from general.", "Hello from the thread.", "I have the role.", "And DMs are open (ALLOW_DMS=1)."]


async def test_a_flood_from_one_user_neither_starves_others_nor_grows_memory(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False, user_cooldown_s=2.0, max_queue=8) as bot:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flood = [await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} spam {i}") for i in range(200)]
        quiet = await world.fake.send_message(world.random, world.mod, f"{mention(world.fake)} What is 2+2?")
        answer = await world.fake.wait_for(lambda: replies_to(world.fake, world.random, quiet), timeout=30)
        assert answer[0]["content"] == "You said: What is 2+2?"
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 60)
        users = [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"]
        gateway = {"identifies": world.fake.identify_count, "resumes": world.fake.resume_count}  # shown on failure: a reconnect would replay events
        assert users.count("spam 0") == 1 and len([u for u in users if u.startswith("spam")]) <= 2, (users, gateway)
        slow_notes = [m for m in world.fake.bot_messages(world.general) if m["content"] == SLOW_DOWN.format(s=2.0)]
        assert len(slow_notes) == 1  # said once, not 199 times
        answered = sum(1 for m in flood if replies_to(world.fake, world.general, m))
        assert answered <= 3
        assert len(bot.access._accepted_at) <= 2 and bot.ctx.scheduler.waiting == 0
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 64
    assert len(scripted.calls) <= 3  # the model was asked for the few messages taken, not for the flood


async def test_two_guilds_and_two_dms_are_isolated(world: World, start_bot, scripted: ScriptedBackend) -> None:
    other_guild = world.fake.add_guild("village")
    lobby = world.fake.add_channel(other_guild, "lobby")
    world.fake.add_member(other_guild, world.ann)
    bob = world.fake.add_user("bob")
    places = {
        "town": world.general,
        "village": lobby,
        "dm-ann": world.fake.dm_channel(world.ann),
        "dm-bob": world.fake.dm_channel(bob),
    }
    authors = {"town": world.ann, "village": world.ann, "dm-ann": world.ann, "dm-bob": bob}
    async with start_bot(stream=False) as bot:
        for name, channel in places.items():
            content = f"The secret word is {name.upper()}-WORD."
            sent = await world.fake.send_message(channel, authors[name], content if "guild_id" not in channel else f"{mention(world.fake)} {content}")
            await world.fake.wait_for(lambda: world.fake.bot_messages(channel) and bot.ctx.scheduler.running == 0, 60)
            assert sent
        set_template = await world.fake.invoke_command("template", user=world.fake.guild_members(other_guild)[other_guild["owner_id"]]["user"], channel=lobby, options={"name": "zephyr"})
        await set_template.wait_done()
        scopes = {
            "town": scope(world, world.general),
            "village": f"guild:{other_guild['id']}:channel:{lobby['id']}",
            "dm-ann": f"dm:{world.ann['id']}",
            "dm-bob": f"dm:{bob['id']}",
        }
        for name, key in scopes.items():
            prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(key))
            text = " ".join(m.content for m in prompt.messages)
            assert f"{name.upper()}-WORD" in text
            assert not any(f"{other.upper()}-WORD" in text for other in scopes if other != name)
            shown = await (await world.fake.invoke_command("template", user=authors[name], channel=places[name])).wait_done()
            assert shown.content.startswith("Template here: **zephyr**" if name == "village" else "Template here: **auto**")
        for name, channel in places.items():  # each reply went only where it was asked
            assert all(m["channel_id"] == channel["id"] for m in world.fake.bot_messages(channel))
        reset = await (await world.fake.invoke_command("reset", user=bob, channel=places["dm-bob"])).wait_done()
        assert reset.content == "Conversation cleared (2 messages)."
        assert len(rows(bot.ctx.settings.database_path, scopes["dm-ann"])) == 2
    # Each reply was written from its own conversation only.
    assert {c.key: [m.content for m in c.messages[1:]] for c in scripted.calls} == {
        key: [f"The secret word is {name.upper()}-WORD."] for name, key in scopes.items()
    }


def test_refusal_rules() -> None:
    s = make_settings(Path("/tmp"), allowed_channel_ids=frozenset({10}), allowed_role_ids=frozenset({7}), admin_role_ids=frozenset({8}), blocked_user_ids=frozenset({666}))
    assert refusal(s, user_id=1, channel_ids={10}, role_ids={7}, in_dm=False) is None
    assert refusal(s, user_id=1, channel_ids={55, 10}, role_ids={8}, in_dm=False) is None  # a thread of #10; an admin role
    assert refusal(s, user_id=1, channel_ids={11}, role_ids={7}, in_dm=False) == REFUSED_CHANNEL
    assert refusal(s, user_id=1, channel_ids={10}, role_ids={9}, in_dm=False) == REFUSED_ROLE
    assert refusal(s, user_id=1, channel_ids={10}, role_ids=None, in_dm=False) is None  # roles not known: not checked
    assert refusal(s, user_id=666, channel_ids={10}, role_ids={7}, in_dm=False) == REFUSED_BLOCKED
    assert refusal(s, user_id=1, channel_ids={99}, role_ids=set(), in_dm=True) == REFUSED_DMS
    open_dms = make_settings(Path("/tmp"), allowed_channel_ids=frozenset({10}), allow_dms=True)
    assert refusal(open_dms, user_id=1, channel_ids={99}, role_ids=set(), in_dm=True) is None
    nothing = make_settings(Path("/tmp"))
    assert nothing.dms_open and refusal(nothing, user_id=1, channel_ids={1}, role_ids=set(), in_dm=False) is None
