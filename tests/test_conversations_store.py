"""The SQLite store (bot/conversations/store.py): migrations, upgrades, WAL, file mode, clear
errors, and SQL that never formats values in."""

from __future__ import annotations

import ast
import sqlite3
import stat
from pathlib import Path

import pytest

from bot.conversations.store import Store, StoreError, load_migrations
from tests.conftest import ROOT


async def test_migrations_run_twice_are_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with await Store.open(path) as store:
        latest = await store.schema_version()
        conv = await store.conversation("terminal:default")
        await store.add_message(conv.id, "user", "hello")
    assert latest == load_migrations()[-1].version >= 2

    async with await Store.open(path) as store:
        assert await store.schema_version() == latest
        assert len(await store.messages(conv.id)) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(load_migrations())


async def test_old_schema_upgrades_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = await Store.open(path, upto=1)  # the schema of the first release
    assert await old.schema_version() == 1
    await old.close()
    with sqlite3.connect(path) as db:  # rows written by that release
        db.execute("INSERT INTO conversations (id, scope, template, created_at) VALUES (7, 'guild:1:channel:2', 'chatml', '2026-01-01')")
        for i in range(5):
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, author_name, created_at) VALUES (7, ?, ?, 'ann', '2026-01-01')",
                ("user" if i % 2 == 0 else "assistant", f"message {i}"),
            )
        assert "status" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}

    store = await Store.open(path)
    try:
        assert await store.schema_version() == load_migrations()[-1].version
        conv = await store.conversation("guild:1:channel:2")
        messages = await store.messages(conv.id)
        assert [m.content for m in messages] == [f"message {i}" for i in range(5)]
        assert all(m.status == "ok" and m.author_name == "ann" for m in messages)
        assert conv.id == 7 and conv.template == "chatml" and conv.chat_mode == 0
    finally:
        await store.close()


async def test_wal_mode_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bot.sqlite3"
    async with await Store.open(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_clear_edit_delete(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "bot.sqlite3") as store:
        await _clear_edit_delete(store)


async def _clear_edit_delete(store: Store) -> None:
    a = await store.conversation("dm:1")
    b = await store.conversation("dm:2")
    await store.add_message(a.id, "user", "one", platform_message_id="100")
    await store.add_message(a.id, "assistant", "two", platform_message_id="101")
    await store.add_message(b.id, "user", "other", platform_message_id="200")
    assert await store.edit_by_platform_id("100", "one, edited") == ("dm:1", True)
    assert await store.edit_by_platform_id("101", "bots are not edited this way") is None
    assert [m.content for m in await store.messages(a.id)] == ["one, edited", "two"]
    assert await store.delete_by_platform_id("101") == ("dm:1", True)
    assert await store.delete_by_platform_id("999") is None
    assert await store.clear("dm:1") == 1
    assert await store.messages(a.id) == []
    assert [m.content for m in await store.messages(b.id)] == ["other"]


async def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a SQLite database"):
        await Store.open(path)
    assert path.read_bytes() == b"definitely not sqlite" * 100  # nothing overwritten


async def test_uncreatable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(StoreError, match="cannot create the database"):
        await Store.open(blocker / "bot.sqlite3")


async def test_migration_4_keeps_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    async with await Store.open(path, upto=3) as old:
        conv = await old.conversation("guild:1:channel:2")
        await old.add_message(conv.id, "user", "hello", author_name="ann")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE conversations SET system_prompt = 'Be brief.'")
    async with await Store.open(path) as store:
        conv = await store.conversation("guild:1:channel:2")
        assert (conv.system_prompt, conv.temperature, conv.top_p, conv.n_predict, conv.thinking) == ("Be brief.", None, None, None, None)
        [message] = await store.messages(conv.id)
        assert (message.content, message.attachments, message.full_text) == ("hello", None, "hello")


def test_every_sql_statement_uses_parameters() -> None:
    """No SQL is built by formatting: every execute() gets a literal string (values go in parameters).

    The store's `_write(sql, params)` helper counts as an execute: its callers must pass
    literals, and it hands its own `sql` parameter on unchanged."""
    paths = sorted((ROOT / "bot").rglob("*.py"))
    assert ROOT / "bot" / "conversations" / "store.py" in paths  # every layer's modules, in their folders
    for path in paths:
        tree = ast.parse(path.read_text())
        passers = ("_write", "_fetch_one", "_row", "_rows")  # the store's helpers hand their `sql` argument on
        helpers = [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef) and n.name in passers]
        inside_helper = {id(c) for h in helpers for c in ast.walk(h)}
        for node in ast.walk(tree):
            sql_calls = ("execute", "execute_fetchall", "executemany", "executescript") + (passers if path.name == "store.py" else ())
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in sql_calls:
                first = node.args[0]
                literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
                migration = isinstance(first, ast.BinOp) and isinstance(first.left, ast.Constant) and ast.unparse(first.right) == "m.sql"
                passed_on = id(node) in inside_helper and isinstance(first, ast.Name) and first.id == "sql"
                # "... IN (?,?,?)": only the count of placeholders is built, the values stay parameters
                placeholders = isinstance(first, ast.JoinedStr) and all(
                    isinstance(v, ast.Constant) or ast.unparse(v.value) == "','.join('?' * len(chunk))" for v in first.values
                )
                assert literal or migration or passed_on or placeholders, f"{path.name}:{node.lineno}: SQL built at run time: {ast.unparse(first)}"
