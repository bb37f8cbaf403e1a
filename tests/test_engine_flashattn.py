"""FLASH_ATTN=auto: measured once per CPU, thread count, model and build, kept in a JSON file.

No test here looks at which setting wins on this machine or how fast anything is:
a planted cache entry decides where a test needs a known choice."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from bot.config import Sampling
from bot.engine import flashattn
from bot.engine.flashattn import Timings
from bot.engine.local import Engine, EngineOptions
from tests.test_engine_kvdisk import chat_tokens

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
THREADS = len(os.sched_getaffinity(0))
FAST_READ = Timings(read_near=0.1, decode_near=0.010, read_deep=0.1, decode_deep=0.050)  # reads fast, generates slowly
FAST_GEN = Timings(read_near=0.3, decode_near=0.011, read_deep=0.7, decode_deep=0.020)


def options(cache: Path | None, **changes: object) -> EngineOptions:
    base: dict[str, object] = dict(n_ctx=256, n_threads=THREADS, parallel=1, kv_cache_mb=0, flash_attn="auto", flash_attn_cache=cache, n_predict=16)
    base.update(changes)
    return EngineOptions(**base)  # type: ignore[arg-type]


def plant(cache: Path, model: Path, timings: dict[str, Timings], n_threads: int = THREADS) -> None:
    """A cache file holding a measurement for this machine's key (as if made at an earlier start)."""
    key = flashattn.cache_key(model, n_threads=n_threads, kv_type="f16")
    entry = {"key": key, "timings": {s: t.__dict__ for s, t in timings.items()}, "measured_at": "earlier"}
    cache.write_text(json.dumps({"version": 1, "entries": {flashattn.key_id(key): entry}}))


def test_the_rule_weighs_reading_against_generating() -> None:
    timings = {"on": FAST_READ, "off": FAST_GEN}
    assert flashattn.choose(timings, 1) == "on"  # a one-token reply: the faster read wins
    assert flashattn.choose(timings, 512) == "off"  # a long reply: the faster generation wins
    assert flashattn.choose({"on": FAST_READ, "off": FAST_READ}, 16) == "on"  # a tie keeps llama.cpp's default
    assert FAST_GEN.reply_s(10) == pytest.approx(0.3 + 10 * 0.011 + 0.7 + 10 * 0.020)
    # off computes attention in lower precision: if its greedy tokens stray from on's, on it stays
    assert flashattn.choose(timings, 512, agreement=0.97) == "off"
    assert flashattn.choose(timings, 512, agreement=flashattn.MIN_AGREEMENT - 0.01) == "on"


def test_the_cache_key_follows_the_cpu_threads_model_and_build(model_path: Path, tmp_path: Path) -> None:
    key = flashattn.cache_key(model_path, n_threads=2, kv_type="f16")
    assert key["llama_cpp"] and key["llama_build"] and key["model"]["size"] == model_path.stat().st_size
    cpu = key["cpu"]
    if "vendor_id" in cpu:  # x86: not just the model name, which can be as vague as "Intel(R) Xeon(R) Processor"
        assert {"cpu family", "model", "stepping", "flags"} <= set(cpu)
    ids = {flashattn.key_id(key)}
    ids.add(flashattn.key_id(flashattn.cache_key(model_path, n_threads=1, kv_type="f16")))
    copy = tmp_path / "model.gguf"
    shutil.copyfile(model_path, copy)
    ids.add(flashattn.key_id(flashattn.cache_key(copy, n_threads=2, kv_type="f16")))
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    ids.add(flashattn.key_id(flashattn.cache_key(copy, n_threads=2, kv_type="f16")))
    assert len(ids) == 4
    assert flashattn.key_id(flashattn.cache_key(model_path, n_threads=2, kv_type="f16")) in ids  # and it is stable


async def test_auto_measures_once_and_the_next_start_reads_the_cache(model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "bot.sqlite3.flash-attn.json"
    with caplog.at_level(logging.INFO):
        first = await Engine.load(model_path, options(cache))
    try:
        assert first.flash_attn.source == "measured" and first.flash_attn.setting in ("on", "off")
        timings = first.flash_attn.timings
        assert timings is not None and set(timings) == {"on", "off"}
        assert all(t.read_deep > 0 and t.decode_deep > 0 and t.read_near > 0 and t.decode_near > 0 for t in timings.values())
        assert first.flash_attn.setting == flashattn.choose(timings, 16, first.flash_attn.agreement)
        gen = await first.generate("fa", chat_tokens(first, "Name a color."), max_tokens=4, sampling=GREEDY).wait()
        assert gen.text.strip()
    finally:
        await first.close()
    assert "measured flash attention in" in caplog.text
    assert f"flash attention {first.flash_attn.setting} (FLASH_ATTN=auto, measured now" in caplog.text
    [entry] = json.loads(cache.read_text())["entries"].values()
    assert entry["key"]["n_threads"] == THREADS and set(entry["timings"]) == {"on", "off"}
    assert 0 <= entry["agreement"] <= 1 and entry["agreement"] == first.flash_attn.agreement
    assert oct(cache.stat().st_mode & 0o777) == "0o600"

    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = await Engine.load(model_path, options(cache))
    try:
        assert second.flash_attn.source == "cache" and second.flash_attn.setting == first.flash_attn.setting
        assert second.flash_attn.timings == timings
    finally:
        await second.close()
    assert "measured flash attention in" not in caplog.text
    assert "measured at an earlier start" in caplog.text


@pytest.mark.parametrize("winner", ["off", "on"])
async def test_a_cached_measurement_decides_without_measuring(model_path: Path, tmp_path: Path, winner: str) -> None:
    cache = tmp_path / "fa.json"
    plant(cache, model_path, {"on": FAST_READ, "off": FAST_GEN} if winner == "off" else {"on": FAST_GEN, "off": FAST_READ}, n_threads=THREADS)
    before = cache.read_text()
    engine = await Engine.load(model_path, options(cache, n_predict=512))
    try:
        assert (engine.flash_attn.setting, engine.flash_attn.source) == (winner, "cache")
    finally:
        await engine.close()
    assert cache.read_text() == before  # nothing measured, nothing written


@pytest.mark.parametrize(
    ("changes", "expected"),
    [({"flash_attn": "on"}, ("on", "setting")), ({"flash_attn": "off"}, ("off", "setting")), ({"kv_type": "q8_0"}, ("on", "kv_type"))],
    ids=["on", "off", "q8_0"],
)
async def test_explicit_settings_and_q8_0_bypass_the_measurement(model_path: Path, tmp_path: Path, changes: dict, expected: tuple[str, str]) -> None:
    cache = tmp_path / "fa.json"
    engine = await Engine.load(model_path, options(cache, **changes))
    try:
        assert (engine.flash_attn.setting, engine.flash_attn.source) == expected
        gen = await engine.generate("fa", chat_tokens(engine, "Name a color."), max_tokens=4, sampling=GREEDY).wait()
        assert gen.text.strip()
    finally:
        await engine.close()
    assert not cache.exists()


async def test_the_kv_disk_identity_records_the_setting_in_use(model_path: Path, tmp_path: Path) -> None:
    """States saved under auto (resolved to off) are read by FLASH_ATTN=off and refused by on:
    the files record what was used, not "auto"."""
    cache, folder = tmp_path / "fa.json", tmp_path / "kv"
    plant(cache, model_path, {"on": FAST_READ, "off": FAST_GEN})
    disk = {"kv_disk_dir": folder, "kv_disk_mb": 64, "n_ctx": 512, "n_predict": 512}
    auto = await Engine.load(model_path, options(cache, **disk))
    assert auto.flash_attn.setting == "off"
    first = chat_tokens(auto, "Tell me about cats.")
    gen = await auto.generate("k", first, max_tokens=8, sampling=GREEDY).wait()
    follow = first + gen.tokens + chat_tokens(auto, "x")[-4:]
    await auto.close()

    off = await Engine.load(model_path, options(cache, flash_attn="off", **disk))
    try:
        again = await off.generate("k", follow, max_tokens=2, sampling=GREEDY).wait()
        assert off.disk_restores == 1 and again.n_cached >= len(first)
    finally:
        await off.close()
    on = await Engine.load(model_path, options(cache, flash_attn="on", **disk))
    try:
        again = await on.generate("k", follow, max_tokens=2, sampling=GREEDY).wait()
        assert on.disk_restores == 0 and again.n_cached == 0
    finally:
        await on.close()
