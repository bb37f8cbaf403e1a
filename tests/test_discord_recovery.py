"""Nothing lost (bot/discord_adapter/recovery.py): what waited across a restart is answered
once, what was said while the bot was away is caught up on, and gateway reconnects lose
nothing.

In-process: the real discord.py client against the local Discord API, a real SQLite file
and the scripted model (tests/scripted.py). Real restarts (SIGTERM, SIGKILL) run
`python -m bot run` in a process of its own on a scripted model server
(tests/sse_server.py), whose reply stays open until the test lets it end."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import pytest

from bot.conversations.store import Store
from bot.discord_adapter.recovery import RESTARTED
from tests.bot_process import finish, one_channel, run_until, start_process
from tests.conftest import World, rows, scope
from tests.discord_helpers import IN_LINE_PREFIX, answered, idle, replies_to, send, table, user_rows
from tests.fakediscord import FakeDiscord
from tests.scripted import Script, ScriptedBackend
from tests.sse_server import DONE, ScriptedServer, Step, chat_reply, delta, event

LONG = "Write a long story about a dragon."
NOTE = {"filename": "note.txt", "data": b"The meeting is on Tuesday.\n", "content_type": "text/plain"}


# --- real restarts ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_queued_message_survives_a_restart(tmp_path: Path, how: str) -> None:
    """A message waiting behind a reply being written is answered after the bot comes back,
    once, in the message that said "you're #1 in line"; after SIGKILL the reply being written
    when the process died is finished too, in the message it had started."""
    hold = asyncio.Event()
    story = Step([event(delta("Once upon a time ")), hold, event(delta("there was a dragon.")), event(delta(None, finish="stop")), DONE])
    script = [story, chat_reply("Four.")] if how == "SIGTERM" else [story, chat_reply("The whole story."), chat_reply("Four.")]
    async with FakeDiscord() as fake, ScriptedServer(script) as server:
        _, general, ann = one_channel(fake)
        process = await start_process(fake, tmp_path, server=server, STREAM="1")
        try:
            await fake.wait_ready(timeout=60)
            story_message = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> {LONG}")
            [half] = await fake.wait_for(lambda: replies_to(fake, general, story_message), 60)  # being written, held open
            queued = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> What is two plus two?")
            [note] = await fake.wait_for(lambda: replies_to(fake, general, queued), 60)
            assert note["content"].startswith(IN_LINE_PREFIX)
            if how == "SIGTERM":
                process.send_signal(signal.SIGTERM)
                await fake.wait_for(lambda: "shutting down" in process.log_path.read_text(), 30)  # type: ignore[attr-defined]
                hold.set()  # the reply in progress finishes within the shutdown's grace
                code, log = await finish(process)
                assert code == 0 and "Traceback" not in log, log
            else:
                process.kill()
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
        db = tmp_path / "bot.sqlite3"
        with sqlite3.connect(db) as conn:  # a clean database, whatever the way it stopped
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        statuses = {content: status for role, status, content in table(db) if role == "user"}
        assert statuses["What is two plus two?"] == "pending"  # on disk, waiting
        assert statuses[LONG] == ("ok" if how == "SIGTERM" else "pending")
        await fake.drop_connections()

        await run_until(
            fake, tmp_path,
            lambda: answered(fake, general, queued),
            lambda: all(s != "pending" for _, s, _ in table(db)),
            server=server, STREAM="1",
        )
        assert replies_to(fake, general, queued) == [note] and note["content"] == "Four."  # answered once, in place
        assert replies_to(fake, general, story_message) == [half]  # never answered twice...
        assert half["content"] == ("Once upon a time there was a dragon." if how == "SIGTERM" else "The whole story.")  # ...finished in place
        assert table(db) == [
            ("user", "ok", LONG), ("assistant", "ok", half["content"]), ("user", "ok", "What is two plus two?"), ("assistant", "ok", "Four."),
        ]
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(server.completions) == len(script)  # each reply asked for once more at most: nothing answered twice


async def test_killed_while_a_file_downloads_answers_it_with_the_file_after_the_restart(tmp_path: Path) -> None:
    """SIGKILL while a message's file is downloading, after a later message was stored: the
    restart answers both, the first with its file (read again), each once."""
    async with FakeDiscord() as fake, ScriptedServer([chat_reply("On Tuesday."), chat_reply("Hello!")]) as server:
        _, general, ann = one_channel(fake)
        process = await start_process(fake, tmp_path, server=server)
        db = tmp_path / "bot.sqlite3"
        try:
            await fake.wait_ready(timeout=60)
            fake.hold_attachments = asyncio.Event()
            slow = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> When is the meeting?", attachments=[NOTE])
            await fake.wait_for(lambda: fake.attachment_downloads == 1, 60)
            later = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> Hello!")
            await fake.wait_for(lambda: db.exists() and len(user_rows(db)) == 2, 60)
            process.kill()
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
        assert [(c, a, s) for c, a, s in user_rows(db)] == [("When is the meeting?", None, "pending"), ("Hello!", None, "pending")]
        assert server.completions == []  # nothing was answered before the kill
        fake.hold_attachments.set()
        await fake.drop_connections()
        await run_until(
            fake, tmp_path,
            lambda: all(s != "pending" for _, _, s in user_rows(db)),
            lambda: answered(fake, general, slow) and answered(fake, general, later),
            server=server,
        )
        statuses = {content: (status, attached) for content, attached, status in user_rows(db)}
        assert statuses["Hello!"] == ("ok", None)
        assert statuses["When is the meeting?"][0] == "ok" and "Tuesday" in statuses["When is the meeting?"][1]
        assert [m["content"] for m in replies_to(fake, general, slow)] == ["On Tuesday."]
        assert [m["content"] for m in replies_to(fake, general, later)] == ["Hello!"]
    asked = server.completions[0].body["messages"]
    assert asked[-1]["content"].startswith("When is the meeting?\n\nAttached file note.txt:\n") and "Tuesday" in asked[-1]["content"]  # read again


# --- restarts in one process -------------------------------------------------------------------


async def test_message_sent_while_the_bot_is_down_is_answered_once(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    async with start_bot(db=db, stream=False) as bot:
        first = await send(world, world.general, world.ann, "Hello!")
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, first))
        await idle(world.fake, bot)
    # the bot is stopped: these arrive while nobody listens
    missed = await send(world, world.general, world.ann, "Are you there?")
    chatter = await world.fake.send_message(world.general, world.mod, "just talking among ourselves")
    async with start_bot(db=db, stream=False) as bot:
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, missed))
        await idle(world.fake, bot)
    async with start_bot(db=db, stream=False) as bot:  # and once more: nothing is answered twice
        await asyncio.sleep(1.0)
        await idle(world.fake, bot)
    assert [m["content"] for m in replies_to(world.fake, world.general, missed)] == ["You said: Are you there?"]
    assert replies_to(world.fake, world.general, chatter) == []  # not addressed to the bot
    assert [r[2] for r in rows(db) if r[1] == "user"] == ["Hello!", "Are you there?"]
    assert [c.messages[-1].content for c in scripted.calls] == ["Hello!", "Are you there?"]


async def test_too_old_to_resume_gets_a_note_and_is_never_answered(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    waiting = await send(world, world.general, world.ann, "Remember me?")
    async with await Store.open(db) as store:  # what an earlier run stored before it went down
        conversation = await store.conversation(scope(world, world.general), channel_id=world.general["id"])
        await store.receive(conversation.id, "Remember me?", author_id=world.ann["id"], author_name="Ann", platform_message_id=waiting["id"])
    async with start_bot(db=db, stream=False, resume_max_age_s=0.0, catchup_max_messages=0) as bot:
        [note] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, waiting))
        await idle(world.fake, bot)
    assert note["content"] == RESTARTED
    assert table(db) == [("user", "expired", "Remember me?")]
    async with start_bot(db=db, stream=False) as bot:  # later starts leave it alone
        await asyncio.sleep(1.0)
        await idle(world.fake, bot)
    assert len(replies_to(world.fake, world.general, waiting)) == 1
    assert scripted.calls == []  # the model was never asked


# --- gateway reconnects ------------------------------------------------------------------------


async def test_reconnect_mid_conversation_loses_nothing(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then(Script(["The moon ", "is ", "far."], hold=hold), "The sun is hot.")
    async with start_bot(stream=False) as bot:
        sent = await send(world, world.general, world.ann, "Tell me a fact about the moon.")
        await world.fake.wait_for(lambda: len(bot.ctx.replies))  # being written, held open
        await world.fake.request_reconnect()  # op 7 while the reply is being generated
        await world.fake.wait_for(lambda: world.fake.resume_count >= 1 and world.fake.connections == 1)
        second = await send(world, world.general, world.ann, "And one about the sun.")
        hold.set()
        await world.fake.wait_for_bot_message(world.general, after=sent, count=2)
        await idle(world.fake, bot)
        await asyncio.sleep(1.0)
        replies = [m for m in world.fake.bot_messages(world.general) if int(m["id"]) > int(sent["id"])]
        assert len(replies) == 2  # each message answered exactly once
        assert {r["message_reference"]["message_id"]: r["content"] for r in replies} == {sent["id"]: "The moon is far.", second["id"]: "The sun is hot."}
        stored = rows(bot.ctx.settings.database_path)
        assert [r[1] for r in stored] == ["user", "assistant", "user", "assistant"]
    assert len(scripted.calls) == 2


async def test_gateway_drop_while_generating_delivers_once(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then(Script(["A ", "cat ", "story."], hold=hold))
    async with start_bot(stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Write a story about a cat.")
        await world.fake.wait_for(lambda: len(bot.ctx.replies))  # being written, held open
        await world.fake.drop_connections(abrupt=True)
        await world.fake.wait_for(lambda: world.fake.connections == 1, 30)  # back
        hold.set()
        await idle(world.fake, bot)
        assert [m["content"] for m in replies_to(world.fake, world.general, sent)] == ["A cat story."]
        after = await send(world, world.general, world.ann, "Are you back?")
        await world.fake.wait_for(lambda: answered(world.fake, world.general, after))
        await idle(world.fake, bot)
        assert [m["content"] for m in replies_to(world.fake, world.general, after)] == ["You said: Are you back?"]
        assert [r[1] for r in table(bot.ctx.settings.database_path)] == ["ok"] * 4
