"""`python -m bot run` as a real process, pointed at the local fake Discord API through
DISCORD_API_BASE / DISCORD_GATEWAY_URL, the way a REST proxy would be configured.

It runs on the bundled model, or (`server=`) on a scripted OpenAI-compatible server
(tests/sse_server.py) with BACKEND=openai: then a reply says what the test scripted and
stays open until the test lets it end, whatever the CPU."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ENGINE_THREADS, ROOT
from tests.fakediscord import FakeDiscord
from tests.sse_server import ScriptedServer


async def start_process(fake: FakeDiscord, tmp_path: Path, *args: str, server: ScriptedServer | None = None, **env: str) -> asyncio.subprocess.Process:
    """`python -m bot run` (or `python -m bot *args`) pointed at the fake; its log goes to a file."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "OPENAI_", "BACKEND"))}
    full.update(
        PYTHONPATH=str(ROOT),
        DISCORD_TOKEN=fake.token,
        DISCORD_API_BASE=fake.api_base,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        DATABASE_PATH=str(tmp_path / "bot.sqlite3"),
        LLAMA_N_CTX="1024",
        LLAMA_N_PREDICT="48",
        TEMPERATURE="0",
        USER_COOLDOWN_S="0",
        N_THREADS=str(ENGINE_THREADS),
    )
    if server is not None:
        full.update(BACKEND="openai", OPENAI_BASE_URL=server.base)
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


async def run_until(fake: FakeDiscord, tmp_path: Path, *conditions: Callable[[], object], server: ScriptedServer | None = None, **env: str) -> None:
    """Start the bot in a process of its own, wait for each condition in turn, then stop it
    with SIGTERM: it must stop cleanly."""
    process = await start_process(fake, tmp_path, server=server, **env)
    try:
        for condition in conditions:
            await fake.wait_for(condition, 120)
        process.send_signal(signal.SIGTERM)
        code, log = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0 and "Traceback" not in log, log


async def one_reply_then_sigterm(fake: FakeDiscord, tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """Start the bot process (on the bundled model), get one reply in a fresh channel, stop it with SIGTERM."""
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
