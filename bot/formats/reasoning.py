"""A reply's raw text, split into the model's reasoning and its answer.

Reasoning models write private thoughts before they answer, each family in
its own format:

- `<think>…</think>` (Qwen3, DeepSeek-R1 and its distills, QwQ, ...). Some
  templates open `<think>` in the prompt itself (DeepSeek-R1's generation prompt
  ends with it), so only `</think>` arrives: `ReplyFormat.thinking` says so.
- gpt-oss's harmony channels: `<|channel|>analysis<|message|>…<|end|>` then
  `<|start|>assistant<|channel|>final<|message|>…`. Only the `final` channel is
  the answer (`ReplyFormat.harmony`).

`ReplyText` reads the text as it is generated, piece by piece, and hands out
reasoning and answer separately, never a marker or half of one; stop strings
cut the answer. Both backends use it, so the local engine and a remote server
behave the same. Nothing here knows about llama.cpp or Discord.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HARMONY_END = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")  # what ends a harmony message
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_HEADER_LIMIT = 256  # a harmony header longer than this is not one: treat the text as a plain answer


@dataclass(frozen=True)
class ReplyFormat:
    """How a model lays out a reply: stop strings, and where its reasoning is."""

    stop: tuple[str, ...] = ()
    harmony: bool = False  # gpt-oss channels (control tokens are part of the text)
    thinking: bool = False  # the prompt already opened <think>: the reply starts inside reasoning
    continuing: bool = False  # the reply goes on from text already shown (Continue): keep its leading space


class StopText:
    """A reply's text as it arrives: cut where a stop string appears, and held back
    while its end could still be the start of one, so no stop marker is ever shown."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0  # how much of `text` was handed out
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append a piece; returns the text now safe to show (empty once a stop string ended it)."""
        if self.stopped:
            return ""
        self.text += piece
        cut = find_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return ""
        safe = len(self.text) - held_back(self.text, self.stops)
        if safe <= self.emitted:
            return ""
        shown, self.emitted = self.text[self.emitted : safe], safe
        return shown

    def rest(self) -> str:
        """Everything not handed out yet (at the end of the reply)."""
        rest, self.emitted = self.text[self.emitted :], len(self.text)
        return rest


class ReplyText:
    """Splits a reply into reasoning and answer as it is generated.

    `add(piece)` returns `(reasoning, answer)`: the new text of each that is safe
    to show. `thinking` is True while the model is reasoning; `stopped` once a
    stop string (or the end of gpt-oss's final message) ended the answer.
    """

    def __init__(self, fmt: ReplyFormat) -> None:
        self.fmt = fmt
        stops = fmt.stop + (HARMONY_END if fmt.harmony else ())
        self.answer = StopText(stops)
        self.reasoning = ""
        self.thinking = fmt.thinking
        self._state = "reasoning" if fmt.thinking else "start"
        self._end_marks: tuple[str, ...] = (THINK_CLOSE,)
        self._buf = ""  # raw text not yet classified
        self._answer_started = fmt.continuing  # a new answer's leading whitespace is dropped; a continuation's is its word gap

    @property
    def stopped(self) -> bool:
        return self.answer.stopped

    @property
    def text(self) -> str:
        """The answer so far (including text still held back)."""
        return self.answer.text

    def add(self, piece: str) -> tuple[str, str]:
        self._buf += piece
        reasoning, answer = "", ""
        while self._buf and not self.stopped:
            before = (self._state, len(self._buf))
            r, a = self._step()
            reasoning += r
            answer += a
            if (self._state, len(self._buf)) == before:
                break  # waiting for more text
        self.reasoning += reasoning
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """The end of generation: whatever is still buffered goes where it belongs."""
        buf, self._buf = self._buf, ""
        reasoning = ""
        if self._state == "reasoning":
            reasoning = buf
        elif self._state == "header":
            if not buf.lstrip().startswith("<|"):
                self._feed_answer(buf)
        elif self._state == "start":
            if not (self.fmt.harmony and buf.lstrip().startswith("<|")):
                self._feed_answer(buf)
        self.reasoning += reasoning
        self.thinking = False
        return reasoning, self.answer.rest()

    # --- the state machine --------------------------------------------------------------

    def _step(self) -> tuple[str, str]:
        if self._state == "start":
            return self._start()
        if self._state == "reasoning":
            return self._reason()
        if self._state == "header":
            return self._header()
        return "", self._feed_answer(self._take_all())

    def _start(self) -> tuple[str, str]:
        """Decide from the first characters whether the reply opens with reasoning."""
        head = self._buf.lstrip()
        if self.fmt.harmony:
            if head.startswith("<|"):
                self._state = "header"
                return "", ""
            if not head or "<|".startswith(head):
                return "", ""
        elif head.startswith(THINK_OPEN):
            self._buf = head[len(THINK_OPEN) :]
            self._state, self.thinking, self._end_marks = "reasoning", True, (THINK_CLOSE,)
            return "", ""
        elif not head or THINK_OPEN.startswith(head):
            return "", ""  # could still become <think>
        self._state = "answer"
        return "", ""

    def _reason(self) -> tuple[str, str]:
        """Inside reasoning: pass it on until the end marker, holding back partial markers."""
        self.thinking = True
        if self.fmt.thinking and not self.reasoning and self._buf.lstrip().startswith(THINK_OPEN):
            self._buf = self._buf.lstrip()[len(THINK_OPEN) :]  # a model that opens <think> again
        marks = (THINK_CLOSE,) if not self.fmt.harmony else HARMONY_END
        cut = find_stop(self._buf, marks, 0)
        if cut is None:
            safe = len(self._buf) - held_back(self._buf, marks)
            out, self._buf = self._buf[:safe], self._buf[safe:]
            return out, ""
        out = self._buf[:cut]
        rest = self._buf[cut:]
        if self.fmt.harmony:
            mark = next(m for m in HARMONY_END if rest.startswith(m))
            if mark in ("<|return|>", "<|call|>"):
                self.answer.stopped = True  # it ended without a final message
                self._buf = ""
            else:  # <|end|>: the next message follows; <|start|> opens it
                self._buf = rest[len(mark) :] if mark == "<|end|>" else rest
                self._state = "header"
        else:
            self._buf = rest[len(THINK_CLOSE) :]
            self._state = "answer"
        self.thinking = False
        return out, ""

    def _header(self) -> tuple[str, str]:
        """Harmony: `<|start|>assistant<|channel|>NAME<|message|>` opens the next message."""
        at = self._buf.find("<|message|>")
        if at == -1:
            if len(self._buf) > _HEADER_LIMIT:
                self._state = "answer"  # not harmony after all
            return "", ""
        header, self._buf = self._buf[:at], self._buf[at + len("<|message|>") :]
        match = _CHANNEL.search(header)
        if match is None or match.group(1) == "final":
            self._state = "answer"
        else:  # analysis (or commentary): not for the user
            self._state, self.thinking = "reasoning", True
        return "", ""

    def _take_all(self) -> str:
        out, self._buf = self._buf, ""
        return out

    def _feed_answer(self, text: str) -> str:
        if not self._answer_started:
            text = text.lstrip()
            if not text:
                return ""
            self._answer_started = True
        return self.answer.add(text)


def find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index of the earliest stop string in `text` (searching only where one could newly appear)."""
    best: int | None = None
    for stop in stops:
        at = text.find(stop, max(0, emitted - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string, so must wait."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
