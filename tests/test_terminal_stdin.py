"""The terminal chat with any standard input: a terminal, a pipe, a file, or /dev/null (a
container or service started without a TTY, or `python -m bot < /dev/null` in a script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run_bot_with_stdin(stdin: int | object, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "MODEL_PATH", "DATABASE_PATH"))}
    env.update(PYTHONPATH=str(ROOT), LLAMA_N_CTX="512", LLAMA_N_PREDICT="8")
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], stdin=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )


@pytest.mark.parametrize("device", ["/dev/null", "file"])
def test_plain_python_m_bot_ends_at_the_end_of_any_input(device: str, tmp_path: Path) -> None:
    """/dev/null is a character device that asyncio accepts as a pipe and epoll then refuses:
    the chat used to log a traceback and hang forever. It must end at once, cleanly."""
    if device == "file":
        source = tmp_path / "questions.txt"
        source.write_text("/template\n")
    else:
        source = Path(device)
    with source.open("rb") as stdin:
        result = run_bot_with_stdin(stdin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Operation not permitted" not in result.stderr
    first = result.stderr.splitlines()[0]
    # The first line says why there is no Discord bot, where .env was looked for, and that stdin is no terminal.
    assert "No DISCORD_TOKEN" in first and str((tmp_path / ".env").resolve()) + " (no such file)" in first
    assert "standard input is not a terminal" in first
    assert result.stdout.startswith("[USER]:\n")
    if device == "file":
        assert "[INFO] Prompt template: auto" in result.stdout  # the file was read and its command run
