"""Getting replies onto Discord (bot/discord_adapter/output.py): split at 2,000 characters
with code blocks intact, streamed by edits within Discord's edit budget, the final text
exact and right after generation. The budget's arithmetic on its own, then through the
real discord.py client against the local Discord API.

Replies come from the scripted model (tests/scripted.py) at a pace the test sets
(`every_s`): a reply lasts as long as the script says, on any CPU."""

from __future__ import annotations

import re
import time

from bot.conversations.service import Reply
from bot.discord_adapter.output import BOT_EDITS_PER_S, EDITS_PER_WINDOW, LIMIT, STREAM_EVERY_S, WINDOW_S, EditBudget, split_message
from tests.conftest import World, rows, scope
from tests.discord_helpers import ask, idle, pages_after, replies_to, send
from tests.scripted import Script, ScriptedBackend

EDIT = r"/channels/(\d+)/messages/\d+$"
STORY = " ".join(f"Ember the dragon flew over hill number {i} and rested." for i in range(30))  # about 1,600 characters
PROGRAM = "Here is the program.\n\n```python\n" + "\n\n".join(
    f'def task_{i}(items):\n    """Keep the items that are not {i}."""\n    return [x for x in items if x != {i}]' for i in range(40)
) + "\n```\nThat is all."  # about 3,600 characters, one code block


def paced(text: str, seconds: float, *, pieces: int = 50) -> Script:
    """`text` in about `pieces` pieces spread over `seconds`."""
    words = len(text.split(" "))
    per_piece = max(1, -(-words // pieces))
    return Script.text(text, words_per_piece=per_piece, every_s=seconds / -(-words // per_piece))


def max_edits_in_window(world: World, channel: dict, seconds: float = WINDOW_S) -> int:
    """The most edits the fake saw in one channel within any `seconds` (Discord's budget window)."""
    times = sorted(r["time"] for r in world.fake.requests_to("PATCH", EDIT) if re.search(EDIT, r["path"]).group(1) == channel["id"])
    return max((sum(1 for t in times[i:] if t - start < seconds) for i, start in enumerate(times)), default=0)


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


# --- splitting ------------------------------------------------------------------------------


async def test_long_reply_is_split_with_code_fences_intact(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script.text(PROGRAM, words_per_piece=20))
    async with start_bot(n_predict=700, stream=False) as bot:
        pages = [p["content"] for p in await ask(world, bot, world.general, world.ann, "Write a long Python program with many functions for a to-do list app.")]
        full = rows(bot.ctx.settings.database_path)[1][2]
    assert full == PROGRAM and len(full) > LIMIT and len(pages) >= 2
    assert all(len(p) <= LIMIT for p in pages)
    assert pages == split_message(full)
    for page in pages:  # every page opens and closes its code blocks
        assert sum(1 for line in page.split("\n") if line.lstrip().startswith("```")) % 2 == 0
    assert pages[1].startswith("```python\n")  # the block goes on, as Python, on the next page
    assert _same_words(pages, full)


def _same_words(pages: list[str], full: str) -> bool:
    """The pages hold the reply's words in order, plus only the fence lines added at cuts."""
    words = [w for p in pages for w in p.split()]
    original = full.split()
    i = 0
    for w in words:
        if i < len(original) and w == original[i]:
            i += 1
        elif not w.startswith("```"):
            return False
    return i == len(original)


# --- streaming ------------------------------------------------------------------------------


async def test_short_streamed_reply_is_posted_once_complete(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script(["Hi", " there", "!"], every_s=0.05))
    async with start_bot(stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Say hi.")
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 2)
        await idle(world.fake, bot)
        [reply] = pages_after(world.fake, world.general, sent)
    posts = world.fake.requests_to("POST", rf"/channels/{world.general['id']}/messages$")
    assert len(posts) == 1 and posts[0]["json"]["content"] == "Hi there!"  # one message, already complete
    assert world.fake.requests_to("PATCH", EDIT) == []  # and never edited
    assert reply["content"] == "Hi there!" and reply["message_reference"]["message_id"] == sent["id"]


async def test_long_streamed_reply_appears_early_grows_by_edits_and_ends_exact(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """A reply of two pages, written over 5 s: visible while it is written, edited (within
    the budget, pinging nobody) as it grows, exact page by page at the end."""
    scripted.then(paced(PROGRAM, 5.0))
    async with start_bot(n_predict=700, stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Write a long Python program with many functions for a to-do list app.")
        [first] = await world.fake.wait_for_bot_message(world.general, after=sent)
        assert bot.ctx.scheduler.running == 1  # visible while still being generated
        await idle(world.fake, bot)
        final = rows(bot.ctx.settings.database_path)[1][2]
        pages = pages_after(world.fake, world.general, sent)
    assert final == PROGRAM and len(final) > LIMIT
    assert [p["content"] for p in pages] == split_message(final)  # the final text is exact, page by page
    assert len(first["_edits"]) >= 2  # it grew by edits
    assert max_edits_in_window(world, world.general) <= EDITS_PER_WINDOW  # Discord's per-channel budget
    edits = world.fake.requests_to("PATCH", EDIT)
    assert edits and all(e["json"]["allowed_mentions"]["parse"] == [] for e in edits), [e["json"].get("allowed_mentions") for e in edits]


async def test_long_streamed_reply_ends_with_a_final_edit_right_after_generation(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(paced(STORY, 5.0))  # 50 pieces: cut at the length limit (45), 4.5 s in
    async with start_bot(n_predict=45, stream=True) as bot:
        sent = await send(world, world.general, world.ann, "Write a long story about a dragon.")
        reply: Reply = await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)))
        await idle(world.fake, bot)
        stored = rows(bot.ctx.settings.database_path)[1][2]
        pages = pages_after(world.fake, world.general, sent)
    ended = reply.generation.finished_at  # perf_counter and the fake's monotonic() are the same clock
    assert ended is not None and reply.finish_reason == "length" and reply.generation.n_generated == 45
    assert [p["content"] for p in pages] == split_message(stored) == [stored]
    first = world.fake.requests_to("POST", rf"/channels/{world.general['id']}/messages$")[-1]
    edits = world.fake.requests_to("PATCH", EDIT)
    during = [e for e in edits if e["time"] < ended]
    after = [e for e in edits if e["time"] >= ended]
    # The reply grew on screen while it was generated: posted before the end, then edited at the
    # streaming pace for as long as generation lasted (less one edit that may still be on its way).
    assert first["time"] < ended and pages[0]["content"].startswith(first["json"]["content"])
    assert len(during) >= max(2, int((ended - first["time"]) / STREAM_EVERY_S) - 1)
    growing = [e["json"]["content"] for e in during]
    assert all(stored.startswith(text) for text in growing)
    assert after and after[-1]["json"]["content"] == stored  # the last edit is the final text...
    assert len(after) <= 2  # ...at most one streaming edit was already on its way when generation ended
    assert bot.ctx.edit_budget.final_waits == 0  # ...and it went out without waiting for the budget
    assert max_edits_in_window(world, world.general) <= EDITS_PER_WINDOW


async def test_edit_budget_with_four_channels_streaming_two_replies_each(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """Four channels stream at once, each with a second message waiting behind the first (its
    queue note becomes the reply: one more edit in the same window). Each channel stays within
    its budget, the bot within its bot-wide cap, and every reply ends exact."""
    channels = [world.general, world.random] + [world.fake.add_channel(world.guild, f"extra-{i}") for i in range(2)]
    scripted.then(*(paced(STORY, 3.5, pieces=30) for _ in range(2 * len(channels))))
    async with start_bot(n_predict=200, stream=True, parallel=4) as bot:
        asked = []
        for channel in channels:
            asked.append(await send(world, channel, world.ann, "Write a long story about a dragon."))
            asked.append(await send(world, channel, world.mod, "Write a long story about a castle."))
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 4 * len(channels), timeout=120)
        await idle(world.fake, bot)
    edits = world.fake.requests_to("PATCH", EDIT)
    assert len(edits) >= 4 * len(channels)  # they really streamed
    times = sorted(e["time"] for e in edits)
    assert max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times)) <= BOT_EDITS_PER_S  # bot-wide
    for channel in channels:
        assert max_edits_in_window(world, channel) <= EDITS_PER_WINDOW
        answers = [r[2] for r in rows(bot.ctx.settings.database_path, scope(world, channel)) if r[1] == "assistant"]
        assert answers == [STORY, STORY]
        mine = [m for m in asked if m["channel_id"] == channel["id"]]
        for message in mine:  # the second one's queue note became its reply
            assert [m["content"] for m in replies_to(world.fake, channel, message)] == [STORY]
        assert len(world.fake.bot_messages(channel)) == 2
    assert all(r["status"] == 200 for r in edits)  # nothing was refused or rate limited


async def test_streamer_survives_a_refused_edit(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """Discord refusing a streaming edit stops the streaming; the final text still arrives exact."""
    scripted.then(paced(STORY, 4.0))
    async with start_bot(n_predict=400, stream=True) as bot:
        world.fake.fail_next("PATCH", EDIT, 403, times=1)
        sent = await send(world, world.general, world.ann, "Write a long story about a dragon.")
        await world.fake.wait_for(lambda: len(rows(bot.ctx.settings.database_path)) == 2)
        await idle(world.fake, bot)
        stored = rows(bot.ctx.settings.database_path)[1][2]
    assert stored == STORY and [p["content"] for p in pages_after(world.fake, world.general, sent)] == [STORY]
    statuses = [r["status"] for r in world.fake.requests_to("PATCH", EDIT)]
    assert statuses == [403, 200]  # no streaming after the refusal; the final edit went through
