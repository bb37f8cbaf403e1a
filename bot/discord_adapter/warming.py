"""Warm while typing: members type before they send, and Discord says so (TYPING_START).

When someone starts typing where the bot would answer them (a chat channel, a thread of
its own, a DM, or a channel where their last message mentioned the bot), the
conversation's state is made ready in the background (restored from disk, or its
history read in an idle slot), so the reply starts from a warm state. It is speculative:
the engine never lets it delay a real reply (see `ChatService.warm`).
"""

from __future__ import annotations

import collections
import logging
import time

import discord
from discord.ext import commands

from bot.conversations.records import ChatMode
from bot.discord_adapter.access import Access, refusal
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.scopes import DiscordScope

log = logging.getLogger(__name__)

AGAIN_AFTER_S = 8.0
"""Discord repeats TYPING_START about every 10 s while someone types: one warm-up per conversation per this long."""
REMEMBERED = 10_000
"""(channel, member) pairs whose last message is remembered (did it mention the bot?)."""


class Warming(commands.Cog):
    """TYPING_START in, warm-ups out."""

    def __init__(self, bot: commands.Bot, ctx: BotContext, access: Access) -> None:
        self.bot = bot
        self.ctx = ctx
        self.access = access
        self._addressed_last: collections.OrderedDict[tuple[int, int], bool] = collections.OrderedDict()
        self._warmed_at: dict[str, float] = {}
        self.started = 0  # warm-ups asked for (read by tests and the benchmark)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Remember whether a member's last message in a channel was addressed to the bot."""
        if message.author.bot or message.guild is None:
            return
        key = (message.channel.id, message.author.id)
        self._addressed_last[key] = self.access.addressed(message)
        self._addressed_last.move_to_end(key)
        while len(self._addressed_last) > REMEMBERED:
            self._addressed_last.popitem(last=False)

    @commands.Cog.listener()
    async def on_raw_typing(self, payload: discord.RawTypingEvent) -> None:
        me = self.bot.user
        if not self.ctx.settings.warm_on_typing or me is None or payload.user_id == me.id:
            return
        scope = self._would_answer(payload)
        if scope is None:
            return
        now = time.monotonic()
        if now - self._warmed_at.get(scope.key, -AGAIN_AFTER_S) < AGAIN_AFTER_S:
            return
        self._warmed_at[scope.key] = now
        if len(self._warmed_at) > REMEMBERED:
            self._warmed_at = {k: t for k, t in self._warmed_at.items() if now - t < AGAIN_AFTER_S}
        self.ctx.in_background(self._warm(scope, payload.user_id))

    async def _warm(self, scope: DiscordScope, author_id: int) -> None:
        try:
            if await self.ctx.chat.warm(scope.key, author_id=str(author_id)):
                self.started += 1
                log.debug("warming %s: someone is typing", scope)
        except Exception as exc:  # speculative: a failure costs nothing but the head start
            log.debug("could not warm %s: %s", scope, exc)

    def _would_answer(self, payload: discord.RawTypingEvent) -> DiscordScope | None:
        """The conversation the typist's next message would be answered in, or None."""
        settings = self.ctx.settings
        if payload.guild_id is None:
            why = refusal(settings, user_id=payload.user_id, channel_ids=set(), role_ids=None, in_dm=True)
            return DiscordScope.dm(payload.user_id) if why is None else None
        channel = self.bot.get_channel(payload.channel_id)
        parent_id = getattr(channel, "parent_id", None)
        member = payload.user if isinstance(payload.user, discord.Member) else None
        roles = {role.id for role in member.roles} if member is not None else None
        places = {i for i in (payload.channel_id, parent_id) if i}
        if refusal(settings, user_id=payload.user_id, channel_ids=places, role_ids=roles, in_dm=False) is not None:
            return None
        scope = DiscordScope.channel(payload.guild_id, payload.channel_id)
        chat = self.ctx.chat
        if places & set(settings.chat_channels) or chat.chat_mode(scope.key) == ChatMode.ON:
            return scope
        if parent_id is not None:
            parent = DiscordScope.channel(payload.guild_id, parent_id)
            if chat.chat_mode(parent.key) == ChatMode.ON:
                return scope
            me = self.bot.user
            if chat.chat_mode(parent.key) == ChatMode.THREADS and me is not None and getattr(channel, "owner_id", None) == me.id:
                return scope  # the bot's own thread
        if self._addressed_last.get((payload.channel_id, payload.user_id)):
            return scope  # their last message here mentioned the bot: this one likely will too
        return None
