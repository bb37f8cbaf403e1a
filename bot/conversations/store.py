"""The conversation store: SQLite through aiosqlite, with numbered migrations.

Every write commits at once. A message the bot will answer is on disk the
moment it arrives, as *pending*, before it waits for its turn; it becomes part
of the conversation together with its reply, in one transaction, so a crash or
restart can lose neither, answer nothing twice, nor leave half a reply. WAL mode
lets readers and the writer overlap.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)

# Message states (see migrations/0002_discord.sql and 0003_durable.sql). Only VISIBLE ones reach prompts.
OK, STOPPED, UNDELIVERED, PENDING, EXPIRED = "ok", "stopped", "undelivered", "pending", "expired"
VISIBLE = (OK, STOPPED)

# conversations.chat_enabled: which messages of a channel the bot answers (/chat off|on|threads).
CHAT_OFF, CHAT_ON, CHAT_THREADS = 0, 1, 2  # threads: a new thread for each mention, every message answered in it


class StoreError(Exception):
    """The database cannot be used. The message is one line for the user."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Conversation:
    id: int
    scope: str
    template: str | None
    system_prompt: str | None
    chat_enabled: bool
    channel_id: str | None = None  # the platform channel (where to read what arrived while down)
    # The channel's own settings (/settings); None: the configured default.
    temperature: float | None = None
    top_p: float | None = None
    n_predict: int | None = None
    thinking: str | None = None


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    author_id: str | None
    author_name: str | None
    platform_message_id: str | None
    created_at: str
    token_count: int | None
    status: str
    reasoning: str | None = None
    # For a pending turn: the bot's message already posted for it. For an answer: the last of
    # the messages it was posted as (a long answer takes several; platform_message_id is the first).
    reply_message_id: str | None = None
    attachments: str | None = None  # attached text files as put in the prompt (kept apart: edits change `content` only)

    @property
    def full_text(self) -> str:
        """What the model reads of this message: its text, then its attached files."""
        if not self.attachments:
            return self.content
        return f"{self.content}\n\n{self.attachments}" if self.content else self.attachments


@dataclass(frozen=True)
class PendingTurn:
    """A stored message still waiting for its answer, with where it was said."""

    message: StoredMessage
    scope: str
    channel_id: str | None


def load_migrations() -> list[Migration]:
    """The numbered `.sql` files, in order (shipped inside the package as `bot.migrations`)."""
    try:
        folder = importlib.resources.files("bot.migrations")
        files = [f for f in folder.iterdir() if f.name.endswith(".sql")]
    except ModuleNotFoundError:  # running from a source checkout that is not installed
        files = list((Path(__file__).resolve().parents[2] / "migrations").glob("*.sql"))  # type: ignore[arg-type]
    migrations = []
    for f in files:
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", f.name)
        if match is None:
            raise StoreError(f"migration file name {f.name!r} is not NNNN_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), f.read_text(encoding="utf-8")))
    migrations.sort(key=lambda m: m.version)
    if len({m.version for m in migrations}) != len(migrations):
        raise StoreError("two migration files share a number")
    return migrations


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """Conversations and messages. Open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._writing = asyncio.Lock()  # one write transaction at a time: another's commit must not commit half of ours

    @classmethod
    async def open(cls, path: Path | str, *, upto: int | None = None) -> Store:
        """Open (creating with mode 0600 if new) and migrate. `upto` stops at a version (tests)."""
        path = Path(path)
        try:
            if str(path) != ":memory:" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            db = await aiosqlite.connect(path)
        except OSError as exc:
            raise StoreError(f"cannot create the database {path}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        store = cls(db, path)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
            mode = await (await db.execute("PRAGMA journal_mode = WAL")).fetchone()
            if mode is not None and mode[0] != "wal" and str(path) != ":memory:":
                log.warning("database %s: WAL mode not available (journal_mode=%s)", path, mode[0])
            await store._migrate(upto)
            await store._check_writable()
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(_explain(path, exc)) from None
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self, upto: int | None) -> None:
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        await self._db.commit()
        done = {row[0] for row in await self._db.execute_fetchall("SELECT version FROM schema_migrations")}
        for m in load_migrations():
            if m.version in done or (upto is not None and m.version > upto):
                continue
            # One transaction per migration: it is applied entirely, and recorded, or not at all.
            try:
                await self._db.executescript("BEGIN;\n" + m.sql)
                await self._db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (m.version, m.name, _now())
                )
                await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise
            log.info("database %s: applied migration %04d_%s", self.path, m.version, m.name)

    async def _check_writable(self) -> None:
        """Fail at start, not at the first message, when the file cannot be written."""
        try:
            await self._db.executescript("BEGIN; CREATE TABLE write_probe (x); ROLLBACK;")
        except sqlite3.DatabaseError:
            await self._db.rollback()
            raise

    async def schema_version(self) -> int:
        row = await (await self._db.execute("SELECT MAX(version) FROM schema_migrations")).fetchone()
        return int(row[0] or 0) if row else 0

    # --- conversations -----------------------------------------------------------------

    async def conversation(self, scope: str, *, channel_id: str | None = None) -> Conversation:
        """The conversation for `scope`, created on first use; `channel_id` records where it happens."""
        async with self._writing:
            await self._db.execute("INSERT OR IGNORE INTO conversations (scope, created_at) VALUES (?, ?)", (scope, _now()))
            if channel_id is not None:
                await self._db.execute("UPDATE conversations SET channel_id = ? WHERE scope = ? AND channel_id IS NOT ?", (channel_id, scope, channel_id))
            await self._db.commit()
        row = await (await self._db.execute("SELECT * FROM conversations WHERE scope = ?", (scope,))).fetchone()
        assert row is not None
        return _conversation(row)

    async def find_conversation(self, scope: str) -> Conversation | None:
        """The conversation for `scope` if it exists (nothing is written)."""
        row = await (await self._db.execute("SELECT * FROM conversations WHERE scope = ?", (scope,))).fetchone()
        return _conversation(row) if row is not None else None

    async def conversations(self) -> list[Conversation]:
        """Every conversation (for catching up on what arrived while the bot was down)."""
        return [_conversation(r) for r in await self._db.execute_fetchall("SELECT * FROM conversations ORDER BY id")]

    async def set_template(self, scope: str, template: str | None) -> None:
        await self.conversation(scope)
        await self._write("UPDATE conversations SET template = ? WHERE scope = ?", (template, scope))

    async def set_system_prompt(self, scope: str, system_prompt: str | None) -> None:
        """A conversation's own system prompt; None: the configured one."""
        await self.conversation(scope)
        await self._write("UPDATE conversations SET system_prompt = ? WHERE scope = ?", (system_prompt, scope))

    async def set_channel_settings(
        self, scope: str, *, temperature: float | None, top_p: float | None, n_predict: int | None, thinking: str | None
    ) -> Conversation:
        """Replace a conversation's own sampling settings (None: the configured default)."""
        await self.conversation(scope)
        await self._write(
            "UPDATE conversations SET temperature = ?, top_p = ?, n_predict = ?, thinking = ? WHERE scope = ?",
            (temperature, top_p, n_predict, thinking, scope),
        )
        return await self.conversation(scope)

    async def set_chat_mode(self, scope: str, mode: int) -> None:
        """CHAT_OFF, CHAT_ON or CHAT_THREADS (stored in chat_enabled, an INTEGER column)."""
        if mode not in (CHAT_OFF, CHAT_ON, CHAT_THREADS):
            raise ValueError(f"unknown chat mode {mode!r}")
        await self.conversation(scope)
        await self._write("UPDATE conversations SET chat_enabled = ? WHERE scope = ?", (mode, scope))

    async def chat_mode_scopes(self, mode: int) -> set[str]:
        rows = await self._db.execute_fetchall("SELECT scope FROM conversations WHERE chat_enabled = ?", (mode,))
        return {row[0] for row in rows}

    # --- messages ----------------------------------------------------------------------

    async def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        author_id: str | None = None,
        author_name: str | None = None,
        platform_message_id: str | None = None,
        token_count: int | None = None,
        status: str = OK,
        reasoning: str | None = None,
    ) -> int:
        """Append a message and commit it."""
        cursor = await self._write(
            "INSERT INTO messages (conversation_id, role, content, author_id, author_name, platform_message_id, created_at, token_count, status, reasoning)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, author_id, author_name, platform_message_id, _now(), token_count, status, reasoning),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def receive(
        self,
        conversation_id: int,
        content: str,
        *,
        author_id: str | None,
        author_name: str | None,
        platform_message_id: str | None,
    ) -> int | None:
        """Store a message to be answered, as pending, the moment it arrives (its attached
        files, if any, are added once read: `set_attachments`).

        Returns its id, or None when that platform message is already stored (a
        message is answered once, however often it is seen)."""
        cursor = await self._write(
            "INSERT OR IGNORE INTO messages (conversation_id, role, content, author_id, author_name, platform_message_id, created_at, status)"
            " VALUES (?, 'user', ?, ?, ?, ?, ?, ?)",
            (conversation_id, content, author_id, author_name, platform_message_id, _now(), PENDING),
        )
        return cursor.lastrowid if cursor.rowcount else None

    async def set_attachments(self, message_id: int, attachments: str | None) -> None:
        """Add a stored message's text files once they are read (it is stored before they are)."""
        await self._write("UPDATE messages SET attachments = ? WHERE id = ?", (attachments, message_id))

    async def message(self, message_id: int) -> StoredMessage | None:
        row = await (await self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,))).fetchone()
        return _message(row) if row is not None else None

    async def set_status(self, message_id: int, status: str) -> None:
        await self._write("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))

    async def set_reply_message(self, message_id: int, platform_message_id: str | None) -> None:
        """Remember the bot's message for a pending turn (a restart finishes that message)."""
        await self._write("UPDATE messages SET reply_message_id = ? WHERE id = ?", (platform_message_id, message_id))

    async def finish_turn(
        self,
        user_message_id: int,
        reply: str | None,
        *,
        reasoning: str | None = None,
        platform_message_id: str | None = None,
        last_message_id: str | None = None,
        token_count: int | None = None,
        status: str = OK,
    ) -> int | None:
        """Store a reply and make its user turn part of the conversation, in one transaction.

        Nothing is stored when the user's message was deleted meanwhile (returns None), or
        no reply when `reply` is None (the turn still becomes part of the history).
        `last_message_id`: the last platform message of a reply posted as several."""
        async with self._writing:
            try:
                row = await (await self._db.execute("SELECT conversation_id FROM messages WHERE id = ?", (user_message_id,))).fetchone()
                if row is None:
                    return None
                # The turn joins the conversation now, after the turns answered while it waited:
                # it moves to the end, so the history reads in the order things were answered.
                await self._db.execute(
                    "UPDATE messages SET status = ?, id = (SELECT MAX(id) + 1 FROM messages) WHERE id = ? AND status = ?",
                    (OK, user_message_id, PENDING),
                )
                reply_id = None
                if reply is not None:
                    cursor = await self._db.execute(
                        "INSERT INTO messages (conversation_id, role, content, platform_message_id, reply_message_id, created_at, token_count, status, reasoning)"
                        " VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?, ?)",
                        (row[0], reply, platform_message_id, last_message_id, _now(), token_count, status, reasoning),
                    )
                    reply_id = cursor.lastrowid
                await self._db.commit()
                return reply_id
            except BaseException:
                await self._db.rollback()
                raise

    async def replace_answer(
        self,
        answer_id: int,
        reply: str,
        *,
        reasoning: str | None = None,
        platform_message_id: str | None = None,
        last_message_id: str | None = None,
        token_count: int | None = None,
        status: str = OK,
    ) -> int | None:
        """Rewrite a stored answer in place (Regenerate, Continue): it keeps its place in the
        history. Returns its id, or None when it is gone (deleted meanwhile)."""
        cursor = await self._write(
            "UPDATE messages SET content = ?, reasoning = ?, platform_message_id = ?, reply_message_id = ?, token_count = ?, status = ?,"
            " created_at = ? WHERE id = ? AND role = 'assistant'",
            (reply, reasoning, platform_message_id, last_message_id, token_count, status, _now(), answer_id),
        )
        return answer_id if cursor.rowcount else None

    async def last_turn(self, conversation_id: int) -> tuple[StoredMessage, StoredMessage | None] | None:
        """The newest turn of the history: (the user's message, its answer or None).

        None when the history is empty or ends with an answer to no stored message."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM messages WHERE conversation_id = ? AND status IN ('ok', 'stopped') ORDER BY id DESC LIMIT 2", (conversation_id,)
        )
        newest = [_message(r) for r in rows]
        if newest and newest[0].role == "user":
            return newest[0], None
        if len(newest) == 2 and newest[1].role == "user":
            return newest[1], newest[0]
        return None

    async def pending(self) -> list[PendingTurn]:
        """Messages still waiting for an answer, oldest first, with their conversation."""
        rows = await self._db.execute_fetchall(
            "SELECT m.*, c.scope AS scope, c.channel_id AS conv_channel_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.status = ? ORDER BY m.id",
            (PENDING,),
        )
        return [PendingTurn(_message(r), r["scope"], r["conv_channel_id"]) for r in rows]

    async def messages(self, conversation_id: int) -> list[StoredMessage]:
        """All messages of a conversation, oldest first."""
        rows = await self._db.execute_fetchall("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(r) for r in rows]

    async def newest_first(
        self, conversation_id: int, page: int = 64, *, include: int | None = None, below: int | None = None
    ) -> AsyncIterator[StoredMessage]:
        """Visible messages from the newest back, a page at a time (for context fitting).

        `include` is one pending message, the turn being answered: it comes first (it
        is the newest turn, whatever its id). Other pending messages (waiting their own
        turn) are not part of the conversation yet. `below`: only messages older than
        that id (the history an answer was written from)."""
        if include is not None:
            row = await (await self._db.execute("SELECT * FROM messages WHERE id = ? AND conversation_id = ?", (include, conversation_id))).fetchone()
            if row is not None:
                yield _message(row)
        before = below
        while True:
            rows = await self._db.execute_fetchall(
                "SELECT * FROM messages WHERE conversation_id = ? AND status IN ('ok', 'stopped')"
                " AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
                (conversation_id, before, before, page),
            )
            for row in rows:
                yield _message(row)
            if len(rows) < page:
                return
            before = rows[-1]["id"]

    async def count_messages(self, conversation_id: int) -> int:
        row = await (await self._db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,))).fetchone()
        return int(row[0]) if row else 0

    async def newest_platform_id(self, conversation_id: int) -> int | None:
        """The newest platform message id stored for a conversation (theirs or the bot's)."""
        row = await (
            await self._db.execute(
                "SELECT MAX(CAST(platform_message_id AS INTEGER)), MAX(CAST(reply_message_id AS INTEGER)) FROM messages WHERE conversation_id = ?",
                (conversation_id,),
            )
        ).fetchone()
        values = [int(v) for v in (row or ()) if v is not None]
        return max(values) if values else None

    async def has_platform_id(self, platform_message_id: str) -> bool:
        return await self._find_by_platform_id(platform_message_id) is not None

    async def clear(self, scope: str) -> int:
        """Delete a conversation's messages (its settings stay). Returns how many were deleted.

        Messages still waiting for their answer stay: they are answered after the reset."""
        cursor = await self._write(
            "DELETE FROM messages WHERE conversation_id = (SELECT id FROM conversations WHERE scope = ?) AND status != ?", (scope, PENDING)
        )
        return cursor.rowcount

    async def edit_by_platform_id(self, platform_message_id: str, content: str) -> tuple[str, bool] | None:
        """Follow an edit of a user's message made on the platform.

        Returns (scope, visible) — visible when the edited turn was already part of
        the conversation (so cached prompts no longer hold) — or None if unknown."""
        found = await self._find_by_platform_id(platform_message_id)
        if found is None or found[1] != "user":
            return None
        await self._write("UPDATE messages SET content = ? WHERE platform_message_id = ? AND role = 'user'", (content, platform_message_id))
        return found[0], found[2] in VISIBLE

    async def delete_by_platform_id(self, platform_message_id: str) -> tuple[str, bool] | None:
        """Follow a delete made on the platform. Returns (scope, visible), or None if unknown."""
        found = await self._find_by_platform_id(platform_message_id)
        if found is None:
            return None
        await self._write("DELETE FROM messages WHERE platform_message_id = ?", (platform_message_id,))
        return found[0], found[2] in VISIBLE

    async def _find_by_platform_id(self, platform_message_id: str) -> tuple[str, str, str] | None:
        """(scope, role, status) of the stored message with this platform id."""
        row = await (
            await self._db.execute(
                "SELECT c.scope, m.role, m.status FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.platform_message_id = ?",
                (platform_message_id,),
            )
        ).fetchone()
        return (str(row[0]), str(row[1]), str(row[2])) if row is not None else None

    async def _write(self, sql: str, params: tuple[object, ...]) -> aiosqlite.Cursor:
        """One statement, committed at once (or rolled back)."""
        async with self._writing:
            try:
                cursor = await self._db.execute(sql, params)
                await self._db.commit()
                return cursor
            except BaseException:
                await self._db.rollback()
                raise


def _conversation(row: aiosqlite.Row) -> Conversation:
    keys = row.keys()
    return Conversation(
        id=row["id"],
        scope=row["scope"],
        template=row["template"],
        system_prompt=row["system_prompt"],
        chat_enabled=bool(row["chat_enabled"]) if "chat_enabled" in keys else False,
        channel_id=row["channel_id"] if "channel_id" in keys else None,
        temperature=row["temperature"] if "temperature" in keys else None,
        top_p=row["top_p"] if "top_p" in keys else None,
        n_predict=row["n_predict"] if "n_predict" in keys else None,
        thinking=row["thinking"] if "thinking" in keys else None,
    )


def _message(row: aiosqlite.Row) -> StoredMessage:
    keys = row.keys()
    return StoredMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        author_id=row["author_id"],
        author_name=row["author_name"],
        platform_message_id=row["platform_message_id"],
        created_at=row["created_at"],
        token_count=row["token_count"],
        status=row["status"] if "status" in keys else OK,
        reasoning=row["reasoning"] if "reasoning" in keys else None,
        reply_message_id=row["reply_message_id"] if "reply_message_id" in keys else None,
        attachments=row["attachments"] if "attachments" in keys else None,
    )


def _explain(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"{path} is not a SQLite database (or it is damaged): {text}"
    if "readonly" in text or "read-only" in text:
        return f"the database {path} is read-only; the bot needs to write to it and to its folder"
    if "disk" in text and "full" in text:
        return f"the disk holding {path} is full"
    return f"cannot use the database {path}: {text}"
