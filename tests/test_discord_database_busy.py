"""A database locked by another program (an admin's open `sqlite3` transaction, a backup, VACUUM)
is a transient condition: writes wait and retry in order, the replies being written go on, the
author of a message that cannot be stored yet is told once, and nothing is lost."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from bot.discord_adapter.intake import STORAGE_BUSY
from tests.conftest import World, mention, rows, scope
from tests.scripted import Script, ScriptedBackend

HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, as an admin's open transaction holds it
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class Locker:
    """Another process holding the database's write lock until `release()`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def hold(cls, db: Path) -> Locker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, str(db), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == b"locked"
        return cls(process)

    async def release(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b"go\n")
            await self.process.stdin.drain()
            await asyncio.wait_for(self.process.wait(), 30)


async def test_a_locked_database_delays_a_message_and_loses_nothing(
    world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fake = world.fake
    release_story = asyncio.Event()
    scripted.then(Script.text("Once upon a time a dragon slept.", hold=release_story, hold_after=2))
    async with start_bot(database_wait_s=1.0) as bot:
        db = bot.ctx.settings.database_path
        story = await fake.send_message(world.general, world.ann, f"{mention(fake)} Tell me a story.")
        reply = await fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)), 30)
        locker = await Locker.hold(db)
        try:
            asked = await fake.send_message(world.random, world.mod, f"{mention(fake)} Are you there?")
            [note] = await fake.wait_for_bot_message(world.random, after=asked, timeout=30)
            assert note["content"] == STORAGE_BUSY  # told once, within DATABASE_WAIT_S

            # The reply being written goes on, and is shown whole, while the database is locked.
            release_story.set()
            await reply.generation.wait()
            await fake.wait_for(lambda: any(m["content"] == "Once upon a time a dragon slept." for m in fake.bot_messages(world.general)), 30)
            await asyncio.sleep(2.5)  # more than two DATABASE_WAIT_S: still waiting, and still one note
            assert [m["id"] for m in fake.bot_messages(world.random)] == [note["id"]]
            assert rows(db, scope(world, world.random)) == []  # not stored yet (readers are not blocked)
        finally:
            await locker.release()
        # Writable again: the message is stored and answered (in the note's place), the story stored too.
        await fake.wait_for(lambda: (fake.message(note["id"]) or {}).get("content") == "You said: Are you there?", 30)
        await fake.wait_for(lambda: len(rows(db)) == 4, 30)
    assert rows(db, scope(world, world.general)) == [
        (scope(world, world.general), "user", "Tell me a story."),
        (scope(world, world.general), "assistant", "Once upon a time a dragon slept."),
    ]
    assert rows(db, scope(world, world.random)) == [
        (scope(world, world.random), "user", "Are you there?"),
        (scope(world, world.random), "assistant", "You said: Are you there?"),
    ]
    assert len(fake.bot_messages(world.random)) == 1 and story["id"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "locked by another program" in caplog.text and "writable again" in caplog.text
