"""The terminal chat, through the real command line in a subprocess."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import run_cli

ARGS = ("--n-predict", "24", "--ctx-size", "1024")


def rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, content FROM messages ORDER BY id").fetchall()


def test_piped_chat_replies_and_exits_at_end_of_input(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    result = run_cli("chat", "--db", str(db), *ARGS, stdin="What is the capital of France?\n", cwd=tmp_path, env={"TEMPERATURE": "0"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("[USER]:\nWhat is the capital of France?\n[ASSISTANT]:\n")
    assert "Paris" in out and out.endswith("[USER]:\n")
    assert [r[0] for r in rows(db)] == ["user", "assistant"]
    assert "Traceback" not in result.stderr


def test_history_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    first = run_cli("chat", "--db", str(db), *ARGS, stdin="My name is Zanzibar.\n", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("chat", "--db", str(db), *ARGS, stdin="What is my name?\n", cwd=tmp_path, env={"LOG_LEVEL": "DEBUG"})
    assert second.returncode == 0, second.stderr
    assert "prompt for terminal:default:" in second.stderr and "3 history messages" in second.stderr  # the first run's turns
    assert [r[1] for r in rows(db)][::2] == ["My name is Zanzibar.", "What is my name?"]


def test_reset_and_template_commands(tmp_path: Path) -> None:
    db = tmp_path / "chat.sqlite3"
    script = "Hello there\n/template vicuna-chat\n/template nonsense\n/reset\n/template\n"
    result = run_cli("chat", "--db", str(db), *ARGS, stdin=script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[INFO] Prompt template: vicuna-chat\n" in result.stdout
    assert "[ERROR] unknown prompt template 'nonsense'; valid: auto," in result.stdout
    assert "[INFO] Conversation cleared (2 messages).\n" in result.stdout
    assert "[INFO] Prompt template: vicuna-chat; available: auto," in result.stdout
    assert rows(db) == []
    # the template choice is stored with the conversation and survives a restart
    again = run_cli("chat", "--db", str(db), *ARGS, stdin="/template\n", cwd=tmp_path)
    assert "[INFO] Prompt template: vicuna-chat; available:" in again.stdout


def test_no_token_starts_terminal_chat_and_says_why(tmp_path: Path) -> None:
    result = run_cli(*(), stdin="", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "No DISCORD_TOKEN" in result.stderr and "starting the terminal chat" in result.stderr
    assert result.stdout == "[USER]:\n"


def test_run_without_token_explains_how_to_get_one(tmp_path: Path) -> None:
    result = run_cli("run", cwd=tmp_path)
    assert result.returncode == 2
    assert "DISCORD_TOKEN is not set" in result.stderr
    assert "Message Content Intent" in result.stderr and "DISCORD_TOKEN=" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_a_reply_then_leaves_at_the_prompt(tmp_path: Path) -> None:
    """In a real terminal (a pty): the first Ctrl-C stops the reply, one at the prompt leaves."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_"))}
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat", "--db", str(tmp_path / "chat.sqlite3"), "--n-predict", "2000", "--ctx-size", "4096"],
        stdin=slave, stdout=slave, stderr=(tmp_path / "stderr.log").open("w"), cwd=tmp_path, env=env, start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert marker in seen, (seen[-300:], process.poll())

    try:
        read_until(b"[USER]:")
        os.write(master, b"Write a very long story about a dragon, a knight and a wizard.\n")
        read_until(b"[ASSISTANT]:\r\n")
        seen = b""
        read_until(b" ", timeout=30)  # the reply's own text is arriving
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        read_until(b" [stopped]")
        seen = b""
        read_until(b"[USER]:")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    with sqlite3.connect(tmp_path / "chat.sqlite3") as conn:
        assert conn.execute("SELECT role, status FROM messages ORDER BY id").fetchall() == [("user", "ok"), ("assistant", "stopped")]
