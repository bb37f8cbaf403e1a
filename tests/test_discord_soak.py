"""Soak of the Discord adapter: 330 messages in 20 channels and 2 DMs, with random reconnects,
dropped connections and injected 500s; every message answered exactly once, the database
matching what Discord shows, nothing left running, the process's memory flat.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py), each reply paced over a few steps so that many are in
flight when a fault strikes. (The engine's memory under the same kind of load, on the real
model: tests/test_engine_memory.py.) Run by CI like every test; `-m soak` runs the soaks alone."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path

import pytest

from bot.conversations.service import ChatService
from bot.conversations.store import Store
from bot.discord_adapter.client import LlamaBot
from bot.discord_adapter.scopes import DiscordScope
from tests.conftest import make_settings
from tests.fakediscord import FakeDiscord
from tests.scripted import ScriptedBackend, echo
from tests.test_engine_memory import peak_rss_mib, reset_peak_rss

MESSAGES = 330
WARM_UP = MESSAGES // 2


@pytest.mark.soak
async def test_soak(scripted: ScriptedBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(1234)
    scripted.default = lambda call: echo(call, every_s=0.01)  # in flight for a few loop turns, on any CPU
    async with FakeDiscord() as fake:
        places: list[tuple[dict, dict]] = []  # (channel, the user who talks there)
        for g in range(2):
            guild = fake.add_guild(f"guild-{g}")
            for c in range(10):
                channel = fake.add_channel(guild, f"chan-{c}")
                user = fake.add_user(f"user-{g}-{c}")
                fake.add_member(guild, user)
                places.append((channel, user))
        for d in range(2):
            user = fake.add_user(f"dm-user-{d}")
            places.append((fake.dm_channel(user), user))

        settings = make_settings(tmp_path, discord_token=fake.token, n_predict=24, user_cooldown_s=0.0, max_queue=64, stream=True)
        async with await Store.open(settings.database_path) as store:
            for channel, user in places:  # each conversation starts with a history
                conversation = await store.conversation(DiscordScope.of(int(channel["guild_id"]) if "guild_id" in channel else None, int(channel["id"]), int(user["id"])).key)
                for i in range(30):
                    await store.add_message(conversation.id, "user" if i % 2 == 0 else "assistant", f"Earlier message {i} about numbers.")
            # discord.py keeps the newest MAX_MESSAGES messages (1,000 by default): a smaller cache fills
            # during the warm-up, so what grows after it is the bot's own.
            bot = LlamaBot(settings, ChatService(scripted, store, settings), guild_ready_timeout=0.1, max_messages=MESSAGES // 4)
            bot.before_identify_hook = _no_wait  # type: ignore[method-assign]  # a re-IDENTIFY needs no 5 s pause here
            sent: list[tuple[dict, dict]] = []
            faults: dict[str, int] = {"reconnect": 0, "drop": 0, "post-500": 0, "edit-500": 0}
            rss: dict[str, float] = {}

            async with fake.running(bot):

                async def speaker(channel: dict, user: dict, count: int) -> None:
                    for i in range(count):
                        content = f"Message {i}: what is {rng.randint(1, 99)}?"
                        if "guild_id" in channel:
                            content = f"<@{fake.bot_user['id']}> {content}"
                        message = await fake.send_message(channel, user, content)
                        sent.append((channel, message))
                        await fake.wait_for(lambda: _answered(fake, channel, message), 60)
                        if len(fake.requests) > 2000:  # the fake's request and event logs are test bookkeeping
                            fake.requests.clear()
                            fake.events.clear()
                        if len(sent) >= WARM_UP and "warm" not in rss:  # the first speaker past the warm-up
                            rss["warm"] = peak_rss_mib()
                        await asyncio.sleep(rng.random() * 0.02)

                async def chaos() -> None:
                    while True:
                        await asyncio.sleep(rng.uniform(0.5, 1.5))
                        fault = rng.choice(list(faults))
                        faults[fault] += 1
                        if fault == "reconnect":
                            await fake.request_reconnect()
                        elif fault == "drop":
                            await fake.drop_connections(abrupt=True)
                        elif fault == "post-500":
                            fake.fail_next("POST", r"/channels/\d+/messages$", 500)
                        else:
                            fake.fail_next("PATCH", r"/channels/\d+/messages/\d+$", 500)

                reset_peak_rss()
                started = time.monotonic()
                counts = [MESSAGES // len(places) + (1 if i < MESSAGES % len(places) else 0) for i in range(len(places))]
                chaos_task = asyncio.ensure_future(chaos())
                try:
                    await asyncio.gather(*(speaker(ch, user, n) for (ch, user), n in zip(places, counts)))
                finally:
                    chaos_task.cancel()
                await fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 60)
                await asyncio.sleep(1.0)  # anything late (a duplicate) would show up now
                await bot.shutdown(grace=30)

            leftover = [t for t in asyncio.all_tasks() if not t.done() and _is_ours(t)]
            db_rows = _rows(settings.database_path)

        # every message answered exactly once, with the answer to it
        assert len(sent) == MESSAGES and len(scripted.calls) == MESSAGES
        answers = {m["id"]: _replies(fake, ch, m) for ch, m in sent}
        assert all(len(r) == 1 for r in answers.values()), [k for k, r in answers.items() if len(r) != 1][:5]
        # the database matches what Discord shows
        users = {r[2]: r for r in db_rows if r[0] == "user" and r[2]}
        assert set(users) == {m["id"] for _, m in sent}
        bot_ids = {r[2]: r for r in db_rows if r[0] == "assistant"}
        for _, message in sent:
            [reply] = answers[message["id"]]
            stored = bot_ids.get(reply["id"])
            assert stored is not None and stored[1] == "ok", (message["id"], reply["content"])
            assert reply["content"] == stored[3] and stored[3].startswith("You said: ") and stored[3].endswith(users[message["id"]][3])
        # the faults really happened, and nothing is left running; memory flat after warm-up
        assert faults["reconnect"] + faults["drop"] >= 2 and fake.injected_failures >= 1, faults
        assert leftover == []
        rss["peak"] = peak_rss_mib()
        growth = rss["peak"] - rss["warm"]
        assert growth < 40, rss
        with capsys.disabled():
            print(
                f"\nsoak: messages={len(sent)} replies={sum(len(r) for r in answers.values())} faults={faults} retries={fake.injected_failures} "
                f"(resumes={fake.resume_count}, identifies={fake.identify_count}) elapsed={time.monotonic() - started:.0f}s "
                f"peak_rss_at_warmup={rss['warm']:.0f}MiB peak_rss_at_end={rss['peak']:.0f}MiB growth={growth:.1f}MiB"
            )


async def _no_wait(shard_id: int | None, *, initial: bool = False) -> None:
    return None


def _replies(fake: FakeDiscord, channel: dict, message: dict) -> list[dict]:
    return [m for m in fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def _answered(fake: FakeDiscord, channel: dict, message: dict) -> bool:
    """A reply that is more than the "you're #N in line" note (which becomes the reply later)."""
    return any(not m["content"].startswith("\u23f3") for m in _replies(fake, channel, message))


def _rows(db: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status, platform_message_id, content FROM messages ORDER BY id").fetchall()


def _is_ours(task: asyncio.Task) -> bool:
    """Tasks started by the bot or discord.py (the fake's own server tasks are not ours)."""
    code = getattr(task.get_coro(), "cr_code", None)
    filename = code.co_filename if code else ""
    return "/bot/" in filename or "/discord/" in filename
