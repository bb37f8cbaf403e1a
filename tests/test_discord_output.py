"""Streaming replies onto Discord within its edit budget: the real bot, model and discord.py
client against the local fake Discord API, plus the budget's arithmetic on its own."""

from __future__ import annotations

import re
import time

from bot.conversations.service import Reply
from bot.discord_adapter.output import EDITS_PER_WINDOW, STREAM_EVERY_S, WINDOW_S, EditBudget, split_message
from tests.conftest import World, mention, rows, scope

STORY = "Write a long story about a dragon."
EDIT = r"/channels/(\d+)/messages/\d+$"


def max_edits_in_window(world: World, channel: dict, seconds: float = WINDOW_S) -> int:
    """The most edits the fake saw in one channel within any `seconds` (Discord's budget window)."""
    times = sorted(r["time"] for r in world.fake.requests_to("PATCH", EDIT) if re.search(EDIT, r["path"]).group(1) == channel["id"])
    return max((sum(1 for t in times[i:] if t - start < seconds) for i, start in enumerate(times)), default=0)


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def bot_pages(world: World, channel: dict, after: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if int(m["id"]) > int(after["id"])]


# --- the budget on its own ------------------------------------------------------------------


def test_budget_keeps_the_last_edit_of_a_window_for_the_final_text() -> None:
    budget = EditBudget(per_channel=5, window_s=60.0)
    for _ in range(4):
        assert budget.wait(1, final=False) == 0
        budget.answered(budget.take(1))
    assert budget.wait(1, final=False) > 50  # streaming may not take the 5th edit...
    assert budget.wait(1, final=True) == 0  # ...the final text may
    assert budget.wait(2, final=False) == 0  # and other channels have their own window
    budget.answered(budget.take(1))
    assert budget.wait(1, final=True) > 50  # 5 in the window: even a final edit waits


def test_budget_counts_an_edit_in_flight_until_it_is_answered() -> None:
    budget = EditBudget(per_channel=2, window_s=0.05)
    in_flight = budget.take(7)
    time.sleep(0.1)  # longer than the window, but Discord has not answered yet
    assert budget.wait(7, final=True) == 0 and budget.wait(7, final=False) == float("inf")
    budget.answered(in_flight)
    assert 0 < budget.wait(7, final=False) <= 0.05
    time.sleep(0.06)
    assert budget.wait(7, final=False) == 0


def test_bot_wide_cap() -> None:
    budget = EditBudget(per_channel=5, window_s=5.0, bot_per_s=8)
    for channel in range(6):  # streaming leaves a quarter of the bot-wide cap free
        assert budget.wait(channel, final=False) == 0
        budget.answered(budget.take(channel))
    assert budget.wait(100, final=False) > 0
    assert budget.wait(100, final=True) == 0


# --- through Discord ------------------------------------------------------------------------


async def test_short_streamed_reply_is_posted_once_complete(world: World, start_bot) -> None:
    async with start_bot(n_predict=2, stream=True) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Say hi.")
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 2, timeout=600)
        stored = rows(bot.ctx.settings.database_path)[1][2]
        [reply] = bot_pages(world, world.general, sent)
    posts = world.fake.requests_to("POST", rf"/channels/{world.general['id']}/messages$")
    assert len(posts) == 1 and posts[0]["json"]["content"] == stored  # one message, already complete
    assert world.fake.requests_to("PATCH", EDIT) == []  # and never edited
    assert reply["content"] == stored and reply["message_reference"]["message_id"] == sent["id"]


async def test_long_streamed_reply_ends_with_a_final_edit_right_after_generation(world: World, start_bot) -> None:
    async with start_bot(n_predict=400, stream=True) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} {STORY}")
        reply: Reply = await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)), timeout=600)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout=900)
        stored = rows(bot.ctx.settings.database_path)[1][2]
        pages = bot_pages(world, world.general, sent)
    ended = reply.generation.finished_at  # perf_counter and the fake's monotonic() are the same clock
    assert ended is not None and reply.finish_reason == "length"
    assert [p["content"] for p in pages] == split_message(stored)
    first = world.fake.requests_to("POST", rf"/channels/{world.general['id']}/messages$")[-1]
    edits = world.fake.requests_to("PATCH", EDIT)
    during = [e for e in edits if e["time"] < ended]
    after = [e for e in edits if e["time"] >= ended]
    # The reply grew on screen while it was generated: posted before the end, then edited at the
    # streaming pace for as long as generation lasted (less one edit that may still be on its way).
    # A count, not a time: a fast machine generates in fewer intervals and owes fewer edits.
    assert first["time"] < ended and pages[0]["content"].startswith(first["json"]["content"])
    assert len(during) >= int((ended - first["time"]) / STREAM_EVERY_S) - 1
    growing = [e["json"]["content"] for e in during if e["path"].endswith(f"/{pages[0]['id']}")]
    assert all(pages[0]["content"].startswith(text) for text in growing if len(text) <= len(pages[0]["content"]))
    assert after and after[-1]["json"]["content"] == pages[-1]["content"]  # the last edit is the final text...
    assert len(after) <= 2  # ...at most one streaming edit was already on its way when generation ended
    assert bot.ctx.edit_budget.final_waits == 0  # ...and it went out without waiting for the budget
    assert max_edits_in_window(world, world.general) <= EDITS_PER_WINDOW


async def test_no_channel_exceeds_five_edits_in_five_seconds(world: World, start_bot) -> None:
    """Three channels stream long replies at once, each with a second message waiting behind
    the first (its queue note becomes the reply: one more edit in the same window)."""
    channels = [world.general, world.random, world.fake.add_channel(world.guild, "extra")]
    async with start_bot(n_predict=150, stream=True, parallel=4) as bot:
        asked = []
        for channel in channels:
            asked.append(await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {STORY}"))
            asked.append(await world.fake.send_message(channel, world.mod, f"{mention(world.fake)} Write a long story about a castle."))
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 4 * len(channels), timeout=900)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout=600)
    edits = world.fake.requests_to("PATCH", EDIT)
    assert len(edits) >= 4 * len(channels)  # they really streamed
    for channel in channels:
        assert max_edits_in_window(world, channel) <= EDITS_PER_WINDOW
        answers = [r[2] for r in rows(bot.ctx.settings.database_path, scope(world, channel)) if r[1] == "assistant"]
        mine = [m for m in asked if m["channel_id"] == channel["id"]]
        for message, answer in zip(mine, answers, strict=True):  # the second one's queue note became its reply
            assert [m["content"] for m in replies_to(world, channel, message)] == split_message(answer)[:1]
        assert sum(len(split_message(a)) for a in answers) == len(world.fake.bot_messages(channel))
    assert all(r["status"] == 200 for r in edits)  # nothing was refused or rate limited


async def test_streamer_survives_a_refused_edit(world: World, start_bot) -> None:
    """Discord refusing a streaming edit stops the streaming; the final text still arrives exact."""
    async with start_bot(n_predict=400, stream=True) as bot:
        world.fake.fail_next("PATCH", EDIT, 403, times=1)
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} {STORY}")
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 2, timeout=900)
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout=600)
        stored = rows(bot.ctx.settings.database_path)[1][2]
    assert [p["content"] for p in bot_pages(world, world.general, sent)] == split_message(stored)
    statuses = [r["status"] for r in world.fake.requests_to("PATCH", EDIT)]
    assert statuses[0] == 403 and statuses[-1] == 200 and len(statuses) == 2  # no streaming after the refusal

