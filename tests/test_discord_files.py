"""Attached files (bot/discord_adapter/intake.py, bot/conversations/attachments.py): text files
read into the user's turn, notes for what is not read, and a message stored before its
files download (so edits, deletes and restarts during a download find it).

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py): `scripted.calls` shows the turn the model got, file
included. (A file's template markup through the real tokenizer: tests/test_end_to_end.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.conversations.service import CUT_FILES_NOTE
from bot.discord_adapter.intake import NO_TEXT
from tests.conftest import World, mention, rows, scope
from tests.discord_helpers import answered, ask, everything_stored, idle, prompt_of, replies_to, send, user_rows
from tests.scripted import Script, ScriptedBackend

PY_FILE = b'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
NOTE = {"filename": "note.txt", "data": b"The meeting is on Tuesday.\n", "content_type": "text/plain"}


async def test_a_py_file_reaches_the_prompt_and_an_image_gets_a_note(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.sees = False  # a model without a vision projector (images to one that sees: tests/test_discord_images.py)
    scripted.then("It adds two numbers.")
    async with start_bot(stream=False) as bot:
        files = [
            {"filename": "add.py", "data": PY_FILE, "content_type": "text/x-python"},
            {"filename": "cat.png", "data": PNG, "content_type": "image/png"},
        ]
        [reply] = await ask(world, bot, world.general, world.ann, "What does this function do?", attachments=files)
        assert reply["content"] == f"It adds two numbers.\n-# I did not read cat.png ({scripted.image_support()})."
        [(content, attached, status)] = user_rows(bot.ctx.settings.database_path)
        assert content == "What does this function do?" and status == "ok"
        assert attached == "Attached file add.py:\n```py\n" + PY_FILE.decode() + "```"
    turn = scripted.calls[0].messages[-1]
    assert turn.role == "user" and turn.content == "What does this function do?\n\n" + attached  # the file is part of the user's turn
    assert "cat.png" not in turn.content and "PNG" not in turn.content


async def test_text_with_a_binary_attachment_is_answered_with_a_note(world: World, start_bot) -> None:
    async with start_bot(stream=False) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "What is 2+2?", attachments=[{"filename": "a.bin", "data": b"\x00\x01", "content_type": None}])
        assert reply["content"] == "You said: What is 2+2?\n-# I did not read a.bin (not a text file)."
        assert [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"] == ["What is 2+2?"]


async def test_a_message_with_only_a_text_file_is_answered_and_its_edit_keeps_the_file(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then("Milk and eggs.", "Milk, eggs.")
    async with start_bot(stream=False) as bot:
        sent = await world.fake.send_message(
            world.general, world.ann, mention(world.fake), attachments=[{"filename": "notes.md", "data": b"# Shopping\n- milk\n- eggs\n", "content_type": None}]
        )
        [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
        await idle(world.fake, bot)
        assert reply["content"] == "Milk and eggs."  # answered, with no note
        db = bot.ctx.settings.database_path
        [(content, attached, _)] = user_rows(db)
        assert content == "" and attached == "Attached file notes.md:\n```md\n# Shopping\n- milk\n- eggs\n```"
        assert scripted.calls[0].messages[-1].content == attached  # the file alone is the turn
        await world.fake.edit_message(sent, f"{mention(world.fake)} Summarise my list.")
        await world.fake.wait_for(lambda: user_rows(db)[0][0] == "Summarise my list.")
        assert user_rows(db)[0][1] == attached  # an edit changes the text; the file stays, as on Discord
        prompt = await prompt_of(bot, scope(world, world.general))
        assert prompt.messages[1].content == "Summarise my list.\n\n" + attached


async def test_images_and_binaries_alone_still_get_the_no_text_note(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.sees = False  # a model that sees answers a picture alone: tests/test_discord_images.py
    async with start_bot() as bot:
        sent = await world.fake.send_message(
            world.general, world.ann, mention(world.fake),
            attachments=[{"filename": "cat.png", "data": PNG, "content_type": "image/png"}, {"filename": "blob", "data": b"\x00\xff" * 50, "content_type": None}],
        )
        [note] = await world.fake.wait_for_bot_message(world.general, after=sent)
        await idle(world.fake, bot)
        assert note["content"] == f"{NO_TEXT}\n-# I did not read cat.png ({scripted.image_support()}), blob (not a text file)."
        assert rows(bot.ctx.settings.database_path) == []
    assert scripted.calls == []


async def test_an_oversized_file_is_read_up_to_the_bound_and_the_prompt_cut_says_so(world: World, start_bot, scripted: ScriptedBackend) -> None:
    log = "".join(f"2026-01-01 12:00:{i % 60:02d} INFO worker {i}: handled request {i * 7} in {i % 13} ms\n" for i in range(400))
    size = len(log.encode())
    assert size > 20 * 1024
    async with start_bot(stream=False, attachment_max_kb=8) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "Any errors in this log?", attachments=[{"filename": "server.log", "data": log.encode(), "content_type": "text/plain"}])
        [(_, attached, _)] = user_rows(bot.ctx.settings.database_path)
        body = attached.split("\n", 2)[2].rsplit("```", 1)[0].rstrip("\n")
        assert 8 * 1024 - 100 < len(body.encode()) <= 8 * 1024 and log.startswith(body)  # the first 8 KB, nothing past the bound
        assert attached.startswith(f"Attached file server.log (only its first 8 KB of {size / 1024:.0f} KB):\n```log\n")
        assert f"-# I read only the beginning of server.log (8 KB of {size / 1024:.0f} KB)" in reply["content"]
        # 8 KB of log is more than the 1,024-token window: the turn is cut too, and the note says why.
        notes = [line for line in reply["content"].split("\n") if line.startswith("-# (Your message with its attached files")]
        assert len(notes) == 1 and "was too long for my context window, so I only read its beginning: about" in notes[0]
        last = bot.ctx.chat.last_replies[scope(world, world.general)]
        assert last.prompt_tokens <= last.budget == bot.ctx.chat.backend.n_ctx - bot.ctx.settings.n_predict
    whole = "Any errors in this log?\n\n" + attached
    turn = scripted.calls[0].messages[-1].content
    assert whole.startswith(turn) and turn.startswith("Any errors in this log?\n\nAttached file server.log")  # the beginning of the turn
    said = int(notes[0].split("about ")[1].split("%")[0])
    assert abs(said - 100 * len(turn) / len(whole)) <= 1 and notes[0] == "-# " + CUT_FILES_NOTE.format(kept=said / 100)  # as much as it read


async def test_files_sent_while_the_bot_was_down_are_read_when_it_catches_up(world: World, start_bot, scripted: ScriptedBackend) -> None:
    sent = await world.fake.send_message(world.random, world.ann, "", attachments=[{"filename": "todo.txt", "data": b"buy bread\n", "content_type": "text/plain"}])
    async with start_bot(stream=False, chat_channels=frozenset({int(world.random["id"])})) as bot:
        [reply] = await world.fake.wait_for_bot_message(world.random, after=sent)
        await idle(world.fake, bot)
        assert reply["message_reference"]["message_id"] == sent["id"]
        [(content, attached, status)] = user_rows(bot.ctx.settings.database_path)
        assert (content, status) == ("", "ok") and attached == "Attached file todo.txt:\n```txt\nbuy bread\n```"
    assert scripted.calls[0].messages[-1].content == attached


async def test_a_waiting_message_keeps_its_file_across_a_restart(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    hold = asyncio.Event()
    scripted.then(Script(["Once ", "upon ", "a ", "time."], hold=hold))
    async with start_bot(db=db, stream=False, parallel=1) as bot:
        await send(world, world.general, world.mod, "Write a long story about a dragon.")  # held open: the second waits behind it
        second = await send(world, world.general, world.ann, "And this?", attachments=[{"filename": "poem.txt", "data": b"Roses are red.\n", "content_type": "text/plain"}])
        await world.fake.wait_for(lambda: [r[2] for r in user_rows(db)] == ["pending", "pending"])
        await world.fake.wait_for(lambda: user_rows(db)[1][1] is not None)  # its file is read and stored
        assert bot.ctx.scheduler.running == 1 and bot.ctx.scheduler.waiting == 1
        hold.set()  # the shutdown below lets the first reply finish; the second is not started
    assert {r[0]: r[2] for r in user_rows(db)}["And this?"] == "pending"  # shut down before its turn: it waits for the next start
    async with start_bot(db=db, stream=False) as bot:
        await world.fake.wait_for(lambda: answered(world.fake, world.general, second))
        await idle(world.fake, bot)
        assert len(replies_to(world.fake, world.general, second)) == 1  # answered once, in the message that showed its place in line
    assert scripted.calls[-1].messages[-1].content.endswith("And this?\n\nAttached file poem.txt:\n```txt\nRoses are red.\n```")
    assert len(scripted.calls) == 2


# --- the message is stored before its files are downloaded ----------------------------------------


async def test_edit_while_its_file_downloads_is_answered_in_its_edited_form_with_the_file(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False) as bot:
        db = bot.ctx.settings.database_path
        world.fake.hold_attachments = asyncio.Event()  # a slow download
        sent = await send(world, world.general, world.ann, "When is it?", attachments=[NOTE])
        await world.fake.wait_for(lambda: world.fake.attachment_downloads == 1)
        assert user_rows(db) == [("When is it?", None, "pending")]  # on disk before its file arrived
        await world.fake.edit_message(sent, f"{mention(world.fake)} On which day is the meeting?")
        await world.fake.wait_for(lambda: user_rows(db)[0][0] == "On which day is the meeting?")
        world.fake.hold_attachments.set()
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, sent))
        await idle(world.fake, bot)
    [(content, attached, status)] = user_rows(db)
    assert (status, content) == ("ok", "On which day is the meeting?") and attached == "Attached file note.txt:\n```txt\nThe meeting is on Tuesday.\n```"
    assert "When is it" not in everything_stored(db)
    assert [c.messages[-1].content for c in scripted.calls] == ["On which day is the meeting?\n\n" + attached]


async def test_delete_while_its_file_downloads_is_never_answered(world: World, start_bot, scripted: ScriptedBackend) -> None:
    async with start_bot(stream=False) as bot:
        db = bot.ctx.settings.database_path
        world.fake.hold_attachments = asyncio.Event()
        sent = await send(world, world.general, world.ann, "Read this.", attachments=[NOTE])
        await world.fake.wait_for(lambda: world.fake.attachment_downloads == 1)
        await world.fake.delete_message(sent)
        await world.fake.wait_for(lambda: user_rows(db) == [])
        world.fake.hold_attachments.set()
        await asyncio.sleep(1.0)
        await idle(world.fake, bot)
        assert rows(db) == [] and world.fake.bot_messages(world.general) == []
    assert scripted.calls == []
