"""After a restart or an outage: answer what waited, and what was said while the bot was away.

Messages stored as pending by an earlier run are answered first, in order (or, when
too old, told that the bot was restarting). Then each channel where the bot talks is
read from the last message it stored, and what was addressed to it is answered. A
message already stored is never answered twice. Live messages wait until this is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging

import discord
from discord.ext import commands

from bot.conversations.records import StoreBusy
from bot.discord_adapter.access import Access
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.intake import Intake
from bot.discord_adapter.output import NO_PINGS, post_note
from bot.discord_adapter.replies import Turn
from bot.discord_adapter.scopes import DiscordScope

log = logging.getLogger(__name__)

RESTARTED = "Sorry, I was restarting when you sent this and it is too old to answer now. Please ask again."
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

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        self.ctx.in_background(self.after_connect())

    async def after_connect(self) -> None:
        """Answer what waited across a restart (once), then what arrived while the bot was away."""
        async with self._running:
            try:
                if not self._resumed:
                    await self.resume_pending()
                    self._resumed = True
                await self.catch_up()
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
            if message.attachments and turn.message.attachments is None:  # stopped while they downloaded
                if await self.intake.add_files(message, turn.message.id, notes) is None:
                    continue
            self._queued.add(turn.message.id)
            self.intake.queue(Turn(message, turn.scope, _done(turn.message.id), notes, first=first, thread=thread))
            resumed += 1
        if resumed or expired:
            log.info("after the restart: answering %d waiting message(s); %d were too old (RESUME_MAX_AGE_S)", resumed, expired)

    async def catch_up(self) -> None:
        """Read each channel where the bot talks from the last message it stored, and answer
        what was addressed to it while it was away (bounded by CATCHUP_MAX_AGE_S and
        CATCHUP_MAX_MESSAGES per channel). A message already stored is never answered again."""
        settings = self.ctx.settings
        chat = self.ctx.chat
        if not settings.catchup_max_messages:
            return
        oldest = discord.utils.utcnow() - datetime.timedelta(seconds=settings.catchup_max_age_s)
        floor = discord.utils.time_snowflake(oldest)
        channels: dict[int, int | None] = {}  # channel id -> newest stored message id there
        for place in await chat.places():
            scope = DiscordScope.parse(place.scope)
            channel_id = place.channel_id or (scope.channel_id if scope is not None else None)
            if channel_id is not None:
                channels[int(channel_id)] = place.newest_message_id
        for channel_id in settings.chat_channels:
            channels.setdefault(channel_id, None)
        answered = 0
        for channel_id, newest in channels.items():
            channel = await self._channel(str(channel_id))
            if channel is None:
                continue
            try:
                after = discord.Object(max(newest or 0, floor))
                async for message in channel.history(after=after, oldest_first=True, limit=settings.catchup_max_messages):
                    if self.access.wants_answer(message) and not await chat.has_seen(str(message.id)):
                        if await self.access.refusal_fetching_roles(message) is not None:
                            continue
                        text = self.intake.text_of(message)
                        if text or message.attachments:
                            answered += await self.intake.accept(message, text, [], force=True)
            except discord.HTTPException as exc:
                log.warning("could not read what arrived in channel %s while I was away: %s", channel_id, exc)
        if answered:
            log.info("caught up: answering %d message(s) that arrived while I was away", answered)

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


def _done(value: int) -> asyncio.Future[int | None]:
    future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
