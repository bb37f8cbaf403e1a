"""The engine on the real model (bot/engine/local.py): stops, KV reuse, batching and micro-batches,
cancellation, the state cache, and giving up after repeated faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Sampling
from bot.engine.backend import PromptTooLong
from bot.engine.local import Engine, EngineDead, EngineOptions
from bot.formats.reasoning import ReplyFormat, find_stop, held_back
from bot.formats.templates import Message, get_template
from tests.conftest import ENGINE_THREADS
from tests.test_engine_warm import until

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)


def chat_tokens(engine: Engine, *turns: str) -> list[int]:
    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    messages = [Message("system", "You are a helpful assistant.")]
    for i, turn in enumerate(turns):
        messages.append(Message("user" if i % 2 == 0 else "assistant", turn))
    return engine.vocab.encode(template.render(messages))


async def generate(engine: Engine, key: str, tokens: list[int], **kw: object):
    gen = engine.generate(key, tokens, max_tokens=kw.pop("max_tokens", 24), sampling=kw.pop("sampling", GREEDY), **kw)  # type: ignore[arg-type]
    return await gen.wait()


async def test_stop_string_never_leaks(engine: Engine) -> None:
    tokens = chat_tokens(engine, "What is the capital of France?")
    free = await generate(engine, "stop-a", tokens, max_tokens=40)
    assert "Paris" in free.text
    chunks = []
    gen = engine.generate("stop-b", tokens, max_tokens=40, sampling=GREEDY, fmt=ReplyFormat(stop=("Paris",)))
    async for chunk in gen.stream():
        chunks.append(chunk)
    assert gen.finish_reason == "stop"
    assert gen.text == free.text[: free.text.index("Paris")]
    assert "Paris" not in "".join(chunks) and "".join(chunks) == gen.text


async def test_plain_greedy_picks_what_the_sampler_chain_picks(engine: Engine) -> None:
    """Greedy without a repeat penalty skips llama.cpp's sampler chain for an argmax; a chain
    that keeps only the top token (top_k=1) must choose exactly the same tokens."""
    tokens = chat_tokens(engine, "Write a short poem about the sea.")
    fast = await generate(engine, "argmax", tokens, max_tokens=40)
    chain = await generate(engine, "chain", tokens, max_tokens=40, sampling=Sampling(temperature=0.7, top_k=1, repeat_penalty=1.0))
    assert len(fast.tokens) > 10
    assert fast.tokens == chain.tokens and fast.text == chain.text


async def test_end_of_turn_token_ends_the_reply(engine: Engine) -> None:
    gen = await generate(engine, "eot", chat_tokens(engine, "Say hi."), max_tokens=200)
    assert gen.finish_reason == "stop"
    assert "<|im_end|>" not in gen.text and "<|im_start|>" not in gen.text


async def test_length_limit(engine: Engine) -> None:
    gen = await generate(engine, "len", chat_tokens(engine, "Write a long story about a dragon."), max_tokens=5)
    assert gen.finish_reason == "length" and len(gen.tokens) == 5


async def test_follow_up_evaluates_only_new_tokens(engine: Engine) -> None:
    first = chat_tokens(engine, "Tell me about cats.")
    gen = await generate(engine, "reuse", first)
    assert gen.n_evaluated == len(first)
    follow = chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?")
    # Other conversations in between, more than there are slots, force a save/restore.
    for i in range(engine.options.parallel + 1):
        await generate(engine, f"other-{i}", chat_tokens(engine, f"Count to {i}."), max_tokens=4)
    again = await generate(engine, "reuse", follow)
    new = len(follow) - len(first) - len(gen.tokens)
    assert again.n_cached >= len(first) + len(gen.tokens) - 2
    assert again.n_evaluated <= new + 2  # only the new message (and the template seam) was evaluated


async def test_batched_equals_unbatched(engine: Engine) -> None:
    questions = ["What is 2+2?", "Name a color.", "Where is Rome?", "What do cows eat?"]
    prompts = [chat_tokens(engine, q) for q in questions]
    alone = [(await generate(engine, f"solo-{i}", p, max_tokens=20)).tokens for i, p in enumerate(prompts)]
    steps_before = engine.batched_steps
    gens = [engine.generate(f"batch-{i}", p, max_tokens=20, sampling=GREEDY) for i, p in enumerate(prompts)]
    together = [(await g.wait()).tokens for g in gens]
    assert engine.batched_steps > steps_before  # they really shared decode steps
    assert together == alone


async def test_cancel_during_prompt_evaluation(engine: Engine) -> None:
    long_prompt = chat_tokens(engine, "story " * 800)
    gen = engine.generate("cancel-prompt", long_prompt, max_tokens=20, sampling=GREEDY)
    await asyncio.sleep(0.05)
    gen.cancel()
    await asyncio.wait_for(gen.wait(), 10)
    assert gen.finish_reason == "cancelled" and gen.tokens == []
    # the slot is free again and the engine keeps serving
    after = await generate(engine, "after-cancel", chat_tokens(engine, "Hi"))
    assert after.finish_reason in ("stop", "length")


async def test_cancel_mid_reply_keeps_text(engine: Engine) -> None:
    gen = engine.generate("cancel-reply", chat_tokens(engine, "Write a long story about a dragon."), max_tokens=300, sampling=GREEDY)
    async for _ in gen.stream():
        if len(gen.tokens) >= 5:
            gen.cancel()
    assert gen.finish_reason == "cancelled"
    assert 5 <= len(gen.tokens) < 300 and gen.text


async def test_prompt_too_long_is_refused(engine: Engine) -> None:
    with pytest.raises(PromptTooLong):
        engine.generate("huge", [1] * engine.n_ctx, max_tokens=1, sampling=GREEDY)


def test_stop_helpers() -> None:
    assert find_stop("hello USER: x", ["USER:"], 0) == 6
    assert find_stop("abc", ["USER:"], 0) is None
    assert held_back("hello US", ["USER:"]) == 2
    assert held_back("hello", ["USER:"]) == 0
    assert held_back("x <|im", ["<|im_end|>", "<|im_start|>"]) == 4


async def test_a_long_prompt_shares_steps_with_a_generating_channel_one_micro_batch_at_a_time(engine: Engine) -> None:
    """Alone, a prompt is read in one decode (n_batch 2048). While another channel generates,
    it goes at most n_ubatch (512) tokens a step, so that channel's next token never waits
    for more than one micro-batch."""
    long = chat_tokens(engine, "Please summarise: " + "the history of the world in many words " * 70)
    assert engine.n_ubatch < len(long) <= engine.n_batch
    before = engine.steps
    alone = await engine.generate("micro-alone", long, max_tokens=1, sampling=GREEDY).wait()
    assert alone.n_evaluated == len(long) and engine.steps - before == 1
    story = engine.generate("micro-story", chat_tokens(engine, "Write a long story about a dragon."), max_tokens=300, sampling=GREEDY)
    async for _ in story.stream():
        break  # it is generating now
    before = engine.batched_steps
    read = await engine.generate("micro-read", long, max_tokens=1, sampling=GREEDY).wait()
    batched = engine.batched_steps - before
    story.cancel()
    await story.wait()
    assert read.n_evaluated == len(long)
    assert batched == -(-len(long) // (engine.n_ubatch - 1))  # one step per micro-batch: the story's next token + 511 of the prompt


@pytest.fixture
async def own_engine(model_path: Path) -> AsyncIterator[Engine]:
    """A small engine of its own (one slot), for faults the shared one must not see."""
    engine = await Engine.load(model_path, EngineOptions(n_ctx=512, n_threads=ENGINE_THREADS, parallel=1, kv_cache_mb=64))
    yield engine
    await engine.close()


async def test_engine_that_cannot_go_on_fails_every_request_at_once(own_engine: Engine) -> None:
    """After repeated faults the engine gives up: waiting and later replies fail at once (no
    hang), and `on_fatal` tells the process to exit so the service manager restarts it."""
    fatal: list[str] = []
    own_engine.on_fatal = fatal.append
    tokens = own_engine.vocab.tokenize("Hello there, how are you?", special=False)
    own_engine.inject_fault("admit", times=100)
    generations = [own_engine.generate(f"k{i}", tokens, max_tokens=8, sampling=Sampling(temperature=0.0)) for i in range(8)]
    done = await asyncio.wait_for(asyncio.gather(*(g.wait() for g in generations)), 30)
    assert all(g.finish_reason == "error" for g in done)
    await asyncio.sleep(0.1)
    assert fatal and "faults in a row" in fatal[0] and own_engine.dead
    with pytest.raises(EngineDead):
        own_engine.generate("later", tokens, max_tokens=8, sampling=Sampling(temperature=0.0))


# --- saving ahead of an eviction ---------------------------------------------------------------


async def test_the_slot_to_be_emptied_next_is_saved_while_idle_so_the_next_conversation_waits_for_no_save(model_path: Path) -> None:
    """One slot, two conversations taking turns: after each reply the idle engine copies the
    slot's state to the RAM cache, so admitting the other conversation empties the slot without
    a save, and the first one comes back from that copy, exactly as if it had kept its slot."""
    engine = await Engine.load(model_path, EngineOptions(n_ctx=512, n_threads=ENGINE_THREADS, parallel=1, kv_cache_mb=64))
    kept = await Engine.load(model_path, EngineOptions(n_ctx=512, n_threads=ENGINE_THREADS, parallel=2, kv_cache_mb=64))
    try:
        cats = chat_tokens(engine, "Tell me about cats.")
        first = await generate(engine, "a", cats, max_tokens=12)
        await until(lambda: engine.saves_ahead == 1)
        assert engine.cached_states == 1 and engine.saves == 1
        await generate(engine, "b", chat_tokens(engine, "Name a color."), max_tokens=12)
        assert engine.saves_skipped == 1 and engine.saves == 1  # a's slot emptied without a copy: RAM had it
        await until(lambda: engine.saves_ahead == 2)  # now b's state, the next to go
        follow = chat_tokens(engine, "Tell me about cats.", first.text, "And dogs?")
        again = await generate(engine, "a", follow, max_tokens=12)
        assert again.n_cached >= len(cats) + len(first.tokens) - 2  # from the copy
        assert engine.saves_skipped == 2 and engine.saves == engine.saves_ahead  # no save on any admission

        # the same conversation where it never left its slot: the same reply, token for token
        reference_first = await generate(kept, "a", cats, max_tokens=12)
        assert reference_first.tokens == first.tokens
        reference = await generate(kept, "a", follow, max_tokens=12)
        assert reference.n_cached == again.n_cached and reference.tokens == again.tokens
    finally:
        await engine.close()
        await kept.close()


async def test_a_copy_saved_ahead_that_its_own_conversation_outdates_is_dropped(model_path: Path) -> None:
    """The conversation whose state was copied ahead speaks again in its slot: the old copy is
    dropped at once (it would only take RAM), and the new state is the one copied next; an
    empty slot means no eviction is coming, so nothing is copied."""
    engine = await Engine.load(model_path, EngineOptions(n_ctx=512, n_threads=ENGINE_THREADS, parallel=2, kv_cache_mb=64))
    try:
        cats = chat_tokens(engine, "Tell me about cats.")
        first = await generate(engine, "a", cats, max_tokens=12)
        await generate(engine, "b", chat_tokens(engine, "Name a color."), max_tokens=12)  # both slots taken now
        await until(lambda: engine.saves_ahead == 1)
        assert engine.saves == 1 and engine.cached_states == 1  # only the one admission would empty: a's
        follow = chat_tokens(engine, "Tell me about cats.", first.text, "And dogs?")
        second = await generate(engine, "a", follow, max_tokens=12)
        assert second.n_cached >= len(cats) + len(first.tokens) - 2  # it kept its slot
        await until(lambda: engine.saves_ahead == 2)  # b is the oldest now
        assert engine.cached_states == 1  # a's outdated copy went at its admission
        await generate(engine, "c", chat_tokens(engine, "Name a fruit."), max_tokens=12)  # empties b's slot: no save
        assert engine.saves_skipped == 1 and engine.saves == engine.saves_ahead
    finally:
        await engine.close()
