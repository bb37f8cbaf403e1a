"""The conversation store: SQLite through aiosqlite, with numbered migrations.

Every write commits at once. A message the bot will answer is on disk the
moment it arrives, as *pending*, before it waits for its turn; it becomes part
of the conversation together with its reply, in one transaction, so a crash or
restart can lose neither, answer nothing twice, nor leave half a reply. WAL mode
lets readers and the writer overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import aiosqlite

from bot.conversations.records import (
    VISIBLE, ChatMode, Conversation, MessageStatus, PendingTurn, StoreBusy, StoredImage, StoreError, StoredMessage,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
IMAGES_VERSION = 6  # migrations/0006_images.sql


BUSY_POLL_MS = 200
"""SQLite's own wait for a lock (busy_timeout) before a statement fails as busy. Kept short: the
waiting is done between attempts with asyncio, so aiosqlite's one thread stays free for reads."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


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

    def __init__(self, db: aiosqlite.Connection, path: Path, *, wait_s: float = 60.0) -> None:
        self._db = db
        self.path = path
        self.wait_s = wait_s  # how long one write waits for a lock held by another program (DATABASE_WAIT_S)
        self._writing = asyncio.Lock()  # one write transaction at a time, in order: another's commit must not commit half of ours
        self._busy_since: float | None = None  # when the current wait for another program's lock began
        self._images = False  # the images tables exist (a store opened `upto` an older version has none)

    @classmethod
    async def open(cls, path: Path | str, *, upto: int | None = None, wait_s: float = 60.0) -> Store:
        """Open (creating with mode 0600 if new) and migrate. `upto` stops at a version (tests);
        `wait_s`: how long a write waits for a lock another program holds (DATABASE_WAIT_S)."""
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
        store = cls(db, path, wait_s=wait_s)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 200")  # BUSY_POLL_MS (a PRAGMA takes no parameters)
            mode = await store._patiently(lambda: store._fetch_one("PRAGMA journal_mode = WAL", ()))
            if mode is not None and mode[0] != "wal" and str(path) != ":memory:":
                log.warning("database %s: WAL mode not available (journal_mode=%s)", path, mode[0])
            async with store._writing:
                await store._patiently(lambda: store._migrate(upto), rollback=True)
                await store._patiently(store._check_writable, rollback=True)
            store._images = await store.schema_version() >= IMAGES_VERSION
        except StoreBusy as exc:
            await db.close()
            raise StoreError(f"{exc}; is another program using it?") from None
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
        row = await self._row("SELECT MAX(version) FROM schema_migrations")
        return int(row[0] or 0) if row else 0

    # --- images ------------------------------------------------------------------------

    async def add_images(self, message_id: int, images: Sequence[tuple[StoredImage, bytes]]) -> bool:
        """Add images (their description and bytes) after a message's others, in one transaction.
        False when the message is gone (deleted while its images downloaded)."""

        async def add() -> bool:
            row = await self._fetch_one(
                "SELECT COALESCE((SELECT MAX(position) + 1 FROM message_images WHERE message_id = ?), 0) FROM messages WHERE id = ?",
                (message_id, message_id),
            )
            if row is None:
                return False
            for position, (image, data) in enumerate(images, start=int(row[0])):
                await self._db.execute("INSERT OR IGNORE INTO image_blobs (sha256, data) VALUES (?, ?)", (image.sha256, data))
                await self._db.execute(
                    "INSERT INTO message_images (message_id, position, name, sha256, mime, width, height, bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (message_id, position, image.name, image.sha256, image.mime, image.width, image.height, image.size),
                )
            await self._db.commit()
            return True

        return await self._transaction(add)

    async def image_data(self, sha256: str) -> bytes | None:
        """The stored bytes of an image (None: no message shows it any more)."""
        row = await self._row("SELECT data FROM image_blobs WHERE sha256 = ?", (sha256,))
        return bytes(row[0]) if row is not None else None

    async def keep_images(self, platform_message_id: str, names: Sequence[str]) -> tuple[str, bool] | None:
        """Follow an edit that removed attachments: keep only the images of that message whose
        file names are in `names` (each name as often as it is listed). Returns (scope, visible)
        as `edit_by_platform_id` does when an image went, else None."""
        found = await self._find_by_platform_id(platform_message_id)
        if found is None or found[1] != "user":
            return None
        rows = await self._rows(
            "SELECT i.message_id, i.position, i.name FROM message_images i JOIN messages m ON m.id = i.message_id"
            " WHERE m.platform_message_id = ? AND m.role = 'user' ORDER BY i.position",
            (platform_message_id,),
        )
        left = list(names)
        doomed = []
        for message_id, position, name in rows:
            if name in left:
                left.remove(name)
            else:
                doomed.append((message_id, position))
        if not doomed:
            return None

        async def delete() -> None:
            await self._db.executemany("DELETE FROM message_images WHERE message_id = ? AND position = ?", doomed)
            await self._db.commit()

        await self._transaction(delete)
        return found[0], found[2] in VISIBLE

    async def _with_images(self, messages: list[StoredMessage]) -> list[StoredMessage]:
        """The messages with their images filled in (one query for them all)."""
        if not messages or not self._images:
            return messages
        ids = [m.id for m in messages]
        found: dict[int, list[StoredImage]] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            rows = await self._rows(
                f"SELECT * FROM message_images WHERE message_id IN ({','.join('?' * len(chunk))}) ORDER BY message_id, position", tuple(chunk)
            )
            for r in rows:
                found.setdefault(r["message_id"], []).append(StoredImage(r["name"], r["sha256"], r["mime"], r["width"], r["height"], r["bytes"]))
        return [replace(m, images=tuple(found[m.id])) if m.id in found else m for m in messages]

    # --- reads and writes that wait out another program's lock ----------------------------

    async def _patiently(self, attempt: Callable[[], Awaitable[T]], *, rollback: bool = False) -> T:
        """Run `attempt` until SQLite does not report the database busy (locked by another
        program: an admin's open transaction, a backup, VACUUM), for at most `wait_s` seconds,
        sleeping between attempts without blocking the event loop. Raises StoreBusy after that."""
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            try:
                result = await attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if rollback:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.rollback()
                now = time.monotonic()
                if self._busy_since is None:
                    self._busy_since = now
                    log.warning("the database %s is locked by another program; waiting for it (DATABASE_WAIT_S=%g s per write)", self.path, self.wait_s)
                if now >= deadline:
                    raise StoreBusy(f"the database {self.path} has been locked by another program for more than {self.wait_s:g} s") from None
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)
                continue
            if self._busy_since is not None:
                log.warning("the database %s is writable again after %.0f s", self.path, time.monotonic() - self._busy_since)
                self._busy_since = None
            return result

    async def _fetch_one(self, sql: str, params: tuple[object, ...]) -> aiosqlite.Row | None:
        return await (await self._db.execute(sql, params)).fetchone()

    async def _row(self, sql: str, params: tuple[object, ...] = ()) -> aiosqlite.Row | None:
        return await self._patiently(lambda: self._fetch_one(sql, params))

    async def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[aiosqlite.Row]:
        return list(await self._patiently(lambda: self._db.execute_fetchall(sql, params)))

    async def _write(self, sql: str, params: tuple[object, ...]) -> aiosqlite.Cursor:
        """One statement, committed at once (or rolled back), after the writes before it."""

        async def attempt() -> aiosqlite.Cursor:
            cursor = await self._db.execute(sql, params)
            await self._db.commit()
            return cursor

        return await self._transaction(attempt)

    async def _transaction(self, body: Callable[[], Awaitable[T]]) -> T:
        """Run `body` (statements, then its own commit) as one transaction, in order after the
        writes before it, waiting out another program's lock (it starts over after a rollback)."""
        async with self._writing:
            try:
                return await self._patiently(body, rollback=True)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.rollback()
                raise

    # --- the bot's own state -----------------------------------------------------------

    async def state(self, key: str) -> str | None:
        row = await self._row("SELECT value FROM bot_state WHERE key = ?", (key,))
        return str(row[0]) if row is not None else None

    async def set_state(self, key: str, value: str) -> None:
        await self._write("INSERT INTO bot_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # --- conversations -----------------------------------------------------------------

    async def conversation(self, scope: str, *, channel_id: str | None = None) -> Conversation:
        """The conversation for `scope`, created on first use; `channel_id` records where it happens."""

        async def create() -> None:
            await self._db.execute("INSERT OR IGNORE INTO conversations (scope, created_at) VALUES (?, ?)", (scope, _now()))
            if channel_id is not None:
                await self._db.execute("UPDATE conversations SET channel_id = ? WHERE scope = ? AND channel_id IS NOT ?", (channel_id, scope, channel_id))
            await self._db.commit()

        await self._transaction(create)
        row = await self._row("SELECT * FROM conversations WHERE scope = ?", (scope,))
        assert row is not None
        return _conversation(row)

    async def find_conversation(self, scope: str) -> Conversation | None:
        """The conversation for `scope` if it exists (nothing is written)."""
        row = await (await self._db.execute("SELECT * FROM conversations WHERE scope = ?", (scope,))).fetchone()
        return _conversation(row) if row is not None else None

    async def conversations(self) -> list[Conversation]:
        """Every conversation (for catching up on what arrived while the bot was down)."""
        return [_conversation(r) for r in await self._rows("SELECT * FROM conversations ORDER BY id")]

    async def set_template(self, scope: str, template: str | None) -> None:
        await self.conversation(scope)
        await self._write("UPDATE conversations SET template = ? WHERE scope = ?", (template, scope))

    async def set_model(self, scope: str, model: str | None) -> None:
        """The model a conversation is answered by; None: the default."""
        await self.conversation(scope)
        await self._write("UPDATE conversations SET model = ? WHERE scope = ?", (model, scope))

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

    async def set_chat_mode(self, scope: str, mode: ChatMode) -> None:
        await self.conversation(scope)
        await self._write("UPDATE conversations SET chat_enabled = ? WHERE scope = ?", (int(ChatMode(mode)), scope))

    async def chat_modes(self) -> dict[str, ChatMode]:
        """Every conversation whose chat mode is not OFF."""
        rows = await self._rows("SELECT scope, chat_enabled FROM conversations WHERE chat_enabled != ?", (int(ChatMode.OFF),))
        return {row[0]: ChatMode(row[1]) for row in rows}

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
        status: MessageStatus = MessageStatus.OK,
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
            (conversation_id, content, author_id, author_name, platform_message_id, _now(), MessageStatus.PENDING),
        )
        return cursor.lastrowid if cursor.rowcount else None

    async def set_attachments(self, message_id: int, attachments: str | None) -> None:
        """Add a stored message's text files once they are read (it is stored before they are)."""
        await self._write("UPDATE messages SET attachments = ? WHERE id = ?", (attachments, message_id))

    async def message(self, message_id: int) -> StoredMessage | None:
        row = await self._row("SELECT * FROM messages WHERE id = ?", (message_id,))
        return (await self._with_images([_message(row)]))[0] if row is not None else None

    async def set_status(self, message_id: int, status: MessageStatus) -> None:
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
        status: MessageStatus = MessageStatus.OK,
    ) -> int | None:
        """Store a reply and make its user turn part of the conversation, in one transaction.

        Nothing is stored when the user's message was deleted meanwhile (returns None), or
        no reply when `reply` is None (the turn still becomes part of the history).
        `last_message_id`: the last platform message of a reply posted as several."""

        async def finish() -> int | None:
            row = await self._fetch_one("SELECT conversation_id FROM messages WHERE id = ?", (user_message_id,))
            if row is None:
                return None
            # The turn joins the conversation now, after the turns answered while it waited:
            # it moves to the end, so the history reads in the order things were answered.
            await self._db.execute(
                "UPDATE messages SET status = ?, id = (SELECT MAX(id) + 1 FROM messages) WHERE id = ? AND status = ?",
                (MessageStatus.OK, user_message_id, MessageStatus.PENDING),
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

        return await self._transaction(finish)

    async def replace_answer(
        self,
        answer_id: int,
        reply: str,
        *,
        reasoning: str | None = None,
        platform_message_id: str | None = None,
        last_message_id: str | None = None,
        token_count: int | None = None,
        status: MessageStatus = MessageStatus.OK,
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
        rows = await self._rows(
            "SELECT * FROM messages WHERE conversation_id = ? AND status IN ('ok', 'stopped') ORDER BY id DESC LIMIT 2", (conversation_id,)
        )
        newest = await self._with_images([_message(r) for r in rows])
        if newest and newest[0].role == "user":
            return newest[0], None
        if len(newest) == 2 and newest[1].role == "user":
            return newest[1], newest[0]
        return None

    async def pending(self) -> list[PendingTurn]:
        """Messages still waiting for an answer, oldest first, with their conversation."""
        rows = await self._rows(
            "SELECT m.*, c.scope AS scope, c.channel_id AS conv_channel_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.status = ? ORDER BY m.id",
            (MessageStatus.PENDING,),
        )
        found = await self._with_images([_message(r) for r in rows])
        return [PendingTurn(m, r["scope"], r["conv_channel_id"]) for m, r in zip(found, rows)]

    async def messages(self, conversation_id: int) -> list[StoredMessage]:
        """All messages of a conversation, oldest first."""
        rows = await self._rows("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return await self._with_images([_message(r) for r in rows])

    async def newest_first(
        self, conversation_id: int, page: int = 64, *, include: int | None = None, below: int | None = None
    ) -> AsyncIterator[StoredMessage]:
        """Visible messages from the newest back, a page at a time (for context fitting).

        `include` is one pending message, the turn being answered: it comes first (it
        is the newest turn, whatever its id). Other pending messages (waiting their own
        turn) are not part of the conversation yet. `below`: only messages older than
        that id (the history an answer was written from)."""
        if include is not None:
            row = await self._row("SELECT * FROM messages WHERE id = ? AND conversation_id = ?", (include, conversation_id))
            if row is not None:
                yield (await self._with_images([_message(row)]))[0]
        before = below
        while True:
            rows = await self._rows(
                "SELECT * FROM messages WHERE conversation_id = ? AND status IN ('ok', 'stopped')"
                " AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
                (conversation_id, before, before, page),
            )
            for stored in await self._with_images([_message(row) for row in rows]):
                yield stored
            if len(rows) < page:
                return
            before = rows[-1]["id"]

    async def count_messages(self, conversation_id: int) -> int:
        row = await self._row("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,))
        return int(row[0]) if row else 0

    async def newest_platform_id(self, conversation_id: int) -> int | None:
        """The newest platform message id stored for a conversation (theirs or the bot's)."""
        row = await self._row(
            "SELECT MAX(CAST(platform_message_id AS INTEGER)), MAX(CAST(reply_message_id AS INTEGER)) FROM messages WHERE conversation_id = ?",
            (conversation_id,),
        )
        values = [int(v) for v in (row or ()) if v is not None]
        return max(values) if values else None

    async def has_platform_id(self, platform_message_id: str) -> bool:
        return await self._find_by_platform_id(platform_message_id) is not None

    async def clear(self, scope: str) -> int:
        """Delete a conversation's messages (its settings stay). Returns how many were deleted.

        Messages still waiting for their answer stay: they are answered after the reset."""
        cursor = await self._write(
            "DELETE FROM messages WHERE conversation_id = (SELECT id FROM conversations WHERE scope = ?) AND status != ?", (scope, MessageStatus.PENDING)
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
        row = await self._row(
            "SELECT c.scope, m.role, m.status FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.platform_message_id = ?",
            (platform_message_id,),
        )
        return (str(row[0]), str(row[1]), str(row[2])) if row is not None else None


def _conversation(row: aiosqlite.Row) -> Conversation:
    keys = row.keys()
    return Conversation(
        id=row["id"],
        scope=row["scope"],
        template=row["template"],
        system_prompt=row["system_prompt"],
        chat_mode=ChatMode(row["chat_enabled"]) if "chat_enabled" in keys else ChatMode.OFF,
        channel_id=row["channel_id"] if "channel_id" in keys else None,
        temperature=row["temperature"] if "temperature" in keys else None,
        top_p=row["top_p"] if "top_p" in keys else None,
        n_predict=row["n_predict"] if "n_predict" in keys else None,
        thinking=row["thinking"] if "thinking" in keys else None,
        model=row["model"] if "model" in keys else None,
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
        status=MessageStatus(row["status"]) if "status" in keys else MessageStatus.OK,
        reasoning=row["reasoning"] if "reasoning" in keys else None,
        reply_message_id=row["reply_message_id"] if "reply_message_id" in keys else None,
        attachments=row["attachments"] if "attachments" in keys else None,
    )


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock we need (transient)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _explain(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"{path} is not a SQLite database (or it is damaged): {text}"
    if "readonly" in text or "read-only" in text:
        return f"the database {path} is read-only; the bot needs to write to it and to its folder"
    if "disk" in text and "full" in text:
        return f"the disk holding {path} is full"
    return f"cannot use the database {path}: {text}"
