"""Buttons under replies (bot/discord_adapter/buttons.py, views.py): Stop, Regenerate, Continue.

The real discord.py client against the local Discord API and a real SQLite file, on the
scripted model (tests/scripted.py): what Discord shows is read from the fake (contents and
components), what the bot remembers from the database, and what the model was asked
from `scripted.calls`. Replies to be stopped are held open by their script.
(Continue on the real model, down to its tokens: tests/test_end_to_end.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.config import Sampling
from bot.conversations.service import NOT_NEWEST
from bot.discord_adapter.access import REFUSED_BLOCKED
from bot.discord_adapter.output import split_message
from tests.conftest import World, scope
from tests.discord_helpers import (
    CONTINUE, REGENERATE, STOP, answers, ask, assert_refused, bob, button, custom_ids, idle, press, prompt_of, remote_bot, remote_settings,
    replies_to, send,
)
from tests.scripted import Script, ScriptedBackend
from tests.sse_server import ScriptedServer, Step, chat_reply, event, text

SAMPLED = Sampling(temperature=0.9, seed=1234)
WORDS = [f"w{i}" for i in range(1, 41)]


def words(n: int, start: int = 0) -> str:
    """`n` made-up words: a reply whose every token the test knows."""
    return " ".join(WORDS[start : start + n])


async def test_stop_button_is_for_the_author_and_admins(world: World, start_bot, scripted: ScriptedBackend) -> None:
    other = bob(world)
    holds = [asyncio.Event() for _ in range(3)]
    scripted.then(*(Script(["Once ", "upon ", "a ", "time"], hold=hold, hold_after=2) for hold in holds[:2]))
    async with start_bot() as bot:
        db = bot.ctx.settings.database_path
        for user in (world.ann, world.mod):  # the author, then a moderator stopping Ann's reply
            sent = await send(world, world.general, world.ann, "Write a very long story about a dragon named Ember.")
            [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
            assert custom_ids(reply) == [f"llamabot:stop:{sent['id']}:{world.ann['id']}"]  # shown while it is written
            refused = await world.fake.press_button(reply, button(reply, STOP), other)
            await refused.wait_done()
            assert_refused(refused)
            assert bot.ctx.replies.reply_in(scope(world, world.general)) is not None  # still writing
            stop = await world.fake.press_button(reply, button(reply, STOP), user)
            await world.fake.wait_for(lambda: reply["content"].endswith("*(stopped)*"))
            assert stop.response_types == [6] and stop.errors == []
            await idle(world.fake, bot)
            # Done: Stop is gone; what was written can be regenerated (it did not end at the length limit).
            assert custom_ids(reply) == [f"llamabot:regen:{sent['id']}:{world.ann['id']}"]
            content, status, first, last, tokens = answers(db, scope(world, world.general))[-1]
            assert (content, status, tokens) == ("Once upon", "stopped", 2) and first == last == reply["id"]
            assert reply["content"] == content + " *(stopped)*"

        # A Regenerate can be stopped too: the stopped new answer replaces the old one.
        scripted.then(Script(["A ", "new ", "tale"], hold=holds[2], hold_after=2))
        count = len(answers(db, scope(world, world.general)))
        regenerate = await world.fake.press_button(reply, button(reply, REGENERATE), world.ann)
        await world.fake.wait_for(lambda: custom_ids(reply) == [f"llamabot:stop:{sent['id']}:{world.ann['id']}"])
        await world.fake.wait_for(lambda: bot.ctx.replies.reply_in(scope(world, world.general)) is not None)
        await world.fake.press_button(reply, button(reply, STOP), world.ann)
        await world.fake.wait_for(lambda: not bot.ctx.replies.redoing and bot.ctx.scheduler.running == 0)
        assert regenerate.response_types == [6] and regenerate.followups == []
        stored = answers(db, scope(world, world.general))
        assert len(stored) == count and stored[-1][:2] == ("A new", "stopped") and reply["content"] == "A new *(stopped)*"
        assert custom_ids(reply) == [f"llamabot:regen:{sent['id']}:{world.ann['id']}"]


async def test_regenerate_replaces_the_answer_in_place(world: World, start_bot, scripted: ScriptedBackend) -> None:
    other = bob(world)
    scripted.then("Hello Ann, sailing is fun.", "The sea is salty.", "The sea is deep.")
    async with start_bot(sampling=SAMPLED, stream=False) as bot:
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        await ask(world, bot, world.general, world.ann, "My name is Ann and I like sailing.")
        [reply] = await ask(world, bot, world.general, world.ann, "Tell me a short fact about the sea.")
        before = answers(db, where)
        assert reply["content"] == before[-1][0] == "The sea is salty." and before[-1][2] == before[-1][3] == reply["id"]

        refused = await press(world, bot, reply, REGENERATE, other)
        assert_refused(refused)
        assert reply["content"] == "The sea is salty." and answers(db, where) == before and len(scripted.calls) == 2

        pressed = await press(world, bot, reply, REGENERATE, world.ann)
        assert pressed.response_types == [6] and pressed.errors == [] and pressed.followups == []
        after = answers(db, where)
        assert after[-1][0] == reply["content"] == "The sea is deep."  # the same message, edited in place
        assert len(after) == len(before) and after[:-1] == before[:-1]  # the old answer is gone, nothing else changed
        assert after[-1][2] == after[-1][3] == reply["id"]
        assert [m["id"] for m in world.fake.bot_messages(world.general)][-1] == reply["id"]  # no new message
        assert REGENERATE in button(reply, REGENERATE)

        # The model was asked the same question again (without the old answer), with a new seed.
        answer_call, redo_call = scripted.calls[1:]
        assert redo_call.messages == answer_call.messages and redo_call.prompt == answer_call.prompt
        assert redo_call.sampling.seed != answer_call.sampling.seed and answer_call.sampling.seed == 1234

        # The next prompt holds the new answer where the old one was.
        contents = [m.content for m in (await prompt_of(bot, where)).messages]
        assert contents[-1] == "The sea is deep." and "The sea is salty." not in contents


async def test_continue_extends_the_answer_that_hit_the_length_limit(world: World, start_bot, scripted: ScriptedBackend) -> None:
    other = bob(world)
    scripted.then(Script.text(words(20)), Script([f" {w}" for w in WORDS[16:36]]), Script([" and", " the", " end."]))
    async with start_bot(n_predict=16) as bot:
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        [reply] = await ask(world, bot, world.general, world.ann, "Write a long poem about the moon and the stars.")
        old_text = words(16)  # cut at the 16-token limit
        assert answers(db, where) == [(old_text, "ok", reply["id"], reply["id"], 16)] and reply["content"] == old_text
        assert custom_ids(reply) == [f"llamabot:{a}:{reply['message_reference']['message_id']}:{world.ann['id']}" for a in ("regen", "cont")]

        refused = await press(world, bot, reply, CONTINUE, other)
        assert_refused(refused)
        assert answers(db, where) == [(old_text, "ok", reply["id"], reply["id"], 16)]

        pressed = await press(world, bot, reply, CONTINUE, world.ann)
        assert pressed.response_types == [6] and pressed.errors == []
        # The model was asked to go on inside the answer's own turn (ChatML): no <|im_end|> after it.
        continued = scripted.calls[1].prompt
        assert continued.endswith("<|im_start|>assistant\n" + old_text) and scripted.calls[1].max_tokens == 16
        longer = words(32)
        assert answers(db, where) == [(longer, "ok", reply["id"], reply["id"], 32)]
        assert reply["content"] == longer  # the same message, extended
        assert CONTINUE in ":".join(custom_ids(reply))  # at the limit again: offered again

        await press(world, bot, reply, CONTINUE, world.ann)
        assert scripted.calls[2].prompt.endswith("<|im_start|>assistant\n" + longer)
        assert answers(db, where) == [(longer + " and the end.", "ok", reply["id"], reply["id"], 35)]
        assert reply["content"] == longer + " and the end."
        assert custom_ids(reply) == [button(reply, REGENERATE)]  # it ended by itself: no more Continue
        assert len(world.fake.bot_messages(world.general)) == 1


async def test_older_replies_lose_their_buttons(world: World, start_bot) -> None:
    async with start_bot(n_predict=16) as bot:
        [first] = await ask(world, bot, world.general, world.ann, "Say hello.")
        assert REGENERATE in button(first, REGENERATE)
        [other_channel] = await ask(world, bot, world.random, world.ann, "Say hi.")
        assert custom_ids(first) != []  # another channel's reply does not touch this one
        [second] = await ask(world, bot, world.general, world.mod, "Say goodbye.")
        await world.fake.wait_for(lambda: custom_ids(first) == [])
        assert custom_ids(second) and all(":stop:" not in c for c in custom_ids(second))
        try:  # Discord would not even offer the press
            await world.fake.press_button(first, f"llamabot:regen:{first['message_reference']['message_id']}:{world.ann['id']}", world.ann)
        except ValueError as exc:
            assert "has no button" in str(exc)
        else:
            raise AssertionError("a button that is gone was pressed")
        assert custom_ids(other_channel) != []


async def test_buttons_work_after_a_restart_and_for_admins(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    where = scope(world, world.general)
    scripted.then(Script.text(words(20)), Script([", and", " so", " on."]), "A new story.")
    async with start_bot(db=db, n_predict=16, sampling=SAMPLED) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "Write a long story about a lighthouse keeper.")
    assert answers(db, where)[0][0] == words(16)
    async with start_bot(db=db, n_predict=16, sampling=SAMPLED) as bot:  # a new process: nothing in memory
        continued = await press(world, bot, reply, CONTINUE, world.ann)
        assert continued.response_types == [6] and continued.errors == []
        assert answers(db, where)[0][0] == reply["content"] == words(16) + ", and so on."
        regenerated = await press(world, bot, reply, REGENERATE, world.mod)  # a moderator, on Ann's reply
        assert regenerated.response_types == [6] and regenerated.errors == []
        assert answers(db, where)[0][0] == reply["content"] == "A new story."


async def test_regenerate_waits_its_turn_and_refuses_once_a_newer_answer_exists(world: World, start_bot, scripted: ScriptedBackend) -> None:
    hold = asyncio.Event()
    scripted.then("Hello.", Script(["A ", "dragon ", "story"], hold=hold, hold_after=1), "Goodbye.")
    async with start_bot(parallel=1) as bot:  # one reply at a time, in all channels
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        [old] = await ask(world, bot, world.general, world.ann, "Say hello.")
        stored = answers(db, where)
        busy = await send(world, world.random, world.mod, "Write a long story about a dragon.")
        await world.fake.wait_for_bot_message(world.random, after=busy)  # held open: it keeps the only slot
        newer = await send(world, world.general, world.ann, "Now say goodbye.")  # waits
        await world.fake.wait_for(lambda: replies_to(world.fake, world.general, newer))  # "#1 in line"
        pressed = await world.fake.press_button(old, button(old, REGENERATE), world.ann)  # queued behind it...
        await world.fake.wait_for(lambda: pressed.followups)
        hold.set()
        await world.fake.wait_for(lambda: not bot.ctx.replies.redoing)
        await idle(world.fake, bot)
        assert pressed.response_types == [6] and [m["flags"] & 64 for m in pressed.followups] == [64, 64]
        assert [m["content"] for m in pressed.followups] == ["\u23f3 Busy: you're #2 in line.", NOT_NEWEST]  # ...then refused
        assert custom_ids(old) == [] and answers(db, where)[: len(stored)] == stored  # nothing rewritten
        assert [a[0] for a in answers(db, where)] == ["Hello.", "Goodbye."]
        assert world.fake.bot_messages(world.general)[-1]["message_reference"]["message_id"] == newer["id"]
    assert len(scripted.calls) == 3  # the model was never asked to regenerate


async def test_regenerate_rewrites_every_page_of_a_long_answer(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    where = scope(world, world.general)
    long = " ".join(f"Chapter {i}: Ember the dragon flew over the hills and the sea." for i in range(60))
    assert len(long) > 2 * 2000 - 500
    scripted.then(Script.text(long, words_per_piece=4), "Ember slept.")
    async with start_bot(db=db, n_predict=700) as bot:  # long enough for two Discord messages
        pages = await ask(world, bot, world.general, world.ann, "Write a very long and detailed story about a dragon named Ember.")
    assert len(pages) >= 2 and all(custom_ids(p) == [] for p in pages[:-1]) and custom_ids(pages[-1]) != []  # buttons under the last page
    [(old_text, _, first, last, _)] = answers(db, where)
    assert old_text == long and (first, last) == (pages[0]["id"], pages[-1]["id"]) and [p["content"] for p in pages] == split_message(long)

    async with start_bot(db=db, n_predict=40) as bot:  # now the new answer fits in one message
        await press(world, bot, pages[-1], REGENERATE, world.ann)
        [(new_text, _, first, last, _)] = answers(db, where)
        shown = world.fake.bot_messages(world.general)
        assert new_text == "Ember slept." and [m["content"] for m in shown] == ["Ember slept."]
        assert shown[0]["id"] == pages[0]["id"] == first == last  # the first page kept its place; the rest went
        assert all(world.fake.message(p["id"]) is None and p["_deleted"] for p in pages[1:])
        assert REGENERATE in button(shown[0], REGENERATE)


async def test_a_blocked_user_cannot_press_buttons(world: World, start_bot, scripted: ScriptedBackend, tmp_path: Path) -> None:
    """BLOCKED_USER_IDS holds for buttons too: a press gets the same short refusal as a command."""
    db = tmp_path / "kept.sqlite3"
    async with start_bot(db=db, stream=False) as first:
        [reply] = await ask(world, first, world.general, world.ann, "Name a colour.")
    before = answers(db, scope(world, world.general))
    async with start_bot(db=db, stream=False, blocked_user_ids=frozenset({int(world.ann["id"])})) as bot:
        refused = await press(world, bot, reply, REGENERATE, world.ann)
        assert refused.ephemeral and refused.content == REFUSED_BLOCKED
    assert answers(db, scope(world, world.general)) == before and len(scripted.calls) == 1


# --- a model server (BACKEND=openai) ----------------------------------------------------------


async def test_continue_with_a_model_server_only_where_the_bot_renders_the_prompt(world: World, tmp_path: Path) -> None:
    """OPENAI_MODE=chat: the server applies its template and may start a new turn, so no
    Continue. OPENAI_MODE=completions: the bot's own template leaves the answer open, and the
    server is asked to go on from it. (A scripted server; the real one: tests/test_engine_remote.py.)"""
    async with ScriptedServer([chat_reply("Waves ", "roll ", "on", finish="length")]) as server:
        async with remote_bot(world, remote_settings(tmp_path, server.base, stream=False, n_predict=16)) as bot:
            [chatted] = await ask(world, bot, world.general, world.ann, "Write a long poem about the sea.")
            assert chatted["content"] == "Waves roll on"
            assert custom_ids(chatted) == [button(chatted, REGENERATE)]
    first = Step([event(text("Waves ")), event(text("roll ")), event(text("on", finish="length"))])
    more = Step([event(text(", and on.")), event(text("", finish="stop"))])
    async with ScriptedServer([first, more]) as server:
        # (no catch-up: on its first start it would also answer the mention above, which this database never saw)
        settings = remote_settings(tmp_path / "c", server.base, openai_mode="completions", prompt_template="chatml", stream=False, n_predict=16, catchup_max_messages=0)
        async with remote_bot(world, settings) as bot:
            [reply] = await ask(world, bot, world.random, world.ann, "Write a long poem about the sea.")
            assert reply["content"] == "Waves roll on" and CONTINUE in ":".join(custom_ids(reply))
            pressed = await press(world, bot, reply, CONTINUE, world.ann)
            assert pressed.errors == [] and pressed.followups == []
            [(new_text, *_)] = answers(settings.database_path, scope(world, world.random))
            assert new_text == reply["content"] == "Waves roll on, and on."
        asked, going_on = server.completions
    assert asked.path == going_on.path == "/v1/completions"
    assert asked.body["prompt"].endswith("<|im_start|>assistant\n")
    assert going_on.body["prompt"] == asked.body["prompt"] + "Waves roll on"  # the same turn, left open after the answer


async def test_continue_keeps_the_space_between_the_old_text_and_the_new(world: World, tmp_path: Path) -> None:
    """A continuation that starts with a word gap (" and ...") keeps it: only a new answer's
    leading whitespace is dropped, so Continue never glues two words together."""
    first = Step([event(text("The sea is")), event(text(" deep", finish="length"))])
    more = Step([event(text(" and")), event(text(" wide.")), event(text("", finish="stop"))])
    async with ScriptedServer([first, more]) as server:
        settings = remote_settings(tmp_path, server.base, openai_mode="completions", prompt_template="chatml", stream=False, n_predict=16)
        async with remote_bot(world, settings) as bot:
            [reply] = await ask(world, bot, world.random, world.ann, "Describe the sea.")
            assert reply["content"] == "The sea is deep"
            pressed = await press(world, bot, reply, CONTINUE, world.ann)
            assert pressed.errors == []
            [(new_text, *_)] = answers(settings.database_path, scope(world, world.random))
            assert new_text == reply["content"] == "The sea is deep and wide."
