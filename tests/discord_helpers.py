"""What the Discord tests do again and again: ask and wait, find the replies to a message,
read the database, press a button. Shared so each test file reads as its scenarios."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.conversations.service import ChatService
from bot.conversations.store import Store
from bot.discord_adapter.buttons import NOT_YOURS
from bot.discord_adapter.client import LlamaBot, create_bot
from bot.engine.remote import RemoteBackend
from tests.conftest import JSON, World, make_settings, mention
from tests.fakediscord import FakeDiscord, Interaction

STOP, REGENERATE, CONTINUE = "stop", "regen", "cont"  # what a button's custom_id says it does
IN_LINE_PREFIX = "\u23f3"  # a "you're #N in line" note starts with it


def replies_to(fake: FakeDiscord, channel: JSON, message: JSON) -> list[JSON]:
    """The bot's messages in `channel` that reply to `message` (its first page, or its queue note)."""
    return [m for m in fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


def answered(fake: FakeDiscord, channel: JSON, message: JSON) -> list[JSON]:
    """The replies to `message` that are more than a "you're #N in line" note (which becomes the reply later)."""
    return [m for m in replies_to(fake, channel, message) if not m["content"].startswith(IN_LINE_PREFIX)]


def pages_after(fake: FakeDiscord, channel: JSON, sent: JSON) -> list[JSON]:
    """The bot's messages in `channel` newer than `sent`, oldest first."""
    return [m for m in fake.bot_messages(channel) if int(m["id"]) > int(sent["id"])]


async def idle(fake: FakeDiscord, bot: LlamaBot, timeout: float = 60) -> None:
    """Nothing running or waiting in the bot's queue."""
    await fake.wait_for(lambda: bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, timeout)


async def send(world: World, channel: JSON, author: JSON, text: str, **extra: Any) -> JSON:
    """Send `text` to the bot (mentioning it in guild channels)."""
    content = text if "guild_id" not in channel else f"{mention(world.fake)} {text}"
    return await world.fake.send_message(channel, author, content, **extra)


async def ask(world: World, bot: LlamaBot, channel: JSON, author: JSON, text: str, *, timeout: float = 60, **extra: Any) -> list[JSON]:
    """Send a message; wait for its reply and for the bot to be idle; return the bot's messages after it."""
    sent = await send(world, channel, author, text, **extra)
    await world.fake.wait_for_bot_message(channel, after=sent, timeout=timeout)
    await idle(world.fake, bot, timeout)
    return pages_after(world.fake, channel, sent)


async def command(world: World, name: str, user: JSON, channel: JSON, **options: object) -> Interaction:
    """Invoke a slash command and wait for its answer."""
    interaction = await world.fake.invoke_command(name, user=user, channel=channel, options=options or None)
    return await interaction.wait_done(60)


async def prompt_of(bot: LlamaBot, scope_key: str) -> Any:  # -> bot.conversations.service.Prompt
    """The prompt the bot would build next for a conversation."""
    return await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope_key))


# --- the database ---------------------------------------------------------------------------


def table(db: Path) -> list[tuple[str, str, str]]:
    """(role, status, content) of every stored message, oldest first."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()


def user_rows(db: Path) -> list[tuple[str, str | None, str]]:
    """(content, attachments, status) of every stored user turn, oldest first."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT content, attachments, status FROM messages WHERE role = 'user' ORDER BY id").fetchall()


def answers(db: Path, where: str) -> list[tuple[str, str, str | None, str | None, int | None]]:
    """(content, status, first message id, last message id, tokens) of the stored answers of a scope."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT m.content, m.status, m.platform_message_id, m.reply_message_id, m.token_count FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id WHERE c.scope = ? AND m.role = 'assistant' ORDER BY m.id",
            (where,),
        ).fetchall()


def everything_stored(db: Path) -> str:
    """All stored text (contents and reasoning), to check that something is nowhere."""
    with sqlite3.connect(db) as conn:
        return " ".join(str(v) for row in conn.execute("SELECT content, reasoning FROM messages") for v in row)


# --- buttons --------------------------------------------------------------------------------


def custom_ids(message: JSON) -> list[str]:
    """The custom ids of a message's buttons, as Discord shows them."""
    return [c["custom_id"] for row in message.get("components") or [] for c in row.get("components") or [] if "custom_id" in c]


def button(message: JSON, action: str) -> str:
    [found] = [c for c in custom_ids(message) if c.startswith(f"llamabot:{action}:")]
    return found


async def press(world: World, bot: LlamaBot, message: JSON, action: str, user: JSON) -> Interaction:
    """Press one of our buttons; wait for the acknowledgement and for the work it started."""
    interaction = await world.fake.press_button(message, button(message, action), user)
    await world.fake.wait_for(lambda: interaction.acked_at is not None, 10)
    await world.fake.wait_for(lambda: not bot.ctx.replies.redoing and bot.ctx.scheduler.running == 0 and bot.ctx.scheduler.waiting == 0, 60)
    return interaction


def bob(world: World) -> JSON:
    """A regular member who did not write the message (and is no moderator)."""
    user = world.fake.add_user("bob", global_name="Bob")
    world.fake.add_member(world.guild, user)
    return user


def assert_refused(interaction: Interaction) -> None:
    assert interaction.response_types == [4] and interaction.ephemeral and interaction.content == NOT_YOURS
    assert interaction.latency is not None and interaction.latency < 3


# --- the bot on a model server (BACKEND=openai) -----------------------------------------------


def remote_settings(tmp_path: Path, base: str, **changes: Any) -> Settings:
    return make_settings(tmp_path, backend="openai", openai_base_url=base, n_ctx=2048, **changes)


@contextlib.asynccontextmanager
async def remote_bot(world: World, settings: Settings, **connect: Any) -> AsyncIterator[Any]:
    """The bot on `RemoteBackend` (a real or a scripted OpenAI-compatible server), against the fake Discord."""
    backend = await RemoteBackend.connect(settings, **connect)
    try:
        async with await Store.open(settings.database_path) as store:
            bot = create_bot(settings, ChatService(backend, store, settings), guild_ready_timeout=0.1)
            async with world.fake.running(bot):
                try:
                    yield bot
                finally:
                    await bot.shutdown(grace=30)
    finally:
        await backend.close()
