"""Getting replies onto Discord: splitting at 2,000 characters and streaming by edits.

Part of the Discord adapter. Every message and edit goes out with
`allowed_mentions` that ping nobody, whatever the model wrote.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence

import discord

LIMIT = 2000
NO_PINGS = discord.AllowedMentions.none()
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


class EditBudget:
    """A bot-wide token bucket for message edits, on top of one edit per second per message."""

    def __init__(self, rate: float = 4.0, burst: int = 4) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def try_take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class ReplyStreamer:
    """Shows a reply as it grows: the first page replies to the user's message, edits
    follow at most once per `interval` per message, new pages continue past 2,000
    characters, and `finish` leaves exactly `split_message(final)` on screen.

    `pages`: messages already showing this reply (rewritten in place); `channel`: where
    to post instead of beside `reply_to` (a thread started from it; then no reference);
    `view`: buttons under the newest page while it is written (`finish` sets the final ones)."""

    def __init__(
        self,
        reply_to: discord.Message,
        *,
        budget: EditBudget,
        first: discord.Message | None = None,
        interval: float = 1.0,
        pages: Sequence[discord.Message] = (),
        channel: discord.abc.Messageable | None = None,
        view: discord.ui.View | None = None,
    ) -> None:
        self.reply_to = reply_to
        self.channel = channel
        self.budget = budget
        self.interval = interval
        self.view = view
        self.messages: list[discord.Message] = list(pages) or ([first] if first is not None else [])
        self._shown: list[str] = [m.content for m in self.messages]
        self._edited_at: list[float] = [0.0] * len(self.messages)
        self._views: list[object] = [_OLD_VIEW if m.components else None for m in self.messages]

    async def update(self, text: str) -> None:
        """Show partial text, if the rate limits allow an edit now (otherwise skip)."""
        pages = split_message(text.strip()) if text.strip() else []
        if not pages:
            return
        i = len(pages) - 1
        if i < len(self.messages):
            if self._shown[i] == pages[i] or time.monotonic() - self._edited_at[i] < self.interval:
                return
            if not self.budget.try_take():
                return
        await self._show(pages, final=False)

    async def finish(self, text: str, *, view: discord.ui.View | None = None) -> list[discord.Message]:
        """Make the messages show exactly `text`, split into pages, with `view` under the
        last one (and no buttons on the others); returns them."""
        self.view = view
        await self._show(split_message(text), final=True)
        return self.messages

    async def _show(self, pages: list[str], *, final: bool) -> None:
        for i, page in enumerate(pages):
            view = self.view if i == len(pages) - 1 else None
            if i < len(self.messages):
                if self._shown[i] != page or self._views[i] is not view:
                    wait = self.interval - (time.monotonic() - self._edited_at[i])
                    if wait > 0:
                        if not final:
                            continue
                        await asyncio.sleep(wait)
                    buttons = {} if self._views[i] is view else {"view": view}
                    await self.messages[i].edit(content=page, allowed_mentions=NO_PINGS, **buttons)
                    self._shown[i] = page
                    self._views[i] = view
                    self._edited_at[i] = time.monotonic()
            else:
                await self._send(page, view)
        if final:  # the final text can be shorter than a partial one (a stop string was cut)
            while len(self.messages) > len(pages):
                extra = self.messages.pop()
                self._shown.pop()
                self._views.pop()
                self._edited_at.pop()
                await extra.delete()

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
        self._edited_at.append(time.monotonic())


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
