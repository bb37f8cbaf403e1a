"""The disk tier of the KV cache (bot/engine/kvdisk.py) on the real model and real files.

Each test builds its own small engines (they load in well under a second) on a
folder in tmp_path, so the session's shared engine never gets a disk tier."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.engine.backend import Generation
from bot.config import ConfigError, Sampling, load_settings
from bot.engine.local import Engine, EngineOptions
from bot.engine.kvdisk import SUFFIX, key_name
from bot.formats.templates import Message, get_template
from tests.conftest import ENGINE_THREADS, ROOT, run_cli

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
THREADS = ENGINE_THREADS


def options(folder: Path | None, **changes: object) -> EngineOptions:
    base = dict(n_ctx=512, n_threads=THREADS, parallel=1, kv_cache_mb=0, kv_disk_dir=folder, kv_disk_mb=64 if folder else 0)
    base.update(changes)
    return EngineOptions(**base)  # type: ignore[arg-type]


async def load(model: Path, folder: Path | None, **changes: object) -> Engine:
    return await Engine.load(model, options(folder, **changes))


def chat_tokens(engine: Engine, *turns: str) -> list[int]:
    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    messages = [Message("system", "You are a helpful assistant.")]
    messages += [Message("user" if i % 2 == 0 else "assistant", turn) for i, turn in enumerate(turns)]
    return engine.vocab.encode(template.render(messages))


async def ask(engine: Engine, key: str, tokens: list[int], max_tokens: int = 12) -> Generation:
    return await engine.generate(key, tokens, max_tokens=max_tokens, sampling=GREEDY).wait()


def state_files(folder: Path, key: str) -> list[Path]:
    """The files of a conversation's states, one per identity (model and settings) that saved one."""
    return sorted(folder.glob(key_name(key) + "-*" + SUFFIX))


def state_file(folder: Path, key: str) -> Path:
    """The file of a conversation's state, where one model wrote it (a path that does not exist if none)."""
    found = state_files(folder, key)
    assert len(found) <= 1, found
    return found[0] if found else folder / (key_name(key) + "-none" + SUFFIX)


async def saved_conversation(model: Path, folder: Path, key: str = "guild:1:channel:2") -> tuple[list[int], Generation]:
    """A first engine answers one message and closes, leaving the conversation's state on disk."""
    engine = await load(model, folder)
    first = chat_tokens(engine, "Tell me about cats.")
    gen = await ask(engine, key, first)
    await engine.close()
    assert state_file(folder, key).is_file()
    return first, gen


# --- reuse across a restart ------------------------------------------------------------------


async def test_a_new_engine_starts_warm_from_the_states_on_disk(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    first, gen = await saved_conversation(model_path, folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()] == [0o600]
    assert "guild" not in " ".join(p.name for p in folder.iterdir())  # names are hashes

    second = await load(model_path, folder)
    try:
        follow = chat_tokens(second, "Tell me about cats.", gen.text, "And dogs?")
        again = await ask(second, "guild:1:channel:2", follow)
        assert second.disk_restores == 1
        assert again.n_cached >= len(first) + len(gen.tokens) - 2  # the whole first exchange came from disk
        assert again.n_evaluated == len(follow) - again.n_cached <= len(follow) - len(first) - len(gen.tokens) + 2
        assert second.tokens_evaluated == again.n_evaluated
    finally:
        await second.close()

    # The restored state is the state the first engine had: the same follow-up on an engine
    # that never stopped (the history still in its slot) gives the same tokens.
    live = await load(model_path, None)
    try:
        await ask(live, "c", first)
        same = await ask(live, "c", follow)
    finally:
        await live.close()
    assert same.n_cached == again.n_cached
    assert again.tokens == same.tokens and again.text == same.text


async def test_terminal_chat_restarts_warm(tmp_path: Path) -> None:
    """The real `python -m bot chat`, twice: the second process reads only the new message."""
    db = tmp_path / "chat.sqlite3"
    args = ("chat", "--db", str(db), "--n-predict", "12", "--ctx-size", "512")
    env = {"TEMPERATURE": "0", "LLAMA_LOG": "1"}
    first = run_cli(*args, stdin="My name is Zanzibar. Tell me about cats.\n", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "chat.sqlite3.kv"  # the default: beside the database
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600

    second = run_cli(*args, stdin="What is my name?\n", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    [(n_prompt, n_cached)] = [(int(a), int(b)) for a, b in re.findall(r"timings terminal:default: prompt (\d+) tokens \((\d+) cached\)", second.stderr)]
    [(n_first, _)] = [(int(a), int(b)) for a, b in re.findall(r"timings terminal:default: prompt (\d+) tokens \((\d+) cached\)", first.stderr)]
    assert n_cached >= n_first  # the first process's prompt (and more) came from disk
    assert n_prompt - n_cached <= 30  # "What is my name?" and the template around it
    assert "Traceback" not in second.stderr


# --- what must never be used -----------------------------------------------------------------


async def cold_text(engine: Engine, tokens: list[int]) -> str:
    gen = await ask(engine, "cold-reference", tokens)
    assert gen.n_cached == 0
    return gen.text


@pytest.mark.parametrize(
    ("damage", "logged"),
    [("corrupt", "corrupt (checksum mismatch)"), ("truncated", "unreadable (truncated")],
)
async def test_a_damaged_state_is_detected_deleted_and_logged(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, logged: str
) -> None:
    folder = tmp_path / "kv"
    _, gen = await saved_conversation(model_path, folder)
    path = state_file(folder, "guild:1:channel:2")
    if damage == "corrupt":  # one flipped bit in the middle of the KV data
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    engine = await load(model_path, folder)
    try:
        if damage == "truncated":  # cut short after the engine indexed it (as a crash mid-copy would)
            with path.open("r+b") as f:
                f.truncate(path.stat().st_size // 2)
        follow = chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?")
        with caplog.at_level(logging.WARNING, logger="bot.engine.kvdisk"):
            again = await ask(engine, "guild:1:channel:2", follow)
        assert logged in caplog.text
        assert again.n_cached == 0 and engine.disk_restores == 0
        engine.disk.drain()
        assert not path.exists()
        assert again.text == await cold_text(engine, follow)
    finally:
        await engine.close()


@pytest.mark.parametrize("change", ["model mtime", "model header", "context size", "kv type", "slots"])
async def test_a_state_made_for_something_else_is_kept_but_never_used(
    change: str, model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model.gguf"
    shutil.copyfile(model_path, model)
    folder = tmp_path / "kv"
    _, gen = await saved_conversation(model, folder)
    changes: dict[str, object] = {}
    if change == "model mtime":
        os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    elif change == "model header":  # same size and mtime, one byte of the metadata differs
        before = model.stat()
        raw = bytearray(model.read_bytes())
        at = raw.index(b"Smollm2 135M")
        raw[at + 6] = ord("3")
        model.write_bytes(bytes(raw))
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert model.stat().st_size == before.st_size
    elif change == "context size":
        changes["n_ctx"] = 640
    elif change == "slots":  # a sequence's state holds one KV stream per slot: PARALLEL=1's cannot be restored with 2
        changes["parallel"] = 2
    else:
        changes["kv_type"] = "q8_0"

    [old] = state_files(folder, "guild:1:channel:2")
    with caplog.at_level(logging.INFO, logger="bot.engine.kvdisk"):
        engine = await load(model, folder, **changes)
    try:
        # Kept (another model, or these settings again, may come back to it: the budget decides), never read.
        assert "deleted" not in caplog.text and "1 saved states" in caplog.text
        follow = chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?")
        again = await ask(engine, "guild:1:channel:2", follow)
        assert again.n_cached == 0 and engine.disk_restores == 0
        assert again.text == await cold_text(engine, follow)
    finally:
        await engine.close()
    # The new engine's state of the conversation lies beside the old one, under its own identity.
    files = state_files(folder, "guild:1:channel:2")
    assert old in files and len(files) == 2


async def test_a_state_whose_history_moved_on_is_not_read(model_path: Path, tmp_path: Path) -> None:
    """After the history window slid, the prompt shares only the system prompt with the state."""
    folder = tmp_path / "kv"
    await saved_conversation(model_path, folder)
    engine = await load(model_path, folder)
    try:
        gen = await ask(engine, "guild:1:channel:2", chat_tokens(engine, "Something else entirely, about the weather in Norway."))
        assert engine.disk_restores == 0 and gen.n_cached == 0
        engine.disk.drain()
        assert not state_file(folder, "guild:1:channel:2").exists()
    finally:
        await engine.close()


# --- forget, budget ---------------------------------------------------------------------------


async def test_forget_deletes_the_file_and_no_later_reply_sees_the_old_state(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    _, gen = await saved_conversation(model_path, folder)
    engine = await load(model_path, folder)
    try:
        follow = chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?")
        engine.forget("guild:1:channel:2")
        again = await ask(engine, "guild:1:channel:2", follow)  # at once: no waiting for the delete
        assert again.n_cached == 0 and engine.disk_restores == 0
        engine.disk.drain()
        assert not state_file(folder, "guild:1:channel:2").exists()

        # A write still queued when the conversation is forgotten never lands.
        await ask(engine, "other", chat_tokens(engine, "Hi"))  # "guild:1:channel:2" leaves the slot: its write is queued
        engine.forget("guild:1:channel:2")
        engine.disk.drain()
        assert not state_file(folder, "guild:1:channel:2").exists()
        assert not engine.disk.has("guild:1:channel:2")
    finally:
        await engine.close()
    assert not state_file(folder, "guild:1:channel:2").exists()  # nor at close


async def test_the_disk_budget_evicts_least_recently_used_by_bytes(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kv"
    engine = await load(model_path, folder, kv_disk_mb=2)
    try:
        keys = [f"chan-{i}" for i in range(4)]
        prompts = {k: chat_tokens(engine, f"Count from one to {i + 3}, please.") for i, k in enumerate(keys)}
        for k in keys:  # one slot, no RAM cache: each reply pushes the previous one to disk
            await ask(engine, k, prompts[k], max_tokens=8)
        disk = engine.disk
        assert disk is not None
        disk.drain()

        def on_disk() -> set[str]:
            return {k for k in keys if state_file(folder, k).exists()}

        def sizes() -> int:
            return sum(p.stat().st_size for p in folder.iterdir())

        assert on_disk() == {"chan-1", "chan-2"}  # chan-0 made room; chan-3 is in the slot
        assert disk.used == sizes() <= 2 * 2**20 < 3 * min(p.stat().st_size for p in folder.iterdir())
        # Reading chan-1 makes it the most recently used: chan-2 goes next, though written later.
        gen = await ask(engine, "chan-1", prompts["chan-1"] + chat_tokens(engine, "x")[-3:], max_tokens=4)
        assert engine.disk_restores == 1 and gen.n_cached > 0
        disk.drain()
        assert on_disk() == {"chan-1", "chan-3"}
        assert disk.used == sizes() <= 2 * 2**20
    finally:
        await engine.close()


# --- a disk that cannot be written ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, os, resource, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if sys.argv[2] != "0":
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    if sys.argv[3] == "1":  # root: give up the capabilities that bypass file permissions
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice (64 bits)
        assert libc.capget(header, data) == 0
        data[0] &= ~((1 << 1) | (1 << 2) | (1 << 3))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        assert libc.capset(header, data) == 0, ctypes.get_errno()
    from bot.config import Sampling, bundled_model_path
    from bot.engine.local import Engine, EngineOptions

    async def main():
        opts = EngineOptions(n_ctx=512, n_threads=int(sys.argv[4]), parallel=1, kv_cache_mb=0, kv_disk_dir=Path(sys.argv[1]), kv_disk_mb=64)
        engine = await Engine.load(bundled_model_path(), opts)
        replies = []
        for turn in range(2):
            for c in range(4):  # one slot: every reply pushes another conversation's state out
                tokens = engine.vocab.tokenize(f"Conversation {c}, turn {turn}: name a color.", special=False)
                gen = await engine.generate(f"c{c}", tokens, max_tokens=6, sampling=Sampling(temperature=0.0)).wait()
                replies.append([gen.finish_reason, gen.text])
        disk = engine.disk
        await engine.close()
        print(json.dumps({"replies": replies, "disk_on": disk is not None}))

    asyncio.run(main())
    """
)


def run_child(folder: Path, *, fsize: int = 0, drop_caps: bool = False) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(fsize), "1" if drop_caps else "0", str(THREADS)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def check_replies_kept_coming(result: dict) -> None:
    assert len(result["replies"]) == 8
    assert all(reason in ("stop", "length") and text.strip() for reason, text in result["replies"])


def test_a_full_disk_turns_the_tier_off_with_one_warning(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 64 KiB fail (EFBIG), as a full disk fails them (ENOSPC)."""
    result, stderr = run_child(tmp_path / "kv", fsize=64 * 1024)
    assert stderr.count("KV disk cache turned off") == 1, stderr
    assert stderr.count("WARNING") == 1, stderr
    check_replies_kept_coming(result)
    assert result["disk_on"] is False
    assert not list((tmp_path / "kv").glob("*" + SUFFIX)) and not list((tmp_path / "kv").glob("*.tmp"))


def test_a_read_only_folder_turns_the_tier_off_with_one_warning(tmp_path: Path) -> None:
    """chmod 0500 stops anyone but root; as root (CI runs so), the child first gives up the
    capabilities that let root write anywhere, so the folder is read-only for it too. Threads
    the engine starts later inherit that."""
    folder = tmp_path / "kv"
    folder.mkdir(mode=0o500)
    try:
        result, stderr = run_child(folder, drop_caps=os.geteuid() == 0)
        assert stderr.count("WARNING") == 1 and "cannot be used" in stderr, stderr
        check_replies_kept_coming(result)
        assert result["disk_on"] is False
        assert list(folder.iterdir()) == []
    finally:
        os.chmod(folder, 0o700)


def test_a_folder_that_cannot_be_made_turns_the_tier_off_with_one_warning(tmp_path: Path) -> None:
    """KV_DISK_DIR under a file (a typo in the path): mkdir fails even for root."""
    (tmp_path / "notes.txt").write_text("not a folder")
    result, stderr = run_child(tmp_path / "notes.txt" / "kv")
    assert stderr.count("WARNING") == 1 and "cannot be used" in stderr and "Not a directory" in stderr, stderr
    check_replies_kept_coming(result)
    assert result["disk_on"] is False


# --- KV_TYPE ----------------------------------------------------------------------------------


async def test_q8_0_states_take_about_half_the_bytes(model_path: Path, tmp_path: Path) -> None:
    sizes = {}
    for kv_type in ("f16", "q8_0"):
        folder = tmp_path / kv_type
        engine = await load(model_path, folder, kv_type=kv_type)
        try:
            gen = await ask(engine, "k", chat_tokens(engine, "Tell me about cats."))
            assert gen.text.strip()
        finally:
            await engine.close()
        sizes[kv_type] = state_file(folder, "k").stat().st_size
    assert 0.45 < sizes["q8_0"] / sizes["f16"] < 0.6


# --- configuration ----------------------------------------------------------------------------


def test_kv_settings(tmp_path: Path) -> None:
    s = load_settings({"DATABASE_PATH": str(tmp_path / "bot.sqlite3")})
    assert s.kv_disk_mb == 4096 and s.kv_type == "f16"
    assert s.resolved_kv_disk_dir() == tmp_path / "bot.sqlite3.kv"
    s = load_settings({"KV_DISK_DIR": str(tmp_path / "states"), "KV_DISK_MB": "0", "KV_TYPE": "Q8_0"})
    assert s.resolved_kv_disk_dir() == tmp_path / "states" and s.kv_disk_mb == 0 and s.kv_type == "q8_0"
    for bad, says in [
        ({"KV_TYPE": "q4_0"}, "KV_TYPE must be one of f16, q8_0"),
        ({"KV_DISK_MB": "-1"}, "KV_DISK_MB must be a whole number"),
        ({"KV_TYPE": "q8_0", "FLASH_ATTN": "off"}, "KV_TYPE=q8_0 needs flash attention"),
    ]:
        with pytest.raises(ConfigError, match=says):
            load_settings(bad)


def test_q8_0_without_flash_attention_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("chat", stdin="", cwd=tmp_path, env={"KV_TYPE": "q8_0", "FLASH_ATTN": "off"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: KV_TYPE=q8_0 needs flash attention: set FLASH_ATTN=auto or on, or KV_TYPE=f16"]


# --- format and buffers -----------------------------------------------------------------------


async def test_a_file_of_the_older_format_is_deleted_unread(model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files of the first format (CRC-32) are told apart by their magic and deleted at start."""
    folder = tmp_path / "kv"
    _, gen = await saved_conversation(model_path, folder)
    path = state_file(folder, "guild:1:channel:2")
    raw = bytearray(path.read_bytes())
    assert raw[:8] == b"LLBOTKV2"
    raw[:8] = b"LLBOTKV1"
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="bot.engine.kvdisk"):
        engine = await load(model_path, folder)
    try:
        assert "deleted 1 saved KV states: written by an older version of the bot" in caplog.text
        assert not path.exists()
        again = await ask(engine, "guild:1:channel:2", chat_tokens(engine, "Tell me about cats.", gen.text, "And dogs?"))
        assert again.n_cached == 0 and engine.disk_restores == 0
    finally:
        await engine.close()


async def test_state_buffers_are_recycled_between_saves_and_reads(model_path: Path, tmp_path: Path) -> None:
    """One slot, no RAM cache: two conversations taking turns push each other to disk and read
    themselves back. Once written or restored, a buffer serves the next save or read."""
    folder = tmp_path / "kv"
    engine = await load(model_path, folder)
    try:
        prompts = {k: chat_tokens(engine, f"Conversation {k}: name a fruit.") for k in "ab"}
        texts: dict[str, list[str]] = {"a": [], "b": []}
        for turn in range(3):
            for k in "ab":
                gen = await ask(engine, k, prompts[k], max_tokens=4)
                texts[k].append(gen.text)
                assert turn == 0 or gen.n_cached > 0  # restored from disk
                engine.disk.drain()
        buffers = engine._buffers
        assert engine.disk_restores == 4
        assert buffers.reused >= 4 and buffers.made <= 4  # 5 saves and 4 reads: most took a recycled buffer
        assert buffers.spare <= 2
        assert all(len(set(v)) == 1 for v in texts.values())  # the same answer each time
    finally:
        await engine.close()
