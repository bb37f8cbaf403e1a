"""Shared fixtures: the real bundled model (loaded once per session), real SQLite files."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bot.config import Sampling, Settings, bundled_model_path
from bot.conversations.service import ChatService
from bot.conversations.store import Store
from bot.discord_adapter.client import LlamaBot
from bot.engine.backend import Backend
from bot.engine.local import Engine, EngineOptions, LocalBackend
from tests.fakediscord import FakeDiscord, Permissions
from tests.references import family_vocabs, gemma3_path, gemma3_vocab_path, hf_ggufs, hf_infos  # noqa: F401 (fixtures: the reference vocabularies and templates)
from tests.scripted import ScriptedBackend

JSON = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent

# The bot's FLASH_ATTN=auto measures this CPU and picks on or off, and the two compute slightly
# different numbers (greedy replies can differ). So the bots the tests start in subprocesses run
# with it on, as the tests' own engines do (EngineOptions' default); tests/test_engine_flashattn.py is about auto.
os.environ.setdefault("FLASH_ATTN", "on")
TEST_N_CTX = 1024
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.1)
_CORES = len(os.sched_getaffinity(0))
ENGINE_THREADS = _CORES if os.getloadavg()[0] < 0.5 * _CORES else max(1, _CORES - 1)
"""Threads for the tests' llama.cpp engines (and N_THREADS for the bot and CLI they start). On a
machine that is quiet when the run starts (a CI runner, a server of one's own), every core: the
real-model tests take about 40% less time with 2 threads than with 1 on 2 cores. On a busy shared
machine, one core fewer, leaving one to the event loop, the fake Discord and the processes a test
runs: there llama.cpp's threads wait on each other whenever one is descheduled (decoding 64 tokens
took 2 to 22 s with 2 threads, 0.9 s with 1, under load). Pinned to one core: 1 thread. Only the
run's duration depends on this, never an outcome."""


EXIT_GRACE_S = 60.0
"""How long the test process may take to exit after its summary before the watchdog below ends it."""
_session: pytest.Session | None = None  # its exitstatus is what pytest returns


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A watchdog for the interpreter's exit, which waits for every non-daemon thread (an
    executor's worker, an aiosqlite connection left open) and runs native libraries' exit code.
    If the process is still alive EXIT_GRACE_S after the summary, it prints every thread's stack
    and the threads still running, then exits with the run's own status: a hang after the tests
    is then a readable report in CI's log instead of a run cut at CI's time limit. Should even
    that thread not get to run (native code holding the GIL), faulthandler dumps and exits 1.

    Once Python has joined its threads, the process ends there (`_end_now`): what would follow is
    only module teardown and native libraries' exit code (llama.cpp, OpenMP), which a test run
    has no use for and which no watchdog can see once Python has shut down."""

    if _session is None:
        return  # no run (a usage error): nothing to watch, and no status to exit with

    def expire() -> None:
        time.sleep(EXIT_GRACE_S)
        waiting = [t.name for t in threading.enumerate() if t not in (threading.current_thread(), threading.main_thread()) and not t.daemon]
        print(f"\ntests: the test process had not exited {EXIT_GRACE_S:.0f} s after its summary; "
              f"non-daemon threads still running: {waiting}; every thread's stack:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(_status())

    threading.Thread(target=expire, name="exit-watchdog", daemon=True).start()
    faulthandler.dump_traceback_later(EXIT_GRACE_S + 30, exit=True)
    atexit.register(_end_now)  # registered last, so the first exit function to run


def _status() -> int:
    assert _session is not None
    return int(_session.exitstatus)


def _end_now() -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status())


@pytest.fixture(scope="session")
def model_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    """One engine for the whole session, as in the bot: loading is the slow part."""
    eng = Engine.load_sync(model_path, EngineOptions(n_ctx=TEST_N_CTX, n_threads=ENGINE_THREADS, parallel=4, kv_cache_mb=64))
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
        user_cooldown_s=0.0,  # the per-user cooldown would turn away a test's quick second question
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
    return ChatService(LocalBackend(engine), store, settings)


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess, with a clean environment plus `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "MODEL_PATH", "PROMPT_TEMPLATE", "DATABASE_PATH"))}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env["N_THREADS"] = str(ENGINE_THREADS)
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


# --- Discord: the real bot against the local fake Discord API ------------------------------


@dataclass
class World:
    fake: FakeDiscord
    guild: JSON
    general: JSON
    random: JSON
    ann: JSON  # a regular member
    mod: JSON  # has Manage Messages
    other_bot: JSON


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with FakeDiscord() as fake:
        guild = fake.add_guild("town")
        general = fake.add_channel(guild, "general")
        random = fake.add_channel(guild, "random")
        ann = fake.add_user("ann", global_name="Ann")
        mod = fake.add_user("mod", global_name="Mod")
        other_bot = fake.add_user("otherbot", bot=True)
        moderators = fake.add_role(guild, "moderators", permissions=Permissions.MANAGE_MESSAGES)
        fake.add_member(guild, ann)
        fake.add_member(guild, mod, roles=[moderators])
        fake.add_member(guild, other_bot)
        yield World(fake, guild, general, random, ann, mod, other_bot)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedBackend]:
    """The scripted model (see tests/scripted.py): replies as the test writes them, at its pace."""
    backend = ScriptedBackend()
    yield backend
    await backend.close()


@pytest.fixture
def real(engine: Engine) -> LocalBackend:
    """The real bundled model, on the session's engine: for tests where generation is the subject."""
    return LocalBackend(engine)


@pytest.fixture
def start_bot(world: World, scripted: ScriptedBackend, tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[LlamaBot]]:
    """Start the bot with a fresh (or given) database, on the scripted model unless `backend` is
    given (`real` for the bundled model); stop it after."""

    @contextlib.asynccontextmanager
    async def start(db: Path | None = None, *, backend: Backend | None = None, **changes: Any) -> AsyncIterator[LlamaBot]:
        if db is not None:
            changes["database_path"] = db
        settings = make_settings(tmp_path, discord_token=world.fake.token, **changes)
        async with await Store.open(settings.database_path, wait_s=settings.database_wait_s) as store:
            bot = LlamaBot(settings, ChatService(backend or scripted, store, settings), guild_ready_timeout=0.1)
            async with world.fake.running(bot):
                try:
                    yield bot
                finally:
                    await bot.shutdown(grace=30)

    return start


def rows(db: Path, scope: str | None = None) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        sql = "SELECT c.scope, m.role, m.content FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        if scope:
            return conn.execute(sql + " WHERE c.scope = ? ORDER BY m.id", (scope,)).fetchall()
        return conn.execute(sql + " ORDER BY m.id").fetchall()


def mention(fake: FakeDiscord) -> str:
    return f"<@{fake.bot_user['id']}>"


def scope(world: World, channel: JSON) -> str:
    return f"guild:{world.guild['id']}:channel:{channel['id']}"
