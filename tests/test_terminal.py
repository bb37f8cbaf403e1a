"""The terminal chat (bot/terminal.py), through the real command line in a subprocess.

One chat runs on the bundled model, end to end. The others run on a scripted model server
(BACKEND=openai, tests/sse_server.py, OPENAI_MODE=completions so the bot's own templates
apply): what they check is the chat's commands, history and Ctrl-C, and a reply the
server holds open is still running when Ctrl-C arrives, whatever the CPU."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ENGINE_THREADS, ROOT, run_cli
from tests.sse_server import DONE, ScriptedServer, Step, event, text

ARGS = ("--n-predict", "24", "--ctx-size", "1024")


def rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, content FROM messages ORDER BY id").fetchall()


def reply(*pieces: str) -> Step:
    """A /v1/completions stream of these pieces."""
    return Step([*(event(text(p)) for p in pieces), event(text("", finish="stop")), DONE])


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer([reply("Hello ", "there!")]) as s:
        yield s


def on(server: ScriptedServer) -> dict[str, str]:
    return {"BACKEND": "openai", "OPENAI_BASE_URL": server.base, "OPENAI_MODE": "completions"}


async def chat(*args: str, **options: object) -> subprocess.CompletedProcess[str]:
    """`python -m bot *args` in a thread, so the scripted server in this loop can answer it."""
    return await asyncio.to_thread(run_cli, *args, **options)  # type: ignore[arg-type]


def test_piped_chat_on_the_bundled_model_replies_and_exits_at_end_of_input(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    result = run_cli("chat", "--db", str(db), *ARGS, stdin="What is the capital of France?\n", cwd=tmp_path, env={"TEMPERATURE": "0"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("[USER]:\nWhat is the capital of France?\n[ASSISTANT]:\n")
    assert "Paris" in out and out.endswith("[USER]:\n")
    [(_, question), (_, answer)] = rows(db)
    assert question == "What is the capital of France?" and answer.strip() and answer in out
    assert "Traceback" not in result.stderr


async def test_history_survives_a_restart(server: ScriptedServer, tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    first = await chat("chat", "--db", str(db), *ARGS, stdin="My name is Zanzibar.\n", cwd=tmp_path, env=on(server))
    assert first.returncode == 0, first.stderr
    second = await chat("chat", "--db", str(db), *ARGS, stdin="What is my name?\n", cwd=tmp_path, env={**on(server), "LOG_LEVEL": "DEBUG"})
    assert second.returncode == 0, second.stderr
    assert "prompt for terminal:default:" in second.stderr and "3 history messages" in second.stderr  # the first run's turns
    assert rows(db) == [("user", "My name is Zanzibar."), ("assistant", "Hello there!"), ("user", "What is my name?"), ("assistant", "Hello there!")]
    prompt = server.completions[1].body["prompt"]  # what the second run asked: the first run's turns, then the new one
    assert prompt.index("My name is Zanzibar.") < prompt.index("Hello there!") < prompt.index("What is my name?")


async def test_reset_and_template_commands(server: ScriptedServer, tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    script = "Hello there\n/template vicuna-chat\n/template nonsense\n/reset\n/template\n"
    result = await chat("chat", "--db", str(db), *ARGS, stdin=script, cwd=tmp_path, env=on(server))
    assert result.returncode == 0, result.stderr
    assert "[INFO] Prompt template: vicuna-chat\n" in result.stdout
    assert "[ERROR] unknown prompt template 'nonsense'; valid: auto," in result.stdout
    assert "[INFO] Conversation cleared (2 messages).\n" in result.stdout
    assert "[INFO] Prompt template: vicuna-chat; available: auto," in result.stdout
    assert rows(db) == []
    # the template choice is stored with the conversation, survives a restart, and shapes the next prompt
    again = await chat("chat", "--db", str(db), *ARGS, stdin="/template\nHi\n", cwd=tmp_path, env=on(server))
    assert "[INFO] Prompt template: vicuna-chat; available:" in again.stdout
    assert server.completions[-1].body["prompt"].endswith("USER: Hi ASSISTANT:")


async def test_no_token_starts_terminal_chat_and_says_why(server: ScriptedServer, tmp_path: Path) -> None:
    result = await chat(*(), stdin="", cwd=tmp_path, env=on(server))
    assert result.returncode == 0, result.stderr
    assert "No DISCORD_TOKEN" in result.stderr and "starting the terminal chat" in result.stderr
    assert result.stdout == "[USER]:\n"


def test_run_without_token_explains_how_to_get_one(tmp_path: Path) -> None:
    result = run_cli("run", cwd=tmp_path)
    assert result.returncode == 2
    assert "DISCORD_TOKEN is not set" in result.stderr
    assert "Message Content Intent" in result.stderr and "DISCORD_TOKEN=" in result.stderr
    assert "Traceback" not in result.stderr


async def test_ctrl_c_stops_a_reply_then_leaves_at_the_prompt(tmp_path: Path) -> None:
    """In a real terminal (a pty): the first Ctrl-C stops the reply (held open by the server),
    one at the prompt leaves."""
    held = asyncio.Event()  # never set: only the Ctrl-C ends this reply
    async with ScriptedServer([Step([event(text("Once upon ")), event(text("a time")), held, DONE])]) as server:
        await asyncio.to_thread(_ctrl_c_session, tmp_path, on(server))
        await asyncio.sleep(0)
        assert server.completions[0].closed_at is not None  # the stop closed the stream
    with sqlite3.connect(tmp_path / "chat.sqlite3") as conn:
        stored = conn.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()
    assert stored == [("user", "ok", "Write a very long story about a dragon, a knight and a wizard."), ("assistant", "stopped", "Once upon a time")]


def _ctrl_c_session(tmp_path: Path, backend: dict[str, str]) -> None:
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_"))}
    env.update(PYTHONPATH=str(ROOT), N_THREADS=str(ENGINE_THREADS), **backend)
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat", "--db", str(tmp_path / "chat.sqlite3"), "--n-predict", "2000", "--ctx-size", "4096"],
        stdin=slave, stdout=slave, stderr=(tmp_path / "stderr.log").open("w"), cwd=tmp_path, env=env, start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        """Read until `marker`, then keep only what came after it: text read in the same
        chunk as the marker (the reply's first words right after its header, on a busy
        machine) is the next wait's to find."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert marker in seen, (seen[-300:], process.poll(), (tmp_path / "stderr.log").read_text()[-2000:])
        seen = seen[seen.index(marker) + len(marker):]

    try:
        read_until(b"[USER]:")
        os.write(master, b"Write a very long story about a dragon, a knight and a wizard.\n")
        read_until(b"[ASSISTANT]:\r\n")
        read_until(b"a time", timeout=30)  # the reply's own text is arriving; the server holds the rest
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        read_until(b" [stopped]")
        read_until(b"[USER]:")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
