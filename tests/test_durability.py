"""Nothing lost: messages are durable from arrival, through restarts, outages and faults.

Through the local Discord API with the real model and real SQLite files; in real
subprocesses where the scenario needs a real restart (SIGTERM, SIGKILL)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.conversations.service import ChatService
from bot.discord_adapter.client import LlamaBot
from bot.discord_adapter.recovery import RESTARTED
from bot.discord_adapter.replies import SORRY
from bot.engine.local import Engine, EngineDead, EngineOptions, LocalBackend
from bot.conversations.store import Store
from tests.conftest import World, make_settings, mention, rows, scope
from tests.fakediscord import FakeDiscord
from tests.test_discord_process import finish, one_channel, start_process

LONG = "Write a long story about a dragon."


def replies_to(fake: FakeDiscord, channel: dict, message: dict) -> list[dict]:
    return [m for m in fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def table(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()


def everything_stored(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return " ".join(str(v) for row in conn.execute("SELECT content, reasoning FROM messages") for v in row)


async def idle(fake: FakeDiscord, bot: LlamaBot) -> None:
    await fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 120)


async def run_until(fake: FakeDiscord, tmp_path: Path, *conditions: Callable[[], object], **env: str) -> None:
    """Start the bot in a process of its own, wait for each condition in turn, then stop it
    with SIGTERM: it must stop cleanly."""
    process = await start_process(fake, tmp_path, **env)
    try:
        for condition in conditions:
            await fake.wait_for(condition, 120)
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0 and "Traceback" not in log


# --- real restarts ---------------------------------------------------------------------------


# --- edits and deletes while waiting or being answered ---------------------------------------


# --- attached files: the message is stored before they are downloaded ------------------------

NOTE = {"filename": "note.txt", "data": b"The meeting is on Tuesday.\n", "content_type": "text/plain"}


def attachments_of(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status, content, attachments FROM messages WHERE role = 'user' ORDER BY id").fetchall()


# --- faults in the engine --------------------------------------------------------------------


@pytest.fixture
async def own_engine(model_path: Path):
    """A small engine of its own (one slot), for faults the shared one must not see."""
    engine = await Engine.load(model_path, EngineOptions(n_ctx=512, n_threads=2, parallel=1, kv_cache_mb=64))
    yield engine
    await engine.close()


async def test_fault_while_restoring_a_cached_state_apologises_and_the_channel_recovers(
    world: World, own_engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, discord_token=world.fake.token, stream=False, parallel=1, user_cooldown_s=0.0)
    async with await Store.open(settings.database_path) as store:
        bot = LlamaBot(settings, ChatService(LocalBackend(own_engine), store, settings), guild_ready_timeout=0.1)
        async with world.fake.running(bot):
            try:
                for channel, text in ((world.general, "Hello!"), (world.random, "Hi there.")):  # general's state goes to the cache
                    sent = await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {text}")
                    await world.fake.wait_for(lambda: replies_to(world.fake, channel, sent), 60)
                    await idle(world.fake, bot)
                assert own_engine.cached_states == 1
                own_engine.inject_fault("restore")
                with caplog.at_level(logging.ERROR):
                    failing = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} And now?")
                    [apology] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, failing), 60)
                assert apology["content"] == SORRY
                assert "injected fault while restoring" in caplog.text and scope(world, world.general) in caplog.text
                again = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Still there?")
                [answer] = await world.fake.wait_for(lambda: replies_to(world.fake, world.general, again), 60)
                assert answer["content"] != SORRY
                await idle(world.fake, bot)
                assert own_engine.dead is None and own_engine.busy_slots == 0
            finally:
                await bot.shutdown(grace=10)


async def test_engine_that_cannot_go_on_fails_every_request_at_once(own_engine: Engine) -> None:
    """After repeated faults the engine gives up: waiting and later replies fail at once (no
    hang), and `on_fatal` tells the process to exit so the service manager restarts it."""
    fatal: list[str] = []
    own_engine.on_fatal = fatal.append
    tokens = own_engine.vocab.tokenize("Hello there, how are you?", special=False)
    own_engine.inject_fault("admit", times=100)
    from bot.config import Sampling

    generations = [own_engine.generate(f"k{i}", tokens, max_tokens=8, sampling=Sampling(temperature=0.0)) for i in range(8)]
    done = await asyncio.wait_for(asyncio.gather(*(g.wait() for g in generations)), 30)
    assert all(g.finish_reason == "error" for g in done)
    await asyncio.sleep(0.1)
    assert fatal and "faults in a row" in fatal[0] and own_engine.dead
    with pytest.raises(EngineDead):
        own_engine.generate("later", tokens, max_tokens=8, sampling=Sampling(temperature=0.0))


# --- stopping on time ------------------------------------------------------------------------

