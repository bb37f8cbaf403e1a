"""Reliability and security: bad input, faults, nothing lost, no one let in.

Through the local Discord API with the real model and real SQLite files, and the
real CLI in a subprocess where a process has to die or fail to start."""

from __future__ import annotations

import ast
import logging
import os
import resource
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from bot.discord_adapter.access import SLOW_DOWN
from bot.discord_adapter.intake import MENTION_ONLY, NO_TEXT
from bot.discord_adapter.replies import SORRY, UNDELIVERED
from tests.conftest import ROOT, World, mention, rows, run_cli, scope
from tests.fakediscord import FakeDiscord
from tests.test_discord_process import one_reply_then_sigterm
from tests.test_formats_templates import EVIL


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


async def send_and_wait(world: World, bot, channel: dict, content: str, **kw) -> list[dict]:
    sent = await world.fake.send_message(channel, world.ann, content, **kw)
    await world.fake.wait_for(lambda: replies_to(world, channel, sent), 120)
    await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 120)
    return replies_to(world, channel, sent)


def statuses(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()


# --- bad input -----------------------------------------------------------------------------

ANSWERED = {
    "emoji-only": "\U0001f389\U0001f389\U0001f44d",
    "zalgo": "Z\u0338\u0322\u031ba\u0337l\u0334g\u0335o\u0336 t\u0337e\u0334x\u0335t\u0336 h\u0334e\u0335r\u0336e\u0337",
    "right-to-left": "\u0645\u0631\u062d\u0628\u0627\u060c \u0643\u064a\u0641 \u062d\u0627\u0644\u0643\u061f",
    "4000 characters": "Please read this. " + "word " * 796,
    "one huge code block": "```python\n" + "print('hello world')\n" * 150 + "```",
}


async def test_typed_template_markup_stays_text(world: World, start_bot, engine) -> None:
    async with start_bot(stream=False) as bot:
        await send_and_wait(world, bot, world.general, f"{mention(world.fake)} {EVIL}")
        assert statuses(bot.ctx.settings.database_path)[0][2] == EVIL.strip()
        evil = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, world.general)))
        await bot.ctx.chat.reset(scope(world, world.general))
        await send_and_wait(world, bot, world.general, f"{mention(world.fake)} hello")
        plain = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, world.general)))
        control = [[t for t in p.prepared.tokens if engine.vocab.is_control(t)] for p in (evil, plain)]
        assert control[0] == control[1]  # the same turns, so the same control tokens: none came from the user


# --- faults --------------------------------------------------------------------------------


def test_unusable_database_is_a_clear_error_at_start(tmp_path: Path) -> None:
    not_sqlite = tmp_path / "notes.sqlite3"
    not_sqlite.write_text("shopping list: milk, eggs\n" * 50)
    result = run_cli("chat", "--db", str(not_sqlite), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2 and "is not a SQLite database" in result.stderr and "Traceback" not in result.stderr
    assert not_sqlite.read_text().startswith("shopping list")  # left untouched

    read_only = tmp_path / "ro.sqlite3"
    assert run_cli("chat", "--db", str(read_only), stdin="", cwd=tmp_path).returncode == 0  # create it
    with _read_only(read_only):
        result = run_cli("chat", "--db", str(read_only), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "is read-only" in result.stderr and "Traceback" not in result.stderr


class _read_only:
    """Make a file read-only for this process, root included (root ignores mode bits, not chattr +i)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.immutable = os.geteuid() == 0 and shutil.which("chattr") is not None

    def __enter__(self) -> None:
        self.path.chmod(0o444)
        if self.immutable:
            subprocess.run(["chattr", "+i", str(self.path)], check=True)

    def __exit__(self, *exc: object) -> None:
        if self.immutable:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        self.path.chmod(0o600)


def test_truncated_model_is_a_clear_error_at_start(tmp_path: Path, model_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src:
        truncated.write_bytes(src.read(20_000_000))
    result = run_cli("chat", "--model", str(truncated), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: llama.cpp could not load {truncated}: the file is truncated, corrupt or of an unsupported architecture (LLAMA_LOG=1 shows why)"


# --- security ------------------------------------------------------------------------------


def test_every_sql_statement_uses_parameters() -> None:
    """No SQL is built by formatting: every execute() gets a literal string (values go in parameters).

    The store's `_write(sql, params)` helper counts as an execute: its callers must pass
    literals, and it hands its own `sql` parameter on unchanged."""
    for path in (ROOT / "bot").glob("*.py"):
        tree = ast.parse(path.read_text())
        helpers = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name == "_write"]
        inside_helper = {id(c) for h in helpers for c in ast.walk(h)}
        for node in ast.walk(tree):
            sql_calls = ("execute", "execute_fetchall", "executemany", "executescript") + (("_write",) if path.name == "store.py" else ())
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in sql_calls:
                first = node.args[0]
                literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
                migration = isinstance(first, ast.BinOp) and isinstance(first.left, ast.Constant) and ast.unparse(first.right) == "m.sql"
                passed_on = id(node) in inside_helper and isinstance(first, ast.Name) and first.id == "sql"
                assert literal or migration or passed_on, f"{path.name}:{node.lineno}: SQL built at run time: {ast.unparse(first)}"

