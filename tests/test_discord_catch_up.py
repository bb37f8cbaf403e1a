"""A mention in a channel where the bot never spoke, written while it was down, is answered after
the restart: Discord sends each channel's last_message_id with the guild, so only channels where
something was written since the bot was last connected are read, oldest first, paced well inside
Discord's rate limits."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.conftest import World, mention, rows
from tests.fakediscord import FakeDiscord

HISTORY = re.compile(r"/channels/(\d+)/messages")


def history_reads(fake: FakeDiscord, since: int = 0) -> list[dict]:
    return [r for r in fake.requests[since:] if r["method"] == "GET" and HISTORY.fullmatch(r["path"])]


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for t in times if start <= t < start + 1.0) for start in times), default=0)


async def caught_up(fake: FakeDiscord, bot) -> None:  # noqa: ANN001
    await fake.wait_for(lambda: bot.get_cog("Recovery").caught_up, 60)


async def test_a_mention_in_a_new_channel_while_the_bot_was_down_is_answered(world: World, start_bot, tmp_path: Path) -> None:
    fake = world.fake
    quiet = [fake.add_channel(world.guild, f"quiet-{i}") for i in range(12)]
    busy = [fake.add_channel(world.guild, f"busy-{i}") for i in range(6)]
    for channel in quiet:
        await fake.send_message(channel, world.ann, "chatter from before")
    db = tmp_path / "bot.sqlite3"
    async with start_bot(db=db) as bot:
        await caught_up(fake, bot)
    # While the bot is down: something is written in six channels, one of them a mention.
    before = len(fake.requests)
    for i, channel in enumerate(busy):
        await fake.send_message(channel, world.ann, "more chatter" if i != 3 else "also chatter")
    missed = await fake.send_message(busy[4], world.mod, f"{mention(fake)} Are you there?")
    async with start_bot(db=db) as bot:
        [reply] = await fake.wait_for_bot_message(busy[4], after=missed, timeout=60)
        await caught_up(fake, bot)
    assert reply["content"] == "You said: Are you there?"
    assert [r[2] for r in rows(db)] == ["Are you there?", "You said: Are you there?"]  # nothing else was addressed to it
    reads = history_reads(fake, before)
    assert {HISTORY.fullmatch(r["path"]).group(1) for r in reads} == {c["id"] for c in busy}  # only where something new was written
    assert len(reads) == len(busy)  # each read once
    assert most_in_one_second([r["time"] for r in reads]) <= 5 and all(r["status"] == 200 for r in reads)


async def test_a_first_start_reads_nothing_older_than_catchup_max_age(world: World, start_bot, tmp_path: Path) -> None:
    fake = world.fake
    old_place, new_place = fake.add_channel(world.guild, "old"), fake.add_channel(world.guild, "new")
    old = await fake.send_message(old_place, world.ann, f"{mention(fake)} Anyone?")
    await asyncio.sleep(4.0)
    new = await fake.send_message(new_place, world.ann, f"{mention(fake)} Hello?")
    async with start_bot(catchup_max_age_s=3.0) as bot:  # (the catch-up must begin within 3 s of "Hello?": a loaded machine's margin)
        [reply] = await fake.wait_for_bot_message(new_place, after=new, timeout=60)
        await caught_up(fake, bot)
        assert reply["content"] == "You said: Hello?"
    assert fake.bot_messages(old_place) == [] and old["id"]
    assert {HISTORY.fullmatch(r["path"]).group(1) for r in history_reads(fake)} == {new_place["id"]}
