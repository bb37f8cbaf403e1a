"""The benchmark: `python -m bench` (about 5 minutes on 2 cores).

Every row is a ratio of two things measured side by side in this one run, so
a noisy shared machine still gives comparable numbers. Results are printed as
a markdown table and written to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from bot.config import Sampling, bundled_model_path
from bot.engine.backend import Generation, PreparedPrompt
import numpy as np

from bot.engine.flashattn import cpu_identity
from bot.engine.local import Engine, EngineOptions, LocalBackend
from bot.engine.kvdisk import SUFFIX, key_name
from bot.formats.templates import Image, Message, Template, get_template

HERE = Path(__file__).resolve().parent
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
STORIES = [f"Write a long story about a {thing}." for thing in ("dragon", "knight", "wizard", "princess")]


@dataclass
class Row:
    measure: str
    result: str
    target: str
    ok: bool | None  # None: no target, information only


def threads() -> int:
    return len(os.sched_getaffinity(0))


# The instruction-set extensions llama.cpp's CPU kernels choose between (x86 and ARM).
KERNEL_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def cpu_name() -> str:
    """The CPU as a reader can look it up: /proc/cpuinfo's model name is sometimes only
    "Intel(R) Xeon(R) Processor", so family, model, stepping and the kernel-relevant flags follow."""
    cpu = cpu_identity()
    name = cpu.get("model name") or platform.processor() or platform.machine()
    ids = ", ".join(f"{k} {cpu[k]}" for k in ("vendor_id", "cpu family", "model", "stepping") if k in cpu)
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    wanted = [f for f in KERNEL_FLAGS if f in flags]
    missing = [f for f in ("avx2", "avx512f", "amx_tile") if f not in flags] if "flags" in cpu else []
    described = "; ".join(part for part in (ids, "flags " + " ".join(wanted) if wanted else "", "no " + ", no ".join(missing) if missing else "") if part)
    return f"{name} ({described})" if described else name


def template_for(engine: Engine) -> Template:
    info = engine.info
    return get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)


def chat_prompt(engine: Engine, messages: Sequence[Message]) -> list[int]:
    return engine.vocab.encode(template_for(engine).render(messages))


def decode_rate(gen: Generation) -> float:
    """Tokens per second after the first token (prompt evaluation excluded)."""
    assert gen.first_token_at is not None and gen.finished_at is not None
    return (len(gen.tokens) - 1) / (gen.finished_at - gen.first_token_at)


# --- 1. overhead against the plain library ----------------------------------------------


def plain_llama(path: Path, n_batch: int = EngineOptions.n_batch, n_ubatch: int = EngineOptions.n_ubatch):  # noqa: ANN201 (llama_cpp.Llama)
    """llama-cpp-python's high-level API, with the engine's context size, batch, threads and
    attention kernels (the engine's FLASH_ATTN=auto turns flash attention on for CPUs)."""
    import llama_cpp

    return llama_cpp.Llama(
        str(path), n_ctx=3072, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=threads(), n_threads_batch=threads(), flash_attn=True, verbose=False
    )


async def overhead(engine: Engine, llm, rounds: int) -> Row:  # noqa: ANN001
    """Decode speed of the engine vs llama-cpp-python's Llama.create_completion.

    The two run back to back in pairs, taking turns to go first, and the result is the
    median of the pairs' ratios: on a shared machine the speed drifts between pairs far
    more than the few percent this row is about."""
    prompt = chat_prompt(engine, [Message("user", STORIES[0])])

    async def ours(i: int) -> float:
        return decode_rate(await engine.generate(f"overhead-{i}", prompt, max_tokens=200, sampling=GREEDY).wait())

    async def plain(_: int) -> float:
        first = None
        n = 0
        for _chunk in llm.create_completion(prompt, max_tokens=200, temperature=0.0, repeat_penalty=1.0, stream=True):
            first = first or time.perf_counter()
            n += 1
        return (n - 1) / (time.perf_counter() - first) if first and n > 1 else 0.0

    pairs: list[tuple[float, float]] = []
    for i in range(rounds):
        if i % 2 == 0:
            a = await ours(i)
            b = await plain(i)
        else:
            b = await plain(i)
            a = await ours(i)
        pairs.append((a, b))
    ratio = statistics.median(a / b for a, b in pairs)
    return Row(
        "Overhead: decode tokens/s, engine vs plain `Llama.create_completion` (greedy, same prompt and threads; median of paired runs)",
        f"{statistics.median(a for a, _ in pairs):.0f} vs {statistics.median(b for _, b in pairs):.0f} tok/s = **{ratio:.2f}x**",
        ">= 1.0x",
        ratio >= 1.0,
    )


# --- 2. follow-up latency ----------------------------------------------------------------


def history(turns: int, seed: int) -> list[Message]:
    """A synthetic channel history of about 55 tokens per turn."""
    out = [Message("system", "You are a helpful assistant.")]
    for i in range(turns):
        topic = ("gardens", "rivers", "engines", "castles")[seed % 4]
        if i % 2 == 0:
            out.append(Message("user", f"Message {i} in channel {seed}: tell me one more thing about {topic}, in a few sentences please, with detail."))
        else:
            out.append(Message("assistant", f"Here is fact {i} about {topic}: they have a long history, many forms, and people study them for years, writing books and building models of them."))
    return out


async def follow_ups(engine: Engine, label: str, rounds: int, channels: int = 4, turns: int = 40) -> list[tuple[list[int], Generation]]:
    """Channels speak in turn (A B C D A B C D ...); returns each follow-up's prompt and generation."""
    convs = [history(turns, c) for c in range(channels)]
    measured: list[tuple[list[int], Generation]] = []
    for r in range(rounds + 1):
        for c, conv in enumerate(convs):
            conv.append(Message("user", f"Round {r}: and what else?"))
            prompt = chat_prompt(engine, conv)
            gen = await engine.generate(f"{label}-{c}", prompt, max_tokens=8, sampling=GREEDY).wait()
            conv.append(Message("assistant", gen.text.strip() or "ok"))
            if r > 0:  # round 0 reads each history once; the follow-ups are what we measure
                measured.append((prompt, gen))
    return measured


def ttft(gen: Generation) -> float:
    assert gen.first_token_at is not None
    return gen.first_token_at - gen.queued_at


async def follow_up_latency(engine: Engine, no_reuse: Engine, llm) -> list[Row]:  # noqa: ANN001
    warm = await follow_ups(engine, "reuse", rounds=2)
    cold = await follow_ups(no_reuse, "cold", rounds=1)
    # The least work possible: the plain library, its cache already holding what the engine's slot
    # held, evaluating only the new tokens (same position, same history) and sampling one.
    only_new: list[float] = []
    for prompt, gen in warm:
        llm.create_completion(prompt[: gen.n_cached], max_tokens=1, temperature=0.0)
        start = time.perf_counter()
        next(iter(llm.create_completion(prompt, max_tokens=1, temperature=0.0, stream=True)))
        only_new.append(time.perf_counter() - start)
    a = statistics.median(ttft(g) for _, g in warm)
    b = statistics.median(ttft(g) for _, g in cold)
    c = statistics.median(only_new)
    n_history = statistics.median(len(p) for p, _ in warm)
    n_new = statistics.median(g.n_evaluated for _, g in warm)
    return [
        Row(
            f"Follow-up latency: 4 channels with ~{n_history:.0f} tokens of history each, speaking in turn; "
            "median time to first token with KV reuse vs without",
            f"{a * 1000:.0f} ms vs {b * 1000:.0f} ms = **{b / a:.1f}x faster**",
            ">= 10x",
            b / a >= 10,
        ),
        Row(
            f"Follow-up latency vs evaluating only the new message ({n_new:.0f} tokens after the same cached history, "
            "plain `Llama.create_completion`)",
            f"{a * 1000:.0f} ms vs {c * 1000:.0f} ms = **{a / c:.2f}x**",
            "<= 1.5x",
            a / c <= 1.5,
        ),
    ]


# --- 3 and 4. aggregate throughput and event-loop responsiveness ----------------------------


async def generate_all(engine: Engine, prompts: list[list[int]], label: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    gens = [engine.generate(f"{label}-{i}", p, max_tokens=max_tokens, sampling=GREEDY) for i, p in enumerate(prompts)]
    done = [await g.wait() for g in gens]
    return sum(len(g.tokens) for g in done), time.perf_counter() - start


async def throughput_and_lag(engine: Engine, rounds: int) -> list[Row]:
    prompts = [chat_prompt(engine, [Message("user", s)]) for s in STORIES]
    solo: list[float] = []
    together: list[float] = []
    lags: list[float] = []
    for r in range(rounds):
        n, seconds = await generate_all(engine, prompts[:1], f"solo-{r}", 128)
        solo.append(n / seconds)
        ticker = asyncio.ensure_future(_ticker(lags))
        n, seconds = await generate_all(engine, prompts, f"together-{r}", 128)
        ticker.cancel()
        together.append(n / seconds)
    a, b = statistics.median(together), statistics.median(solo)
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)] * 1000
    return [
        Row(
            "Aggregate throughput: 4 channels generating at once vs 1 channel alone (total generated tokens/s)",
            f"{a:.0f} vs {b:.0f} tok/s = **{a / b:.2f}x**",
            ">= 1.5x",
            a / b >= 1.5,
        ),
        Row("Responsiveness: event-loop lag of a 10 ms ticker while 4 channels generate, p99", f"**{p99:.1f} ms** ({len(lags)} ticks)", "< 20 ms", p99 < 20),
    ]


async def channels_per_box(path: Path) -> Row:
    """How fast each channel gets its reply when 1, 2, 4 or 8 generate at once (PARALLEL=8)."""
    engine = await Engine.load(path, EngineOptions(n_ctx=1024, n_threads=threads(), parallel=8, kv_cache_mb=64))
    try:
        prompts = [chat_prompt(engine, [Message("user", STORIES[i % 4])]) for i in range(8)]
        cells = []
        for n in (1, 2, 4, 8):
            tokens, seconds = await generate_all(engine, prompts[:n], f"box-{n}", 96)
            cells.append(f"{n}: {tokens / seconds / n:.0f}")
    finally:
        await engine.close()
    return Row(
        "Channels per box: tokens/s each channel sees when N channels generate at once (PARALLEL=8)",
        "; ".join(cells) + " tok/s",
        "",
        None,
    )


async def flash_attention(path: Path, rounds: int, cache: Path, n_predict: int = 512) -> list[Row]:
    """FLASH_ATTN=auto (measured at load, as the bot does) vs on vs off, side by side: a
    follow-up's time to first token and decode speed after ~1,450 tokens of history, and
    decode speed near an empty context. Each round runs the three in a rotating order."""
    started = time.perf_counter()
    auto = await Engine.load(path, EngineOptions(n_ctx=2048, n_threads=threads(), parallel=1, flash_attn="auto", flash_attn_cache=cache, n_predict=n_predict))
    load_s = time.perf_counter() - started
    engines = {"auto": auto}
    engines.update({fa: await Engine.load(path, EngineOptions(n_ctx=2048, n_threads=threads(), parallel=1, flash_attn=fa)) for fa in ("on", "off")})
    near: dict[str, list[float]] = {fa: [] for fa in engines}
    follow: dict[str, list[float]] = {fa: [] for fa in engines}
    deep: dict[str, list[float]] = {fa: [] for fa in engines}
    try:
        prompt = chat_prompt(auto, [Message("user", STORIES[0])])
        conv = history(40, 0)
        long = chat_prompt(auto, conv)
        follow_up = chat_prompt(auto, [*conv, Message("assistant", "Here is one more fact about gardens."), Message("user", "And what else? Tell me about the soil, please.")])
        for r in range(rounds):
            order = list(engines.items())
            order = order[r % 3 :] + order[: r % 3]
            for fa, engine in order:
                near[fa].append(decode_rate(await engine.generate(f"fa-{r}", prompt, max_tokens=96, sampling=GREEDY).wait()))
                engine.forget("fa-long")
                await engine.generate("fa-long", long, max_tokens=1, sampling=GREEDY).wait()
                gen = await engine.generate("fa-long", follow_up, max_tokens=48, sampling=GREEDY).wait()
                follow[fa].append(ttft(gen))
                deep[fa].append(decode_rate(gen))
        choice = auto.flash_attn
    finally:
        for engine in engines.values():
            await engine.close()
    f = {fa: statistics.median(v) * 1000 for fa, v in follow.items()}
    d = {fa: statistics.median(v) for fa, v in deep.items()}
    n = {fa: statistics.median(v) for fa, v in near.items()}
    n_new = len(follow_up) - len(long)
    how = f"measured at load in {load_s:.1f} s" if choice.source == "measured" else choice.source
    agree = f", greedy next tokens agree {100 * choice.agreement:.0f}%" if choice.agreement is not None else ""
    return [
        Row(
            f"Flash attention: what FLASH_ATTN=auto picks on this CPU for {n_predict}-token replies (bot.engine.flashattn: a 32-token read and "
            "generation near an empty context and after 1,536 tokens, both settings)",
            f"**{choice.setting}** ({how}{agree})",
            "",
            None,
        ),
        Row(
            f"Flash attention after ~{len(long)} tokens of history, auto ({choice.setting}) / on / off: time to first token of a {n_new}-token follow-up; "
            "decode tokens/s after it",
            f"{f['auto']:.0f} / {f['on']:.0f} / {f['off']:.0f} ms (on/off **{f['on'] / f['off']:.2f}x**); "
            f"{d['auto']:.0f} / {d['on']:.0f} / {d['off']:.0f} tok/s (off/on **{d['off'] / d['on']:.2f}x**)",
            "",
            None,
        ),
        Row(
            "Flash attention near an empty context, auto / on / off: decode tokens/s",
            f"{n['auto']:.0f} / {n['on']:.0f} / {n['off']:.0f} tok/s (on/off **{n['on'] / n['off']:.2f}x**)",
            "",
            None,
        ),
    ]


async def _ticker(lags: list[float]) -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - start - 0.01)


# --- 5. memory ---------------------------------------------------------------------------


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def memory_child(kv_cache_mb: int, channels: int) -> dict[str, float]:
    """Run in a fresh process so that peak RSS belongs to this scenario only."""
    engine = await Engine.load(bundled_model_path(), EngineOptions(n_ctx=1024, n_threads=threads(), parallel=4, kv_cache_mb=kv_cache_mb))
    after_load, _ = rss_mb()
    for c in range(channels):
        await engine.generate(f"mem-{c}", chat_prompt(engine, history(8, c)), max_tokens=4, sampling=GREEDY).wait()
    _, peak = rss_mb()
    result = {"after_load": after_load, "peak": peak, "cache_mb": engine.cache_bytes / 2**20, "cached": engine.cached_states}
    await engine.close()
    return result


def memory(kv_cache_mb: int = 64, channels: int = 50) -> Row:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--memory-child", str(kv_cache_mb), str(channels)], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["after_load"]
    bound = kv_cache_mb + 32
    return Row(
        f"Memory: peak RSS with {channels} channels that each have history (KV_CACHE_MB={kv_cache_mb}) vs right after model load",
        f"{m['after_load']:.0f} MiB -> {m['peak']:.0f} MiB peak (**+{grown:.0f} MiB**; {m['cached']:.0f} states cached in {m['cache_mb']:.0f} MiB)",
        f"<= KV_CACHE_MB + 32 MiB (+{bound} MiB)",
        grown <= bound,
    )


# --- 6. end to end through Discord -------------------------------------------------------


async def discord_end_to_end(engine: Engine, messages: int = 5) -> Row:
    """Through the test suite's local Discord API: user message -> first visible text -> final text."""
    sys.path.insert(0, str(HERE.parent))
    import tempfile

    from bot.engine.local import LocalBackend
    from bot.conversations.service import ChatService
    from bot.config import Settings
    from bot.discord_adapter.client import LlamaBot
    from bot.conversations.store import Store
    from tests.fakediscord import FakeDiscord

    first_times: list[float] = []
    final_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_path=Path(tmp) / "bench.sqlite3", n_predict=128, sampling=GREEDY, user_cooldown_s=0.0, stream=True)
        async with FakeDiscord() as fake:
            guild = fake.add_guild("bench")
            channel = fake.add_channel(guild, "general")
            user = fake.add_user("user")
            fake.add_member(guild, user)
            async with await Store.open(settings.database_path) as store:
                bot = LlamaBot(settings, ChatService(LocalBackend(engine), store, settings), guild_ready_timeout=0.1)
                async with fake.running(bot):
                    for i in range(messages):
                        start = time.monotonic()
                        sent = await fake.send_message(channel, user, f"<@{fake.bot_user['id']}> {STORIES[i % 4]}")
                        await fake.wait_for_bot_message(channel, after=sent, timeout=120)  # polls every 20 ms
                        first_times.append(time.monotonic() - start)
                        await fake.wait_for(lambda: bot.ctx.scheduler.running == 0, 120)
                        last = max([e["time"] for m in fake.bot_messages(channel) if int(m["id"]) > int(sent["id"]) for e in m["_edits"]] or [time.monotonic()])
                        final_times.append(last - start)
                    await bot.shutdown()
    first, final = statistics.median(first_times), statistics.median(final_times)
    return Row(
        "End to end through Discord (local fake API, streaming on, 128-token replies): user message to first visible reply text / to final text, median",
        f"**{first * 1000:.0f} ms** / **{final:.1f} s**",
        "",
        None,
    )


# --- 7. the final text after generation, through Discord ----------------------------------


async def final_text_latency(engine: Engine, short: int = 8, long: int = 3) -> Row:
    """Through the local Discord API with streaming on: from the end of generation to the reply's
    final text on screen (its last POST or PATCH), for short and long replies in one channel,
    and the most edits that channel saw in any 5 seconds (Discord allows 5)."""
    sys.path.insert(0, str(HERE.parent))
    import tempfile

    from bot.conversations.service import ChatService, Reply
    from bot.config import Settings
    from bot.discord_adapter.client import LlamaBot
    from bot.discord_adapter.output import EDITS_PER_WINDOW, WINDOW_S
    from bot.engine.local import LocalBackend
    from bot.conversations.store import Store
    from tests.fakediscord import FakeDiscord

    class Recording(ChatService):
        """Keeps every reply, for its generation's finishing time."""

        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            self.replies: list[Reply] = []

        async def answer(self, scope: str, message_id: int) -> Reply | None:
            reply = await super().answer(scope, message_id)
            if reply is not None:
                self.replies.append(reply)
            return reply

    lags: dict[int, list[float]] = {16: [], 128: []}
    posted_once = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with FakeDiscord() as fake:
            guild = fake.add_guild("bench")
            channel = fake.add_channel(guild, "general")
            user = fake.add_user("user")
            fake.add_member(guild, user)
            for n_predict, count in ((16, short), (128, long)):
                settings = Settings(database_path=Path(tmp) / f"bench-{n_predict}.sqlite3", n_predict=n_predict, sampling=GREEDY, user_cooldown_s=0.0, stream=True)
                async with await Store.open(settings.database_path) as store:
                    chat = Recording(LocalBackend(engine), store, settings)
                    bot = LlamaBot(settings, chat, guild_ready_timeout=0.1)
                    async with fake.running(bot):
                        for i in range(count):
                            question = STORIES[i % 4] if n_predict > 16 else f"Question {i}: what is {i} plus {i}?"
                            sent = await fake.send_message(channel, user, f"<@{fake.bot_user['id']}> {question}")
                            replies = chat.replies
                            await fake.wait_for(lambda n=i + 1, r=replies: len(r) == n and r[-1].saved_id is not None, 600)
                            gen = replies[i].generation
                            pages = [m for m in fake.bot_messages(channel) if int(m["id"]) > int(sent["id"])]
                            shown = max([p["_created"] for p in pages] + [e["time"] for p in pages for e in p["_edits"]])
                            lags[n_predict].append(shown - gen.finished_at)  # perf_counter and monotonic: one clock
                            posted_once += n_predict == 16 and len(pages) == 1 and not pages[0]["_edits"]
                        await bot.shutdown()
                # Each bot counts its own edits; Discord counts the channel's. A restart within 5 s of
                # the last edit is rare, and discord.py would wait out a 429: let the window pass.
                await asyncio.sleep(WINDOW_S)
            edits = sorted(r["time"] for r in fake.requests_to("PATCH", rf"/channels/{channel['id']}/messages/\d+$"))
    most = max((sum(1 for t in edits[i:] if t - start < WINDOW_S) for i, start in enumerate(edits)), default=0)
    a, b = statistics.median(lags[16]) * 1000, statistics.median(lags[128]) * 1000
    return Row(
        "Final text after generation, through Discord (local fake API, streaming on): end of generation to the final text "
        f"on screen, median, 16-token / 128-token replies; most edits in one channel in any {WINDOW_S:g} s",
        f"**{a:.0f} ms** ({posted_once} of {short} posted once, complete) / **{b:.0f} ms**; {most} edits",
        f"< 150 ms; <= {EDITS_PER_WINDOW} edits",
        a < 150 and most <= EDITS_PER_WINDOW,
    )


# --- 8. reading a prompt ------------------------------------------------------------------


async def prompt_reading(path: Path, rounds: int) -> list[Row]:
    """Cold prompt reading, engine vs plain `Llama.eval` of the same ~1,500 tokens with the same
    threads and batch sizes, in pairs taking turns to go first; and the engine's batch sizes
    (llama-server's defaults, 2048/512) against 512/512, the same way."""
    options = EngineOptions(n_ctx=3072, n_threads=threads(), parallel=4, kv_cache_mb=256)
    engine = await Engine.load(path, options)
    small = await Engine.load(path, EngineOptions(**{**options.__dict__, "n_batch": 512, "n_ubatch": 512}))
    llm = plain_llama(path, engine.n_batch, engine.n_ubatch)
    try:
        prompt = chat_prompt(engine, history(44, 0))

        async def read(eng: Engine) -> float:
            eng.forget("prompt")  # its slot is emptied: every token is read again
            gen = await eng.generate("prompt", prompt, max_tokens=1, sampling=GREEDY).wait()
            assert gen.n_evaluated == len(prompt) and gen.first_token_at and gen.started_at
            return gen.first_token_at - gen.started_at

        async def plain() -> float:
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            return time.perf_counter() - start

        async def ours() -> float:
            return await read(engine)

        async def ours_small() -> float:
            return await read(small)

        vs_plain = await _paired(ours, plain, rounds)
        vs_small = await _paired(ours, ours_small, rounds)
    finally:
        llm.close()
        await engine.close()
        await small.close()
    n = len(prompt)

    def speed(pairs: list[tuple[float, float]], i: int) -> float:
        return n / statistics.median(p[i] for p in pairs)

    ratio = statistics.median(b / a for a, b in vs_plain)
    ratio_small = statistics.median(b / a for a, b in vs_small)
    return [
        Row(
            f"Prompt reading, cold: {n} tokens, engine vs plain `Llama.eval` of the same tokens (same threads, batch "
            f"{engine.n_batch}/{engine.n_ubatch}, flash attention; median of {rounds} paired runs)",
            f"{speed(vs_plain, 0):.0f} vs {speed(vs_plain, 1):.0f} tok/s = **{ratio:.2f}x**",
            ">= 0.97x",
            ratio >= 0.97,
        ),
        Row(
            f"Prompt reading, cold: engine batch {engine.n_batch}/{engine.n_ubatch} (llama-server's defaults) vs 512/512 "
            f"({n} tokens, median of {rounds} paired runs)",
            f"{speed(vs_small, 0):.0f} vs {speed(vs_small, 1):.0f} tok/s = **{ratio_small:.2f}x**",
            "",
            None,
        ),
    ]


async def _paired(a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]], rounds: int) -> list[tuple[float, float]]:
    """`rounds` pairs of timings, taking turns to go first (after one unmeasured run of each)."""
    await a()
    await b()
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            x = await a()
            y = await b()
        else:
            y = await b()
            x = await a()
        pairs.append((x, y))
    return pairs


# --- the disk tier: every channel warm -------------------------------------------------


def disk_options(folder: Path | None, **changes: object) -> EngineOptions:
    """The bot's defaults for a server: 4 slots, 256 MiB of RAM cache, 4 GiB of disk (or none)."""
    base = EngineOptions(n_ctx=2048, n_threads=threads(), parallel=4, kv_cache_mb=256, kv_disk_dir=folder, kv_disk_mb=4096 if folder else 0)
    return replace(base, **changes)  # type: ignore[arg-type]


async def say(engine: Engine, key: str, conv: list[Message], text: str) -> tuple[list[int], Generation]:
    """One follow-up in a channel: the user's message, the reply appended to the history."""
    conv.append(Message("user", text))
    prompt = chat_prompt(engine, conv)
    gen = await engine.generate(key, prompt, max_tokens=8, sampling=GREEDY).wait()
    conv.append(Message("assistant", gen.text.strip() or "ok"))
    return prompt, gen


async def disk_tier(path: Path, rounds: int, flash_attn: str = "on", channels: int = 32, turns: int = 28, samples: int = 8) -> list[Row]:
    """32 channels on 4 slots, speaking in turn: follow-ups with the disk tier, without it,
    with the history still in its slot, and right after a restart; and what restoring one
    state cost, part by part."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "kv"
        engine = await Engine.load(path, disk_options(folder, flash_attn=flash_attn))
        without = await Engine.load(path, disk_options(None, flash_attn=flash_attn))
        convs = [history(turns, c) for c in range(channels)]
        try:
            for c, conv in enumerate(convs):  # round 0 reads each history once, through the engine
                await say(engine, f"disk-{c}", conv, "Round 0: and what else?")
            warm: list[Generation] = []
            cold: list[Generation] = []
            for r in range(1, rounds + 1):
                for c, conv in enumerate(convs):
                    prompt, gen = await say(engine, f"disk-{c}", conv, f"Round {r}: and what else?")
                    warm.append(gen)
                    if r == 1 and c < samples:  # without the tier, 32 channels always miss the RAM cache:
                        cold.append(await engine_cold(without, f"nodisk-{c}", prompt))  # the whole prompt again
            restores, written = engine.disk_restores, engine.disk.writes if engine.disk else 0
            disk = engine.disk
            assert disk is not None
            parts = {
                "read": disk.spent["read"] / max(1, disk.reads) * 1000,
                "check": disk.spent["check"] / max(1, disk.reads) * 1000,
                "set": engine.spent["restore"] / max(1, engine.disk_restores) * 1000,
                "save": engine.spent["save"] / max(1, engine.disk_restores) * 1000,  # what admissions waited for, per restore
                "ahead": engine.spent["save_ahead"] / max(1, engine.saves_ahead) * 1000,
            }
            saves, ahead, skipped, recycled = engine.saves, engine.saves_ahead, engine.saves_skipped, engine._buffers.reused
            in_slot: list[Generation] = []
            for c in range(samples // 2):  # the same channel twice in a row: the second finds its slot
                await say(engine, f"disk-{c}", convs[c], "One more: and what else?")
                in_slot.append((await say(engine, f"disk-{c}", convs[c], "And then? Tell me more."))[1])
            n_history = statistics.median(g.n_prompt for g in warm)
        finally:
            await without.close()
            started = time.perf_counter()
            await engine.close()
            close_s = time.perf_counter() - started
        files = [f.stat().st_size for f in folder.iterdir()]
        started = time.perf_counter()
        restarted = await Engine.load(path, disk_options(folder, flash_attn=flash_attn))
        load_s = time.perf_counter() - started
        try:
            after: list[Generation] = []
            for c, conv in enumerate(convs):
                after.append((await say(restarted, f"disk-{c}", conv, "After the restart: and what else?"))[1])
            restored_after = restarted.disk_restores
        finally:
            await restarted.close()
    a = statistics.median(ttft(g) for g in warm)
    b = statistics.median(ttft(g) for g in cold)
    c_ = statistics.median(ttft(g) for g in in_slot)
    d = statistics.median(ttft(g) for g in after)
    n_new = statistics.median(g.n_evaluated for g in warm)
    mb = sum(files) / len(files) / 2**20 if files else 0.0
    restore_ms = parts["read"] + parts["check"] + parts["set"] + parts["save"]
    return [
        Row(
            f"Disk tier (FLASH_ATTN={flash_attn}): {channels} channels on 4 slots (~{n_history:.0f} tokens of history each, KV_CACHE_MB=256 holds ~{256 / mb:.0f} of them), "
            f"speaking in turn; median time to first token of a follow-up with KV_DISK_MB vs without ({len(cold)} samples)",
            f"{a * 1000:.0f} ms vs {b * 1000:.0f} ms = **{b / a:.1f}x faster** ({restores} of {len(warm)} restored from disk, {written} states written)",
            ">= 10x",
            b / a >= 10,
        ),
        Row(
            f"Disk tier (FLASH_ATTN={flash_attn}) vs evaluating only the new message ({n_new:.0f} tokens after a history still in its slot, same engine)",
            f"{a * 1000:.0f} ms vs {c_ * 1000:.0f} ms = **{a / c_:.2f}x**",
            "<= 1.2x",
            a / c_ <= 1.2,
        ),
        Row(
            f"Restoring one state from disk (~{mb:.0f} MiB, FLASH_ATTN={flash_attn}), mean per part: reading it into a recycled buffer and checking "
            "its XXH3 (reader thread, before the reply reaches the engine), copying it into the slot, and saving the slot's state it replaces "
            "when the engine had no idle moment to save it ahead",
            f"read {parts['read']:.1f} + check {parts['check']:.1f} + copy in {parts['set']:.1f} + save {parts['save']:.1f} = **{restore_ms:.0f} ms** "
            f"({saves} saves, {ahead} of them ahead of the eviction while the engine was idle, {parts['ahead']:.1f} ms each; "
            f"{skipped} evictions needed none; {recycled} buffers recycled)",
            "< 35 ms",
            restore_ms < 35,
        ),
        Row(
            f"Restart (FLASH_ATTN={flash_attn}): the same {channels} channels after close + a new Engine on the same KV_DISK_DIR; median first follow-up vs a warm one "
            "(the files were still in the OS page cache, as after a service restart)",
            f"{d * 1000:.0f} ms vs {a * 1000:.0f} ms = **{d / a:.2f}x** ({restored_after} of {len(after)} restored; close {close_s:.1f} s, load {load_s:.1f} s, "
            f"{len(files)} files of {mb:.0f} MiB)",
            "<= 2x",
            d / a <= 2,
        ),
    ]


async def engine_cold(engine: Engine, key: str, prompt: list[int]) -> Generation:
    return await engine.generate(key, prompt, max_tokens=8, sampling=GREEDY).wait()


async def loop_lag_chat(path: Path, channels: int = 16, turns: int = 28, messages: int = 2) -> Row:
    """A 10 ms ticker on the event loop while 16 channels with long histories receive messages
    and answer them, through ChatService (history from SQLite, prompts built in a worker thread)."""
    from bot.conversations.service import ChatService, UserMessage, engine_options
    from bot.config import Settings
    from bot.engine.local import LocalBackend
    from bot.conversations.store import Store

    lags: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_path=Path(tmp) / "bench.sqlite3", n_predict=16, sampling=GREEDY, n_ctx=2048, n_threads=threads(), parallel=4)
        engine = await Engine.load(path, engine_options(settings))
        try:
            async with await Store.open(settings.database_path) as store:
                chat = ChatService(LocalBackend(engine), store, settings)
                for c in range(channels):
                    conversation = await store.conversation(f"lag-{c}")
                    for m in history(turns, c)[1:]:
                        await store.add_message(conversation.id, m.role, m.content)

                async def channel(c: int) -> None:
                    for i in range(messages):
                        reply = await chat.respond(UserMessage(f"lag-{c}", f"Message {i}: and what else?"))
                        await reply.text()
                        await reply.save()

                ticker = asyncio.ensure_future(_ticker(lags))
                started = time.perf_counter()
                await asyncio.gather(*(channel(c) for c in range(channels)))
                seconds = time.perf_counter() - started
                ticker.cancel()
                restored = engine.disk_restores
        finally:
            await engine.close()
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)] * 1000
    return Row(
        f"Responsiveness with the disk tier: event-loop lag of a 10 ms ticker while {channels} channels with ~1,000 tokens of history "
        f"each get {messages} messages, through ChatService (SQLite, prompt building and tokenizing in threads), p99",
        f"**{p99:.1f} ms** ({len(lags)} ticks in {seconds:.0f} s; {restored} states restored from disk)",
        "< 20 ms",
        p99 < 20,
    )


async def kv_types(path: Path, rounds: int, turns: int = 28) -> Row:
    """KV_TYPE=f16 vs q8_0 side by side: bytes per conversation in RAM and on disk, decode speed,
    and how often q8_0 picks f16's greedy token when both read the same text."""
    sizes: dict[str, tuple[float, float, int]] = {}
    decode: dict[str, list[float]] = {"f16": [], "q8_0": []}
    agree = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        engines = {t: await Engine.load(path, disk_options(Path(tmp) / t, kv_type=t, parallel=1)) for t in decode}
        try:
            long = chat_prompt(engines["f16"], history(turns, 0))
            prompt = chat_prompt(engines["f16"], [Message("user", STORIES[0])])
            for t, engine in engines.items():
                await engine.generate("conv", long, max_tokens=1, sampling=GREEDY).wait()
                await engine.generate("other", prompt, max_tokens=1, sampling=GREEDY).wait()  # "conv" goes to the RAM cache
                ram = engine.cache_bytes
                sizes[t] = (ram, ram / len(long), len(long))
            for r in range(rounds):
                for t, engine in (engines.items() if r % 2 == 0 else reversed(engines.items())):
                    decode[t].append(decode_rate(await engine.generate(f"kv-{r}", prompt, max_tokens=128, sampling=GREEDY).wait()))
            f16, q8 = engines["f16"], engines["q8_0"]
            for i, story in enumerate(STORIES):  # teacher-forced: q8_0 reads f16's reply one token at a time
                p = chat_prompt(f16, [Message("user", story)])
                ref = (await f16.generate(f"ref-{i}", p, max_tokens=48, sampling=GREEDY).wait()).tokens
                for j in range(len(ref)):
                    gen = await q8.generate(f"forced-{i}", p + ref[:j], max_tokens=1, sampling=GREEDY).wait()
                    agree += gen.tokens[:1] == ref[j : j + 1]
                    total += 1
        finally:
            for engine in engines.values():
                await engine.close()
        disk = {t: (Path(tmp) / t / (key_name("conv") + SUFFIX)).stat().st_size for t in decode}
    rate = {t: statistics.median(v) for t, v in decode.items()}
    cells = "; ".join(f"{t}: {sizes[t][0] / 2**20:.1f} MiB RAM, {disk[t] / 2**20:.1f} MiB disk ({sizes[t][1] / 1024:.1f} KiB/token)" for t in decode)
    return Row(
        f"KV_TYPE=q8_0 vs f16: one conversation of {sizes['f16'][2]} tokens in the RAM cache and on disk; decode tokens/s; "
        "how often q8_0's greedy next token is f16's, reading f16's replies",
        f"{cells}; decode {rate['q8_0']:.0f} vs {rate['f16']:.0f} tok/s (**{rate['q8_0'] / rate['f16']:.2f}x**); "
        f"same next token {agree / max(total, 1):.0%} of {total}",
        "",
        None,
    )



# --- warm-ups while members type ------------------------------------------------------------


def history_prompt(engine: Engine, conv: Sequence[Message]) -> list[int]:
    """What ChatService.warm sends: the conversation so far, without a generation prompt."""
    return engine.vocab.encode(template_for(engine).render(conv, add_generation_prompt=False))


async def typed(engine: Engine, key: str, conv: list[Message], text: str, typing_s: float) -> tuple[Generation, bool]:
    """A member types for `typing_s` seconds (the engine warms the channel), then sends.
    Returns the reply and whether the warm-up was done when the message came."""
    assert engine.warm(key, history_prompt(engine, conv))
    await asyncio.sleep(typing_s)
    done = engine.warming == 0
    return (await say(engine, key, conv, text))[1], done


async def settled(engine: Engine) -> None:
    while engine.warming:
        await asyncio.sleep(0.01)


async def warm_ups(path: Path, fa_options: dict[str, object], samples: int = 3, typing_s: float = 10.0, turns: int = 40) -> list[Row]:
    """Typing TYPING_S seconds before the message vs not, for a channel whose state is nowhere
    (a first message after a restart with an empty KV folder, or after the state was evicted)
    and for one whose state is on disk; and the CPU a warm-up costs when no message follows."""
    with tempfile.TemporaryDirectory() as tmp:
        options = disk_options(Path(tmp) / "kv", warm_ttl_s=600.0, **fa_options)
        engine = await Engine.load(path, options)
        try:  # state nowhere
            cold, warmed, follow, done_first = [], [], [], 0
            for i in range(samples):
                conv = history(turns, 100 + i)
                cold.append((await say(engine, f"cold-{i}", conv, "And what else?"))[1])
                conv = history(turns, 200 + i)
                gen, done = await typed(engine, f"typed-{i}", conv, "And what else?", typing_s)
                done_first += done
                warmed.append(gen)
                follow.append((await say(engine, f"typed-{i}", conv, "One more thing?"))[1])
            n_history = statistics.median(g.n_prompt for g in cold)
            # typing no message follows: the warm-up runs to its end, then the history changes (counted as wasted)
            conv = history(turns, 300)
            before = replace(engine.warm_stats)
            started = time.perf_counter()
            assert engine.warm("silent", history_prompt(engine, conv))
            await settled(engine)
            silent_wall = time.perf_counter() - started
            engine.forget("silent")
            await asyncio.sleep(0.1)
            silent_cpu = engine.warm_stats.cpu_wasted_s - before.cpu_wasted_s
            silent_tokens = engine.warm_stats.tokens_wasted - before.tokens_wasted
        finally:
            await engine.close()

        folder = Path(tmp) / "kv-disk"
        first = await Engine.load(path, disk_options(folder, **fa_options))
        convs = [history(turns, 400 + c) for c in range(3 * samples + 3)]
        try:
            for c, conv in enumerate(convs):
                await say(first, f"disk-{c}", conv, "Round 0: and what else?")
        finally:
            await first.close()  # every state goes to the folder
        engine = await Engine.load(path, replace(disk_options(folder, **fa_options), warm_ttl_s=600.0))
        try:  # a new process: every state is on disk only
            on_disk_typed = [(await typed(engine, f"disk-{c}", convs[c], "And then?", typing_s))[0] for c in range(samples)]
            restored_typed = engine.warm_stats.restored
            on_disk = [(await say(engine, f"disk-{c}", convs[c], "And then?"))[1] for c in range(samples, 2 * samples)]
            for c in range(2 * samples, 3 * samples + 1):  # four more channels: the first ones leave their slots for RAM
                await say(engine, f"disk-{c}", convs[c], "And then?")
            in_ram = [(await say(engine, f"disk-{c}", convs[c], "And after that?"))[1] for c in range(samples)]
            key = f"disk-{3 * samples + 2}"
            before = replace(engine.warm_stats)
            assert engine.warm(key, history_prompt(engine, convs[3 * samples + 2]))
            await settled(engine)
            engine.forget(key)
            await asyncio.sleep(0.1)
            disk_silent_cpu = engine.warm_stats.cpu_wasted_s - before.cpu_wasted_s
            stats = engine.warm_stats
        finally:
            await engine.close()

    def ms(gens: list[Generation]) -> float:
        return statistics.median(ttft(g) for g in gens) * 1000

    a, b, c = ms(warmed), ms(cold), ms(follow)
    d, e, f = ms(on_disk_typed), ms(on_disk), ms(in_ram)
    fa = fa_options.get("flash_attn", "on")
    return [
        Row(
            f"Warm-up, a channel whose state is nowhere (~{n_history:.0f} tokens of history, FLASH_ATTN={fa}): time to first token when its member "
            f"started typing {typing_s:g} s before the message vs no typing; and vs a follow-up whose state is in its slot ({samples} samples each)",
            f"{a:.0f} ms vs {b:.0f} ms = **{b / a:.1f}x faster** ({done_first} of {samples} warm-ups done before the message); "
            f"vs {c:.0f} ms warm = **{a / c:.2f}x**",
            ">= 5x (ideally <= 1.2x of warm)",
            b / a >= 5,
        ),
        Row(
            f"Warm-up, a channel whose state is on disk (a new process): typing {typing_s:g} s before vs no typing vs a state already in RAM",
            f"{d:.0f} ms vs {e:.0f} ms vs {f:.0f} ms in RAM: typed/in RAM **{d / f:.2f}x** ({restored_typed} of {samples} restored ahead)",
            "<= 1.1x of in RAM",
            d / f <= 1.1,
        ),
        Row(
            "Warm-up no message follows: CPU it cost (the process's CPU time while the engine did warm-up work, and the disk read)",
            f"state nowhere: **{silent_cpu:.1f} s** CPU for {silent_tokens} tokens ({silent_wall:.1f} s wall); state on disk: **{disk_silent_cpu * 1000:.0f} ms** CPU; "
            f"in this run {stats.started} started, {stats.used} used, {stats.wasted} wasted, {stats.preempted} preempted",
            "",
            None,
        ),
    ]


# --- side by side with llama-server ----------------------------------------------------------


async def versus_llama_server(path: Path, fa_options: dict[str, object], channels: int = 32, turns: int = 40, rounds: int = 3) -> list[Row]:
    """The bot's time from a message to its first token vs llama-server's time to the first
    token of a one-token completion (cache_prompt on), 32 channels of ~1,500 tokens on 4
    slots speaking in turn, llama-server at its defaults and at the bot's flash-attention
    setting. The server gets the same prompts; it has to read the bot's reply as well, which
    the bot's own state already holds."""
    from bench import llama_server

    try:
        llama_server.binary()
    except llama_server.Unavailable as exc:
        return [Row("Side by side with llama-server", f"skipped: {exc}", "", None)]
    with tempfile.TemporaryDirectory() as tmp:
        engine = await Engine.load(path, replace(disk_options(Path(tmp) / "kv", **fa_options), n_ctx=2048))
        fa = engine.flash_attn.setting
        convs = [history(turns, c) for c in range(channels)]
        prompts: list[list[list[int]]] = [[] for _ in range(channels)]
        bot: list[Generation] = []
        try:
            for r in range(rounds + 1):
                for c, conv in enumerate(convs):
                    prompt, gen = await say(engine, f"ls-{c}", conv, f"Round {r}: and what else?")
                    prompts[c].append(prompt)
                    if r > 0:
                        bot.append(gen)
        finally:
            await engine.close()
    server: dict[str, list[float]] = {}
    for label, args in (("defaults", []), (f"-fa {fa}", ["-fa", fa])):
        times: list[float] = []
        try:
            with llama_server.running(path, ["-t", str(threads()), *args]) as url:
                for r in range(rounds + 1):
                    for c in range(channels):
                        started = time.perf_counter()
                        await asyncio.to_thread(llama_server.complete, url, prompts[c][r], n_predict=1)
                        if r > 0:
                            times.append(time.perf_counter() - started)
        except llama_server.Unavailable as exc:
            return [Row("Side by side with llama-server", f"skipped: {exc}", "", None)]
        server[label] = times
    a = statistics.median(ttft(g) for g in bot) * 1000
    b = statistics.median(server["defaults"]) * 1000
    c = statistics.median(server[f"-fa {fa}"]) * 1000
    n_new = statistics.median(g.n_evaluated for g in bot)
    return [
        Row(
            f"Versus llama-server (same model and threads, 4 slots, {channels} channels of ~{statistics.median(len(p[-1]) for p in prompts):.0f} tokens "
            f"speaking in turn, {len(bot)} follow-ups each after every channel's first message): the bot's time from a message to its first token "
            f"(FLASH_ATTN=auto: {fa}; {n_new:.0f} new tokens read) vs llama-server's "
            "time to the first token of a one-token completion (cache_prompt on, over HTTP) at its defaults; medians",
            f"{a:.0f} ms vs {b:.0f} ms = **{a / b:.2f}x**",
            "<= 0.5x",
            a / b <= 0.5,
        ),
        Row(
            f"Versus llama-server at the bot's flash-attention setting (-fa {fa})",
            f"{a:.0f} ms vs {c:.0f} ms = **{a / c:.2f}x**",
            "< 1x",
            a / c < 1,
        ),
    ]


async def throughput_versus_llama_server(path: Path, fa_options: dict[str, object], rounds: int) -> list[Row]:
    """How much 4 channels generating at once gain over 1 alone, for the bot and for
    llama-server on the same model, threads, slots and flash-attention setting: how much
    batching can give on this CPU at all (llama.cpp's kernels decide it, not the bot)."""
    import concurrent.futures

    from bench import llama_server

    try:
        llama_server.binary()
    except llama_server.Unavailable as exc:
        return [Row("Aggregate throughput next to llama-server", f"skipped: {exc}", "", None)]
    engine = await Engine.load(path, EngineOptions(n_ctx=1024, n_threads=threads(), parallel=4, kv_cache_mb=64, **fa_options))  # type: ignore[arg-type]
    fa = engine.flash_attn.setting
    prompts = [chat_prompt(engine, [Message("user", s)]) for s in STORIES]
    bot_solo: list[float] = []
    bot_together: list[float] = []
    try:
        for r in range(rounds):
            n, seconds = await generate_all(engine, prompts[:1], f"tp-solo-{r}", 128)
            bot_solo.append(n / seconds)
            n, seconds = await generate_all(engine, prompts, f"tp-together-{r}", 128)
            bot_together.append(n / seconds)
        bot_tokens = n  # generated by 4 at once (the last round)
    finally:
        await engine.close()

    def server_rates() -> tuple[list[float], list[float], int]:
        solo: list[float] = []
        together: list[float] = []
        with llama_server.running(path, ["-t", str(threads()), "-np", "4", "-c", "4096", "-fa", fa]) as url:  # greedy, as the bot
            generate = functools.partial(llama_server.complete, url, n_predict=128, cache_prompt=False)
            for _ in range(rounds):
                started = time.perf_counter()
                solo.append(generate(prompts[0])["tokens_predicted"] / (time.perf_counter() - started))
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                    done = list(pool.map(generate, prompts))
                server_tokens = sum(d["tokens_predicted"] for d in done)
                together.append(server_tokens / (time.perf_counter() - started))
        return solo, together, server_tokens

    try:
        server_solo, server_together, server_tokens = await asyncio.to_thread(server_rates)
    except llama_server.Unavailable as exc:
        return [Row("Aggregate throughput next to llama-server", f"skipped: {exc}", "", None)]
    a, b = statistics.median(bot_together), statistics.median(bot_solo)
    c, d = statistics.median(server_together), statistics.median(server_solo)
    return [
        Row(
            f"Aggregate throughput next to llama-server (same model and threads, 4 slots, flash attention {fa}, 128-token replies): "
            "4 channels generating at once vs 1 alone (total generated tokens/s), the bot and llama-server",
            f"bot {a:.0f} vs {b:.0f} tok/s = **{a / b:.2f}x**; llama-server {c:.0f} vs {d:.0f} tok/s = **{c / d:.2f}x** "
            f"(4 at once generated {bot_tokens} tokens in the bot, {server_tokens} in llama-server, greedy, each stopping at its end of turn)",
            "",
            None,
        )
    ]


# --- the report --------------------------------------------------------------------------


# --- images: the encode cost, and generating channels while an image is encoded ----------


def noise_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image:
    """A PNG of random pixels: a new picture (never encoded before) for each seed."""
    import io

    from PIL import Image as PILImage

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, "PNG")
    data = out.getvalue()
    return Image(hashlib.sha256(data).hexdigest(), data, "image/png", size[0], size[1], f"noise{seed}.png")


async def image_rows(path: Path, rounds: int) -> list[Row]:
    """Time to first token with one image vs the same text alone, with the tiny projector and
    a real-size random one (the encode cost); then, with the real-size one, the longest wait
    between token deliveries of channels that generate while an image is encoded."""
    from tests.projector import cache_folder, real_size, tiny  # the projectors are generated (random weights, fixed seeds)

    rows: list[Row] = []
    question = [Message("system", "You are a helpful assistant."), Message("user", "What is in this picture? Answer in one sentence.")]
    seed = 1000
    for label, projector in (("tiny projector: 32 px, 16 image tokens", tiny(cache_folder())), ("real-size random projector: 224 px, 12 layers x 768, 196 image tokens", real_size())):
        engine = await Engine.load(path, EngineOptions(n_ctx=2048, n_threads=threads(), parallel=4, kv_cache_mb=64, mmproj=projector))
        backend = LocalBackend(engine)
        template = template_for(engine)
        try:

            async def first_token(with_image: bool) -> float:
                nonlocal seed
                seed += 1
                images = (noise_image(seed),) if with_image else ()
                prepared = await backend.prepare(template, [question[0], Message("user", question[1].content, images)])
                gen = backend.generate(f"image-bench-{seed}", prepared, max_tokens=1, sampling=GREEDY)  # a new channel: nothing cached
                await gen.wait()
                return ttft(gen)

            pairs = await _paired(lambda: first_token(True), lambda: first_token(False), rounds + 2)
            a, b = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
            rows.append(Row(f"Time to first token, one image vs the same text alone ({label}; cold channel, median of {len(pairs)} pairs)",
                            f"{a * 1000:.0f} vs {b * 1000:.0f} ms = **{a / b:.1f}x** (the encode and its embeddings)", "", None))
            if projector != tiny(cache_folder()):
                rows.append(await _gap_while_encoding(engine, backend, template, seed))
        finally:
            await engine.close()
    return rows


async def _gap_while_encoding(engine: Engine, backend: LocalBackend, template: Template, seed: int) -> Row:
    """Three channels write long stories; a fourth sends an image. The longest time between two
    deliveries of new text to the writing channels while the image is encoded (on its own
    thread, with half the cores), against the longest in as long a stretch with no image."""
    writers = [engine.generate(f"writer-{i}", chat_prompt(engine, [Message("user", s)]), max_tokens=4000, sampling=GREEDY) for i, s in enumerate(STORIES[:3])]
    stamps: list[list[float]] = [[] for _ in writers]

    async def watch(i: int, gen: Generation) -> None:
        async for _ in gen.updates():
            stamps[i].append(time.perf_counter())

    watchers = [asyncio.ensure_future(watch(i, g)) for i, g in enumerate(writers)]
    assert engine.vision is not None
    try:
        while min(g.n_generated for g in writers) < 8:
            await asyncio.sleep(0.05)
        prepared = await backend.prepare(template, [Message("user", "What is in this picture?", (noise_image(seed + 1),))])
        arrived = time.perf_counter()
        gen = backend.generate("image-gap", prepared, max_tokens=1, sampling=GREEDY)
        await gen.wait()
        answered = gen.first_token_at or time.perf_counter()
        began, ended = engine.vision.encodes[-1]
        calm_start = time.perf_counter()
        await asyncio.sleep(ended - began)  # as long a stretch, no image
        calm_end = time.perf_counter()
    finally:
        for g in writers:
            g.cancel()
        for w in watchers:
            w.cancel()

    def longest(a: float, b: float) -> float:
        gaps = [0.0]
        for s in stamps:
            inside = [a] + [t for t in s if a <= t <= b] + [b]
            gaps += [y - x for x, y in zip(inside, inside[1:])]
        return max(gaps)

    busy, calm, whole = longest(began, ended), longest(calm_start, calm_end), longest(arrived, answered)
    return Row(
        "Longest wait for new text in 3 generating channels while a 4th channel's image is encoded (real-size random projector), vs as long a stretch with no image",
        f"**{busy * 1000:.0f} ms** during a {(ended - began) * 1000:.0f} ms encode vs {calm * 1000:.0f} ms "
        f"(from the image's arrival to its first token, {(answered - arrived) * 1000:.0f} ms, embeddings included: {whole * 1000:.0f} ms)",
        "< 2x the stretch without an image",
        busy < 2 * max(calm, 0.05),  # 50 ms: how often the engine reports new text at most
    )


# --- several models (bot/engine/pool.py) --------------------------------------------------------


def models_options(folder: Path | None = None) -> EngineOptions:
    """Two slots of 1,024 tokens per model, the bot's FLASH_ATTN choice made once (on), no RAM cache."""
    return EngineOptions(n_ctx=1024, n_threads=threads(), parallel=2, kv_cache_mb=0, kv_disk_dir=folder, kv_disk_mb=256 if folder else 0)


async def models_pool(folder: Path) -> Any:  # -> bot.engine.pool.ModelPool
    from bot.config import ModelEntry
    from bot.engine.pool import ModelPool, entry_options
    from tests.references import gemma3_model_path

    base = models_options(folder)
    catalogue = (ModelEntry("smol", bundled_model_path()), ModelEntry("gemma", gemma3_model_path()))
    return await ModelPool.open(catalogue, lambda e: entry_options(base, e), budget_bytes=4096 << 20, disk_dir=folder, disk_bytes=256 << 20)


async def switch_times(rounds: int) -> Row:
    """First token of a reply on a model not loaded (its load included) vs on one loaded, same prompt."""
    cold: list[float] = []
    warm: list[float] = []
    loads: list[float] = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            pool = await models_pool(Path(tmp))
            try:
                for times in (cold, warm):  # the first time it loads, the second it is loaded
                    start = time.perf_counter()
                    async with pool.hold("gemma") as backend:
                        prompt = chat_prompt(backend.engine, [Message("user", f"Say hello, number {r} {len(times)}.")])
                        gen = backend.generate(f"switch-{len(times)}", PreparedPrompt(len(prompt), tokens=prompt), max_tokens=1, sampling=GREEDY)
                    await gen.wait()
                    times.append((gen.first_token_at or time.perf_counter()) - start)
                loads.append(next(m.load_s for m in pool.status() if m.name == "gemma") or 0.0)
            finally:
                await pool.close()
    c, w = statistics.median(cold), statistics.median(warm)
    return Row(
        "Switch a channel to another model (Gemma 3 270M): first token when it is not loaded yet (load included) vs when it is loaded",
        f"**{c:.2f} s** (the load: {statistics.median(loads):.2f} s) vs {w * 1000:.0f} ms",
        "information",
        None,
    )


async def two_models_throughput(rounds: int, max_tokens: int = 96) -> list[Row]:
    """Aggregate tokens/s with SmolLM2 and Gemma generating at once, through the pool's fair gate,
    vs each alone one after the other (the same work), and vs two engines without the gate."""
    stories = ["Once upon a time, in a land of dragons and knights, there lived", "The history of bread begins thousands of years ago, when"]

    async def one(engine: Engine, story: str, label: str) -> tuple[int, float]:
        """A plain continuation (Gemma 3 270M is a base model: a chat prompt may end at once)."""
        prompt = [engine.vocab.bos] + engine.vocab.tokenize(story, special=False)
        n, seconds = await generate_all(engine, [prompt], label, max_tokens)
        assert n > 0, f"{label}: the model generated nothing"
        return n, seconds

    gated: list[float] = []
    apart: list[float] = []
    ungated: list[float] = []
    fairness: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        pool = await models_pool(Path(tmp))
        try:
            async with pool.hold("gemma"):
                pass
            engines = [pool.loaded("smol").engine, pool.loaded("gemma").engine]
            gate = pool.shared.gate
            for r in range(rounds):
                n_a, s_a = await one(engines[0], stories[0], f"alone-a-{r}")
                n_b, s_b = await one(engines[1], stories[1], f"alone-b-{r}")
                apart.append((n_a + n_b) / (s_a + s_b))
                for enabled in ((True, False) if r % 2 == 0 else (False, True)):  # side by side, taking turns to go first
                    gate.enabled = enabled
                    start = time.perf_counter()
                    results = await asyncio.gather(*(one(e, st, f"two-{enabled}-{i}-{r}") for i, (e, st) in enumerate(zip(engines, stories))))
                    (gated if enabled else ungated).append(sum(n for n, _ in results) / (time.perf_counter() - start))
                    rates = [n / sec for n, sec in results]
                    fairness[enabled].append(min(rates[0] / (n_a / s_a), rates[1] / (n_b / s_b)))
                gate.enabled = True
        finally:
            await pool.close()
    g, a, u = statistics.median(gated), statistics.median(apart), statistics.median(ungated)
    fair, unfair = statistics.median(fairness[True]), statistics.median(fairness[False])
    return [
        Row(
            "Two models generating at once (SmolLM2 + Gemma 3, one reply each, taking turns through the pool's fair gate) vs the same two replies one after the other (aggregate generated tokens/s)",
            f"**{g:.0f}** vs {a:.0f} tok/s = **{g / a:.2f}x**; with the gate off (two engine threads competing for the cores): {u:.0f} tok/s = {u / a:.2f}x",
            ">= 0.9x (taking turns costs little)",
            g / a >= 0.9,
        ),
        Row(
            "Fairness: the slower of the two models' decode speed while both generate, as a share of its speed alone (gate on; gate off)",
            f"**{fair:.0%}**; {unfair:.0%}",
            ">= 35% (each gets about half the CPU)",
            fair >= 0.35,
        ),
    ]


def gemma3() -> Path:
    from tests.references import gemma3_model_path

    return gemma3_model_path()


async def models_memory_child(which: str) -> dict[str, float]:
    """Run in a fresh process: RSS before loading, and peak after loading `which` and one reply on each."""
    before, _ = rss_mb()
    paths = {"smol": [bundled_model_path()], "gemma": [gemma3()], "both": [bundled_model_path(), gemma3()]}[which]
    engines = [await Engine.load(p, models_options()) for p in paths]
    for i, e in enumerate(engines):
        await e.generate(f"m{i}", chat_prompt(e, [Message("user", STORIES[i])]), max_tokens=16, sampling=GREEDY).wait()
    _, peak = rss_mb()
    for e in engines:
        await e.close()
    return {"before": before, "peak": peak}


def models_memory() -> Row:
    grown = {}
    for which in ("smol", "gemma", "both"):
        out = subprocess.run([sys.executable, "-m", "bench", "--models-memory-child", which], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        grown[which] = m["peak"] - m["before"]
    total = grown["smol"] + grown["gemma"]
    return Row(
        "Memory: peak RSS growth with SmolLM2 and Gemma 3 both loaded (2 slots of 1,024 tokens each, a reply on each) vs the sum of each alone",
        f"**{grown['both']:.0f} MiB** vs {grown['smol']:.0f} + {grown['gemma']:.0f} = {total:.0f} MiB",
        "<= the sum + 5%",
        grown["both"] <= total * 1.05,
    )


async def models_rows(rounds: int) -> list[Row]:
    rows = [await switch_times(rounds)]
    rows += await two_models_throughput(rounds)
    rows.append(models_memory())
    return rows


GROUPS = (
    "overhead", "followup", "throughput", "channels", "flash", "memory", "discord", "final", "prompt", "disk", "loop-lag", "kv-type", "images", "warm",
    "server", "server-throughput", "models",
)
"""Row groups, in the order they run; `--only` picks some."""


async def run(quick: bool, only: Sequence[str] = GROUPS) -> tuple[list[Row], str]:
    rounds = 2 if quick else 3
    path = bundled_model_path()
    options = EngineOptions(n_ctx=3072, n_threads=threads(), parallel=4, kv_cache_mb=256)
    needs_engine = {"overhead", "followup", "throughput", "discord", "final"} & set(only)
    engine = await Engine.load(path, options) if needs_engine else None
    rows: list[Row] = []
    fa_cache = Path(tempfile.mkdtemp(prefix="bench-fa-")) / "flash-attn.json"  # FLASH_ATTN=auto measures once per run
    auto = {"flash_attn": "auto", "flash_attn_cache": fa_cache}
    try:
        if {"overhead", "followup"} & set(only):
            assert engine is not None
            llm = plain_llama(path)
            if "overhead" in only:
                print("overhead...", file=sys.stderr)
                rows.append(await overhead(engine, llm, 2 if quick else 21))  # a ratio near 1: more pairs against the noise
            if "followup" in only:
                print("follow-up latency...", file=sys.stderr)
                no_reuse = await Engine.load(path, EngineOptions(**{**options.__dict__, "reuse": False}))
                try:
                    rows += await follow_up_latency(engine, no_reuse, llm)
                finally:
                    await no_reuse.close()
            del llm
        if "throughput" in only:
            assert engine is not None
            print("throughput and responsiveness...", file=sys.stderr)
            rows += await throughput_and_lag(engine, rounds)
        if "channels" in only:
            rows.append(await channels_per_box(path))
        if "flash" in only:
            print("flash attention auto / on / off...", file=sys.stderr)
            rows += await flash_attention(path, rounds, fa_cache)
        if "memory" in only:
            print("memory...", file=sys.stderr)
            rows.append(memory())
        if "discord" in only:
            assert engine is not None
            print("end to end through Discord...", file=sys.stderr)
            rows.append(await discord_end_to_end(engine))
        if "final" in only:
            assert engine is not None
            print("final text after generation, through Discord...", file=sys.stderr)
            rows.append(await final_text_latency(engine, short=4 if quick else 8, long=2 if quick else 3))
        if "prompt" in only:
            print("prompt reading...", file=sys.stderr)
            rows += await prompt_reading(path, 3 if quick else 7)
        if "disk" in only:
            for fa in ("on", "off"):  # whichever auto picks
                print(f"disk tier, FLASH_ATTN={fa} (32 channels, then a restart)...", file=sys.stderr)
                rows += await disk_tier(path, 1 if quick else 2, flash_attn=fa)
        if "loop-lag" in only:
            print("event-loop lag through ChatService...", file=sys.stderr)
            rows.append(await loop_lag_chat(path))
        if "kv-type" in only:
            print("KV_TYPE f16 vs q8_0...", file=sys.stderr)
            rows.append(await kv_types(path, rounds))
        if "images" in only:
            print("images (a tiny and a real-size random projector)...", file=sys.stderr)
            rows += await image_rows(path, rounds)
        if "warm" in only:
            print("warm-ups while typing...", file=sys.stderr)
            rows += await warm_ups(path, auto, samples=2 if quick else 3)
        if "models" in only:
            print("several models: switching, two at once, memory...", file=sys.stderr)
            rows += await models_rows(rounds)
        if "server" in only:
            print("side by side with llama-server (32 channels, twice)...", file=sys.stderr)
            rows += await versus_llama_server(path, auto)
        if "server-throughput" in only:
            print("throughput next to llama-server (1 and 4 at once)...", file=sys.stderr)
            rows += await throughput_versus_llama_server(path, auto, rounds)
    finally:
        if engine is not None:
            await engine.close()
    header = (
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, {threads()} threads, "
        f"model {path.name}, Python {platform.python_version()}, llama-cpp-python {_llama_version()}."
    )
    return rows, header


def _llama_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def table(rows: list[Row]) -> str:
    lines = ["| Measure | Result | Target | Met |", "| --- | --- | --- | --- |"]
    for r in rows:
        met = "" if r.ok is None else "yes" if r.ok else "**no**"
        lines.append(f"| {r.measure} | {r.result} | {r.target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument(
        "--only", metavar="GROUP[,GROUP]", help=f"run only these groups of rows: {', '.join(GROUPS)} (results are then only printed, unless --out is given)"
    )
    parser.add_argument("--out", help="where to write the results (default: bench/RESULTS.md, after a full run)")
    parser.add_argument("--memory-child", nargs=2, type=int, metavar=("KV_CACHE_MB", "CHANNELS"), help=argparse.SUPPRESS)
    parser.add_argument("--models-memory-child", choices=("smol", "gemma", "both"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(asyncio.run(memory_child(*args.memory_child))))
        return 0
    if args.models_memory_child:
        print(json.dumps(asyncio.run(models_memory_child(args.models_memory_child))))
        return 0
    only = [g.strip() for g in args.only.split(",") if g.strip()] if args.only else list(GROUPS)
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    rows, header = asyncio.run(run(args.quick, only))
    report = f"# Benchmark results\n\n{header}\n\nMade with `python -m bench`. Each row compares two things measured side by side in this run.\n\n{table(rows)}\n"
    print(report)
    out = args.out or (None if args.only else str(HERE / "RESULTS.md"))
    if out:
        Path(out).write_text(report)
    return 0 if all(r.ok is not False for r in rows) else 1
