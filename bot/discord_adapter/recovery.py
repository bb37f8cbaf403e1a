"""After a restart or an outage: answer what waited, and what was said while the bot was away.

Messages stored as pending by an earlier run are answered first, in order (or, when
too old, told that the bot was restarting). Then each channel where the bot talks is
read from the last message it stored, and what was addressed to it is answered; live
messages wait until this is done. Then every other channel where Discord says something
was written since the bot was last connected (its `last_message_id`, sent with each
guild) is read too, so a mention in a channel where the bot never spoke is answered as
well. Reads are paced well inside Discord's rate limits, and only channels with
something new are read. A message already stored is never answered twice.

DMs: the bot reads the DM channels it has talked in; Discord tells a bot of no others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time

import discord
from discord.ext import commands, tasks

from bot.conversations.records import StoreBusy
from bot.discord_adapter.access import Access
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.intake import Intake
from bot.discord_adapter.output import NO_PINGS, post_note
from bot.discord_adapter.replies import Turn
from bot.discord_adapter.scopes import DiscordScope

log = logging.getLogger(__name__)

RESTARTED = "Sorry, I was restarting when you sent this and it is too old to answer now. Please ask again."
READ_EVERY_S = 0.2
"""At most one history read this often while catching up (5/s: a server with hundreds of channels
stays far inside Discord's 50 requests/s, with room left for the replies)."""
CONNECTED_EVERY_S = 60.0
"""How often "still connected" is written down (the time a restart reads new messages from)."""
PLATFORM = "discord"
AGAIN_AFTER_S = 60.0
"""When another program held the database through the catch-up, it is tried again after this long."""


class Recovery(commands.Cog):
    """Resume and catch up, once per new gateway session (a first start, or after an outage too long to resume)."""

    def __init__(self, bot: commands.Bot, ctx: BotContext, access: Access, intake: Intake) -> None:
        self.bot = bot
        self.ctx = ctx
        self.access = access
        self.intake = intake
        self._running = asyncio.Lock()
        self._resumed = False
        self._queued: set[int] = set()  # stored messages resumed already (a retry must not queue them twice)
        self._connected = False
        self._seen_all = False  # the catch-up of this session finished: everything until now was read
        self._since: float | None = None  # until when the bot was connected before this session (None: never, as far as it knows)
        self._last_read = 0.0

    @property
    def caught_up(self) -> bool:
        """This gateway session's catch-up is done (what was said while the bot was away is read)."""
        return self._seen_all

    async def cog_load(self) -> None:
        self._keep_connected_time.start()

    async def cog_unload(self) -> None:
        self._keep_connected_time.cancel()
        await self._note_connected()  # a clean shutdown: nothing was missed until now

    @tasks.loop(seconds=CONNECTED_EVERY_S)
    async def _keep_connected_time(self) -> None:
        await self._note_connected()

    async def _note_connected(self) -> None:
        """Write down that nothing said until now was missed: only while connected, and once this
        session's catch-up is done (a catch-up cut short must be read again after a restart)."""
        if self._connected and self._seen_all:
            await self._write_connected(time.time())

    async def _write_connected(self, until: float) -> None:
        try:
            await self.ctx.chat.note_connected(PLATFORM, until)
        except StoreBusy as exc:
            log.warning("could not note the time the bot was connected: %s", exc)

    @commands.Cog.listener()
    async def on_disconnect(self) -> None:
        if self._connected and self._seen_all:
            self.ctx.in_background(self._write_connected(time.time()))  # nothing missed until now
        self._connected = False

    @commands.Cog.listener()
    async def on_resumed(self) -> None:
        self._connected = True  # Discord replays what was missed: nothing to catch up

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """A new gateway session (a first start, or after an outage too long to resume) missed events."""
        self.ctx.in_background(self.after_connect())

    async def after_connect(self) -> None:
        """Answer what waited across a restart (once), then what arrived while the bot was away."""
        async with self._running:
            try:
                if not self._connected:  # a new session: read from when the last one was last known connected
                    self._since = await self.ctx.chat.connected_until(PLATFORM)
                    self._connected, self._seen_all = True, False
                if not self._resumed:
                    await self.resume_pending()
                    self._resumed = True
                await self.catch_up()
                self._seen_all = True
            except StoreBusy as exc:
                log.warning("could not finish catching up after connecting (%s); trying again in %.0f s", exc, AGAIN_AFTER_S)
                self.ctx.in_background(self._again_later())
            except Exception:
                log.exception("could not finish catching up after connecting")
            finally:
                self.ctx.caught_up.set()

    async def _again_later(self) -> None:
        await asyncio.sleep(AGAIN_AFTER_S)
        await self.after_connect()

    async def resume_pending(self) -> None:
        """Messages stored as pending by an earlier run: answer the recent ones, in order, as if
        nothing happened; tell the senders of older ones that the bot was restarting."""
        chat = self.ctx.chat
        now = discord.utils.utcnow()
        resumed = expired = 0
        for turn in await chat.waiting():
            if DiscordScope.parse(turn.scope) is None or not turn.message.platform_message_id or turn.message.id in self._queued:
                continue  # not a Discord conversation (the terminal chat's), or queued by an earlier try
            message, thread = await self._fetch_pending(turn.channel_id, turn.message.platform_message_id)
            if message is None:  # deleted while the bot was down, or no longer reachable
                await chat.delete_message(turn.message.platform_message_id)
                continue
            if await self.access.refusal_fetching_roles(message) is not None:  # blocked, or the allowed lists changed, while it waited
                await chat.expire(turn.message.id)
                continue
            first = await self._fetch_message(turn.channel_id, turn.message.reply_message_id) if turn.message.reply_message_id else None
            first = first or await self._own_reply_to(message, thread)  # posted just before the process died
            age = (now - message.created_at).total_seconds()
            if age > self.ctx.settings.resume_max_age_s:
                await chat.expire(turn.message.id)
                await self._show_note(message, first, RESTARTED)
                expired += 1
                continue
            text = self.intake.text_of(message)
            if text != turn.message.content:  # edited while the bot was down
                await chat.edit_message(turn.message.platform_message_id, text)
            notes: list[str] = []
            if message.attachments and turn.message.attachments is None and not turn.message.images:  # stopped while they downloaded
                if await self.intake.add_files(message, turn.message.id, notes) is None:
                    continue
            self._queued.add(turn.message.id)
            self.intake.queue(Turn(message, turn.scope, _done(turn.message.id), notes, first=first, thread=thread))
            resumed += 1
        if resumed or expired:
            log.info("after the restart: answering %d waiting message(s); %d were too old (RESUME_MAX_AGE_S)", resumed, expired)

    async def catch_up(self) -> None:
        """Read what was addressed to the bot while it was away: first in the channels where it
        talks (from the last message it stored there), then, once live messages may flow again,
        in every other channel where something was written since it was last connected.
        Bounded by CATCHUP_MAX_AGE_S and CATCHUP_MAX_MESSAGES per channel."""
        settings = self.ctx.settings
        if not settings.catchup_max_messages:
            return
        oldest = discord.utils.time_snowflake(discord.utils.utcnow() - datetime.timedelta(seconds=settings.catchup_max_age_s))
        answered = 0
        known: dict[int, int | None] = {}  # channel id -> newest message id stored there
        for place in await self.ctx.chat.places():
            scope = DiscordScope.parse(place.scope)
            channel_id = place.channel_id or (scope.channel_id if scope is not None else None)
            if channel_id is not None:
                known[int(channel_id)] = place.newest_message_id
        for channel_id in settings.chat_channels:
            known.setdefault(channel_id, None)
        for channel_id, newest in known.items():
            channel = await self._channel(str(channel_id))
            if channel is not None:
                answered += await self._read(channel, after=max(newest or 0, oldest))
        self.ctx.caught_up.set()  # the channels it talks in are done: live messages may go on
        since = oldest if self._since is None else max(oldest, discord.utils.time_snowflake(_utc(self._since)))
        for channel in self._written_in_since(since, set(known)):
            answered += await self._read(channel, after=since)
        if answered:
            log.info("caught up: answering %d message(s) that arrived while I was away", answered)

    def _written_in_since(self, since: int, known: set[int]) -> list[discord.abc.Messageable]:
        """Channels and active threads the bot may read where Discord says a message was written
        after the snowflake `since`, the longest quiet first."""
        found: list[tuple[int, discord.abc.Messageable]] = []
        for guild in self.bot.guilds:
            me = guild.me
            for channel in [*guild.text_channels, *guild.voice_channels, *guild.threads]:
                last = channel.last_message_id
                if channel.id in known or last is None or last <= since or me is None:
                    continue
                allowed = channel.permissions_for(me)
                if allowed.view_channel and allowed.read_message_history:
                    found.append((last, channel))
        found.sort(key=lambda pair: pair[0])
        return [channel for _, channel in found]

    async def _read(self, channel: discord.abc.Messageable, *, after: int) -> int:
        """Answer what was addressed to the bot in `channel` after the snowflake `after` (one
        paced history read; nothing when Discord says nothing newer was written there)."""
        last = getattr(channel, "last_message_id", None)
        if last is not None and last <= after:
            return 0
        await self._pace()
        answered = 0
        try:
            async for message in channel.history(after=discord.Object(after), oldest_first=True, limit=self.ctx.settings.catchup_max_messages):
                if self.intake.came_live(message.id):
                    continue  # arrived while this catch-up ran: the live intake has it
                if self.access.wants_answer(message) and not await self.ctx.chat.has_seen(str(message.id)):
                    if await self.access.refusal_fetching_roles(message) is not None:
                        continue
                    text = self.intake.text_of(message)
                    if text or message.attachments:
                        answered += await self.intake.accept(message, text, [], force=True)
        except discord.HTTPException as exc:
            log.warning("could not read what arrived in channel %s while I was away: %s", getattr(channel, "id", "?"), exc)
        return answered

    async def _pace(self) -> None:
        wait = self._last_read + READ_EVERY_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_read = time.monotonic()

    # --- reading back from Discord -----------------------------------------------------------

    async def _channel(self, channel_id: str | None) -> discord.abc.Messageable | None:
        if channel_id is None:
            return None
        channel = self.bot.get_channel(int(channel_id))
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(int(channel_id))
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
        me = self.bot.user
        try:
            async for later in where.history(after=after, limit=50, oldest_first=True):
                if me is None or later.author.id != me.id:
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
                await self.ctx.edit_budget.edit(first, content=text, allowed_mentions=NO_PINGS, view=None)
                return
        await post_note(message, text)


def _utc(unix: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc)


def _done(value: int) -> asyncio.Future[int | None]:
    future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
