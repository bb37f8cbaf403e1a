"""The conversation service (bot/conversations/service.py) on the real model and a real
SQLite file: prompts from stored history, the context window, KV reuse; and Continue's
open-answer prompts on every template."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.conversations.service import CUT_NOTE, WINDOW_REFILL, ChatService, OpenAnswer, UserMessage
from bot.config import Settings
from bot.engine.local import Engine
from bot.conversations.store import Store
from bot.formats.templates import TEMPLATES, JinjaTemplate, Message, prompt_text
from tests.references import HF_TEMPLATES

REFERENCE_TEMPLATES = HF_TEMPLATES


async def test_reply_is_generated_and_stored(chat: ChatService, settings: Settings) -> None:
    reply = await chat.respond(UserMessage("dm:42", "What is the capital of France?", author_id="42", author_name="Ann", platform_message_id="9001"))
    # The user's message is on disk before the reply exists (read through another connection),
    # pending: not yet part of the conversation any other prompt sees.
    with sqlite3.connect(settings.database_path) as db:
        rows = db.execute("SELECT role, content, author_name, platform_message_id, status FROM messages").fetchall()
    assert rows == [("user", "What is the capital of France?", "Ann", "9001", "pending")]

    text = await reply.text()
    assert "Paris" in text
    saved = await reply.save(platform_message_id="9002")
    assert saved is not None
    with sqlite3.connect(settings.database_path) as db:
        roles = db.execute("SELECT role, content, status, token_count FROM messages ORDER BY id").fetchall()
    assert [(r[0], r[2]) for r in roles] == [("user", "ok"), ("assistant", "ok")]
    assert roles[1][1] == text and roles[1][2] == "ok" and roles[1][3] == len(reply.generation.tokens)


async def test_follow_up_sees_history(chat: ChatService) -> None:
    first = await chat.respond(UserMessage("dm:7", "My name is Zanzibar. Remember it.", author_name="Z"))
    await first.save()
    second = await chat.respond(UserMessage("dm:7", "What is my name?", author_name="Z"))
    assert [m.content for m in second.prompt.messages if m.role != "system"][:1] == ["My name is Zanzibar. Remember it."]
    assert second.prompt.n_history == 3
    await second.save()


async def test_guild_prompt_shows_who_said_what(chat: ChatService) -> None:
    await (await chat.respond(UserMessage("guild:1:channel:5", "I like tea.", author_name="Ann"))).save()
    reply = await chat.respond(UserMessage("guild:1:channel:5", "I like coffee.", author_name="Bob"))
    users = [m.content for m in reply.prompt.messages if m.role == "user"]
    assert users == ["Ann: I like tea.", "Bob: I like coffee."]  # two speakers: names shown
    await reply.save()
    dm = await chat.respond(UserMessage("dm:1", "hi", author_name="Ann"))
    assert [m.content for m in dm.prompt.messages if m.role == "user"] == ["hi"]  # one speaker: no names
    await dm.save()


async def test_history_far_longer_than_context(chat: ChatService, store: Store, engine: Engine, settings: Settings) -> None:
    conv = await store.conversation("guild:9:channel:9")
    for i in range(300):
        role = "user" if i % 2 == 0 else "assistant"
        await store.add_message(conv.id, role, f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * 4, author_name="Ann")
    reply = await chat.respond(UserMessage(conv.scope, "And the newest message?", author_name="Ann"))
    budget = engine.n_ctx - settings.n_predict
    assert len(reply.prompt.prepared.tokens) <= budget
    assert len(reply.prompt.prepared.tokens) > budget * WINDOW_REFILL * 0.8  # refilled to about WINDOW_REFILL, not just the last turn
    assert reply.prompt.messages[0].role == "system"
    assert reply.prompt.messages[-1].content == "And the newest message?"  # one speaker: no names
    assert "Turn 0:" not in " ".join(m.content for m in reply.prompt.messages)  # the oldest fell out of the prompt...
    await reply.save()
    assert await store.count_messages(conv.id) == 302  # ...but never out of the database
    assert reply.finish_reason in ("stop", "length")


async def test_single_message_longer_than_window_is_cut(chat: ChatService, engine: Engine, settings: Settings) -> None:
    huge = "This sentence repeats to make a very long message. " * 600  # about 6,000 tokens
    reply = await chat.respond(UserMessage("dm:99", huge, author_name="Ann"))
    assert reply.prompt.cut and CUT_NOTE in reply.notes
    assert len(reply.prompt.prepared.tokens) <= engine.n_ctx - settings.n_predict
    assert (await reply.text()).strip()
    assert reply.finish_reason in ("stop", "length")
    await reply.save()


async def test_reset_clears_only_its_conversation(chat: ChatService, store: Store) -> None:
    for scope in ("dm:1", "dm:2"):
        await (await chat.respond(UserMessage(scope, "hello"))).save()
    assert await chat.reset("dm:1") == 2
    assert await store.count_messages((await store.conversation("dm:1")).id) == 0
    assert await store.count_messages((await store.conversation("dm:2")).id) == 2


async def test_template_switch_is_stored_and_used(chat: ChatService, store: Store) -> None:
    assert await chat.set_template("dm:5", "vicuna-chat") == "vicuna-chat"
    reply = await chat.respond(UserMessage("dm:5", "hello"))
    assert reply.prompt.template.name == "vicuna-chat"
    assert (await store.conversation("dm:5")).template == "vicuna-chat"
    await reply.save()


async def test_window_keeps_its_start_so_the_kv_cache_is_reused(chat: ChatService, store: Store, engine: Engine, settings: Settings) -> None:
    """Past the context, the prompt's oldest turn stays put across messages (one re-evaluation, not one per message)."""
    conv = await store.conversation("dm:window")
    for i in range(60):
        await store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"Turn {i}: " + "lorem ipsum dolor sit amet " * 5)
    first = await chat.respond(UserMessage(conv.scope, "First new question?"))
    await first.save()
    budget = engine.n_ctx - settings.n_predict
    assert len(first.prompt.prepared.tokens) <= budget * WINDOW_REFILL + 64
    second = await chat.respond(UserMessage(conv.scope, "Second new question?"))
    await second.text()
    assert second.prompt.messages[1] == first.prompt.messages[1]  # same oldest turn: same prefix
    assert second.generation.n_cached >= len(first.prompt.prepared.tokens) - 1
    assert second.generation.n_evaluated < 64  # only the new turns were evaluated
    await second.save()


async def test_reset_and_template_invalidate_the_cache(chat: ChatService) -> None:
    first = await chat.respond(UserMessage("dm:cache", "Hello there"))
    await first.save()
    follow = await chat.respond(UserMessage("dm:cache", "And again"))
    await follow.save()
    assert follow.generation.n_cached > 0
    await chat.reset("dm:cache")
    after_reset = await chat.respond(UserMessage("dm:cache", "Hello there"))
    await after_reset.save()
    assert after_reset.generation.n_cached == 0
    await chat.set_template("dm:cache", "chatml")
    after_switch = await chat.respond(UserMessage("dm:cache", "Hi"))
    await after_switch.save()
    assert after_switch.generation.n_cached == 0


async def test_conversation_settings_in_the_chat_layer(chat, engine) -> None:
    from bot.conversations.service import SettingError

    options = await chat.change_options("terminal:a", n_predict=2, top_p=0.5)
    assert (options.n_predict, options.sampling.top_p, options.own) == (2, 0.5, frozenset({"n_predict", "top_p"}))
    reply = await chat.respond(UserMessage("terminal:a", "Tell me a long story."))
    await reply.save()
    assert reply.generation.n_generated <= 2
    other = await chat.respond(UserMessage("terminal:b", "Tell me a long story."))
    await other.save()
    assert other.generation.n_generated > 2  # another conversation keeps the defaults
    with pytest.raises(SettingError, match="top_p must be from 0 to 1, not 1.5"):
        await chat.change_options("terminal:a", top_p=1.5, n_predict=5)
    assert chat.options(await chat.store.conversation("terminal:a")).n_predict == 2  # a refused change changes nothing
    with pytest.raises(SettingError, match="here it may be at most"):
        await chat.set_system_prompt("terminal:a", "You are a very verbose assistant. " * 300)
    with pytest.raises(SettingError, match="cannot be empty"):
        await chat.set_system_prompt("terminal:a", "   ")
    await chat.set_system_prompt("terminal:a", "You are a cat.")
    prompt = await chat.build_prompt(await chat.store.conversation("terminal:a"))
    assert prompt.messages[0].content == "You are a cat."
    await chat.set_system_prompt("terminal:a", None)
    prompt = await chat.build_prompt(await chat.store.conversation("terminal:a"))
    assert prompt.messages[0].content == chat.settings.system_prompt


# --- Continue: the prompt that leaves the answer open ---------------------------------------


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


async def test_odd_but_real_text_is_read_by_the_real_tokenizer_and_answered(chat: ChatService, settings: Settings) -> None:
    """Emoji, zalgo, right-to-left text, 4,000 characters, a huge code block: tokenized (and cut
    to fit) by the real vocabulary and stored whole; the short ones answered by the model too
    (the long ones only cost time to read). (Through Discord: test_discord_intake.py.)"""
    from dataclasses import replace

    from tests.test_discord_intake import ODD

    chat.settings = replace(chat.settings, n_predict=4)
    for name, content in ODD.items():
        if len(content) > 1000:
            stored = await chat.receive(UserMessage(f"dm:odd-{name}", content, author_name="Ann"))
            prompt = await chat.build_prompt(await chat.store.conversation(f"dm:odd-{name}"), include=stored)
            assert prompt.prepared.tokens and len(prompt.prepared.tokens) <= chat.backend.n_ctx - 4
            assert content.startswith(prompt.messages[-1].content) and len(prompt.messages[-1].content) > 500
            continue
        reply = await chat.respond(UserMessage(f"dm:odd-{name}", content, author_name="Ann"))
        assert reply.prompt.prepared.tokens and not reply.prompt.cut and reply.prompt.messages[-1].content == content
        await reply.save()
        assert reply.finish_reason in ("stop", "length")
    with sqlite3.connect(settings.database_path) as db:
        stored = db.execute("SELECT content FROM messages WHERE role = 'user' ORDER BY id").fetchall()
    assert [r[0] for r in stored] == list(ODD.values())  # stored whole, even when the prompt had to cut it
