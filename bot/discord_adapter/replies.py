"""Answering: a stored message's reply generated, streamed onto Discord, and stored with its messages.

A turn runs when the fair queue gives it its channel's place (see `intake`). While the
reply is written it shows a Stop button; once stored, Regenerate (and Continue after
the length limit). Regenerate and Continue (see `buttons`) stream through the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import discord

from bot.conversations.records import StoreBusy
from bot.conversations.service import EMPTY_NOTE, ModelUnavailable, Reply
from bot.discord_adapter.context import BotContext, Writing
from bot.discord_adapter.output import NO_PINGS, ReplyStreamer, delete_all, post_note, reply_view
from bot.discord_adapter.views import finished_view, writing_view

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong while I was answering. Please try again."
UNDELIVERED = "Sorry, Discord did not accept my reply. Please ask again."
STOPPED = " *(stopped)*"
LOADING = "\u23f3 Loading model {name}\u2026"
MODEL_FAILED = "\u26a0\ufe0f Sorry, I could not answer with this channel's model: {why}."
THOUGHT_ONLY = "(I spent my whole reply length thinking and did not get to an answer. Ask me again, or raise LLAMA_N_PREDICT.)"


@dataclass
class Turn:
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


class Typing:
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


class Replier:
    """Writes replies onto Discord and stores them."""

    def __init__(self, ctx: BotContext) -> None:
        self.ctx = ctx

    async def answer(self, turn: Turn) -> None:
        """Generate and post the reply to one stored message; store it with its turn."""
        ctx = self.ctx
        typing = Typing(turn.channel)
        await typing.start()
        reply: Reply | None = None
        writing: Writing | None = None
        stop = writing_view(turn.message.id, turn.message.author.id)
        out = ReplyStreamer(turn.message, budget=ctx.edit_budget, first=turn.first, channel=turn.thread, view=stop)
        try:
            message_id = await turn.stored
            if message_id is None:
                return  # seen twice: the other sighting answers it
            # The bot's note for it, if any (its place in line, storage busy), becomes the reply.
            first = await turn.waiting_note if turn.waiting_note is not None else turn.first
            loading = await ctx.chat.model_to_load(turn.scope)
            if loading is not None:  # the channel's model loads first: say so (the note becomes the reply)
                first = await self._loading_note(turn, first, loading)
            out = ReplyStreamer(turn.message, budget=ctx.edit_budget, first=first, channel=turn.thread, view=stop)
            try:
                reply = await ctx.chat.answer(turn.scope, message_id)
            except ModelUnavailable as exc:
                log.warning("no reply to message %s in %s: %s", turn.message.id, turn.scope, exc)
                await typing.stop()
                with contextlib.suppress(discord.HTTPException):
                    await out.finish(MODEL_FAILED.format(why=str(exc).rstrip(".")))
                await self._settle(turn)
                return
            if reply is None:  # deleted while it waited: nothing to answer
                await delete_all(out.messages)
                return
            writing = Writing(reply, turn.message.id, turn.message.author.id)
            ctx.replies.add(turn.scope, writing)
            await self.retire_buttons(turn.scope, turn.channel)
            await self.stream(reply, out, typing)
            await reply.generation.wait()
        except Exception:
            log.exception("could not answer message %s in %s", turn.message.id, turn.scope)
            await typing.stop()
            await self.apologize(out)
            await self._settle(turn)
            return
        finally:
            await typing.stop()
            if writing is not None:
                ctx.replies.remove(turn.scope, writing)
            if reply is not None and not reply.generation.done:
                reply.stop()  # this job was cancelled (shutdown): free the slot
        if reply.discarded:  # the message was deleted while its reply was written
            await delete_all(out.messages)
            return
        if reply.finish_reason == "error":
            log.error("generation failed for message %s in %s: %s", turn.message.id, turn.scope, reply.generation.error)
            await self.apologize(out)
            await self._settle(turn)
            return
        sent: list[discord.Message] | None = None
        try:
            view = self.finished_view(reply, turn.message.id, turn.message.author.id)
            sent = await out.finish(self.final_text(reply, turn.notes), view=view)
        except discord.HTTPException as exc:
            log.error("could not deliver the reply to message %s in %s (%s); kept as undelivered", turn.message.id, turn.scope, exc)
            await post_note(turn.message, UNDELIVERED, channel=turn.thread)
        await save(reply, sent, f"the reply to message {turn.message.id} in {turn.scope}")

    async def _loading_note(self, turn: Turn, first: discord.Message | None, name: str) -> discord.Message | None:
        """Say the channel's model is loading: in the bot's note for the turn if it has one, else a new note."""
        text = LOADING.format(name=name)
        if first is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.ctx.edit_budget.edit(first, content=text, allowed_mentions=NO_PINGS, view=None)
                return first
        return await post_note(turn.message, text, channel=turn.thread) or first

    async def stream(self, reply: Reply, out: ReplyStreamer, typing: Typing) -> None:
        """Show the reply while it is generated; if Discord refuses an edit, wait for the end."""
        gen = reply.generation
        live = self.ctx.settings.stream
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
                    self.ctx.in_background(self._note_first_page(reply.user_message_id, str(out.messages[0].id)))

    async def _note_first_page(self, message_id: int, page_id: str) -> None:
        """Only a hint for a restart: it never holds the stream up, and a busy database skips it."""
        try:
            await self.ctx.chat.note_reply_message(message_id, page_id)
        except StoreBusy:
            log.warning("the database is busy: not noting the first page of the reply to stored message %s", message_id)

    def final_text(self, reply: Reply, notes: list[str]) -> str:
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

    def finished_view(self, reply: Reply, answered: int, author: int) -> discord.ui.View | None:
        """Regenerate (and Continue after the length limit) under an answer that is stored."""
        if not reply.clean_text() or reply.finish_reason == "error":
            return None
        return finished_view(answered, author, can_continue=reply.finish_reason == "length" and self.ctx.chat.can_continue)

    async def apologize(self, out: ReplyStreamer) -> None:
        with contextlib.suppress(discord.HTTPException):
            await out.finish(SORRY)

    async def retire_buttons(self, scope: str, channel: discord.abc.Messageable) -> None:
        """A new turn starts: the answer before it can no longer be regenerated or continued,
        so its buttons go (in the background; found in the store, so also after a restart)."""
        message_id = await self.ctx.chat.newest_answer_message(scope)
        if message_id and hasattr(channel, "get_partial_message"):  # every channel a reply can be in
            self.ctx.in_background(self._remove_buttons(channel.get_partial_message(int(message_id))))

    async def _remove_buttons(self, message: discord.PartialMessage) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self.ctx.edit_budget.edit(message, view=None)

    async def _settle(self, turn: Turn) -> None:
        """After an apology the turn is done, unless the model engine is gone: then the
        process restarts and answers it (it stays pending)."""
        if self.ctx.chat.backend_dead() or not turn.stored.done() or turn.stored.exception() is not None:
            return
        message_id = turn.stored.result()
        if message_id is not None:
            with contextlib.suppress(Exception):
                await self.ctx.chat.settle(message_id)


async def save(reply: Reply, sent: list[discord.Message] | None, what: str) -> None:
    """Store a finished reply with the Discord messages that show it; `sent` None: Discord
    did not take it, so it is kept as undelivered (never shown to the model as said).

    A database locked by another program is waited out for as long as it takes (the turn
    keeps its channel's place in line meanwhile); only a shutdown ends the wait, and the
    turn, still pending, is finished after the restart."""
    waiting = False
    while True:
        try:
            await reply.save(
                delivered=sent is not None,
                platform_message_id=str(sent[0].id) if sent else None,
                last_message_id=str(sent[-1].id) if sent else None,
            )
            return
        except StoreBusy:
            if not waiting:
                waiting = True
                log.warning("the database is busy: %s waits to be stored", what)
        except Exception:
            log.exception("could not store %s", what)
            return
