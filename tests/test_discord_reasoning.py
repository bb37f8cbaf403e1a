"""A reasoning model's private thoughts on Discord (THINKING hide, spoiler, show): shown only as
the mode says, in every message and every edit, and never in the next prompt.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py), whose replies carry scripted reasoning. (Reasoning
split from a real model's output, through the engine, the store and the terminal:
tests/test_formats_reasoning.py.)"""

from __future__ import annotations

import re
import sqlite3

from bot.discord_adapter.output import THINKING_NOTE, THOUGHT_NOTE
from bot.discord_adapter.replies import THOUGHT_ONLY
from bot.formats.templates import Message
from tests.conftest import World, scope
from tests.discord_helpers import ask, table
from tests.scripted import Script, ScriptedBackend

MARK = "zq"  # every scripted thought starts with it, and no answer contains it
THOUGHT = [f"{MARK} the user ", "asks about ", "grass, which ", "is green ", "in spring."]


def shown_in(world: World, channel: dict) -> list[str]:
    """Every text the bot ever put on screen in a channel: each message as posted and each edit."""
    cid = channel["id"]
    return [
        str(r["json"].get("content") or "")
        for r in world.fake.requests
        if r["method"] in ("POST", "PATCH") and re.fullmatch(rf"/channels/{cid}/messages(/\d+)?", r["path"]) and isinstance(r["json"], dict)
    ]


def stored_answer(db) -> tuple[str, str | None]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT content, reasoning FROM messages WHERE role = 'assistant' ORDER BY id").fetchone()


async def test_hide_never_shows_a_thought_while_streaming_or_after(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script(["Grass ", "is ", "green."], reasoning=THOUGHT, every_s=0.5), "You are welcome.")  # about 3 s of thinking
    async with start_bot(n_predict=120, thinking="hide") as bot:  # streaming on: every edit is checked
        [reply] = await ask(world, bot, world.general, world.ann, "What colour is grass?")
        thought_s = bot.ctx.chat.last_replies[scope(world, world.general)].generation.thought_s
        assert reply["content"] == "Grass is green.\n" + THOUGHT_NOTE.format(s=thought_s)
        shown = shown_in(world, world.general)
        assert not any(MARK in s or "think>" in s for s in shown), shown
        assert any(re.fullmatch(THINKING_NOTE.replace("{s:.0f}", r"\d+"), s) for s in shown)  # "thinking… N s" while it thought
        assert stored_answer(bot.ctx.settings.database_path) == ("Grass is green.", "".join(THOUGHT))
        await ask(world, bot, world.general, world.ann, "Thanks!")
    follow = scripted.calls[1].messages
    assert follow[1:] == [Message("user", "What colour is grass?"), Message("assistant", "Grass is green."), Message("user", "Thanks!")]
    assert MARK not in scripted.calls[1].prompt  # the thought never reaches the next prompt


async def test_spoiler_and_show(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.then(Script(["Snow ", "is ", "white."], reasoning=THOUGHT), Script(["Coal ", "is ", "black."], reasoning=THOUGHT))
    async with start_bot(n_predict=120, thinking="spoiler", stream=False) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "What colour is snow?")
        seconds = bot.ctx.chat.last_replies[scope(world, world.general)].generation.thought_s
        # clearly marked, inside a spoiler, reasoning first, then the answer
        assert reply["content"] == f"-# \U0001f4ad reasoning ({seconds:.0f} s), click to show:\n||{''.join(THOUGHT)}||\n\nSnow is white."
    async with start_bot(n_predict=120, thinking="show", stream=False) as bot:
        [reply] = await ask(world, bot, world.random, world.ann, "What colour is coal?")
        assert reply["content"] == f"-# \U0001f4ad reasoning\n> {''.join(THOUGHT)}\n\nCoal is black."
        assert "||" not in reply["content"]


async def test_a_reply_that_only_thought_says_so(world: World, start_bot, scripted: ScriptedBackend) -> None:
    """The reply length ran out while the model was still thinking: a short note, not an empty reply."""
    scripted.then(Script(["Never", " said."], reasoning=THOUGHT * 4))
    async with start_bot(n_predict=8, thinking="hide", stream=False) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "What is the meaning of life?")
        generation = bot.ctx.chat.last_replies[scope(world, world.general)].generation
        assert generation.finish_reason == "length" and generation.text == ""
        assert reply["content"] == THOUGHT_ONLY + "\n" + THOUGHT_NOTE.format(s=generation.thought_s)
        assert generation.reasoning == "".join((THOUGHT * 4)[:8])
        assert stored_answer(bot.ctx.settings.database_path) is None  # no answer to remember: only the question is stored
        assert table(bot.ctx.settings.database_path) == [("user", "ok", "What is the meaning of life?")]
