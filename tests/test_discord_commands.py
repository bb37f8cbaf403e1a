"""Slash commands (bot/discord_adapter/commands.py, status.py): /reset, /template, /chat,
/system, /settings, /status, /export, and who may use them.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py): `scripted.calls` shows what a command changed in the
next prompt and reply. (/status on the real engine: tests/test_end_to_end.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.conversations.service import UserMessage
from bot.conversations.store import ChatMode
from bot.discord_adapter.commands import NEED_ADMIN
from bot.formats.templates import Message
from tests.conftest import World, rows, scope
from tests.discord_helpers import answers, ask, command, idle, prompt_of, send
from tests.fakediscord import Permissions
from tests.scripted import Script, ScriptedBackend


async def test_reset_clears_only_its_channel(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False) as bot:
        await ask(world, bot, world.general, world.ann, "Hello!")
        await ask(world, bot, world.random, world.ann, "Hi!")
        interaction = await world.fake.invoke_command("reset", user=world.mod, channel=world.general)
        await interaction.wait_done()
        assert interaction.ephemeral and interaction.content == "Conversation cleared (2 messages)."
        assert interaction.latency is not None and interaction.latency < 3
        db = bot.ctx.settings.database_path
        assert rows(db, scope(world, world.general)) == []
        assert len(rows(db, scope(world, world.random))) == 2
        await ask(world, bot, world.general, world.ann, "Hello again!")
    assert scripted.calls[-1].messages[1:] == [Message("user", "Hello again!")]  # the next prompt starts afresh
    assert scope(world, world.general) in scripted.forgotten  # and the model drops what it cached for it


async def test_non_admin_is_refused_server_side(world: World, start_bot) -> None:
    async with start_bot() as bot:
        for hidden in ("reset", "chat"):  # a server admin shows the hidden admin commands to @everyone
            world.fake.set_command_permissions(world.guild, hidden, {world.guild["id"]: True})
        for name, options in (("template", {"name": "chatml"}), ("reset", None), ("chat", {"mode": "on"})):
            interaction = await world.fake.invoke_command(name, user=world.ann, channel=world.general, options=options)
            await interaction.wait_done()
            assert interaction.ephemeral and interaction.content == NEED_ADMIN.format(name=name)
        conversation = await bot.ctx.chat.store.conversation(scope(world, world.general))
        assert conversation.template is None and conversation.chat_mode == ChatMode.OFF
        # showing the current template is fine for anyone
        shown = await (await world.fake.invoke_command("template", user=world.ann, channel=world.general)).wait_done()
        assert shown.content.startswith("Template here: **auto**")


async def test_admin_role_ids_grant_the_commands(world: World, start_bot) -> None:
    helpers = world.fake.add_role(world.guild, "bot-helpers")
    world.fake.add_member(world.guild, world.ann, roles=[helpers])
    async with start_bot(admin_role_ids=frozenset({int(helpers["id"])})):
        interaction = await world.fake.invoke_command("template", user=world.ann, channel=world.general, options={"name": "zephyr"})
        await interaction.wait_done()
        assert interaction.content == "Template here is now **zephyr**."


async def test_admin_commands_are_hidden_by_default_member_permissions(world: World, start_bot) -> None:
    async with start_bot():
        synced = {c["name"]: c["default_member_permissions"] for c in world.fake.commands["global"]}
    admin_only = str(Permissions.MANAGE_MESSAGES)
    assert {name for name, perms in synced.items() if perms == admin_only} == {"reset", "chat", "system", "export"}
    assert all(synced[name] is None for name in ("template", "settings", "status", "stop"))


async def test_template_switch_survives_a_restart(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    async with start_bot(db=db):
        interaction = await world.fake.invoke_command("template", user=world.mod, channel=world.general, options={"name": "vicuna-chat"})
        await interaction.wait_done()
        assert interaction.content == "Template here is now **vicuna-chat**."
        crafted = await world.fake.invoke_command("template", user=world.mod, channel=world.general, options={"name": "evil-template"})
        await crafted.wait_done()
        assert crafted.ephemeral and crafted.content.startswith("unknown prompt template 'evil-template'; valid: auto,")
    async with start_bot(db=db) as bot:
        shown = await (await world.fake.invoke_command("template", user=world.ann, channel=world.general)).wait_done()
        assert shown.content.startswith("Template here: **vicuna-chat**")
        other = await (await world.fake.invoke_command("template", user=world.ann, channel=world.random)).wait_done()
        assert other.content.startswith("Template here: **auto**")
        await ask(world, bot, world.general, world.ann, "Hello")
        await ask(world, bot, world.random, world.ann, "Hello")
        prompt = await prompt_of(bot, scope(world, world.general))
        assert prompt.template.name == "vicuna-chat"
    # The model was asked in each channel's own template: Vicuna's plain text, and the model's own (ChatML).
    assert scripted.calls[0].prompt == "You are a helpful assistant. USER: Hello ASSISTANT:"
    assert scripted.calls[1].prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


# --- /system and /settings -------------------------------------------------------------------------


async def test_system_prompt_per_channel_changes_the_next_prompt_and_survives_a_restart(
    world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path
) -> None:
    db = tmp_path / "kept.sqlite3"
    pirate = "You are a pirate. Answer like one."
    async with start_bot(db=db, stream=False) as bot:
        await ask(world, bot, world.general, world.ann, "Hello!")
        shown = await command(world, "system", world.mod, world.general)
        assert shown.ephemeral and shown.embeds[0]["title"] == "System prompt here (the default)"
        assert shown.embeds[0]["description"] == bot.ctx.settings.system_prompt
        changed = await command(world, "system", world.mod, world.general, text=pirate)
        assert changed.ephemeral and changed.content == "System prompt here is changed; the next reply uses it."
        await ask(world, bot, world.general, world.ann, "Who are you?")
        assert scripted.calls[-1].messages[0] == Message("system", pirate)  # the next reply used it
        assert scripted.calls[0].messages[0] == Message("system", bot.ctx.settings.system_prompt)
    async with start_bot(db=db, stream=False) as bot:
        assert (await prompt_of(bot, scope(world, world.general))).messages[0].content == pirate
        assert (await prompt_of(bot, scope(world, world.random))).messages[0].content == bot.ctx.settings.system_prompt
        shown = await command(world, "system", world.mod, world.general)
        assert shown.embeds[0]["title"] == "System prompt here" and shown.embeds[0]["description"] == pirate
        world.fake.set_command_permissions(world.guild, "system", {world.guild["id"]: True})  # shown to everyone...
        refused = await command(world, "system", world.ann, world.general, text="You are a cat.")
        assert refused.ephemeral and refused.content == NEED_ADMIN.format(name="system")  # ...still checked by the bot
        back = await command(world, "system", world.mod, world.general, text="reset")
        assert back.content == "System prompt here is back to the default."
        assert (await prompt_of(bot, scope(world, world.general))).messages[0].content == bot.ctx.settings.system_prompt


async def test_settings_refuse_bad_values_and_a_change_shapes_the_next_reply(world: World, start_bot, scripted: ScriptedBackend) -> None:
    story = "Once upon a time the sea and the stars talked all night long."
    scripted.then(story, story)
    async with start_bot(stream=False, n_predict=40) as bot:
        hot = await command(world, "settings", world.mod, world.general, temperature=7)
        assert hot.ephemeral and hot.content == "Not changed: temperature must be from 0 to 5 (0 always picks the likeliest word), not 7."
        long = await command(world, "settings", world.mod, world.general, reply_length=5000)
        assert long.content == "Not changed: reply length must be from 1 to 40 tokens (LLAMA_N_PREDICT), not 5000."
        refused = await command(world, "settings", world.ann, world.general, reply_length=3)
        assert refused.content == NEED_ADMIN.format(name="settings")
        conversation = await bot.ctx.chat.store.conversation(scope(world, world.general))
        assert (conversation.temperature, conversation.n_predict) == (None, None)  # nothing stored by the refusals

        changed = await command(world, "settings", world.mod, world.general, reply_length=3, temperature=0.5, thinking="show")
        assert changed.content.startswith("Changed. Settings here:\n- temperature: 0.5 (set here)\n- top_p: 0.9 (default)\n- reply length: 3 tokens (set here); at most 40\n- thinking: show (set here)")
        [short] = await ask(world, bot, world.general, world.ann, "Tell me a long story about the sea and the stars.")
        [whole] = await ask(world, bot, world.random, world.ann, "Tell me a long story about the sea and the stars.")
        assert short["content"] == "Once upon a" and whole["content"] == story  # cut at 3 tokens here only
        assert [a[4] for a in answers(bot.ctx.settings.database_path, scope(world, world.general))] == [3]
        here, there = scripted.calls
        assert (here.max_tokens, here.sampling.temperature) == (3, 0.5)
        assert (there.max_tokens, there.sampling.temperature) == (40, bot.ctx.settings.sampling.temperature)  # another channel keeps the defaults
        assert bot.ctx.chat.last_replies[scope(world, world.general)].generation.n_generated == 3

        shown = await command(world, "settings", world.ann, world.general)  # anyone may look
        assert "reply length: 3 tokens (set here)" in shown.content
        back = await command(world, "settings", world.mod, world.general, reset=True)
        assert back.content.startswith("Changed. Settings here:\n- temperature: 0 (default)")
        dm = world.fake.dm_channel(world.ann)
        mine = await command(world, "settings", world.ann, dm, top_p=0.5)  # anyone in their own DM
        assert "- top_p: 0.5 (set here)" in mine.content


# --- /status ----------------------------------------------------------------------------------------


async def test_status_answers_in_time_while_four_channels_generate(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """Four replies held open while /status is asked; then stopped. (The same on the real
    engine, with its slots and KV cache: tests/test_end_to_end.py.)"""
    channels = [world.general, world.random] + [world.fake.add_channel(world.guild, f"room-{i}") for i in range(2)]
    holds = [asyncio.Event() for _ in channels]
    scripted.then("Hi there!", *(Script(["Bread ", "is ", "old."], hold=hold) for hold in holds))
    async with start_bot(stream=True, n_predict=400) as bot:
        await ask(world, bot, world.general, world.ann, "Hi!")
        sent = [await send(world, c, world.ann, "Write a very long essay about the history of bread.") for c in channels]
        await world.fake.wait_for(lambda: len(bot.ctx.replies) == 4)
        status = await command(world, "status", world.ann, world.general)
        assert status.ephemeral and len(bot.ctx.replies) == 4  # answered while the four replies are held open
        fields = {f["name"]: f["value"] for f in status.embeds[0]["fields"]}
        assert fields["Model"] == "scripted.gguf\nscripted replies (tests)\ncontext: 1024 tokens per conversation\nsees images: yes"
        assert fields["Backend"] == scripted.describe()
        assert fields["Load"] == "4 writing, 0 waiting"  # no slots to show: the model's own numbers are not ours
        assert fields["KV cache"] == "kept by the model server"
        assert fields["This channel"].startswith("last prompt: ") and " of the 624 tokens its window holds" in fields["This channel"]
        assert fields["Last reply here"].startswith("prompt: ") and fields["Last reply here"].endswith("being written (1 tokens so far)")
        for c in channels:  # enough: stop the essays
            bot.ctx.replies.reply_in(scope(world, c)).stop()
        await idle(world.fake, bot)
        for c, s in zip(channels, sent):
            [reply] = await world.fake.wait_for_bot_message(c, after=s)
            assert reply["content"] == "Bread *(stopped)*"
        done = await command(world, "status", world.mod, world.random)
        fields = {f["name"]: f["value"] for f in done.embeds[0]["fields"]}
        assert fields["Load"] == "0 writing, 0 waiting"
        assert "prompt: " in fields["Last reply here"] and "tokens/s" in fields["Last reply here"]
        quiet = world.fake.add_channel(world.guild, "quiet")
        never = await command(world, "status", world.ann, quiet)
        fields = {f["name"]: f["value"] for f in never.embeds[0]["fields"]}
        assert fields["This channel"] == "no reply here since the bot started" and "Last reply (any channel)" in fields


# --- /export ------------------------------------------------------------------------------------


async def test_export_holds_this_channels_messages_only(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        await ask(world, bot, world.general, world.ann, "My cat is called Pixel.", attachments=[{"filename": "pixel.txt", "data": b"tabby, 4 years\n", "content_type": "text/plain"}])
        await ask(world, bot, world.general, world.mod, "Nice cat.")
        await ask(world, bot, world.random, world.ann, "The secret password is swordfish.")
        waiting = await bot.ctx.chat.receive(UserMessage(scope(world, world.general), "Still waiting for an answer.", author_name="Ann"))
        assert waiting is not None  # a turn stored but not yet answered
        with pytest.raises(PermissionError):  # hidden from members without Manage Messages
            await world.fake.invoke_command("export", user=world.ann, channel=world.general)
        export = await command(world, "export", world.mod, world.general)
        assert export.ephemeral
        assert export.content == "This conversation: 4 messages (messages still waiting for an answer are not included)."
        [(name, data)] = export.files
        text = data.decode()
        assert name.startswith("conversation-general-in-town-") and name.endswith(".md")
        assert text.startswith("# Conversation: #general in town\n")
        assert "- Prompt template: auto" in text and "- Messages: 4 (1 still waiting for an answer are not included)" in text
        assert "### Ann \u2014 " in text and "### Mod \u2014 " in text and f"### {world.fake.bot_user['username']} \u2014 " in text
        assert "> My cat is called Pixel." in text and "> tabby, 4 years" in text and "> Nice cat." in text
        assert "> You said: Mod: Nice cat." in text  # the bot's answers, as stored
        assert "swordfish" not in text and "Still waiting" not in text
        dm = world.fake.dm_channel(world.ann)
        await ask(world, bot, dm, world.ann, "Remember: blue.")
        mine = await command(world, "export", world.ann, dm)  # anyone exports their own DM
        dm_text = mine.files[0][1].decode()
        assert dm_text.startswith("# Conversation: direct messages with Ann\n") and "> Remember: blue." in dm_text
        assert "Pixel" not in dm_text and "swordfish" not in dm_text
