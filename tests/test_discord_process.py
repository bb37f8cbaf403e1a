"""`python -m bot run` as a real process (bot/discord_adapter/runner.py, bot/cli.py): start-up,
the errors Discord can answer with, and stopping on time in every state.

Pointed at the local fake Discord API (tests/bot_process.py). One run is on the bundled
model, start-up through a real reply; the others run on a scripted OpenAI-compatible
server (tests/sse_server.py), whose reply stays open until the test lets it end."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.health import read_beat
from tests.bot_process import finish, one_channel, one_reply_then_sigterm, start_process
from tests.conftest import ROOT
from tests.fakediscord import FakeDiscord
from tests.sse_server import DONE, ScriptedServer, Step, chat_reply, delta, event

STORY = ["Once upon a time, ", "a dragon named Ember ", "lived on a hill. ", "The end."]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as f:
        yield f


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    """A model server that answers "Hello there!" (BACKEND=openai): no model to load."""
    async with ScriptedServer([chat_reply("Hello ", "there!")]) as s:
        yield s


async def test_run_on_the_bundled_model_answers_and_never_logs_the_token(tmp_path: Path) -> None:
    """Start-up through a real reply on the bundled model, with every log turned up: the token
    (and its secret part) is never in the log, the database is private."""
    async with FakeDiscord() as fake:
        code, log = await one_reply_then_sigterm(fake, tmp_path, LOG_LEVEL="DEBUG", LLAMA_LOG="1", LLAMA_N_PREDICT="8")
    assert code == 0 and "Traceback" not in log, log
    assert "llama_model_loader" in log and "timings guild:" in log  # the real engine, LLAMA_LOG=1 really logged
    assert "shutting down: finishing replies in progress" in log and "stopped" in log
    assert fake.token not in log and fake.token.split(".")[-1] not in log  # nor its secret part
    db = tmp_path / "bot.sqlite3"
    assert db.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in stored] == [("user", "ok"), ("assistant", "ok")] and stored[0][2] == "hi" and stored[1][2].strip()


async def test_run_serves_discord_and_stops_cleanly_on_sigterm(fake: FakeDiscord, tmp_path: Path) -> None:
    """SIGTERM while a reply is being written: the reply in progress is finished (in one
    message), stored, and the process exits 0. The reply is held open by the scripted
    server until the bot has begun shutting down."""
    guild, general, ann = one_channel(fake)
    hold = asyncio.Event()
    story = Step([event(delta(STORY[0])), event(delta(STORY[1])), hold, *(event(delta(p)) for p in STORY[2:]), event(delta(None, finish="stop")), DONE])
    async with ScriptedServer([story]) as server:
        process = await start_process(fake, tmp_path, server=server, LOG_LEVEL="DEBUG", DEV_GUILD_ID=guild["id"], LLAMA_N_PREDICT="500")
        try:
            await fake.wait_ready(timeout=60)
            await fake.wait_for(lambda: fake.commands.get(guild["id"]), 30)  # DEV_GUILD_ID: synced to that guild
            assert {c["name"] for c in fake.commands[guild["id"]]} == {"reset", "template", "chat", "stop", "system", "settings", "status", "export", "model"}
            sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> Write a long story about a dragon.")
            [shown] = await fake.wait_for_bot_message(general, after=sent, timeout=60)  # streaming: the reply is being written
            assert shown["content"] == "".join(STORY[:2]).strip()
            process.send_signal(signal.SIGTERM)
            await fake.wait_for(lambda: "shutting down: finishing replies in progress" in process.log_path.read_text(), 30)  # type: ignore[attr-defined]
            hold.set()  # the reply in progress may end now
            code, log = await finish(process)
        finally:
            if process.returncode is None:
                process.kill()
    assert code == 0, log
    assert "Traceback" not in log and "stopped" in log
    assert fake.token not in log  # the token never reaches the log, even at DEBUG
    replies = [m for m in fake.bot_messages(general) if int(m["id"]) > int(sent["id"])]
    assert [r["content"] for r in replies] == ["".join(STORY)]  # finished before the exit, in its one message
    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = db.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()
    assert stored == [("user", "ok", "Write a long story about a dragon."), ("assistant", "ok", "".join(STORY))]


async def test_plain_python_m_bot_starts_discord_when_a_token_is_set(fake: FakeDiscord, server: ScriptedServer, tmp_path: Path) -> None:
    _, general, ann = one_channel(fake)
    process = await start_process(fake, tmp_path, "--env-file", str(tmp_path / "none"), server=server)
    try:
        await fake.wait_ready(timeout=60)
        sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> hi")
        [reply] = await fake.wait_for_bot_message(general, after=sent, timeout=60)
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, log
    assert "[INFO] DISCORD_TOKEN is set: starting the Discord bot." in log
    assert reply["content"] == "Hello there!"


async def test_run_keeps_a_heartbeat_while_connected_and_removes_it_on_sigterm(fake: FakeDiscord, server: ScriptedServer, tmp_path: Path) -> None:
    """The file `python -m bot health` (a container's HEALTHCHECK) reads: <DATABASE_PATH>.health."""
    _, general, ann = one_channel(fake)
    heartbeat = tmp_path / "bot.sqlite3.health"
    process = await start_process(fake, tmp_path, server=server)
    try:
        await fake.wait_ready(timeout=60)
        beat = await fake.wait_for(lambda: heartbeat.exists() and read_beat(heartbeat).connected and read_beat(heartbeat), 30)
        assert beat.pid == process.pid and beat.backend_alive
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_"))}
        env.update(PYTHONPATH=str(ROOT), DATABASE_PATH=str(tmp_path / "bot.sqlite3"))
        health = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "health", cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(health.communicate(), 60)
        assert health.returncode == 0, out
        sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> hi")  # the health check took nothing from the bot
        await fake.wait_for_bot_message(general, after=sent, timeout=60)
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, log
    assert not heartbeat.exists()


async def test_refused_message_content_intent_is_explained(fake: FakeDiscord, server: ScriptedServer, tmp_path: Path) -> None:
    fake.refuse_privileged_intents = True
    code, log = await finish(await start_process(fake, tmp_path, server=server))
    assert code == 2
    assert "Turn on 'Message Content Intent'" in log
    assert "Traceback" not in log


async def test_rejected_token_is_explained(fake: FakeDiscord, server: ScriptedServer, tmp_path: Path) -> None:
    process = await start_process(fake, tmp_path, server=server, DISCORD_TOKEN="not-the-token")
    code, log = await finish(process)
    assert code == 2
    assert "Discord rejected DISCORD_TOKEN" in log
    assert "not-the-token" not in log and "Traceback" not in log


# --- stopping on time ------------------------------------------------------------------------


async def test_sigterm_while_reconnecting_to_an_unreachable_discord(server: ScriptedServer, tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    one_channel(fake)
    process = await start_process(fake, tmp_path, server=server)
    try:
        await fake.wait_ready(timeout=60)
        await fake.close()  # Discord goes away: discord.py backs off and retries
        await asyncio.sleep(4.0)
        assert process.returncode is None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process, timeout=25)
        took = time.monotonic() - started
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, log
    assert took < 25 and "Traceback" not in log and "stopped" in log


async def test_sigterm_while_discord_cannot_be_reached_at_start(fake: FakeDiscord, server: ScriptedServer, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = await start_process(fake, tmp_path, server=server, DISCORD_API_BASE=f"http://127.0.0.1:{port}/api/v10", DISCORD_GATEWAY_URL=f"ws://127.0.0.1:{port}")
    try:
        await asyncio.sleep(3.0)
        assert process.returncode is None  # it keeps trying, it does not crash
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process, timeout=25)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, log
    assert "cannot reach Discord" in log and "Traceback" not in log
