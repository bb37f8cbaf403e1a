"""One serving process per database: a second `python -m bot run` (or terminal chat) on the same
file is refused at start with one clear line, since two would answer every message twice; a
process killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fakediscord import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as f:
        yield f


def environment(fake: FakeDiscord, db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "OPENAI_", "BACKEND"))}
    env.update(
        PYTHONPATH=str(ROOT), DISCORD_TOKEN=fake.token, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
        DATABASE_PATH=str(db),
        # A model server that is down: the bot starts without loading a model (this test is about the database).
        BACKEND="openai", OPENAI_BASE_URL="http://127.0.0.1:9/v1", OPENAI_MODEL="none",
    )
    return env


async def start(env: dict[str, str], cwd: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *(args or ("run",)), env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def output(process: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str]:
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_a_second_serving_process_on_the_same_database_is_refused(fake: FakeDiscord, tmp_path: Path) -> None:
    db = tmp_path / "bot.sqlite3"
    env = environment(fake, db)
    first = await start(env, tmp_path)
    try:
        await fake.wait_ready(timeout=60)
        for args in (("run",), ("chat",)):  # the Discord bot and the terminal chat both serve the database
            code, said = await output(await start(env, tmp_path, *args))
            assert code == 2, said
            [line] = [line for line in said.splitlines() if line.startswith("error:")]
            assert f"another bot process (pid {first.pid}) is already serving {db}" in line
            assert "Traceback" not in said
        assert fake.identify_count == 1  # the refused one never logged in
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock, no file to clean up
        await first.wait()
    assert first.returncode == -signal.SIGKILL
    again = await start(env, tmp_path)
    try:
        await fake.wait_for(lambda: fake.identify_count == 2, 60)
    finally:
        again.send_signal(signal.SIGTERM)
        code, said = await output(again)
    assert code == 0, said
