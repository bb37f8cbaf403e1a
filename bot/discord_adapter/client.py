"""The Discord adapter: events and slash commands in, replies out.

Everything Discord-specific lives here (and in `discord_output`). A channel
becomes a conversation scope, a Discord message becomes a `UserMessage`, and
the shared `ChatService` does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import signal
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from bot.conversations.attachments import SKIP_REASONS, Skipped, TextFile, decode_text, kind_of, notes_for, render_files
from bot.engine.backend import ModelError
from bot.conversations.service import EMPTY_NOTE, NO_CONTINUE, TOO_LONG_TO_CONTINUE, CannotRedo, ChatService, Reply, UserMessage, open_chat
from bot.config import Settings
from bot.discord_adapter.commands import register_commands
from bot.discord_adapter.output import NO_PINGS, EditBudget, ReplyStreamer, reply_view
from bot.health import Heartbeat, heartbeat_path
from bot.discord_adapter.views import CONTINUE, REGENERATE, STOP, ReplyButton, finished_view, has_button, writing_view
from bot.conversations.scheduler import FairScheduler, Job, QueueFull
from bot.conversations.store import CHAT_ON, CHAT_THREADS, EXPIRED, STOPPED as STOPPED_STATUS, StoredMessage

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong while I was answering. Please try again."
UNDELIVERED = "Sorry, Discord did not accept my reply. Please ask again."
BUSY = "I'm busy with other conversations right now. Please try again in a minute."
NO_TEXT = "I can only read text and text files (like .txt, .md or .py). Write me a message; images, stickers and embeds are ignored."
MENTION_ONLY = "You mentioned me, but there is no message. Ask me something!"
IGNORED = "I ignored the sticker or embed; I can only read text."
# Refusals of slash commands (messages that may not talk to the bot get no answer at all).
REFUSED_BLOCKED = "Sorry, you can't use this bot."
REFUSED_CHANNEL = "I'm not available in this channel."
REFUSED_ROLE = "You need one of the roles allowed to use this bot here."
REFUSED_DMS = "I don't take direct messages; talk to me in the server."
SLOW_DOWN = "Please slow down a little: I answer one message from you every {s:g} seconds."
STOPPED = " *(stopped)*"
RESTARTED = "Sorry, I was restarting when you sent this and it is too old to answer now. Please ask again."
THOUGHT_ONLY = "(I spent my whole reply length thinking and did not get to an answer. Ask me again, or raise LLAMA_N_PREDICT.)"
NOT_YOURS = "Only the person I answered (or a moderator) can use these buttons."
NOT_WRITING = "That reply is not being written any more."
ALREADY = "Already on it."
IN_LINE = "\u23f3 Busy: you're #{n} in line."
NO_THREAD_PERMISSION = "I could not start a thread here (I need the Create Public Threads permission), so I answered in the channel."
NO_THREAD = "I could not start a thread here, so I answered in the channel."
# Create Public Threads: /chat threads starts a thread for each conversation.
PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, create_public_threads=True,
    read_message_history=True, add_reactions=True,
)


def scope_for(guild_id: int | None, channel_id: int | None, user_id: int) -> str:
    """The conversation key: one per guild channel or thread, one per DM user."""
    if guild_id is None:
        return f"dm:{user_id}"
    return f"guild:{guild_id}:channel:{channel_id}"


def configure_endpoints(settings: Settings) -> None:
    """Point discord.py at DISCORD_API_BASE / DISCORD_GATEWAY_URL (a proxy, or the tests' fake)."""
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


@dataclass
class _Turn:
    """A stored message the bot will answer, waiting for or holding a slot."""

    message: discord.Message
    scope: str
    stored: asyncio.Future[int | None]  # the stored (pending) row's id, once it is on disk; None: seen before
    notes: list[str] = field(default_factory=list)
    waiting_note: asyncio.Task[discord.Message | None] | None = None
    first: discord.Message | None = None  # the bot's message already posted for it (before a restart)
    thread: discord.abc.Messageable | None = None  # where the reply goes when not beside the message (a thread started for it)

    @property
    def channel(self) -> discord.abc.Messageable:
        return self.thread or self.message.channel


@dataclass
class _Redo:
    """A Regenerate or Continue button press, waiting for or holding its channel's turn."""

    action: str  # REGENERATE or CONTINUE
    interaction: discord.Interaction
    scope: str
    answered: int  # the Discord id of the message the answer answers
    author: int  # who wrote it


discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # a text bot: no voice warnings


def refusal(settings: Settings, *, user_id: int, channel_ids: set[int], role_ids: set[int] | None, in_dm: bool) -> str | None:
    """Why this person may not use the bot here (one of the REFUSED_* texts), or None when they may.

    BLOCKED_USER_IDS applies everywhere. In guilds, ALLOWED_CHANNEL_IDS lists channels
    (a thread counts when its parent is listed: `channel_ids` holds both) and ALLOWED_ROLE_IDS
    roles (an ADMIN_ROLE_IDS role counts too; `role_ids` None: not known yet, see
    `LlamaBot._refusal_fetching_roles`). DMs follow `settings.dms_open`: closed by default
    as soon as either list restricts the bot, so "only these channels" also means "not in DMs"."""
    if user_id in settings.blocked_user_ids:
        return REFUSED_BLOCKED
    if in_dm:
        return None if settings.dms_open else REFUSED_DMS
    if settings.allowed_channel_ids and not channel_ids & settings.allowed_channel_ids:
        return REFUSED_CHANNEL
    if settings.allowed_role_ids and role_ids is not None and not role_ids & (settings.allowed_role_ids | settings.admin_role_ids):
        return REFUSED_ROLE
    return None


class _GatedTree(app_commands.CommandTree):
    """The slash command tree, with who-may-use-the-bot checked before any command runs."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        client = self.client
        assert isinstance(client, LlamaBot)
        return await client.check_interaction(interaction)


class LlamaBot(discord.Client):
    """The bot. `chat` is the shared conversation service over the one loaded model."""

    def __init__(self, settings: Settings, chat: ChatService, **options: object) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
        super().__init__(intents=intents, allowed_mentions=NO_PINGS, **options)  # type: ignore[arg-type]
        self.settings = settings
        self.chat = chat
        self.tree = _GatedTree(self)
        self.scheduler = FairScheduler(settings.parallel, settings.max_queue)
        self.edit_budget = EditBudget()
        self.chat_scopes: set[str] = set()  # channels turned on with /chat on
        self.thread_scopes: set[str] = set()  # channels set to /chat threads
        self.replies: dict[str, Reply] = {}  # replies being generated, by scope (for /stop)
        self._answering: dict[int, Reply] = {}  # the same, by the Discord id of the message being answered
        self._redoing: set[int] = set()  # answered message ids with a Regenerate/Continue queued or running
        self._accepted_at: dict[int, float] = {}  # user id -> when we last took a message (cooldown)
        self._warned: set[int] = set()
        self._caught_up = asyncio.Event()  # set once restart work is done; live messages wait for it
        self._catching_up = asyncio.Lock()
        self._resumed = False
        self._background: set[asyncio.Task[None]] = set()
        self._files: aiohttp.ClientSession | None = None  # downloads attachments (created on first use)
        self.started_at = time.time()
        register_commands(self)

    # --- lifecycle ---------------------------------------------------------------------

    async def setup_hook(self) -> None:
        self.chat_scopes = await self.chat.store.chat_mode_scopes(CHAT_ON)
        self.thread_scopes = await self.chat.store.chat_mode_scopes(CHAT_THREADS)
        self.add_dynamic_items(ReplyButton)  # buttons on replies posted by earlier runs work too
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
            log.info("slash commands synced to guild %s", self.settings.dev_guild_id)
        else:
            await self.tree.sync()
            log.info("slash commands synced globally (new commands can take a while to appear)")

    async def on_ready(self) -> None:
        assert self.user is not None
        invite = discord.utils.oauth_url(self.user.id, permissions=PERMISSIONS, scopes=("bot", "applications.commands"))
        log.info("logged in as %s (id %s) in %d guild(s); invite link: %s", self.user, self.user.id, len(self.guilds), invite)
        # A new gateway session (first start, or after an outage too long to resume) missed events: catch up.
        self._in_background(self._after_connect())

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self, grace: float = 20.0) -> None:
        """Finish in-flight replies (or stop them after `grace` s, keeping what was written), then log out.

        Messages still waiting their turn stay pending in the database: the next start answers them."""
        for task in list(self._background):
            task.cancel()
        await self.scheduler.close(grace, wind_down=self._stop_all)
        await self.close()

    async def close(self) -> None:
        if self._files is not None:
            await self._files.close()
        await super().close()

    def _stop_all(self) -> None:
        for reply in list(self.replies.values()):
            reply.stop()

    # --- after a restart or an outage --------------------------------------------------

    async def _after_connect(self) -> None:
        """Answer what waited across a restart (once), then what arrived while the bot was away."""
        async with self._catching_up:
            try:
                if not self._resumed:
                    self._resumed = True
                    await self._resume_pending()
                await self._catch_up()
            except Exception:
                log.exception("could not finish catching up after connecting")
            finally:
                self._caught_up.set()

    async def _resume_pending(self) -> None:
        """Messages stored as pending by an earlier run: answer the recent ones, in order, as if
        nothing happened; tell the senders of older ones that the bot was restarting."""
        now = discord.utils.utcnow()
        resumed = expired = 0
        for turn in await self.chat.store.pending():
            if not turn.scope.startswith(("guild:", "dm:")) or not turn.message.platform_message_id:
                continue  # not a Discord conversation (the terminal chat's)
            message, thread = await self._fetch_pending(turn.channel_id, turn.message.platform_message_id)
            if message is None:  # deleted while the bot was down, or no longer reachable
                await self.chat.delete_message(turn.message.platform_message_id)
                continue
            if await self._refusal_fetching_roles(message) is not None:  # blocked, or the allowed lists changed, while it waited
                await self.chat.store.set_status(turn.message.id, EXPIRED)
                continue
            first = await self._fetch_message(turn.channel_id, turn.message.reply_message_id) if turn.message.reply_message_id else None
            first = first or await self._own_reply_to(message, thread)  # posted just before the process died
            age = (now - message.created_at).total_seconds()
            if age > self.settings.resume_max_age_s:
                await self.chat.store.set_status(turn.message.id, EXPIRED)
                await self._show_note(message, first, RESTARTED)
                expired += 1
                continue
            text = self._text_of(message)
            if text != turn.message.content:  # edited while the bot was down
                await self.chat.edit_message(turn.message.platform_message_id, text)
            notes: list[str] = []
            if message.attachments and turn.message.attachments is None:  # stopped while they downloaded
                if await self._add_files(message, turn.message.id, notes) is None:
                    continue
            self._queue(_Turn(message, turn.scope, _done(turn.message.id), notes, first=first, thread=thread))
            resumed += 1
        if resumed or expired:
            log.info("after the restart: answering %d waiting message(s); %d were too old (RESUME_MAX_AGE_S)", resumed, expired)

    async def _catch_up(self) -> None:
        """Read each channel where the bot talks from the last message it stored, and answer
        what was addressed to it while it was away (bounded by CATCHUP_MAX_AGE_S and
        CATCHUP_MAX_MESSAGES per channel). A message already stored is never answered again."""
        if not self.settings.catchup_max_messages:
            return
        oldest = discord.utils.utcnow() - datetime.timedelta(seconds=self.settings.catchup_max_age_s)
        floor = discord.utils.time_snowflake(oldest)
        channels: dict[int, int | None] = {}  # channel id -> newest stored message id there
        for conversation in await self.chat.store.conversations():
            channel_id = conversation.channel_id or _channel_of_scope(conversation.scope)
            if channel_id is not None:
                channels[int(channel_id)] = await self.chat.store.newest_platform_id(conversation.id)
        for channel_id in self.settings.chat_channels:
            channels.setdefault(channel_id, None)
        answered = 0
        for channel_id, newest in channels.items():
            channel = await self._channel(str(channel_id))
            if channel is None:
                continue
            try:
                async for message in channel.history(after=discord.Object(max(newest or 0, floor)), oldest_first=True, limit=self.settings.catchup_max_messages):
                    if self._wants_answer(message) and not await self.chat.store.has_platform_id(str(message.id)):
                        if await self._refusal_fetching_roles(message) is not None:
                            continue
                        text = self._text_of(message)
                        if text or message.attachments:
                            answered += await self._accept(message, text, [], force=True)
            except discord.HTTPException as exc:
                log.warning("could not read what arrived in channel %s while I was away: %s", channel_id, exc)
        if answered:
            log.info("caught up: answering %d message(s) that arrived while I was away", answered)

    async def _channel(self, channel_id: str | None) -> discord.abc.Messageable | None:
        if channel_id is None:
            return None
        channel = self.get_channel(int(channel_id))
        if channel is None:
            try:
                channel = await self.fetch_channel(int(channel_id))
            except discord.HTTPException:
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def _fetch_pending(self, channel_id: str | None, message_id: str) -> tuple[discord.Message | None, discord.Thread | None]:
        """A waiting message, and the thread its reply goes to when the bot started one from it
        (that thread has the message's id; the message itself is in the thread's parent)."""
        where = await self._channel(channel_id)
        if isinstance(where, discord.Thread) and str(where.id) == message_id and where.parent_id:
            return await self._fetch_message(str(where.parent_id), message_id), where
        return await self._fetch_message(channel_id, message_id), None

    async def _fetch_message(self, channel_id: str | None, message_id: str | None) -> discord.Message | None:
        channel = await self._channel(channel_id)
        if channel is None or message_id is None:
            return None
        try:
            return await channel.fetch_message(int(message_id))
        except discord.HTTPException:
            return None

    async def _own_reply_to(self, message: discord.Message, thread: discord.Thread | None = None) -> discord.Message | None:
        """The bot's message in reply to `message`, if it posted one (its queue note or a
        partial reply) that the database did not get to record before the process died.
        In a thread started from `message`, that is the bot's first message there."""
        where, after = (thread, None) if thread is not None else (message.channel, message)
        try:
            async for later in where.history(after=after, limit=50, oldest_first=True):
                if self.user is None or later.author.id != self.user.id:
                    continue
                if thread is not None or (later.reference and later.reference.message_id == message.id):
                    return later
        except discord.HTTPException:
            pass
        return None

    async def _show_note(self, message: discord.Message, first: discord.Message | None, text: str) -> None:
        """A note in reply to `message`, in the bot's message already there if there is one."""
        if first is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.edit_budget.edit(first, content=text, allowed_mentions=NO_PINGS, view=None)
                return
        await self._note(message, text)

    # --- messages ----------------------------------------------------------------------

    def _wants_answer(self, message: discord.Message) -> bool:
        """A message from a person, of a normal kind, addressed to the bot, by someone who may use it here."""
        if message.author.bot or message.webhook_id is not None:
            return False  # never bots, including this one
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return False  # joins, pins, boosts...
        if not self._addressed(message):
            return False
        why = self._refusal_of(message)
        if why is not None:  # no answer at all, not even a note: the bot is not for them here
            log.debug("not answering message %s from user %s in channel %s: %s", message.id, message.author.id, message.channel.id, why)
            return False
        return True

    def _refusal_of(self, message: discord.Message, role_ids: set[int] | None = None) -> str | None:
        """`refusal` for a message. A live message carries its author's roles; one fetched
        later (after a restart) does not: then roles are not checked unless given."""
        channel = message.channel
        if role_ids is None and isinstance(message.author, discord.Member):
            role_ids = {role.id for role in message.author.roles}
        return refusal(
            self.settings,
            user_id=message.author.id,
            channel_ids={i for i in (channel.id, getattr(channel, "parent_id", None)) if i},
            role_ids=role_ids,
            in_dm=message.guild is None,
        )

    async def _refusal_fetching_roles(self, message: discord.Message) -> str | None:
        """`_refusal_of` for a message read back from Discord (resumed, caught up), fetching
        its author's roles when ALLOWED_ROLE_IDS needs them."""
        role_ids = None
        if message.guild is not None and self.settings.allowed_role_ids and not isinstance(message.author, discord.Member):
            try:
                member = await message.guild.fetch_member(message.author.id)
                role_ids = {role.id for role in member.roles}
            except discord.NotFound:
                role_ids = set()  # no longer a member
            except discord.HTTPException as exc:
                log.warning("could not read the roles of user %s: %s", message.author.id, exc)
                role_ids = set()
        return self._refusal_of(message, role_ids)

    async def check_interaction(self, interaction: discord.Interaction) -> bool:
        """Slash commands (and any other interaction) from someone who may not use the bot here
        get a short ephemeral refusal. The decision is logged at debug level."""
        channel = interaction.channel
        why = refusal(
            self.settings,
            user_id=interaction.user.id,
            channel_ids={i for i in (interaction.channel_id, getattr(channel, "parent_id", None)) if i},
            role_ids={role.id for role in interaction.user.roles} if isinstance(interaction.user, discord.Member) else set(),
            in_dm=interaction.guild_id is None,
        )
        name = interaction.command.name if interaction.command else interaction.type.name
        log.debug("interaction %s from user %s in channel %s: %s", name, interaction.user.id, interaction.channel_id, why or "allowed")
        if why is None:
            return True
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.send_message(why, ephemeral=True)
        return False

    async def on_message(self, message: discord.Message) -> None:
        if not self._wants_answer(message):
            return
        await self._caught_up.wait()  # what waited across a restart goes first, in order
        text = self._text_of(message)
        extras = bool(message.embeds or message.stickers)
        if not text and not message.attachments:
            mentioned_only = not extras and bool(message.content.strip())
            await self._note(message, MENTION_ONLY if mentioned_only else NO_TEXT)
            return
        if not await self._take_from(message):
            return
        await self._accept(message, text, [IGNORED] if extras else [])

    async def _accept(self, message: discord.Message, text: str, notes: list[str], *, force: bool = False) -> bool:
        """Take a message: its place in line is taken at once (arrival order), and it is
        stored as pending before its turn can start, so from here on a restart cannot lose it.

        `force` takes it even past MAX_QUEUE: it was accepted before (a restart, an outage).
        In a channel set to /chat threads, the conversation moves to a new thread first."""
        thread = None
        if self._starts_threads(message):
            thread, problem = await self._thread_for(message, text)
            notes = notes + [problem] if problem else notes
        channel = thread or message.channel
        scope = scope_for(message.guild.id if message.guild else None, channel.id, message.author.id)
        turn = _Turn(message, scope, asyncio.get_running_loop().create_future(), notes, thread=thread)
        try:
            job = self.scheduler.submit(scope, lambda: self._answer(turn), force=force)
        except QueueFull:
            if not self.scheduler.closed:
                log.warning("queue full: turned away a message in %s", scope)
                await self._note(message, BUSY)
            return False
        author = message.author
        try:
            # Stored at once, before its files are downloaded: from here on a restart cannot lose
            # it, and an edit or delete during the download finds it. The files are added once read.
            stored = await self.chat.receive(
                UserMessage(
                    scope, text, author_id=str(author.id), author_name=author.display_name,
                    platform_message_id=str(message.id), channel_id=str(channel.id),
                )
            )
            if stored is not None and message.attachments:
                stored = await self._add_files(message, stored, turn.notes)
        except Exception as exc:  # e.g. the disk is full: the turn apologises
            turn.stored.set_exception(exc)
            return False
        turn.stored.set_result(stored)
        if stored is None:
            return False  # stored already: seen twice (a catch-up racing a live event)
        self._note_position(turn, job)
        return True

    async def _add_files(self, message: discord.Message, stored: int, notes: list[str]) -> int | None:
        """Read a stored message's text files into its row; their notes go to `notes`. None when
        nothing is left to answer (no text, only images or binary files): the row goes, with a note."""
        files, file_notes = await self._read_files(message)
        notes.extend(file_notes)
        if files:
            await self.chat.store.set_attachments(stored, files)
            return stored
        row = await self.chat.store.message(stored)  # its latest text (an edit may have come meanwhile)
        if row is None or row.content:
            return stored  # deleted meanwhile (its turn finds nothing to answer), or text to answer
        if self.is_closed():  # a download cut short by shutdown: kept pending, read again on restart
            return None
        await self.chat.delete_message(str(message.id))
        await self._note(message, NO_TEXT)
        return None

    async def _read_files(self, message: discord.Message) -> tuple[str | None, list[str]]:
        """The message's text attachments rendered for the prompt (None: none readable), and
        the notes for the reply: files cut at ATTACHMENT_MAX_KB, files skipped and why."""
        limit = self.settings.attachment_max_kb * 1024
        most = self.settings.attachment_max_files
        files: list[TextFile] = []
        skipped: list[Skipped] = []
        for i, attachment in enumerate(message.attachments):
            name = attachment.filename
            kind = kind_of(name, attachment.content_type)
            if not limit or not most:
                skipped.append(Skipped(name, "reading attached files is turned off"))
            elif i >= most:
                skipped.append(Skipped(name, f"I read at most {most} files per message"))
            elif kind in SKIP_REASONS:
                skipped.append(Skipped(name, SKIP_REASONS[kind]))
            else:
                try:
                    data, cut = await self._download(attachment, limit)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    log.warning("could not download attachment %s of message %s: %s", attachment.id, message.id, exc)
                    skipped.append(Skipped(name, "I could not download it"))
                    continue
                text = decode_text(data, cut=cut)
                if text is None:
                    skipped.append(Skipped(name, SKIP_REASONS["binary"]))
                elif not text.strip():
                    skipped.append(Skipped(name, "it is empty"))
                else:
                    files.append(TextFile(name, text, size=max(attachment.size, len(data)), read_bytes=len(data), cut=cut))
        return render_files(files), notes_for(files, skipped)

    async def _download(self, attachment: discord.Attachment, limit: int) -> tuple[bytes, bool]:
        """The first `limit` bytes of an attachment, and whether the file is longer. The declared
        size is looked at first, so a huge file costs one bounded read (a Range request), never
        a full download; reading stops at the bound whatever the server sends."""
        if self._files is None or self._files.closed:
            self._files = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=10))
        headers = {"Range": f"bytes=0-{limit - 1}"} if attachment.size > limit else {}
        data = bytearray()
        async with self._files.get(attachment.url, headers=headers) as resp:
            resp.raise_for_status()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > limit:
                    break
        return bytes(data[:limit]), attachment.size > limit or len(data) > limit

    def _queue(self, turn: _Turn) -> None:
        """Queue a turn stored before (by an earlier run)."""
        try:
            job = self.scheduler.submit(turn.scope, lambda: self._answer(turn), force=True)
        except QueueFull:
            return  # shutting down: it stays pending, and the next start answers it
        self._note_position(turn, job)

    def _note_position(self, turn: _Turn, job: Job) -> None:
        position = self.scheduler.position(job)
        if position:
            turn.waiting_note = asyncio.ensure_future(self._waiting_note(turn, position))

    async def _waiting_note(self, turn: _Turn, position: int) -> discord.Message | None:
        """Tell the sender their place in line (in the bot's own message, if it already has one)."""
        text = IN_LINE.format(n=position)
        if turn.first is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.edit_budget.edit(turn.first, content=text, allowed_mentions=NO_PINGS, view=None)
                return turn.first
        note = await self._note(turn.message, text, channel=turn.thread)
        if note is not None and turn.stored.done() and turn.stored.result() is not None:
            await self.chat.store.set_reply_message(turn.stored.result(), str(note.id))
        return note

    def _addressed(self, message: discord.Message) -> bool:
        """DMs, mentions, replies to the bot, every message in chat-enabled channels, and
        every message in the threads the bot started in a /chat threads channel."""
        if message.guild is None:
            return True
        assert self.user is not None
        if any(user.id == self.user.id for user in message.mentions):
            return True
        ref = message.reference
        if ref is not None and isinstance(ref.resolved, discord.Message) and ref.resolved.author.id == self.user.id:
            return True
        channel = message.channel
        parent_id = getattr(channel, "parent_id", None)
        ids = {channel.id, parent_id}
        if ids & set(self.settings.chat_channels):
            return True
        guild_id = message.guild.id
        if parent_id and scope_for(guild_id, parent_id, 0) in self.thread_scopes and getattr(channel, "owner_id", None) == self.user.id:
            return True  # the bot's own thread (Discord remembers who started it, across restarts)
        return any(scope_for(guild_id, i, 0) in self.chat_scopes for i in ids if i)

    def _starts_threads(self, message: discord.Message) -> bool:
        """A message in a /chat threads channel (not in a thread): its conversation gets a thread."""
        if message.guild is None or isinstance(message.channel, discord.Thread):
            return False
        return scope_for(message.guild.id, message.channel.id, 0) in self.thread_scopes

    async def _thread_for(self, message: discord.Message, text: str) -> tuple[discord.Thread | None, str | None]:
        """A new thread started from `message` (or the one it already has, after a restart),
        or None and a note to add to the reply when Discord refuses."""
        if message.thread is not None:
            return message.thread, None
        try:
            return await message.create_thread(name=thread_name(text)), None
        except discord.Forbidden:
            log.warning("no permission to start a thread in channel %s; answering in the channel", message.channel.id)
            return None, NO_THREAD_PERMISSION
        except discord.HTTPException as exc:
            if exc.code == 160004:  # Discord: a thread has already been started from this message
                with contextlib.suppress(discord.HTTPException):
                    existing = await self.fetch_channel(message.id)  # a message's thread has the message's id
                    if isinstance(existing, discord.Thread):
                        return existing, None
            log.warning("could not start a thread in channel %s (%s); answering in the channel", message.channel.id, exc)
            return None, NO_THREAD

    def _text_of(self, message: discord.Message) -> str:
        """The message text with the bot's own mention removed and other mentions as names."""
        assert self.user is not None
        text = re.sub(rf"<@!?{self.user.id}>", " ", message.content)
        names = {str(u.id): u.display_name for u in message.mentions}
        text = re.sub(r"<@!?(\d+)>", lambda m: "@" + names.get(m.group(1), "someone"), text)
        if message.guild is not None:
            text = re.sub(r"<@&(\d+)>", lambda m: "@" + _role_name(message.guild, int(m.group(1))), text)
            text = re.sub(r"<#(\d+)>", lambda m: "#" + _channel_name(message.guild, int(m.group(1))), text)
        return text.strip()

    async def _take_from(self, message: discord.Message) -> bool:
        """The per-user cooldown: one answered message per USER_COOLDOWN_S seconds."""
        cooldown = self.settings.user_cooldown_s
        now = time.monotonic()
        uid = message.author.id
        last = self._accepted_at.get(uid)
        if last is not None and now - last < cooldown:
            if uid not in self._warned:  # say it once, not once per spammed message
                self._warned.add(uid)
                await self._note(message, SLOW_DOWN.format(s=cooldown))
            return False
        if len(self._accepted_at) > 10_000:  # keep memory bounded under a flood of new users
            self._accepted_at = {u: t for u, t in self._accepted_at.items() if now - t < cooldown}
            self._warned &= self._accepted_at.keys()
        self._accepted_at[uid] = now
        self._warned.discard(uid)
        return True

    async def _note(self, message: discord.Message, text: str, *, channel: discord.abc.Messageable | None = None) -> discord.Message | None:
        """A short visible answer that is not part of the conversation (in `channel`, a
        thread started from the message, if given)."""
        try:
            if channel is not None:
                return await channel.send(text, allowed_mentions=NO_PINGS)
            return await message.channel.send(
                text, reference=message.to_reference(fail_if_not_exists=False), mention_author=False, allowed_mentions=NO_PINGS
            )
        except discord.HTTPException as exc:
            log.warning("could not post a note in %s: %s", message.channel.id, exc)
            return None

    async def _answer(self, turn: _Turn) -> None:
        """Generate and post the reply to one stored message; store it with its turn."""
        first = await turn.waiting_note if turn.waiting_note is not None else turn.first
        stop = writing_view(turn.message.id, turn.message.author.id)
        out = ReplyStreamer(turn.message, budget=self.edit_budget, first=first, channel=turn.thread, view=stop)
        typing = _Typing(turn.channel)
        await typing.start()
        reply: Reply | None = None
        try:
            message_id = await turn.stored
            if message_id is None:
                return  # seen twice: the other sighting answers it
            reply = await self.chat.answer(turn.scope, message_id)
            if reply is None:  # deleted while it waited: nothing to answer
                await _delete_all(out.messages)
                return
            self.replies[turn.scope] = reply
            self._answering[turn.message.id] = reply
            await self._retire_buttons(reply, turn.channel)
            await self._stream(reply, out, typing)
            await reply.generation.wait()
        except Exception:
            log.exception("could not answer message %s in %s", turn.message.id, turn.scope)
            await typing.stop()
            await self._apologize(out)
            await self._settle(turn)
            return
        finally:
            await typing.stop()
            self.replies.pop(turn.scope, None)
            self._answering.pop(turn.message.id, None)
            if reply is not None and not reply.generation.done:
                reply.stop()  # this job was cancelled (shutdown): free the slot
        if reply.discarded:  # the message was deleted while its reply was written
            await _delete_all(out.messages)
            return
        if reply.finish_reason == "error":
            log.error("generation failed for message %s in %s: %s", turn.message.id, turn.scope, reply.generation.error)
            await self._apologize(out)
            await self._settle(turn)
            return
        sent: list[discord.Message] | None = None
        try:
            view = self._finished_view(reply, turn.message.id, turn.message.author.id)
            sent = await out.finish(self._final_text(reply, turn.notes), view=view)
        except discord.HTTPException as exc:
            log.error("could not deliver the reply to message %s in %s (%s); kept as undelivered", turn.message.id, turn.scope, exc)
            await self._note(turn.message, UNDELIVERED, channel=turn.thread)
        await _save(reply, sent, f"the reply to message {turn.message.id} in {turn.scope}")

    async def _retire_buttons(self, reply: Reply, channel: discord.abc.Messageable) -> None:
        """A new turn starts: the answer before it can no longer be regenerated or continued,
        so its buttons go (in the background; found in the store, so also after a restart)."""
        last = await self.chat.store.last_turn(reply.conversation.id)
        answer = last[1] if last is not None else None
        message_id = answer and (answer.reply_message_id or answer.platform_message_id)
        if message_id and hasattr(channel, "get_partial_message"):
            self._in_background(self._remove_buttons(channel.get_partial_message(int(message_id))))

    async def _remove_buttons(self, message: discord.PartialMessage) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self.edit_budget.edit(message, view=None)

    def _finished_view(self, reply: Reply, answered: int, author: int) -> discord.ui.View | None:
        """Regenerate (and Continue after the length limit) under an answer that is stored."""
        if not reply.clean_text() or reply.finish_reason == "error":
            return None
        return finished_view(answered, author, can_continue=reply.finish_reason == "length" and self.chat.can_continue)

    async def _settle(self, turn: _Turn) -> None:
        """After an apology the turn is done, unless the model engine is gone: then the
        process restarts and answers it (it stays pending)."""
        if self.chat.backend_dead() or not turn.stored.done() or turn.stored.exception() is not None:
            return
        message_id = turn.stored.result()
        if message_id is not None:
            with contextlib.suppress(Exception):
                await self.chat.settle(message_id)

    async def _stream(self, reply: Reply, out: ReplyStreamer, typing: _Typing) -> None:
        """Show the reply while it is generated; if Discord refuses an edit, wait for the end."""
        gen = reply.generation
        live = self.settings.stream
        recorded = bool(out.messages)
        async for _ in gen.updates():
            if not live:
                continue
            shown = reply_view(reply.clean_text(), gen.reasoning, mode=reply.thinking, thinking=gen.thinking, thought_s=gen.thought_s, final=False)
            try:
                await out.update(shown)
            except discord.HTTPException as exc:
                log.warning("streaming the reply in %s failed (%s); sending it when complete", reply.conversation.scope, exc)
                live = False
            if out.messages:
                await typing.stop()
                if not recorded:  # a restart now finishes this message instead of posting another
                    recorded = True
                    await self.chat.store.set_reply_message(reply.user_message_id, str(out.messages[0].id))

    def _final_text(self, reply: Reply, notes: list[str]) -> str:
        gen = reply.generation
        answer = reply.clean_text()
        if not answer and reply.reasoning_text() and reply.finish_reason != "cancelled":
            answer = THOUGHT_ONLY
        text = reply_view(answer, gen.reasoning, mode=reply.thinking, thinking=False, thought_s=gen.thought_s, final=True)
        if reply.finish_reason == "cancelled":
            text = text + STOPPED if text else STOPPED.strip()
        elif not text:
            text = EMPTY_NOTE
        for note in notes + reply.notes:
            text += f"\n-# {note}"
        return text

    async def _apologize(self, out: ReplyStreamer) -> None:
        with contextlib.suppress(discord.HTTPException):
            await out.finish(SORRY)

    # --- buttons: Stop, Regenerate, Continue ---------------------------------------------

    async def on_reply_button(self, interaction: discord.Interaction, action: str, answered: int, author: int) -> None:
        """A press on a reply's button (see `discord_views`). Answered at once, well inside
        Discord's 3 seconds; a Regenerate or Continue then waits its channel's turn."""
        if interaction.user.id != author and not self.is_admin(interaction):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        if action == STOP:
            reply = self._answering.get(answered)
            if reply is None:
                await interaction.response.send_message(NOT_WRITING, ephemeral=True)
                return
            reply.stop()
            await interaction.response.defer()  # the message itself shows the result
            return
        if answered in self._redoing:
            await interaction.response.send_message(ALREADY, ephemeral=True)
            return
        self._redoing.add(answered)  # from the press on, until the work is done or dropped
        try:
            await interaction.response.defer()
        except discord.HTTPException:
            self._redoing.discard(answered)
            raise
        redo = _Redo(action, interaction, self.scope_of(interaction), answered, author)
        try:
            job = self.scheduler.submit(redo.scope, lambda: self._redo(redo))
        except QueueFull:
            self._redoing.discard(answered)
            await _tell(interaction, BUSY)
            return
        job.done.add_done_callback(lambda _: self._redoing.discard(answered))
        position = self.scheduler.position(job)
        if position:
            await _tell(interaction, IN_LINE.format(n=position))

    async def _redo(self, redo: _Redo) -> None:
        """Regenerate or Continue the newest answer of a channel, in its own messages."""
        pressed = redo.interaction.message
        assert pressed is not None
        reply = await self._start_redo(redo, pressed)
        if reply is None:
            return
        assert reply.rewrites is not None
        old = reply.rewrites
        could_continue = has_button(pressed, CONTINUE)
        stop = writing_view(redo.answered, redo.author)
        typing = _Typing(pressed.channel)
        self.replies[redo.scope] = reply
        self._answering[redo.answered] = reply
        out: ReplyStreamer | None = None
        failed = False
        try:
            with contextlib.suppress(discord.HTTPException):
                await self.edit_budget.edit(pressed, view=stop)  # at once: the press did something
            pages = await self._pages_of(old, pressed)
            out = ReplyStreamer(pages[0], budget=self.edit_budget, pages=pages, view=stop)
            await typing.start()
            await self._stream(reply, out, typing)
            await reply.generation.wait()
        except Exception:
            log.exception("%s failed in %s", redo.action, redo.scope)
            failed = True
        finally:
            await typing.stop()
            self.replies.pop(redo.scope, None)
            self._answering.pop(redo.answered, None)
            if not reply.generation.done:
                reply.stop()  # failed, or this job was cancelled (shutdown): free the slot
        went_wrong = out is None or failed or reply.finish_reason == "error"
        if went_wrong or reply.discarded or not reply.clean_text():  # (stopped before it wrote anything)
            # Put the earlier answer back as it was: it is still the one in the history.
            if went_wrong and not reply.discarded:
                log.error("%s failed in %s: %s", redo.action, redo.scope, reply.generation.error)
                await _tell(redo.interaction, SORRY)
            earlier = old.content + (STOPPED if old.status == STOPPED_STATUS else "")
            view = None if reply.discarded else finished_view(redo.answered, redo.author, can_continue=could_continue)
            with contextlib.suppress(discord.HTTPException):
                await (out.finish(earlier, view=view) if out is not None else self.edit_budget.edit(pressed, view=view))
            return
        sent: list[discord.Message] | None = None
        try:
            sent = await out.finish(self._final_text(reply, []), view=self._finished_view(reply, redo.answered, redo.author))
        except discord.HTTPException as exc:
            log.error("could not show the %s in %s (%s); kept as undelivered", redo.action, redo.scope, exc)
            await _tell(redo.interaction, UNDELIVERED)
        await _save(reply, sent, f"the {redo.action} in {redo.scope}")

    async def _start_redo(self, redo: _Redo, pressed: discord.Message) -> Reply | None:
        """Start the new generation, or tell the presser why not (and take away buttons that
        no longer apply)."""
        try:
            start = self.chat.regenerate if redo.action == REGENERATE else self.chat.continue_answer
            return await start(redo.scope, str(redo.answered))
        except CannotRedo as exc:
            await _tell(redo.interaction, str(exc))
            only_regenerate = exc.args[0] in (TOO_LONG_TO_CONTINUE, NO_CONTINUE)
            with contextlib.suppress(discord.HTTPException):
                await self.edit_budget.edit(pressed, view=finished_view(redo.answered, redo.author, can_continue=False) if only_regenerate else None)
        except Exception:
            log.exception("could not start a %s in %s", redo.action, redo.scope)
            await _tell(redo.interaction, SORRY)
        return None

    async def _pages_of(self, answer: StoredMessage, last: discord.Message) -> list[discord.Message]:
        """The messages an answer was posted as: its first (stored), the one with the buttons,
        and the bot's continuation pages between them (sent without a reference)."""
        if not answer.platform_message_id or answer.platform_message_id == str(last.id):
            return [last]
        try:
            first = await last.channel.fetch_message(int(answer.platform_message_id))
            middle = [
                m
                async for m in last.channel.history(after=first, before=last, oldest_first=True, limit=50)
                if self.user is not None and m.author.id == self.user.id and m.reference is None
            ]
        except discord.HTTPException:
            return [last]  # the first page is gone: rewrite the one that was pressed
        return [first, *middle, last]

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """An edited message changes the stored turn, so the bot never remembers the old text.
        A message still waiting for its turn is answered in its edited form."""
        if "content" not in payload.data or payload.message.author.bot or self.user is None:
            return  # e.g. Discord adding a link preview: the text did not change
        scope = await self.chat.edit_message(str(payload.message_id), self._text_of(payload.message))
        if scope is not None:
            log.info("followed an edit in %s", scope)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A deleted message leaves the history: the bot forgets what users take back. If its
        reply is being written, that stops and nothing of it is kept."""
        reply = self._answering.get(payload.message_id)
        if reply is not None:
            reply.discard()
        scope = await self.chat.delete_message(str(payload.message_id))
        if scope is not None:
            log.info("followed a delete in %s", scope)

    # --- slash commands ----------------------------------------------------------------

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """In DMs anyone; in guilds Manage Messages, Administrator, or an ADMIN_ROLE_IDS role.

        Checked here, on every call, not only by hiding commands in Discord's UI."""
        if interaction.guild is None:
            return True
        perms = interaction.permissions
        if perms.administrator or perms.manage_messages:
            return True
        roles = getattr(interaction.user, "roles", [])
        return any(role.id in self.settings.admin_role_ids for role in roles)

    def scope_of(self, interaction: discord.Interaction) -> str:
        return scope_for(interaction.guild_id, interaction.channel_id, interaction.user.id)


class ShardedLlamaBot(LlamaBot, discord.AutoShardedClient):
    """The same bot over several gateway connections (SHARD_COUNT), for very large bots.

    LlamaBot's methods come first; AutoShardedClient's connection handling
    replaces plain Client's underneath them.
    """


def create_bot(settings: Settings, chat: ChatService, **options: object) -> LlamaBot:
    """A single connection by default; AutoShardedClient when SHARD_COUNT is set (0 = auto)."""
    if settings.shard_count is None:
        return LlamaBot(settings, chat, **options)
    return ShardedLlamaBot(settings, chat, shard_count=settings.shard_count or None, **options)


class _Typing:
    """The typing indicator while a reply is prepared; stops when text appears."""

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self._context = channel.typing()
        self._on = False

    async def start(self) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self._context.__aenter__()
            self._on = True

    async def stop(self) -> None:
        if self._on:
            self._on = False
            await self._context.__aexit__(None, None, None)


def _done(value: int) -> asyncio.Future[int | None]:
    future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _tell(interaction: discord.Interaction, text: str) -> None:
    """A short note only the presser sees, after the press was acknowledged."""
    with contextlib.suppress(discord.HTTPException):
        await interaction.followup.send(text, ephemeral=True)


def thread_name(text: str) -> str:
    """A thread's name from the message that starts it: its first line, at most 100 characters."""
    line = " ".join(text.split("\n", 1)[0].split()) or "Conversation"
    return line if len(line) <= 100 else line[:99].rstrip() + "\u2026"


async def _save(reply: Reply, sent: list[discord.Message] | None, what: str) -> None:
    """Store a finished reply with the Discord messages that show it; `sent` None: Discord
    did not take it, so it is kept as undelivered (never shown to the model as said)."""
    try:
        await reply.save(
            delivered=sent is not None,
            platform_message_id=str(sent[0].id) if sent else None,
            last_message_id=str(sent[-1].id) if sent else None,
        )
    except Exception:
        log.exception("could not store %s", what)


async def _delete_all(messages: list[discord.Message]) -> None:
    for message in messages:
        with contextlib.suppress(discord.HTTPException):
            await message.delete()


def _channel_of_scope(scope: str) -> str | None:
    """The channel id inside a guild scope ("guild:G:channel:C"); DMs need the stored one."""
    parts = scope.split(":")
    return parts[3] if len(parts) == 4 and parts[0] == "guild" else None


def _role_name(guild: discord.Guild, role_id: int) -> str:
    role = guild.get_role(role_id)
    return role.name if role else "role"


def _channel_name(guild: discord.Guild, channel_id: int) -> str:
    channel = guild.get_channel_or_thread(channel_id)
    return channel.name if channel else "channel"


async def run_bot(settings: Settings) -> int:
    """`python -m bot run`: load the model, open the store, serve Discord until SIGINT/SIGTERM.

    A signal stops it on time in every state: loading the model, logging in, connected,
    or waiting to reconnect to an unreachable Discord. Exit status 0 after a signal, 2
    for a configuration problem Discord reports, 1 when the model engine gave up (so a
    service manager restarts it; messages waiting stay pending and are answered then)."""
    assert settings.discord_token
    configure_endpoints(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    aborted = threading.Event()  # tells a model load in progress to give up
    fatal: list[str] = []

    def request_stop() -> None:
        stop.set()
        aborted.set()

    def engine_gave_up(why: str) -> None:  # called from the engine thread
        fatal.append(why)
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop)
    try:
        async with open_chat(settings, abort=aborted) as chat:
            if stop.is_set():
                return 0
            chat.on_backend_fatal(engine_gave_up)
            bot = create_bot(settings, chat)
            # <DATABASE_PATH>.health, read by `python -m bot health` (a container's HEALTHCHECK)
            beat = Heartbeat(heartbeat_path(settings.database_path), lambda: (bot.is_ready() and not bot.is_closed(), not chat.backend_dead()))
            beat.start()
            runner = asyncio.ensure_future(_serve_discord(bot, settings.discord_token, stop))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                log.info("shutting down: finishing replies in progress")
                await bot.shutdown(grace=0.0 if fatal else 20.0)
            stopper.cancel()
            try:
                # After close(), discord.py may still be asleep in its reconnect back-off: don't wait for it.
                await asyncio.wait_for(asyncio.shield(runner), 5.0)
            except asyncio.TimeoutError:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
            except discord.PrivilegedIntentsRequired:
                log.error(
                    "Discord refused the Message Content intent. Turn on 'Message Content Intent' on your "
                    "application's Bot page (https://discord.com/developers/applications), then start the bot again."
                )
                return 2
            except discord.LoginFailure:
                log.error("Discord rejected DISCORD_TOKEN. Copy a fresh token from the Developer Portal (Bot > Reset Token) into .env.")
                return 2
            finally:
                beat.stop()
                if not bot.is_closed():
                    await bot.close()
    except ModelError:
        if stop.is_set():
            log.info("stopped while loading the model")
            return 0
        raise
    if fatal:
        log.critical("exiting so that the service manager restarts the bot: %s", fatal[0])
        return 1
    log.info("stopped")
    return 0


async def _serve_discord(bot: LlamaBot, token: str, stop: asyncio.Event) -> None:
    """Log in (retrying while Discord cannot be reached, until a stop), then stay connected."""
    delay = 1.0
    while True:
        try:
            await bot.login(token)
            break
        except (OSError, aiohttp.ClientError, discord.DiscordServerError) as exc:
            log.warning("cannot reach Discord (%s); trying again in %.0f s", exc, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = min(delay * 2, 60.0)
    await bot.connect()
