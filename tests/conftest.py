"""Shared fixtures: the real bundled model (loaded once per session), real SQLite files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bot.chat import ChatService
from bot.config import Sampling, Settings, bundled_model_path
from bot.engine import Engine, EngineOptions
from bot.store import Store

ROOT = Path(__file__).resolve().parent.parent
TEST_N_CTX = 1024
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.1)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    """One engine for the whole session, as in the bot: loading is the slow part."""
    eng = Engine.load_sync(model_path, EngineOptions(n_ctx=TEST_N_CTX, n_threads=len(os.sched_getaffinity(0)), parallel=4, kv_cache_mb=64))
    yield eng
    eng.close_sync()


def make_settings(tmp_path: Path, **changes: object) -> Settings:
    """Settings for tests: greedy, short replies, a database in tmp_path."""
    base = Settings(
        database_path=tmp_path / "bot.sqlite3",
        n_predict=24,
        sampling=GREEDY,
        system_prompt="You are a helpful assistant.",
        parallel=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = await Store.open(settings.database_path)
    yield s
    await s.close()


@pytest.fixture
async def chat(engine: Engine, store: Store, settings: Settings) -> ChatService:
    return ChatService(engine, store, settings)


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess, with a clean environment plus `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "MODEL_PATH", "PROMPT_TEMPLATE", "DATABASE_PATH"))}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
