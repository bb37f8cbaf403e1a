"""Getting replies onto Discord: splitting at 2,000 characters and streaming by edits.

Part of the Discord adapter. Every message and edit goes out with
`allowed_mentions` that ping nobody, whatever the model wrote.

Discord allows about 5 message edits per 5 seconds in a channel (a budget, not
an interval), so a streamed reply is paced to use at most 4 of them: the 5th is
kept free, and the final text goes out the moment generation ends. A reply that
is finished within `FIRST_SEND_AFTER_S` of its first text is posted once, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import discord

log = logging.getLogger(__name__)

LIMIT = 2000
NO_PINGS = discord.AllowedMentions.none()
EDITS_PER_WINDOW = 5
WINDOW_S = 5.0
"""Discord's per-channel edit budget: at most this many edits in any window of this many seconds."""
BOT_EDITS_PER_S = 20
"""A bot-wide cap on edits per second, well under Discord's global 50 requests/s for everything."""
STREAM_EVERY_S = WINDOW_S / (EDITS_PER_WINDOW - 1)
"""Streaming edits of one reply come at most this often, which uses 4 of the 5 edits in any window."""
FIRST_SEND_AFTER_S = 1.0
"""How long the first text is held back (the typing indicator shows meanwhile): a reply done by
then is posted once, complete, and a longer one starts where its first edit used to land."""
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(\S{0,20})")


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """Cut `text` into messages of at most `limit` characters.

    Cuts fall between lines, or between words when one line is too long, never
    inside a word (unless a single "word" is longer than a message). A code
    block cut in two is closed at the end of one message and reopened, with its
    language, at the start of the next. A block left open at the end (a reply cut
    by the length limit) is closed, so it still shows as code.
    """
    pages: list[str] = []
    lines: list[str] = []
    size = 0
    fence: str | None = None  # the line that opened the code block we are in
    for line in text.split("\n"):
        for piece in _pieces(line, limit - 64):
            after = _toggle(fence, piece)
            closing = len(_closer(after)) + 1 if after else 0
            if lines and size + 1 + len(piece) + closing > limit:
                pages.append("\n".join(lines + ([_closer(fence)] if fence else [])))
                lines, size = ([fence], len(fence)) if fence else ([], 0)
            size += len(piece) + (1 if lines else 0)
            lines.append(piece)
            fence = after
    pages.append("\n".join(lines + ([_closer(fence)] if fence else [])))
    return [p for p in pages if p.strip()]


def _pieces(line: str, width: int) -> list[str]:
    """A line cut at spaces into parts no longer than `width` (a huge word is cut anyway)."""
    pieces = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width + 1)
        if cut <= 0:
            cut = width
        pieces.append(line[:cut].rstrip(" "))
        line = line[cut:].lstrip(" ")
    pieces.append(line)
    return pieces


def _toggle(fence: str | None, line: str) -> str | None:
    """The open fence after `line`: a fence line opens a block, or closes the open one."""
    match = _FENCE.match(line)
    if match is None:
        return fence
    if fence is None:
        return match.group(1) + match.group(2)
    return None if match.group(1).startswith(_closer(fence)) else fence


def _closer(fence: str | None) -> str:
    match = _FENCE.match(fence or "")
    return match.group(1) if match else "```"



@dataclass
class _Edit:
    """One edit in a budget window. It counts from when it is sent until the window has
    passed after Discord answered it, so network delays can never squeeze in one too many."""

    answered_at: float = math.inf  # still in flight


class _Window:
    """At most `limit` edits in any `seconds`: a sliding window over recent edits."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._edits: list[_Edit] = []

    def prune(self, now: float) -> None:
        self._edits = [e for e in self._edits if e.answered_at + self.seconds > now]

    def wait(self, reserve: int, now: float) -> float:
        """Seconds until one more edit fits while leaving `reserve` of the limit unused."""
        self.prune(now)
        room = self.limit - reserve
        over = len(self._edits) + 1 - room
        if over <= 0:
            return 0.0
        ends = sorted(e.answered_at + self.seconds for e in self._edits)
        return ends[over - 1] - now  # inf while the edits that must expire are still in flight

    def take(self) -> _Edit:
        edit = _Edit()
        self._edits.append(edit)
        return edit

    def __len__(self) -> int:
        return len(self._edits)


class EditBudget:
    """The bot's message-edit budget: a sliding window per channel, and one for the whole bot.

    Streaming edits leave room (one edit per channel, a quarter of the bot-wide cap), so
    that a final edit finds the budget open whenever possible."""

    def __init__(self, per_channel: int = EDITS_PER_WINDOW, window_s: float = WINDOW_S, bot_per_s: int = BOT_EDITS_PER_S) -> None:
        self.per_channel = per_channel
        self.window_s = window_s
        self._channels: dict[int, _Window] = {}
        self._bot = _Window(bot_per_s, 1.0)
        self.final_waits = 0  # final edits that had to wait for room (read by tests and the benchmark)

    def wait(self, channel_id: int, *, final: bool) -> float:
        """Seconds until an edit in the channel fits the budget (0: now)."""
        now = time.monotonic()
        channel = self._channels.get(channel_id)
        ours = channel.wait(0 if final else 1, now) if channel is not None else 0.0
        return max(ours, self._bot.wait(0 if final else self._bot.limit // 4, now))

    def take(self, channel_id: int) -> tuple[_Edit, _Edit]:
        """Count an edit that is being sent now; call `answered` with the result when Discord replies."""
        if len(self._channels) > 1000:  # forget channels with nothing left in their window
            now = time.monotonic()
            for window in self._channels.values():
                window.prune(now)
            self._channels = {c: w for c, w in self._channels.items() if len(w)}
        channel = self._channels.setdefault(channel_id, _Window(self.per_channel, self.window_s))
        return channel.take(), self._bot.take()

    async def until_room(self, channel_id: int, *, final: bool) -> bool:
        """Wait until an edit fits in the budget (`wait` says inf while an edit is in flight:
        look again soon). True if it had to wait."""
        wait = self.wait(channel_id, final=final)
        waited = wait > 0
        while wait > 0:
            await asyncio.sleep(min(wait, 1.0))
            wait = self.wait(channel_id, final=final)
        return waited

    async def edit(self, message: discord.Message | discord.PartialMessage, **fields: Any) -> None:
        """Edit a message outside a streamed reply (a note, buttons) within the budget: wait
        for room, leaving the one a final text may need."""
        channel_id = message.channel.id
        await self.until_room(channel_id, final=False)
        edits = self.take(channel_id)
        try:
            await message.edit(**fields)
        finally:
            self.answered(edits)

    @staticmethod
    def answered(edits: tuple[_Edit, _Edit]) -> None:
        now = time.monotonic()
        for edit in edits:
            edit.answered_at = now


class ReplyStreamer:
    """Shows a reply as it grows, within Discord's edit budget.

    `update(text)` notes the newest partial text and returns at once; a background
    task shows it when the budget allows: the first page (replying to the user's
    message, or replacing `first`, a queue note) after `first_send_after` seconds,
    edits at most every `stream_every` seconds, new pages past 2,000 characters.
    `finish(final)` leaves exactly `split_message(final)` on screen, as soon as the
    budget allows; a reply finished before its first page went out is posted once.

    `pages`: messages already showing this reply (rewritten in place); `channel`: where
    to post instead of beside `reply_to` (a thread started from it; then no reference);
    `view`: buttons under the newest page while it is written (`finish` sets the final ones)."""

    def __init__(
        self,
        reply_to: discord.Message,
        *,
        budget: EditBudget,
        first: discord.Message | None = None,
        first_send_after: float = FIRST_SEND_AFTER_S,
        stream_every: float = STREAM_EVERY_S,
        pages: Sequence[discord.Message] = (),
        channel: discord.abc.Messageable | None = None,
        view: discord.ui.View | None = None,
    ) -> None:
        self.reply_to = reply_to
        self.channel = channel
        self.budget = budget
        self.first_send_after = first_send_after
        self.stream_every = stream_every
        self.view = view
        self.messages: list[discord.Message] = list(pages) or ([first] if first is not None else [])
        self._shown: list[str] = [m.content for m in self.messages]
        self._views: list[object] = [_OLD_VIEW if m.components else None for m in self.messages]
        self._latest: list[str] = []  # pages of the newest partial text
        self._first_text_at: float | None = None
        self._shown_at: float | None = None  # when this reply last showed something
        self._pump: asyncio.Task[None] | None = None
        self._finishing = asyncio.Event()
        self._failed: discord.HTTPException | None = None
        self._live = True

    @property
    def channel_id(self) -> int:
        return (self.channel or self.reply_to.channel).id  # type: ignore[union-attr]

    async def update(self, text: str) -> None:
        """Note partial text to show when the budget allows. Raises (once) the error of an
        earlier streaming edit Discord refused; streaming then stops, `finish` still works."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        pages = split_message(text.strip()) if text.strip() else []
        if not pages or not self._live or self._finishing.is_set():
            return
        self._latest = pages
        if self._first_text_at is None:
            self._first_text_at = time.monotonic()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.ensure_future(self._stream())

    async def finish(self, text: str, *, view: discord.ui.View | None = None) -> list[discord.Message]:
        """Make the messages show exactly `text`, split into pages, with `view` under the
        last one (and no buttons on the others); returns them."""
        self._finishing.set()
        if self._pump is not None:
            await self._pump  # an edit in flight completes, so no page is sent twice
        self.view = view
        pages = split_message(text)
        for i, page in enumerate(pages):
            buttons = view if i == len(pages) - 1 else None
            if i >= len(self.messages):
                await self._send(page, buttons)
            elif self._shown[i] != page or self._views[i] is not buttons:
                self.budget.final_waits += await self.budget.until_room(self.channel_id, final=True)
                await self._edit(i, page, buttons)
        while len(self.messages) > len(pages):  # the final text can be shorter than a partial one (a stop string was cut)
            extra = self.messages.pop()
            self._shown.pop()
            self._views.pop()
            await extra.delete()
        return self.messages

    # --- streaming ---------------------------------------------------------------------

    async def _stream(self) -> None:
        """Show the newest partial text whenever it is due, until all of it is shown."""
        try:
            while not self._finishing.is_set() and self._unshown(self._latest):
                delay = self._due_in()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._finishing.wait(), min(delay, 1.0))
                    continue
                await self._show_partial(self._latest)
        except discord.HTTPException as exc:
            self._failed, self._live = exc, False
        except Exception:  # a bug here must not end the reply; finish() still shows it all
            log.exception("streaming a reply in channel %s failed", self.channel_id)
            self._live = False

    def _due_in(self) -> float:
        """Seconds until the partial text may be shown."""
        now = time.monotonic()
        if self._shown_at is None:
            assert self._first_text_at is not None
            due = self._first_text_at + self.first_send_after - now
        else:
            due = self._shown_at + self.stream_every - now
        if any(i < len(self._shown) and self._shown[i] != page for i, page in enumerate(self._latest)):
            due = max(due, self.budget.wait(self.channel_id, final=False))  # an edit, not only new pages
        return due

    def _unshown(self, pages: list[str]) -> bool:
        return any(i >= len(self._shown) or self._shown[i] != page for i, page in enumerate(pages))

    async def _show_partial(self, pages: list[str]) -> None:
        self._shown_at = time.monotonic()
        for i, page in enumerate(pages):
            buttons = self.view if i == len(pages) - 1 else None
            if i >= len(self.messages):
                await self._send(page, buttons)
            elif (self._shown[i] != page or self._views[i] is not buttons) and self.budget.wait(self.channel_id, final=False) <= 0:
                await self._edit(i, page, buttons)

    # --- Discord calls -------------------------------------------------------------------

    async def _edit(self, i: int, page: str, view: discord.ui.View | None) -> None:
        buttons = {} if self._views[i] is view else {"view": view}  # `view=` only when the buttons change
        edits = self.budget.take(self.channel_id)
        try:
            await self.messages[i].edit(content=page, allowed_mentions=NO_PINGS, **buttons)
        finally:
            self.budget.answered(edits)
        self._shown[i] = page
        self._views[i] = view

    async def _send(self, page: str, view: discord.ui.View | None) -> None:
        buttons = {"view": view} if view is not None else {}
        if self.channel is not None:
            message = await self.channel.send(page, allowed_mentions=NO_PINGS, **buttons)
        elif not self.messages:
            reference = self.reply_to.to_reference(fail_if_not_exists=False)
            message = await self.reply_to.channel.send(page, reference=reference, mention_author=False, allowed_mentions=NO_PINGS, **buttons)
        else:
            message = await self.reply_to.channel.send(page, allowed_mentions=NO_PINGS, **buttons)
        self.messages.append(message)
        self._shown.append(page)
        self._views.append(view)


_OLD_VIEW = object()  # buttons a message already had (from before): replaced or removed on its next edit


# --- what a reply looks like: answer, reasoning, notes ---------------------------------------

THINKING_NOTE = "-# \U0001f4ad thinking\u2026 {s:.0f} s"
THOUGHT_NOTE = "-# thought for {s:.0f} s"
REASONING_LIMIT = 1500  # characters of reasoning shown in `spoiler` mode (its end: the conclusion)


def reply_view(answer: str, reasoning: str, *, mode: str, thinking: bool, thought_s: float | None, final: bool) -> str:
    """The text of a reply as Discord shows it, while it is written and when it is done.

    `mode` is THINKING: `hide` shows the answer only (a small "thought for N s" line
    at the end); `spoiler` puts the reasoning first, inside a spoiler; `show` quotes it
    as it is written. While a model is still thinking, hide and spoiler show only
    "thinking… N s", never a half-finished thought.
    """
    answer = answer.strip()
    reasoning = reasoning.strip()
    seconds = thought_s or 0.0
    if mode == "show" and reasoning:
        quoted = "\n".join("> " + line if line.strip() else ">" for line in reasoning.splitlines())
        return f"-# \U0001f4ad reasoning\n{quoted}\n\n{answer}".rstrip()
    if thinking or (reasoning and not answer and not final):
        return THINKING_NOTE.format(s=seconds)
    if mode == "spoiler" and reasoning:
        shown = reasoning if len(reasoning) <= REASONING_LIMIT else "\u2026" + reasoning[-REASONING_LIMIT:]
        shown = shown.replace("||", "| |")
        return f"-# \U0001f4ad reasoning ({seconds:.0f} s), click to show:\n||{shown}||\n\n{answer}".rstrip()
    if reasoning and final and answer:
        return f"{answer}\n{THOUGHT_NOTE.format(s=seconds)}"
    return answer


# --- notes: short visible answers that are not part of the conversation ------------------------


async def post_note(message: discord.Message, text: str, *, channel: discord.abc.Messageable | None = None) -> discord.Message | None:
    """A short note in reply to `message` (in `channel` instead, a thread started from it, if
    given). None when Discord refused it (logged: a note is never worth an exception)."""
    try:
        if channel is not None:
            return await channel.send(text, allowed_mentions=NO_PINGS)
        return await message.channel.send(text, reference=message.to_reference(fail_if_not_exists=False), mention_author=False, allowed_mentions=NO_PINGS)
    except discord.HTTPException as exc:
        log.warning("could not post a note in %s: %s", message.channel.id, exc)
        return None


async def tell(interaction: discord.Interaction, text: str) -> None:
    """A short note only the presser of a button (or user of a command) sees, after the interaction was acknowledged."""
    with contextlib.suppress(discord.HTTPException):
        await interaction.followup.send(text, ephemeral=True)


async def delete_all(messages: Sequence[discord.Message]) -> None:
    for message in messages:
        with contextlib.suppress(discord.HTTPException):
            await message.delete()
