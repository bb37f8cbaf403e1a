"""Warm-ups (Engine.warm, ChatService.warm): a conversation's state made ready while its member
types, on the real model. Nothing here depends on how fast the CPU is: tests wait for the
engine's own counters, and a warm-up's deadline is far away unless a test is about it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bot.config import Sampling
from bot.conversations.service import ChatService, UserMessage
from bot.conversations.store import Store
from bot.engine.local import Engine, EngineOptions, LocalBackend
from tests.conftest import make_settings
from tests.test_engine_kvdisk import chat_tokens, saved_conversation, state_file

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
THREADS = len(os.sched_getaffinity(0))
TURNS = [
    f"Question {i}: tell me about the number {i} in some detail please."
    if i % 2 == 0
    else f"The number {i} is a fine number with many properties that people have studied for a long time."
    for i in range(16)
]  # about 430 tokens of history


def options(**changes: object) -> EngineOptions:
    base: dict[str, object] = dict(n_ctx=1024, n_threads=THREADS, parallel=2, kv_cache_mb=16, warm_ttl_s=3600.0)
    base.update(changes)
    return EngineOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def warm_engine(model_path: Path) -> Iterator[Engine]:
    """Two slots, and a warm-up deadline no test reaches unless it is about that."""
    engine = Engine.load_sync(model_path, options())
    yield engine
    engine.close_sync()


async def until(condition: Callable[[], bool], timeout: float = 600) -> None:
    """Wait for the engine to reach a state (polling; the timeout only stops a hung test)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def history(engine: Engine, *turns: str) -> list[int]:
    """A conversation up to its last turn, as the next message's prompt will start (no generation prompt)."""
    from bot.formats.templates import Message, get_template

    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    messages = [Message("system", "You are a helpful assistant.")]
    messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return engine.vocab.encode(template.render(messages, add_generation_prompt=False))


async def reply(engine: Engine, key: str, tokens: list[int], max_tokens: int = 6):  # noqa: ANN201
    return await engine.generate(key, tokens, max_tokens=max_tokens, sampling=GREEDY).wait()


# --- the engine ------------------------------------------------------------------------------


async def test_a_state_that_is_nowhere_is_evaluated_ahead_and_the_reply_reads_only_its_message(warm_engine: Engine) -> None:
    engine = warm_engine
    before = replace(engine.warm_stats)
    prefix = history(engine, *TURNS)
    full = chat_tokens(engine, *TURNS, "And what about seventeen?")
    assert full[: len(prefix)] == prefix
    reference = await reply(engine, "nowhere-reference", full)  # the same prompt, read whole
    assert reference.n_cached == 0

    assert engine.warm("nowhere", prefix)
    await until(lambda: engine.warming == 0)
    stats = engine.warm_stats
    assert (stats.started - before.started, stats.tokens - before.tokens) == (1, len(prefix))
    gen = await reply(engine, "nowhere", full)
    assert gen.n_cached == len(prefix) and gen.n_evaluated == len(full) - len(prefix)
    assert gen.tokens == reference.tokens
    assert engine.warm_stats.used - before.used == 1 and engine.warm_stats.wasted == before.wasted


async def test_a_reply_for_another_conversation_preempts_a_warm_up_mid_evaluation(warm_engine: Engine) -> None:
    """The reply arrives while a warm-up decode runs: that decode is aborted, the reply is
    served (and is what it would have been), then the warm-up finishes and is used."""
    engine = warm_engine
    before = replace(engine.warm_stats)
    other = chat_tokens(engine, "Name a color.")
    reference = await reply(engine, "preempt-reference", other)
    prefix = history(engine, *TURNS, "One more question.", "One more answer.")

    assert engine.warm("preempted", prefix)
    await until(lambda: engine.warm_decoding == "preempted")
    gen = await reply(engine, "preempt-other", other)
    assert engine.warm_stats.preempted - before.preempted == 1
    assert gen.tokens == reference.tokens and gen.n_cached == 0

    await until(lambda: engine.warming == 0)
    assert engine.warm_stats.tokens - before.tokens == len(prefix)  # nothing evaluated twice: the aborted micro-batch was not counted
    follow = await reply(engine, "preempted", chat_tokens(engine, *TURNS, "One more question.", "One more answer.", "Thanks!"))
    assert follow.n_cached == len(prefix)
    assert engine.warm_stats.used - before.used == 1


async def test_no_warm_up_for_a_conversation_being_answered_and_at_most_one_per_slot(warm_engine: Engine) -> None:
    engine = warm_engine
    story = engine.generate("busy", chat_tokens(engine, "Write a long story about a dragon."), max_tokens=400, sampling=GREEDY)
    async for _ in story.stream():
        break  # it is generating
    assert not engine.warm("busy", history(engine, "Hi", "Hello"))  # its state will be in its slot anyway
    story.cancel()
    await story.wait()
    keys = [f"many-{i}" for i in range(engine.options.parallel + 1)]
    accepted = [engine.warm(k, history(engine, f"Hi {k}", "Hello")) for k in keys]
    assert accepted == [True] * engine.options.parallel + [False]
    await until(lambda: engine.warming == 0)
    for k in keys[:-1]:  # used up, so the next tests start with no live warm-up
        await reply(engine, k, chat_tokens(engine, f"Hi {k}", "Hello", "Bye"), max_tokens=1)


async def test_forget_stops_a_warm_up_and_its_state_is_never_used(warm_engine: Engine) -> None:
    engine = warm_engine
    before = replace(engine.warm_stats)
    prefix = history(engine, *TURNS, "Another question.", "Another answer.")
    assert engine.warm("forgotten", prefix)
    await until(lambda: engine.warm_decoding == "forgotten")
    engine.forget("forgotten")  # /reset, an edit: the state being built is of the old history
    await until(lambda: engine.warm_stats.wasted - before.wasted == 1)
    assert engine.warm_stats.preempted - before.preempted == 1  # its decode was aborted...
    assert engine.warm_stats.tokens_wasted - before.tokens_wasted < len(prefix)  # ...before the whole history was read
    gen = await reply(engine, "forgotten", chat_tokens(engine, *TURNS, "Another question.", "Another answer.", "Hm?"))
    assert gen.n_cached == 0


async def test_a_warm_up_no_message_follows_is_dropped_and_counted(model_path: Path) -> None:
    engine = await Engine.load(model_path, options(warm_ttl_s=1.0, parallel=1))
    try:
        prefix = history(engine, *TURNS[:6])
        assert engine.warm("silent", prefix)
        await until(lambda: engine.warm_stats.wasted == 1)
        stats = engine.warm_stats
        assert stats.started == 1 and stats.used == 0
        assert stats.tokens_wasted == stats.tokens > 0 and stats.cpu_wasted_s == stats.cpu_s > 0
        assert engine.warming == 0
    finally:
        await engine.close()


# --- with the disk tier ------------------------------------------------------------------------


async def test_a_state_on_disk_is_restored_into_a_free_slot_ahead_of_its_message(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    first, gen = await saved_conversation(model_path, folder)  # a previous process answered once
    engine = await Engine.load(model_path, options(kv_disk_dir=folder, kv_disk_mb=64, kv_cache_mb=0, n_ctx=512, parallel=1))
    try:
        follow = chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?")
        assert engine.warm("guild:1:channel:2", history(engine, "Tell me about cats.", gen.text))
        await until(lambda: engine.warming == 0)
        assert engine.warm_stats.restored == 1 and engine.disk_restores == 1 and engine.warm_stats.tokens == 0
        again = await reply(engine, "guild:1:channel:2", follow)
        assert again.n_cached >= len(first) + len(gen.tokens) - 2  # from the slot the warm-up filled
        assert engine.disk_restores == 1  # the reply read nothing itself
        assert engine.warm_stats.used == 1
    finally:
        await engine.close()


async def test_a_restored_state_left_unused_is_given_up_without_a_save(model_path: Path, tmp_path: Path) -> None:
    """The warm-up restored a state the disk holds; another conversation then needs the only
    slot: nothing was added to the state, so it is dropped without a copy or a write."""
    folder = tmp_path / "kv"
    _, gen = await saved_conversation(model_path, folder)
    engine = await Engine.load(model_path, options(kv_disk_dir=folder, kv_disk_mb=64, kv_cache_mb=0, n_ctx=512, parallel=1, warm_ttl_s=1.0))
    try:
        disk = engine.disk
        assert disk is not None
        assert engine.warm("guild:1:channel:2", history(engine, "Tell me about cats.", gen.text))
        await until(lambda: engine.warming == 0)
        assert engine.disk_restores == 1
        mtime = state_file(folder, "guild:1:channel:2").stat().st_mtime_ns
        other = await reply(engine, "someone-else", chat_tokens(engine, "Name a color."))
        assert other.text.strip()
        disk.drain()
        assert engine.saves == 0 and engine.saves_skipped == 1
        assert disk.writes == 0 and state_file(folder, "guild:1:channel:2").stat().st_mtime_ns == mtime
        await until(lambda: engine.warm_stats.wasted == 1)  # no message came within WARM_TTL_S
        assert engine.warm_stats.tokens_wasted == 0 and engine.warm_stats.restored == 1
    finally:
        await engine.close()


async def test_a_reply_arriving_during_the_warm_up_read_waits_for_that_read(model_path: Path, tmp_path: Path) -> None:
    """Typing and sending at once: the reply does not read the file a second time."""
    folder = tmp_path / "kv"
    first, gen = await saved_conversation(model_path, folder)
    engine = await Engine.load(model_path, options(kv_disk_dir=folder, kv_disk_mb=64, kv_cache_mb=0, n_ctx=512, parallel=1))
    try:
        assert engine.warm("guild:1:channel:2", history(engine, "Tell me about cats.", gen.text))
        again = await reply(engine, "guild:1:channel:2", chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?"))
        assert again.n_cached >= len(first) + len(gen.tokens) - 2
        assert engine.disk_restores == 1
        await until(lambda: engine.warming == 0)
    finally:
        await engine.close()


# --- through ChatService -----------------------------------------------------------------------


@pytest.fixture
async def warm_chat(warm_engine: Engine, tmp_path: Path) -> AsyncIterator[ChatService]:
    settings = make_settings(tmp_path, n_predict=16)
    async with await Store.open(settings.database_path) as store:
        yield ChatService(LocalBackend(warm_engine), store, settings)


async def seed(chat: ChatService, scope: str, turns: list[str], author: str = "Ann") -> None:
    conversation = await chat.store.conversation(scope)
    for i, text in enumerate(turns):
        await chat.store.add_message(conversation.id, "user" if i % 2 == 0 else "assistant", text, author_id="1" if i % 2 == 0 else None, author_name=author if i % 2 == 0 else None)


async def test_chat_warms_the_prefix_the_next_message_extends(warm_chat: ChatService, warm_engine: Engine) -> None:
    scope = "guild:7:channel:typing"
    await seed(warm_chat, scope, TURNS[:8])
    before = replace(warm_engine.warm_stats)
    warmed = await warm_chat.build_prompt(await warm_chat.store.conversation(scope), upcoming="1")
    assert await warm_chat.warm(scope, author_id="1")
    await until(lambda: warm_engine.warming == 0)
    sent = await warm_chat.respond(UserMessage(scope, "And the next one?", author_id="1", author_name="Ann"))
    await sent.text()
    await sent.save()
    tokens = sent.prompt.prepared.tokens
    assert tokens[: warmed.prepared.n_tokens] == warmed.prepared.tokens  # the warmed prompt is exactly the reply's prefix
    assert sent.generation.n_cached == warmed.prepared.n_tokens
    assert sent.generation.n_evaluated == len(tokens) - warmed.prepared.n_tokens
    assert warm_engine.warm_stats.used - before.used == 1


async def test_chat_warm_knows_when_names_will_show(warm_chat: ChatService) -> None:
    """A second person typing in a guild channel: their message will make the prompt show who said what."""
    scope = "guild:7:channel:names"
    await seed(warm_chat, scope, TURNS[:4])
    conversation = await warm_chat.store.conversation(scope)
    same = await warm_chat.build_prompt(conversation, upcoming="1")
    other = await warm_chat.build_prompt(conversation, upcoming="2")
    assert not any("Ann:" in m.content for m in same.messages)
    assert any(m.content.startswith("Ann: ") for m in other.messages if m.role == "user")


async def test_chat_warm_does_nothing_it_should_not(warm_chat: ChatService, warm_engine: Engine, tmp_path: Path) -> None:
    before = replace(warm_engine.warm_stats)
    assert not await warm_chat.warm("guild:7:channel:never-spoken")  # no history: nothing to warm...
    with sqlite3.connect(warm_chat.settings.database_path) as db:  # ...and nothing written for it
        assert db.execute("SELECT COUNT(*) FROM conversations WHERE scope = 'guild:7:channel:never-spoken'").fetchone() == (0,)
    await seed(warm_chat, "dm:off", TURNS[:2])
    off = ChatService(warm_chat.backend, warm_chat.store, replace(warm_chat.settings, warm_on_typing=False))
    assert not await off.warm("dm:off")
    assert warm_engine.warm_stats.asked == before.asked


async def test_chat_reset_drops_a_warmed_state(warm_chat: ChatService, warm_engine: Engine) -> None:
    scope = "dm:reset-warm"
    await seed(warm_chat, scope, TURNS[:4])
    before = replace(warm_engine.warm_stats)
    assert await warm_chat.warm(scope)
    await until(lambda: warm_engine.warming == 0)
    await warm_chat.reset(scope)
    await until(lambda: warm_engine.warm_stats.wasted - before.wasted == 1)
    sent = await warm_chat.respond(UserMessage(scope, "Hello again"))
    await sent.text()
    await sent.save()
    assert sent.generation.n_cached == 0
