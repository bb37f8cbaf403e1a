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
from tests.test_templates import EVIL


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


async def test_a_flood_from_one_user_neither_starves_others_nor_grows_memory(world: World, start_bot) -> None:
    async with start_bot(stream=False, user_cooldown_s=2.0, max_queue=8) as bot:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flood = [await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} spam {i}") for i in range(200)]
        quiet = await world.fake.send_message(world.random, world.mod, f"{mention(world.fake)} What is 2+2?")
        answer = await world.fake.wait_for(lambda: replies_to(world, world.random, quiet), timeout=30)
        assert answer[0]["content"] != SORRY
        await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 60)
        users = [r[2] for r in rows(bot.ctx.settings.database_path) if r[1] == "user"]
        assert users.count("spam 0") == 1 and len([u for u in users if u.startswith("spam")]) <= 2
        slow_notes = [m for m in world.fake.bot_messages(world.general) if m["content"] == SLOW_DOWN.format(s=2.0)]
        assert len(slow_notes) == 1  # said once, not 199 times
        answered = sum(1 for m in flood if replies_to(world, world.general, m))
        assert answered <= 3
        assert len(bot.access._accepted_at) <= 2 and bot.ctx.scheduler.waiting == 0
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 64


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


async def test_two_guilds_and_two_dms_are_isolated(world: World, start_bot) -> None:
    other_guild = world.fake.add_guild("village")
    lobby = world.fake.add_channel(other_guild, "lobby")
    world.fake.add_member(other_guild, world.ann)
    bob = world.fake.add_user("bob")
    places = {
        "town": world.general,
        "village": lobby,
        "dm-ann": world.fake.dm_channel(world.ann),
        "dm-bob": world.fake.dm_channel(bob),
    }
    authors = {"town": world.ann, "village": world.ann, "dm-ann": world.ann, "dm-bob": bob}
    async with start_bot(stream=False) as bot:
        for name, channel in places.items():
            content = f"The secret word is {name.upper()}-WORD."
            sent = await world.fake.send_message(channel, authors[name], content if "guild_id" not in channel else f"{mention(world.fake)} {content}")
            await world.fake.wait_for(lambda: world.fake.bot_messages(channel) and bot.ctx.scheduler.running == 0, 60)
            assert sent
        set_template = await world.fake.invoke_command("template", user=world.fake.guild_members(other_guild)[other_guild["owner_id"]]["user"], channel=lobby, options={"name": "zephyr"})
        await set_template.wait_done()
        scopes = {
            "town": scope(world, world.general),
            "village": f"guild:{other_guild['id']}:channel:{lobby['id']}",
            "dm-ann": f"dm:{world.ann['id']}",
            "dm-bob": f"dm:{bob['id']}",
        }
        for name, key in scopes.items():
            prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(key))
            text = " ".join(m.content for m in prompt.messages)
            assert f"{name.upper()}-WORD" in text
            assert not any(f"{other.upper()}-WORD" in text for other in scopes if other != name)
            shown = await (await world.fake.invoke_command("template", user=authors[name], channel=places[name])).wait_done()
            assert shown.content.startswith("Template here: **zephyr**" if name == "village" else "Template here: **auto**")
        for name, channel in places.items():  # each reply went only where it was asked
            assert all(m["channel_id"] == channel["id"] for m in world.fake.bot_messages(channel))
        reset = await (await world.fake.invoke_command("reset", user=bob, channel=places["dm-bob"])).wait_done()
        assert reset.content == "Conversation cleared (2 messages)."
        assert len(rows(bot.ctx.settings.database_path, scopes["dm-ann"])) == 2


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

