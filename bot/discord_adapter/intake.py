"""Taking in messages: who is answered, a place in the fair queue, the message stored at once.

A message addressed to the bot (a mention, a reply to it, a DM, any message in a
chat-enabled channel) takes its place in line the moment it arrives and is stored as
pending before its files download, so from then on a restart cannot lose it. Text
files attached to it are read into the prompt; in a /chat threads channel the
conversation moves to a thread started from the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import discord
from discord.ext import commands

from bot.conversations.attachments import IMAGE, SKIP_REASONS, Skipped, TextFile, decode_text, kind_of, notes_for, render_files
from bot.conversations.images import ImageInput
from bot.conversations.scheduler import Job, QueueFull
from bot.conversations.service import UserMessage
from bot.conversations.records import ChatMode, StoreBusy
from bot.discord_adapter.access import Access
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.output import NO_PINGS, post_note
from bot.discord_adapter.replies import Replier, Turn
from bot.discord_adapter.scopes import DiscordScope
from bot.discord_adapter.text import text_of, thread_name

log = logging.getLogger(__name__)

LIVE_REMEMBERED = 10_000
"""Message ids of live events kept, so a catch-up running meanwhile leaves them to the live intake."""
T = TypeVar("T")

BUSY = "I'm busy with other conversations right now. Please try again in a minute."
NO_TEXT = "I can only read text and text files (like .txt, .md or .py). Write me a message; images, stickers and embeds are ignored."
NOTHING_TO_READ = "I found nothing I can read in that message (stickers and embeds are ignored). Write me a message, or attach text files or images."
MENTION_ONLY = "You mentioned me, but there is no message. Ask me something!"
IGNORED = "I ignored the sticker or embed; I can only read text."
IN_LINE = "\u23f3 Busy: you're #{n} in line."
NO_THREAD_PERMISSION = "I could not start a thread here (I need the Create Public Threads permission), so I answered in the channel."
NO_THREAD = "I could not start a thread here, so I answered in the channel."
STORAGE_BUSY = "\u23f3 My storage is busy right now (another program is using the database): I'll answer this as soon as it is back."


class ArrivalLine:
    """Holds live messages until the catch-up is over (`opened`), then lets them pass in the
    order they arrived.

    Waiting on the event alone is not enough: the messages that waited resume a moment after it
    is set, so one arriving at that moment passed them all. In a flood, that later message took
    the cooldown's one answer from the first."""

    def __init__(self, opened: asyncio.Event) -> None:
        self.opened = opened
        self._last: asyncio.Future[None] | None = None  # passed once the newest message in line has

    async def wait(self) -> None:
        before = self._last
        if self.opened.is_set() and (before is None or before.done()):
            return  # nobody in line: no wait (every message once the catch-up is over)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last = mine
        try:
            await self.opened.wait()
            if before is not None:
                await asyncio.shield(before)  # leaving the line (cancelled) must not cancel the one before
        finally:
            if not mine.done():
                mine.set_result(None)


class Intake(commands.Cog):
    """Messages in: the access rules, the cooldown, a turn in the queue, the message stored."""

    def __init__(self, bot: commands.Bot, ctx: BotContext, access: Access, replier: Replier) -> None:
        self.bot = bot
        self.ctx = ctx
        self.access = access
        self.replier = replier
        self._files: aiohttp.ClientSession | None = None  # downloads attachments (created on first use)
        self._taking: set[int] = set()  # messages being taken in right now (until stored: then has_seen knows them)
        self._live: dict[int, None] = {}  # the newest messages that came as live events (insertion-ordered)
        self._line = ArrivalLine(ctx.caught_up)

    async def cog_unload(self) -> None:
        if self._files is not None:
            await self._files.close()

    def text_of(self, message: discord.Message) -> str:
        assert self.bot.user is not None
        return text_of(message, self.bot.user.id)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self.access.wants_answer(message):
            return
        self._live[message.id] = None
        if len(self._live) > LIVE_REMEMBERED:
            del self._live[next(iter(self._live))]
        await self._line.wait()  # what waited across a restart goes first, then the live messages in order
        text = self.text_of(message)
        extras = bool(message.embeds or message.stickers)
        if not text and not message.attachments:
            mentioned_only = not extras and bool(message.content.strip())
            await post_note(message, MENTION_ONLY if mentioned_only else self.no_text())
            return
        if not await self.access.take_from(message):
            return
        await self.accept(message, text, [IGNORED] if extras else [])

    def came_live(self, message_id: int) -> bool:
        """Whether this message came as a live event: the live intake decides about it (answers,
        turns it away, notes it has no text), never the catch-up too."""
        return message_id in self._live

    async def accept(self, message: discord.Message, text: str, notes: list[str], *, force: bool = False) -> bool:
        """Take a message: its place in line is taken at once (arrival order), and it is
        stored as pending before its turn can start, so from here on a restart cannot lose it.

        `force` takes it even past MAX_QUEUE: it was accepted before (a restart, an outage).
        In a channel set to /chat threads, the conversation moves to a new thread first.
        A message already being taken in (its live event and the catch-up at once) is taken once."""
        if message.id in self._taking:
            return False
        self._taking.add(message.id)
        try:
            return await self._accept(message, text, notes, force=force)
        finally:
            self._taking.discard(message.id)

    async def _accept(self, message: discord.Message, text: str, notes: list[str], *, force: bool) -> bool:
        thread = None
        if self._starts_threads(message):
            thread, problem = await self._thread_for(message, text)
            notes = notes + [problem] if problem else notes
        channel = thread or message.channel
        scope = DiscordScope.of(message.guild.id if message.guild else None, channel.id, message.author.id).key
        turn = Turn(message, scope, asyncio.get_running_loop().create_future(), notes, thread=thread)
        try:
            job = self.ctx.scheduler.submit(scope, lambda: self.replier.answer(turn), force=force)
        except QueueFull:
            if not self.ctx.scheduler.closed:
                log.warning("queue full: turned away a message in %s", scope)
                await post_note(message, BUSY)
            return False
        author = message.author
        said = UserMessage(
            scope, text, author_id=str(author.id), author_name=author.display_name, platform_message_id=str(message.id), channel_id=str(channel.id)
        )
        try:
            # Stored at once, before its files are downloaded: from here on a restart cannot lose
            # it, and an edit or delete during the download finds it. The files are added once read.
            stored = await self._patiently(turn, lambda: self.ctx.chat.receive(said))
            if thread is not None and message.guild is not None:  # a thread the bot started takes its channel's choices
                await self._patiently(turn, lambda: self.ctx.chat.follow_channel(scope, DiscordScope.channel(message.guild.id, message.channel.id).key))
            if stored is not None and (message.attachments or _replied_images(message)):
                stored = await self.add_files(message, stored, turn.notes, turn=turn)
        except Exception as exc:  # e.g. the disk is full: the turn apologises
            turn.stored.set_exception(exc)
            return False
        turn.stored.set_result(stored)
        if stored is None:  # stored already: seen twice (a catch-up racing a live event)
            self.ctx.scheduler.withdraw(job)
            return False
        self._note_position(turn, job)
        return True

    async def _patiently(self, turn: Turn, write: Callable[[], Awaitable[T]]) -> T:
        """A write that waits out a database locked by another program for as long as it takes:
        the message keeps its place in line meanwhile, and its author is told once (the note
        becomes the reply). Only a shutdown gives up (the catch-up after the restart finds it)."""
        told = False
        while True:
            try:
                return await write()
            except StoreBusy:
                if self.bot.is_closed() or self.ctx.scheduler.closed:
                    raise
                if not told:
                    told = True
                    log.warning("the database is busy: message %s in %s keeps its place and waits to be stored", turn.message.id, turn.scope)
                    turn.first = turn.first or await post_note(turn.message, STORAGE_BUSY, channel=turn.thread)

    def no_text(self) -> str:
        """The note for a message with nothing the bot can read."""
        return NOTHING_TO_READ if self.ctx.chat.can_see else NO_TEXT

    def queue(self, turn: Turn) -> None:
        """Queue a turn stored before (by an earlier run)."""
        try:
            job = self.ctx.scheduler.submit(turn.scope, lambda: self.replier.answer(turn), force=True)
        except QueueFull:
            return  # shutting down: it stays pending, and the next start answers it
        self._note_position(turn, job)

    def _note_position(self, turn: Turn, job: Job) -> None:
        position = self.ctx.scheduler.position(job)
        if position:
            turn.waiting_note = asyncio.ensure_future(self._waiting_note(turn, position))

    async def _waiting_note(self, turn: Turn, position: int) -> discord.Message | None:
        """Tell the sender their place in line (in the bot's own message, if it already has one)."""
        text = IN_LINE.format(n=position)
        if turn.first is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.ctx.edit_budget.edit(turn.first, content=text, allowed_mentions=NO_PINGS, view=None)
                return turn.first
        note = await post_note(turn.message, text, channel=turn.thread)
        if note is not None and turn.stored.done() and turn.stored.result() is not None:
            with contextlib.suppress(StoreBusy):  # only a hint for a restart: never worth holding the reply up
                await self.ctx.chat.note_reply_message(turn.stored.result(), str(note.id))
        return note

    # --- attached files ------------------------------------------------------------------

    async def add_files(self, message: discord.Message, stored: int, notes: list[str], *, turn: Turn | None = None) -> int | None:
        """Read a stored message's files into its row: text files as text, images (its own and
        those of the message it replies to) for a model that can see; their notes go to `notes`.
        None when nothing is left to answer (no text, only files the bot cannot read): the row
        goes, with a note. With its `turn`, the writes wait out a busy database (see `_patiently`)."""
        chat = self.ctx.chat

        async def write(change: Callable[[], Awaitable[T]]) -> T:
            return await (self._patiently(turn, change) if turn is not None else change())

        files, images, file_notes = await self._read_files(message)
        notes.extend(file_notes)
        if files:
            await write(lambda: chat.add_files(stored, files))
        if images:
            notes.extend(await write(lambda: chat.add_images(stored, images)))
        row = await chat.message(stored)  # as it stands now (an edit may have come meanwhile)
        if row is None or row.content or row.attachments or row.images:
            return stored  # deleted meanwhile (its turn finds nothing to answer), or something to answer
        if self.bot.is_closed():  # a download cut short by shutdown: kept pending, read again on restart
            return None
        await chat.delete_message(str(message.id))
        await post_note(message, "\n-# ".join([self.no_text(), *notes]))
        return None

    async def _read_files(self, message: discord.Message) -> tuple[str | None, list[ImageInput], list[str]]:
        """The message's text attachments rendered for the prompt (None: none readable), the
        images for a model that can see (its own, then those of the message it replies to),
        and the notes for the reply: files cut at ATTACHMENT_MAX_KB, files skipped and why."""
        chat = self.ctx.chat
        limit = self.ctx.settings.attachment_max_kb * 1024
        most = self.ctx.settings.attachment_max_files
        files: list[TextFile] = []
        images: list[ImageInput] = []
        skipped: list[Skipped] = []
        picture_notes: list[str] = []
        for i, attachment in enumerate([*message.attachments, *_replied_images(message)]):
            name = attachment.filename
            kind = kind_of(name, attachment.content_type)
            own = i < len(message.attachments)
            if kind == IMAGE and (chat.can_see or own) and (most and i < most):
                if not chat.can_see:
                    skipped.append(Skipped(name, chat.cannot_see() or ""))
                elif (refused := chat.image_refusal(name, attachment.size)) is not None:
                    picture_notes.append(refused)
                elif (data := await self._download_whole(attachment, message)) is None:
                    skipped.append(Skipped(name, "I could not download it"))
                else:
                    images.append(ImageInput(name, data))
            elif not own:
                continue  # of the replied-to message, only images are read
            elif not limit or not most:
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
        return render_files(files), images, picture_notes + notes_for(files, skipped)

    async def _download_whole(self, attachment: discord.Attachment, message: discord.Message) -> bytes | None:
        """All of an image (its declared size was checked against IMAGE_MAX_KB); None when the
        download fails or the file is longer than the limit after all (half a picture is none)."""
        limit = max(self.ctx.settings.image_max_kb * 1024, 1)
        try:
            data, cut = await self._download(attachment, limit)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("could not download image %s of message %s: %s", attachment.id, message.id, exc)
            return None
        return None if cut else data

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

    # --- threads ---------------------------------------------------------------------------

    def _starts_threads(self, message: discord.Message) -> bool:
        """A message in a /chat threads channel (not in a thread): its conversation gets a thread."""
        if message.guild is None or isinstance(message.channel, discord.Thread):
            return False
        return self.ctx.chat.chat_mode(DiscordScope.channel(message.guild.id, message.channel.id).key) == ChatMode.THREADS

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
                    existing = await self.bot.fetch_channel(message.id)  # a message's thread has the message's id
                    if isinstance(existing, discord.Thread):
                        return existing, None
            log.warning("could not start a thread in channel %s (%s); answering in the channel", message.channel.id, exc)
            return None, NO_THREAD


def _replied_images(message: discord.Message) -> list[discord.Attachment]:
    """The images of the message `message` replies to (they join its turn)."""
    replied = message.reference.resolved if message.reference is not None else None
    if not isinstance(replied, discord.Message):
        return []
    return [a for a in replied.attachments if kind_of(a.filename, a.content_type) == IMAGE]
