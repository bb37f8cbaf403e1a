"""What the buttons under a reply do: Stop, Regenerate and Continue (see `views` for how they look).

A press is answered at once, well inside Discord's 3 seconds. Stop ends the reply
being written. Regenerate writes the newest answer again; Continue writes more of an
answer that stopped at the length limit. Both wait their channel's turn in the fair
queue and rewrite the answer's own messages in place.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import discord
from discord.ext import commands

from bot.conversations.scheduler import QueueFull
from bot.conversations.service import NO_CONTINUE, TOO_LONG_TO_CONTINUE, CannotRedo, Reply
from bot.conversations.records import MessageStatus, StoredMessage
from bot.discord_adapter.access import Access, may_stop
from bot.discord_adapter.context import BotContext, Writing
from bot.discord_adapter.intake import BUSY, IN_LINE
from bot.discord_adapter.output import ReplyStreamer, tell
from bot.discord_adapter.replies import SORRY, STOPPED, UNDELIVERED, Replier, Typing, save
from bot.discord_adapter.scopes import DiscordScope
from bot.discord_adapter.views import ButtonAction, finished_view, has_button, writing_view

log = logging.getLogger(__name__)

NOT_YOURS = "Only the person I answered (or a moderator) can use these buttons."
NOT_WRITING = "That reply is not being written any more."
ALREADY = "Already on it."


@dataclass
class _Redo:
    """A Regenerate or Continue button press, waiting for or holding its channel's turn."""

    action: ButtonAction
    interaction: discord.Interaction
    scope: str
    answered: int  # the Discord id of the message the answer answers
    author: int  # who wrote it

    @property
    def what(self) -> str:
        return self.action.name.lower()  # for the log: "regenerate", "continue"


class Buttons(commands.Cog):
    """Presses of the buttons under replies (dispatched by `views.ReplyButton` as `reply_button`)."""

    def __init__(self, bot: commands.Bot, ctx: BotContext, access: Access, replier: Replier) -> None:
        self.bot = bot
        self.ctx = ctx
        self.access = access
        self.replier = replier

    @commands.Cog.listener()
    async def on_reply_button(self, interaction: discord.Interaction, action: ButtonAction, answered: int, author: int) -> None:
        """Who may press: anyone who may use the bot here (BLOCKED_USER_IDS and the allowed lists
        hold for buttons as for messages and commands), and then only the author of the
        answered message or an admin."""
        if not await self.access.check_interaction(interaction):
            return
        if not may_stop(self.ctx.settings, interaction, author):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        if action == ButtonAction.STOP:
            writing = self.ctx.replies.answering(answered)
            if writing is None:
                await interaction.response.send_message(NOT_WRITING, ephemeral=True)
                return
            writing.reply.stop()
            await interaction.response.defer()  # the message itself shows the result
            return
        await self._press_redo(interaction, action, answered, author)

    async def _press_redo(self, interaction: discord.Interaction, action: ButtonAction, answered: int, author: int) -> None:
        redoing = self.ctx.replies.redoing
        if answered in redoing:
            await interaction.response.send_message(ALREADY, ephemeral=True)
            return
        redoing.add(answered)  # from the press on, until the work is done or dropped
        try:
            await interaction.response.defer()
        except discord.HTTPException:
            redoing.discard(answered)
            raise
        redo = _Redo(action, interaction, DiscordScope.of_interaction(interaction).key, answered, author)
        try:
            job = self.ctx.scheduler.submit(redo.scope, lambda: self._redo(redo))
        except QueueFull:
            redoing.discard(answered)
            await tell(interaction, BUSY)
            return
        job.done.add_done_callback(lambda _: redoing.discard(answered))
        position = self.ctx.scheduler.position(job)
        if position:
            await tell(interaction, IN_LINE.format(n=position))

    async def _redo(self, redo: _Redo) -> None:
        """Regenerate or Continue the newest answer of a channel, in its own messages."""
        ctx = self.ctx
        pressed = redo.interaction.message
        assert pressed is not None
        reply = await self._start_redo(redo, pressed)
        if reply is None:
            return
        assert reply.rewrites is not None
        old = reply.rewrites
        could_continue = has_button(pressed, ButtonAction.CONTINUE)
        stop = writing_view(redo.answered, redo.author)
        typing = Typing(pressed.channel)
        writing = Writing(reply, redo.answered, redo.author)
        ctx.replies.add(redo.scope, writing)
        out: ReplyStreamer | None = None
        failed = False
        try:
            with contextlib.suppress(discord.HTTPException):
                await ctx.edit_budget.edit(pressed, view=stop)  # at once: the press did something
            pages = await self._pages_of(old, pressed)
            out = ReplyStreamer(pages[0], budget=ctx.edit_budget, pages=pages, view=stop)
            await typing.start()
            await self.replier.stream(reply, out, typing)
            await reply.generation.wait()
        except Exception:
            log.exception("%s failed in %s", redo.what, redo.scope)
            failed = True
        finally:
            await typing.stop()
            ctx.replies.remove(redo.scope, writing)
            if not reply.generation.done:
                reply.stop()  # failed, or this job was cancelled (shutdown): free the slot
        went_wrong = out is None or failed or reply.finish_reason == "error"
        if went_wrong or reply.discarded or not reply.clean_text():  # (stopped before it wrote anything)
            await self._put_back(redo, reply, old, out, pressed, could_continue, went_wrong)
            return
        sent: list[discord.Message] | None = None
        try:
            sent = await out.finish(self.replier.final_text(reply, []), view=self.replier.finished_view(reply, redo.answered, redo.author))
        except discord.HTTPException as exc:
            log.error("could not show the %s in %s (%s); kept as undelivered", redo.what, redo.scope, exc)
            await tell(redo.interaction, UNDELIVERED)
        await save(reply, sent, f"the {redo.what} in {redo.scope}")

    async def _put_back(
        self, redo: _Redo, reply: Reply, old: StoredMessage, out: ReplyStreamer | None, pressed: discord.Message, could_continue: bool, went_wrong: bool
    ) -> None:
        """The earlier answer is still the one in the history: show it again as it was."""
        if went_wrong and not reply.discarded:
            log.error("%s failed in %s: %s", redo.what, redo.scope, reply.generation.error)
            await tell(redo.interaction, SORRY)
        earlier = old.content + (STOPPED if old.status == MessageStatus.STOPPED else "")
        view = None if reply.discarded else finished_view(redo.answered, redo.author, can_continue=could_continue)
        with contextlib.suppress(discord.HTTPException):
            await (out.finish(earlier, view=view) if out is not None else self.ctx.edit_budget.edit(pressed, view=view))

    async def _start_redo(self, redo: _Redo, pressed: discord.Message) -> Reply | None:
        """Start the new generation, or tell the presser why not (and take away buttons that
        no longer apply)."""
        chat = self.ctx.chat
        try:
            start = chat.regenerate if redo.action == ButtonAction.REGENERATE else chat.continue_answer
            return await start(redo.scope, str(redo.answered))
        except CannotRedo as exc:
            await tell(redo.interaction, str(exc))
            only_regenerate = exc.args[0] in (TOO_LONG_TO_CONTINUE, NO_CONTINUE)
            with contextlib.suppress(discord.HTTPException):
                view = finished_view(redo.answered, redo.author, can_continue=False) if only_regenerate else None
                await self.ctx.edit_budget.edit(pressed, view=view)
        except Exception:
            log.exception("could not start a %s in %s", redo.what, redo.scope)
            await tell(redo.interaction, SORRY)
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
                if self.bot.user is not None and m.author.id == self.bot.user.id and m.reference is None
            ]
        except discord.HTTPException:
            return [last]  # the first page is gone: rewrite the one that was pressed
        return [first, *middle, last]
