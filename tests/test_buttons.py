"""Buttons under replies (Stop, Regenerate, Continue), end to end: the real discord.py
client against the local fake Discord API, the real model, a real SQLite file.

What Discord shows is read from the fake (message contents and components), what
the bot remembers from the database and from the prompt it would build next."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.conversations.service import NOT_NEWEST, OpenAnswer
from bot.config import Sampling
from bot.discord_adapter.access import REFUSED_BLOCKED
from bot.discord_adapter.buttons import NOT_YOURS
from bot.discord_adapter.client import LlamaBot
from bot.discord_adapter.output import split_message
STOP, REGENERATE, CONTINUE = "stop", "regen", "cont"  # what a button's custom_id says it does
from bot.formats.templates import TEMPLATES, JinjaTemplate, Message, prompt_text
from tests.conftest import JSON, World, mention, scope
from tests.references import HF_TEMPLATES
from tests.fakediscord import Interaction
from tests.test_discord import ask
from tests.test_remote import LlamaServer, remote_bot, remote_settings

REFERENCE_TEMPLATES = HF_TEMPLATES
SAMPLED = Sampling(temperature=0.9, seed=1234)  # reproducible, and Regenerate really draws anew


def custom_ids(message: JSON) -> list[str]:
    """The custom ids of a message's buttons, as Discord shows them."""
    return [c["custom_id"] for row in message.get("components") or [] for c in row.get("components") or [] if "custom_id" in c]


def button(message: JSON, action: str) -> str:
    [found] = [c for c in custom_ids(message) if c.startswith(f"llamabot:{action}:")]
    return found


def answers(db: Path, where: str) -> list[tuple[str, str, str | None, str | None, int | None]]:
    """(content, status, first message id, last message id, tokens) of the stored answers of a scope."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT m.content, m.status, m.platform_message_id, m.reply_message_id, m.token_count FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id WHERE c.scope = ? AND m.role = 'assistant' ORDER BY m.id",
            (where,),
        ).fetchall()


async def press(world: World, bot: LlamaBot, message: JSON, action: str, user: JSON) -> Interaction:
    """Press one of our buttons; wait for the acknowledgement and for the work it started."""
    interaction = await world.fake.press_button(message, button(message, action), user)
    await world.fake.wait_for(lambda: interaction.acked_at is not None, 10)
    await world.fake.wait_for(lambda: not bot.ctx.replies.redoing and bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 120)
    return interaction


def bob(world: World) -> JSON:
    """A regular member who did not write the message (and is no moderator)."""
    user = world.fake.add_user("bob", global_name="Bob")
    world.fake.add_member(world.guild, user)
    return user


def assert_refused(interaction: Interaction) -> None:
    assert interaction.response_types == [4] and interaction.ephemeral and interaction.content == NOT_YOURS
    assert interaction.latency is not None and interaction.latency < 3


async def test_stop_button_is_for_the_author_and_admins(world: World, start_bot) -> None:
    other = bob(world)
    async with start_bot(n_predict=400) as bot:
        db = bot.ctx.settings.database_path
        for user in (world.ann, world.mod):  # the author, then a moderator stopping Ann's reply
            sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a very long story about a dragon named Ember.")
            [reply] = await world.fake.wait_for_bot_message(world.general, after=sent)
            assert custom_ids(reply) == [f"llamabot:stop:{sent['id']}:{world.ann['id']}"]  # shown while it is written
            refused = await world.fake.press_button(reply, button(reply, STOP), other)
            await refused.wait_done()
            assert_refused(refused)
            assert bot.ctx.replies.reply_in(scope(world, world.general)) is not None  # still writing
            stop = await world.fake.press_button(reply, button(reply, STOP), user)
            await world.fake.wait_for(lambda: reply["content"].endswith("*(stopped)*"), 60)
            assert stop.response_types == [6] and stop.errors == []
            await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0)
            # Done: Stop is gone; what was written can be regenerated (it did not end at the length limit).
            assert custom_ids(reply) == [f"llamabot:regen:{sent['id']}:{world.ann['id']}"]
            content, status, first, last, tokens = answers(db, scope(world, world.general))[-1]
            assert status == "stopped" and first == last == reply["id"] and tokens is not None and tokens < 400
            assert reply["content"] == content + " *(stopped)*"

        # A Regenerate can be stopped too: the stopped new answer replaces the old one.
        count = len(answers(db, scope(world, world.general)))
        regenerate = await world.fake.press_button(reply, button(reply, REGENERATE), world.ann)
        await world.fake.wait_for(lambda: custom_ids(reply) == [f"llamabot:stop:{sent['id']}:{world.ann['id']}"], 30)
        await world.fake.press_button(reply, button(reply, STOP), world.ann)
        await world.fake.wait_for(lambda: not bot.ctx.replies.redoing and bot.ctx.scheduler.running == 0, 60)
        assert regenerate.response_types == [6] and regenerate.followups == []
        stored = answers(db, scope(world, world.general))
        assert len(stored) == count and stored[-1][1] == "stopped" and reply["content"] == stored[-1][0] + " *(stopped)*"
        assert custom_ids(reply) == [f"llamabot:regen:{sent['id']}:{world.ann['id']}"]


async def test_regenerate_replaces_the_answer_in_place(world: World, start_bot) -> None:
    other = bob(world)
    async with start_bot(sampling=SAMPLED, stream=False) as bot:
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        await ask(world, bot, world.general, world.ann, "My name is Ann and I like sailing.")
        [reply] = await ask(world, bot, world.general, world.ann, "Tell me a short fact about the sea.")
        before = answers(db, where)
        old_text = reply["content"]
        assert before[-1][0] == old_text and before[-1][2] == before[-1][3] == reply["id"]

        refused = await press(world, bot, reply, REGENERATE, other)
        assert_refused(refused)
        assert reply["content"] == old_text and answers(db, where) == before

        pressed = await press(world, bot, reply, REGENERATE, world.ann)
        assert pressed.response_types == [6] and pressed.errors == [] and pressed.followups == []
        after = answers(db, where)
        new_text = after[-1][0]
        assert new_text != old_text and reply["content"] == new_text  # the same message, edited in place
        assert len(after) == len(before) and after[:-1] == before[:-1]  # the old answer is gone, nothing else changed
        assert after[-1][2] == after[-1][3] == reply["id"]
        assert [m["id"] for m in world.fake.bot_messages(world.general)][-1] == reply["id"]  # no new message
        assert REGENERATE in button(reply, REGENERATE)

        # The next prompt holds the new answer where the old one was.
        prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(where))
        contents = [m.content for m in prompt.messages]
        assert contents[-1] == new_text and old_text not in contents


async def test_continue_extends_the_answer_that_hit_the_length_limit(world: World, start_bot) -> None:
    other = bob(world)
    async with start_bot(n_predict=16) as bot:
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        [reply] = await ask(world, bot, world.general, world.ann, "Write a long poem about the moon and the stars.")
        [(old_text, _, _, _, old_tokens)] = answers(db, where)
        assert old_tokens == 16 and reply["content"] == old_text
        assert custom_ids(reply) == [f"llamabot:{a}:{reply['message_reference']['message_id']}:{world.ann['id']}" for a in ("regen", "cont")]

        # The continuation's prompt ends inside the answer's turn (SmolLM2 is ChatML): no <|im_end|> after it.
        continued = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(where), open_answer=True)
        vocab = bot.ctx.chat.backend.engine.vocab  # type: ignore[attr-defined]
        [im_start], [im_end] = vocab.tokenize("<|im_start|>", special=True), vocab.tokenize("<|im_end|>", special=True)
        tokens = continued.prepared.tokens
        tail = tokens[len(tokens) - tokens[::-1].index(im_start) :]  # after the last <|im_start|>
        assert im_end not in tail and vocab.text_of(tail) == "assistant\n" + old_text

        refused = await press(world, bot, reply, CONTINUE, other)
        assert_refused(refused)
        assert answers(db, where) == [(old_text, "ok", reply["id"], reply["id"], 16)]

        pressed = await press(world, bot, reply, CONTINUE, world.ann)
        assert pressed.response_types == [6] and pressed.errors == []
        [(new_text, status, first, last, tokens)] = answers(db, where)
        assert new_text.startswith(old_text) and len(new_text) > len(old_text)
        assert status == "ok" and first == last == reply["id"] and 16 < tokens <= 32
        assert reply["content"] == new_text  # the same message, extended
        assert (CONTINUE in ":".join(custom_ids(reply))) == (tokens == 32)  # offered again only at the limit again
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
        with pytest.raises(ValueError, match="has no button"):  # Discord would not even offer the press
            await world.fake.press_button(first, f"llamabot:regen:{first['message_reference']['message_id']}:{world.ann['id']}", world.ann)
        assert custom_ids(other_channel) != []


async def test_buttons_work_after_a_restart_and_for_admins(world: World, start_bot, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    where = scope(world, world.general)
    async with start_bot(db=db, n_predict=16, sampling=SAMPLED) as bot:
        [reply] = await ask(world, bot, world.general, world.ann, "Write a long story about a lighthouse keeper.")
    [(old_text, *_)] = answers(db, where)
    async with start_bot(db=db, n_predict=16, sampling=SAMPLED) as bot:  # a new process: nothing in memory
        continued = await press(world, bot, reply, CONTINUE, world.ann)
        assert continued.response_types == [6] and continued.errors == []
        [(longer, *_)] = answers(db, where)
        assert longer.startswith(old_text) and len(longer) > len(old_text) and reply["content"] == longer
        regenerated = await press(world, bot, reply, REGENERATE, world.mod)  # a moderator, on Ann's reply
        assert regenerated.response_types == [6] and regenerated.errors == []
        [(new_text, *_)] = answers(db, where)
        assert new_text != longer and reply["content"] == new_text


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaServer]:
    srv = LlamaServer(model_path).start()
    yield srv
    srv.stop()


async def test_continue_with_a_model_server_only_where_the_bot_renders_the_prompt(world: World, server: LlamaServer, tmp_path: Path) -> None:
    # OPENAI_MODE=chat: the server applies its template and may start a new turn, so no Continue.
    async with remote_bot(world, remote_settings(tmp_path, server.base, stream=False, n_predict=16)) as bot:
        [chatted] = await ask(world, bot, world.general, world.ann, "Write a long poem about the sea.")
        assert [a[4] for a in answers(bot.ctx.settings.database_path, scope(world, world.general))] == [16]
        assert custom_ids(chatted) == [button(chatted, REGENERATE)]
    # OPENAI_MODE=completions: the bot's own template leaves the answer open; the server continues it.
    settings = remote_settings(tmp_path / "c", server.base, openai_mode="completions", prompt_template="chatml", stream=False, n_predict=16)
    async with remote_bot(world, settings) as bot:
        [reply] = await ask(world, bot, world.random, world.ann, "Write a long poem about the sea.")
        [(old_text, *_)] = answers(settings.database_path, scope(world, world.random))
        pressed = await press(world, bot, reply, CONTINUE, world.ann)
        assert pressed.errors == [] and pressed.followups == []
        [(new_text, *_)] = answers(settings.database_path, scope(world, world.random))
        assert new_text.startswith(old_text) and len(new_text) > len(old_text) and reply["content"] == new_text


def _conversation() -> list[Message]:
    return [Message("system", "Be brief."), Message("user", "Hello there"), Message("assistant", "The answer is")]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_open_answer_leaves_the_answer_turn_open(name: str) -> None:
    """Continue's prompt is the conversation as the template writes it, cut right after the answer."""
    template = TEMPLATES[name]
    closed = prompt_text(template.render(_conversation(), add_generation_prompt=False))
    opened = prompt_text(OpenAnswer(template).render(_conversation()))
    assert opened.endswith("The answer is") and closed.startswith(opened) and len(closed) > len(opened)


def _reference(path: Path) -> Any:
    return JinjaTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>", name=path.stem)


@pytest.mark.parametrize("path", sorted(REFERENCE_TEMPLATES.glob("*.jinja")), ids=lambda p: p.stem)
def test_open_answer_with_real_chat_templates(path: Path) -> None:
    template = _reference(path)
    opened = OpenAnswer(template).render(_conversation())
    text = prompt_text(opened)
    assert opened[-1].text == "The answer is" and not opened[-1].special  # people's text, never markup
    try:
        closed = prompt_text(template.render(_conversation(), add_generation_prompt=False))
    except Exception:  # Mistral Nemo cannot end on an answer: its generation prompt, then the answer
        asked = prompt_text(template.render(_conversation()[:-1], add_generation_prompt=True))
        assert text == asked + "The answer is"
        return
    assert closed.startswith(text) and len(closed) > len(text)
    if template.harmony:  # gpt-oss: inside the final channel, so the reply is plain text up to <|return|>
        assert text.endswith("<|channel|>final<|message|>The answer is")
        assert not OpenAnswer(template).harmony and "<|return|>" in OpenAnswer(template).stop


async def test_regenerate_waits_its_turn_and_refuses_once_a_newer_answer_exists(world: World, start_bot) -> None:
    async with start_bot(parallel=1, n_predict=300) as bot:  # one reply at a time, in all channels
        db = bot.ctx.settings.database_path
        where = scope(world, world.general)
        [old] = await ask(world, bot, world.general, world.ann, "Say hello.")
        stored = answers(db, where)
        busy = await world.fake.send_message(world.random, world.mod, f"{mention(world.fake)} Write a long story about a dragon.")
        await world.fake.wait_for_bot_message(world.random, after=busy)
        newer = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Now say goodbye.")  # waits
        pressed = await press(world, bot, old, REGENERATE, world.ann)  # queued behind it, then refused
        assert pressed.response_types == [6] and [m["flags"] & 64 for m in pressed.followups] == [64, 64]
        assert [m["content"] for m in pressed.followups] == ["\u23f3 Busy: you're #2 in line.", NOT_NEWEST]
        assert custom_ids(old) == [] and answers(db, where)[: len(stored)] == stored  # nothing rewritten
        assert len(answers(db, where)) == 2 and world.fake.bot_messages(world.general)[-1]["message_reference"]["message_id"] == newer["id"]


async def test_regenerate_rewrites_every_page_of_a_long_answer(world: World, start_bot, tmp_path: Path) -> None:
    db = tmp_path / "kept.sqlite3"
    where = scope(world, world.general)
    async with start_bot(db=db, n_predict=700, sampling=SAMPLED) as bot:  # long enough for two Discord messages
        pages = await ask(world, bot, world.general, world.ann, "Write a very long and detailed story about a dragon named Ember, with many chapters.", timeout=300)
    assert len(pages) >= 2 and custom_ids(pages[0]) == [] and custom_ids(pages[-1]) != []  # buttons under the last page
    [(old_text, _, first, last, _)] = answers(db, where)
    assert (first, last) == (pages[0]["id"], pages[-1]["id"]) and [p["content"] for p in pages] == split_message(old_text)

    async with start_bot(db=db, n_predict=40, sampling=SAMPLED) as bot:  # now the new answer fits in one message
        await press(world, bot, pages[-1], REGENERATE, world.ann)
        [(new_text, _, first, last, _)] = answers(db, where)
        shown = world.fake.bot_messages(world.general)
        assert new_text != old_text and [m["content"] for m in shown] == split_message(new_text) == [new_text]
        assert shown[0]["id"] == pages[0]["id"] == first == last  # the first page kept its place; the rest went
        assert world.fake.message(pages[-1]["id"]) is None and pages[-1]["_deleted"]
        assert REGENERATE in button(shown[0], REGENERATE)


async def test_a_blocked_user_cannot_press_buttons(world: World, start_bot, tmp_path: Path) -> None:
    """BLOCKED_USER_IDS holds for buttons too: a press gets the same short refusal as a command."""
    db = tmp_path / "kept.sqlite3"
    async with start_bot(db=db, stream=False, n_predict=12) as first:
        [reply] = await ask(world, first, world.general, world.ann, "Name a colour.")
    before = answers(db, scope(world, world.general))
    async with start_bot(db=db, stream=False, n_predict=12, blocked_user_ids=frozenset({int(world.ann["id"])})) as bot:
        refused = await press(world, bot, reply, REGENERATE, world.ann)
        assert refused.ephemeral and refused.content == REFUSED_BLOCKED
    assert answers(db, scope(world, world.general)) == before
