"""Following what users change: an edited message changes the stored turn, a deleted one leaves the history.

The bot never remembers what a user took back. A message still waiting for its
turn is answered in its edited form; if its reply is being written when it is
deleted, that stops and nothing of it is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord
from discord.ext import commands

from bot.conversations.records import StoreBusy
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.text import text_of

log = logging.getLogger(__name__)


class Following(commands.Cog):
    """Edits and deletes of users' messages, as Discord reports them (also for messages not in its cache)."""

    def __init__(self, bot: commands.Bot, ctx: BotContext) -> None:
        self.bot = bot
        self.ctx = ctx

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if "content" not in payload.data or payload.message.author.bot or self.bot.user is None:
            return  # e.g. Discord adding a link preview: the text did not change
        text = text_of(payload.message, self.bot.user.id)
        # An edit can remove attachments: the images it no longer has leave the turn too.
        names = [a["filename"] for a in payload.data["attachments"]] if "attachments" in payload.data else None
        change = lambda: self.ctx.chat.edit_message(str(payload.message_id), text, image_names=names)  # noqa: E731
        scope = await _patiently(change, "edit", payload.message_id)
        if scope is not None:
            log.info("followed an edit in %s", scope)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        writing = self.ctx.replies.answering(payload.message_id)
        if writing is not None:
            writing.reply.discard()
        scope = await _patiently(lambda: self.ctx.chat.delete_message(str(payload.message_id)), "delete", payload.message_id)
        if scope is not None:
            log.info("followed a delete in %s", scope)


async def _patiently(change: Callable[[], Awaitable[str | None]], what: str, message_id: int) -> str | None:
    """Follow an edit or delete even while another program holds the database: the bot must
    never remember what a user took back, so it waits as long as it takes."""
    waiting = False
    while True:
        try:
            return await change()
        except StoreBusy:
            if not waiting:
                waiting = True
                log.warning("the database is busy: the %s of message %s waits to be followed", what, message_id)
