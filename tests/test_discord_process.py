"""`python -m bot run` as a real process, pointed at the local fake Discord API through
DISCORD_API_BASE / DISCORD_GATEWAY_URL, the way a REST proxy would be configured."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.health import read_beat
from tests.conftest import ROOT
from tests.fakediscord import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as f:
        yield f


async def start_process(fake: FakeDiscord, tmp_path: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    """`python -m bot run` (or `python -m bot *args`) pointed at the fake; its log goes to a file."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_"))}
    full.update(
        PYTHONPATH=str(ROOT),
        DISCORD_TOKEN=fake.token,
        DISCORD_API_BASE=fake.api_base,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        DATABASE_PATH=str(tmp_path / "bot.sqlite3"),
        LLAMA_N_CTX="1024",
        LLAMA_N_PREDICT="48",
        TEMPERATURE="0",
    )
    full.update(env)
    log_path = tmp_path / f"bot-{len(list(tmp_path.glob('bot-*.log')))}.log"
    with log_path.open("wb") as log:  # a file, not a pipe: a chatty log must never block the bot
        command = args or ("run",)
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", *command, cwd=tmp_path, env=full, stdout=log, stderr=log)
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


async def finish(process: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str]:
    """Wait for the process to end; returns its exit code and everything it logged."""
    await asyncio.wait_for(process.wait(), timeout)
    assert process.returncode is not None
    return process.returncode, process.log_path.read_text()  # type: ignore[attr-defined]


def one_channel(fake: FakeDiscord) -> tuple[dict, dict, dict]:
    """A guild with one channel and one member: (guild, channel, member)."""
    guild = fake.add_guild("town")
    channel = fake.add_channel(guild, "general")
    user = fake.add_user("ann")
    fake.add_member(guild, user)
    return guild, channel, user


async def test_run_serves_discord_and_stops_cleanly_on_sigterm(fake: FakeDiscord, tmp_path: Path) -> None:
    guild, general, ann = one_channel(fake)
    process = await start_process(fake, tmp_path, LOG_LEVEL="DEBUG", LLAMA_N_PREDICT="500", DEV_GUILD_ID=guild["id"])
    try:
        await fake.wait_ready(timeout=60)
        await fake.wait_for(lambda: fake.commands.get(guild["id"]), 30)  # DEV_GUILD_ID: synced to that guild
        assert {c["name"] for c in fake.commands[guild["id"]]} == {"reset", "template", "chat", "stop", "system", "settings", "status", "export"}
        sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> Write a long story about a dragon.")
        await fake.wait_for_bot_message(general, after=sent, timeout=60)  # streaming: the reply is being written
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, log
    assert "Traceback" not in log
    assert "shutting down: finishing replies in progress" in log and "stopped" in log
    assert fake.token not in log  # the token never reaches the log, even at DEBUG
    replies = [m for m in fake.bot_messages(general) if int(m["id"]) > int(sent["id"])]
    assert len(replies) == 1 and replies[0]["content"]
    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert [r[0] for r in stored] == ["user", "assistant"]
    assert replies[0]["content"].startswith(stored[1][1][:50])


async def test_run_keeps_a_heartbeat_while_connected_and_removes_it_on_sigterm(fake: FakeDiscord, tmp_path: Path) -> None:
    """The file `python -m bot health` (a container's HEALTHCHECK) reads: <DATABASE_PATH>.health."""
    _, general, ann = one_channel(fake)
    heartbeat = tmp_path / "bot.sqlite3.health"
    process = await start_process(fake, tmp_path)
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


async def test_refused_message_content_intent_is_explained(fake: FakeDiscord, tmp_path: Path) -> None:
    fake.refuse_privileged_intents = True
    code, log = await finish(await start_process(fake, tmp_path))
    assert code == 2
    assert "Turn on 'Message Content Intent'" in log
    assert "Traceback" not in log


async def test_rejected_token_is_explained(fake: FakeDiscord, tmp_path: Path) -> None:
    process = await start_process(fake, tmp_path, DISCORD_TOKEN="not-the-token")
    code, log = await finish(process)
    assert code == 2
    assert "Discord rejected DISCORD_TOKEN" in log
    assert "not-the-token" not in log and "Traceback" not in log


async def one_reply_then_sigterm(fake: FakeDiscord, tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """Start the bot process, get one reply in a fresh channel, stop it with SIGTERM."""
    _, general, ann = one_channel(fake)
    process = await start_process(fake, tmp_path, *args, **env)
    try:
        await fake.wait_ready(timeout=60)
        sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> hi")
        await fake.wait_for_bot_message(general, after=sent, timeout=60)
        process.send_signal(signal.SIGTERM)
        return await finish(process)
    finally:
        if process.returncode is None:
            process.kill()


async def test_plain_python_m_bot_starts_discord_when_a_token_is_set(fake: FakeDiscord, tmp_path: Path) -> None:
    code, log = await one_reply_then_sigterm(fake, tmp_path, "--env-file", str(tmp_path / "none"))
    assert code == 0
    assert "[INFO] DISCORD_TOKEN is set: starting the Discord bot." in log
