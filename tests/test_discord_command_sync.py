"""DEV_GUILD_ID set before the bot is in that server (the natural order of a newcomer's setup):
Discord refuses the command sync with 403 Missing Access. The bot says so in one line with its
invite link, keeps running and answering, and syncs there when it joins; never globally meanwhile."""

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

COMMANDS = {"reset", "template", "chat", "stop", "system", "settings", "status", "export", "model"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as f:
        yield f


async def test_a_refused_guild_sync_is_explained_and_done_when_the_bot_joins(fake: FakeDiscord, tmp_path: Path) -> None:
    town = fake.add_guild("town")
    general = fake.add_channel(town, "general")
    ann = fake.add_user("ann")
    fake.add_member(town, ann)
    dev = fake.add_guild("my-test-server", with_bot=False)  # DEV_GUILD_ID, but the bot was not invited yet
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "OPENAI_", "BACKEND"))}
    env.update(
        PYTHONPATH=str(ROOT), DISCORD_TOKEN=fake.token, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
        DATABASE_PATH=str(tmp_path / "bot.sqlite3"), DEV_GUILD_ID=dev["id"], LLAMA_N_CTX="512", LLAMA_N_PREDICT="8", TEMPERATURE="0",
    )
    log_path = tmp_path / "bot.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        await fake.wait_ready(timeout=60)
        await fake.wait_for(lambda: "Missing Access" in log_path.read_text(), 30)
        # It still answers messages, without slash commands; none were registered globally.
        sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> Hello!")
        [reply] = await fake.wait_for_bot_message(general, after=sent, timeout=60)
        assert reply["content"]
        assert not fake.commands.get("global") and not fake.commands.get(dev["id"])
        await fake.invite_bot(dev)  # the owner used the invite link
        await fake.wait_for(lambda: fake.commands.get(dev["id"]), 30)
        assert {c["name"] for c in fake.commands[dev["id"]]} == COMMANDS and not fake.commands.get("global")
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
    finally:
        if process.returncode is None:
            process.kill()
    said = log_path.read_text()
    assert process.returncode == 0, said
    assert "Traceback" not in said
    [line] = [line for line in said.splitlines() if "Missing Access" in line]
    assert f"DEV_GUILD_ID={dev['id']}" in line and "not in that server yet" in line
    assert f"client_id={fake.application_id}" in line and "scope=bot+applications.commands" in line  # the invite link
