"""The engine's memory over a long run (bot/engine/local.py, kvdisk.StateBuffers): saved KV
states, megabytes each, come and go all day; the process must not keep what they leave.

Two parts. The mechanism on its own: each saved state lives in its own anonymous mapping,
given back to the system when the state is dropped (from malloc, glibc serves blocks of
that size from its heap after a while, and the holes they leave stay: stop 7's soak saw
RSS swing 80 MiB above the live cache). Then the real engine under a soak's load: more
conversations than slots, each with a history of a few hundred tokens, so a state of several
megabytes is saved, restored and dropped on every message; peak RSS flat after warm-up, and
malloc's heap never holding the states.
(The Discord adapter's own soak, on the scripted model: tests/test_discord_soak.py.)"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import bundled_model_path
from bot.conversations.service import ChatService, UserMessage
from bot.conversations.store import Store
from bot.engine.kvdisk import StateBuffers
from bot.engine.local import Engine, EngineOptions, LocalBackend
from tests.conftest import ENGINE_THREADS, make_settings

CONVERSATIONS = 6  # over 2 slots: every message saves one state and restores (and so drops) another
ROUNDS = 6  # each conversation says this many messages (36 in all)
HISTORY = 16  # stored messages each conversation starts with: about 200 tokens, a 5 MB state, growing
WARM_UP = ROUNDS // 2


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux's clear_refs "5"), so the peaks of earlier tests in this
    process do not hide the soak's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peaks are still comparable, just less sharp


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (VmHWM)."""
    return _status("VmHWM")


def rss_mib() -> float:
    return _status("VmRSS")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_heap_mib() -> float:
    """Bytes glibc's malloc holds in its heap (arena), used or not; 0 where there is no mallinfo2."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        return 0.0
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().arena / 2**20


def test_saved_states_give_their_memory_back_when_dropped() -> None:
    """200 states of 4 to 9 MB, a dozen alive at a time, dropped in random order (as the state
    cache does): the heap does not grow, and once they are all gone RSS is back where it was.
    (With malloc'd buffers instead, glibc kept 133 MiB of heap and of RSS here, 300 states.)"""
    rng = random.Random(1)
    buffers = StateBuffers()
    rss_before, heap_before = rss_mib(), malloc_heap_mib()
    live: list[ctypes.Array[ctypes.c_uint8]] = []
    for _ in range(200):
        size = rng.randint(4 << 20, 9 << 20)
        state, _ = buffers.take(size)  # a fresh mapping each time: none was given back to recycle
        ctypes.memset(state, 1, size)  # written, as llama.cpp writes a saved state
        live.append(state)
        if len(live) > 12:
            live.pop(rng.randrange(len(live)))
    assert 12 * 4 <= sum(len(s) for s in live) / 2**20 <= 12 * 9
    live.clear()
    assert malloc_heap_mib() - heap_before < 8
    assert rss_mib() - rss_before < 16


@pytest.fixture
async def soak_engine() -> AsyncIterator[Engine]:
    """Two slots for six conversations: every message evicts one conversation's state to the
    RAM cache and restores another's, as on a busy bot."""
    engine = await Engine.load(bundled_model_path(), EngineOptions(n_ctx=384, n_threads=ENGINE_THREADS, parallel=2, kv_cache_mb=256))
    yield engine
    await engine.close()


@pytest.mark.soak
async def test_engine_memory_stays_flat_under_a_soak(soak_engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = soak_engine
    rng = random.Random(1234)
    settings = make_settings(tmp_path, n_predict=4)
    async with await Store.open(settings.database_path) as store:
        chat = ChatService(LocalBackend(engine), store, settings)
        scopes = [f"guild:1:channel:{i}" for i in range(CONVERSATIONS)]
        for key in scopes:  # each conversation starts with a history that fills half its window
            conversation = await store.conversation(key)
            for i in range(HISTORY):
                await store.add_message(conversation.id, "user" if i % 2 == 0 else "assistant", f"Earlier message {i} about numbers.")

        async def message(key: str, i: int) -> int:
            reply = await chat.respond(UserMessage(key, f"Message {i}: what is {rng.randint(1, 99)}?", author_name="Ann"))
            await reply.save()
            assert reply.finish_reason in ("stop", "length")
            return reply.generation.n_cached

        reset_peak_rss()
        marks: dict[str, float] = {"heap_start": malloc_heap_mib()}
        reused = 0
        for i in range(ROUNDS):  # every conversation at once, as busy channels would
            reused += sum(await asyncio.gather(*(message(key, i) for key in scopes)))
            if i + 1 == WARM_UP:
                marks["warm"], marks["heap_warm"] = peak_rss_mib(), malloc_heap_mib()
        marks["peak"], marks["heap_end"] = peak_rss_mib(), malloc_heap_mib()

    assert engine.busy_slots == 0 and engine.cached_states >= CONVERSATIONS - engine.options.parallel  # states were saved...
    assert reused > 0 and engine.cache_bytes <= 256 * 2**20  # ...restored (their tokens reused), and kept within KV_CACHE_MB
    growth = marks["peak"] - marks["warm"]
    assert growth < 40, marks
    # Saved states never land in malloc's heap: from there, the live cache alone (four states of
    # 5 to 8 MB here) would have grown it, and the holes they leave would keep it grown.
    assert engine.cache_bytes > 20 * 2**20 and marks["heap_end"] - marks["heap_start"] < 12, marks
    with capsys.disabled():
        print(
            f"\nengine soak: messages={CONVERSATIONS * ROUNDS} steps={engine.steps} batched={engine.batched_steps} cached={engine.cached_states}"
            f" cache_mb={engine.cache_bytes / 2**20:.0f} peak_rss_at_warmup={marks['warm']:.0f}MiB peak_rss_at_end={marks['peak']:.0f}MiB"
            f" growth={growth:.1f}MiB heap={marks['heap_start']:.0f}->{marks['heap_warm']:.0f}->{marks['heap_end']:.0f}MiB"
        )
