"""The one small interface between conversations and whatever runs the model.

`ChatService` talks to a `Backend` and never looks past it. `local.LocalBackend`
wraps the in-process llama.cpp engine (the default); `remote.RemoteBackend`
sends the same work to an OpenAI-compatible server (llama-server, vLLM,
Ollama, ...). Both hand back a `Generation`, so streaming, /stop and the
Discord adapter work the same way on either.

This module imports neither llama.cpp nor numpy: a bot that only talks to a
remote server never loads the local engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bot.config import Sampling
from bot.formats.reasoning import ReplyFormat
from bot.formats.templates import Image, Message, Template



class ModelError(Exception):
    """The model file cannot be used. The message is one line for the user."""


class PromptTooLong(ValueError):
    """A prompt does not fit in a conversation's context window."""


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the bot needs to know about the loaded model."""

    path: Path
    description: str
    n_ctx_train: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    size_bytes: int


@dataclass(frozen=True)
class ImagePart:
    """One image chunk's place in a prompt's token list (see bot.engine.vision)."""

    start: int  # index of its first position in the prompt's tokens
    n_pos: int  # positions (token-list entries) it takes
    n_tokens: int  # embeddings it decodes (KV cells; more than n_pos for M-RoPE models)
    image: Image
    index: int  # which image chunk of that image (models that tile big images have several)


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to send: how many tokens it takes, and the form the backend wants."""

    n_tokens: int
    tokens: list[int] | None = None  # local engine: exact token ids
    text: str | None = None  # remote /v1/completions: the rendered prompt
    messages: list[dict[str, Any]] | None = None  # remote /v1/chat/completions: the server renders
    fmt: ReplyFormat = field(default_factory=ReplyFormat)  # how the reply will be laid out
    images: tuple[ImagePart, ...] = ()  # local engine: where images lie in `tokens` (bot.engine.vision)


@dataclass
class Generation:
    """One reply being generated: an async stream of text plus its outcome.

    Created by a backend on the event loop; the producer reports into it with
    `_deliver` (from another thread through `call_soon_threadsafe`). `text` is
    the answer only; a reasoning model's private thoughts go to `reasoning`, and
    `thinking` is True while they are being written. Iterate `stream()` for the
    answer as it arrives, `updates()` to follow both, or `await gen.wait()`.
    """

    key: str
    n_prompt: int
    loop: asyncio.AbstractEventLoop
    text: str = ""
    reasoning: str = ""
    thinking: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    n_cached: int = 0  # prompt tokens reused from the KV cache
    n_evaluated: int = 0  # prompt tokens actually evaluated
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when a slot took it
    first_token_at: float | None = None
    finished_at: float | None = None
    thought_from: float | None = None  # when reasoning began (first token of a thinking reply)
    thought_until: float | None = None  # when the answer began after reasoning
    n_generated: int = 0  # tokens generated (kept also where token ids are not known)
    notes: list[str] = field(default_factory=list)  # short notes for the user from the backend (a server refused the images)
    _cancel: bool = False
    _on_cancel: Callable[[], None] | None = None  # tells the producer to look now
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def thought_s(self) -> float | None:
        """How long the model reasoned before answering (None: it did not)."""
        if self.thought_from is None:
            return None
        end = self.thought_until or self.finished_at or time.perf_counter()
        return max(0.0, end - self.thought_from)

    def cancel(self) -> None:
        """Stop as soon as possible, even mid-prompt; text generated so far is kept."""
        self._cancel = True
        if self._on_cancel is not None and not self.done:
            self._on_cancel()

    async def wait(self) -> Generation:
        while not self.done:
            await self._changed.wait()
            self._changed.clear()
        return self

    async def stream(self) -> AsyncIterator[str]:
        """Yield new answer text as it arrives (pieces coalesce when the reader is slower)."""
        sent = 0
        while True:
            if len(self.text) > sent:
                chunk, sent = self.text[sent:], len(self.text)
                yield chunk
                continue
            if self.done:
                return
            await self._changed.wait()
            self._changed.clear()

    async def updates(self) -> AsyncIterator[None]:
        """Wake at once, then once per change of text, reasoning or state, the last time when
        done (read the fields; changes that come faster than the reader coalesce)."""
        while True:
            yield None
            if self.done:
                return
            await self._changed.wait()
            self._changed.clear()

    def _deliver(self, text: str, finish_reason: str | None = None, error: str | None = None, *, reasoning: str = "", thinking: bool | None = None) -> None:
        """Called on the event loop with what the producer has for us since last time."""
        now = time.perf_counter()
        if thinking or reasoning:
            self.thought_from = self.thought_from or self.first_token_at or now
        self.reasoning += reasoning
        if thinking is not None:
            if self.thinking and not thinking:
                self.thought_until = now
            self.thinking = thinking
        self.text += text
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
            self.finished_at = now
            self.thinking = False
        self._changed.set()


@dataclass
class WarmStats:
    """What warming conversations while their members type cost and brought (`Backend.warm`).

    A warm-up that did work ends either used (a reply of its conversation started within
    WARM_TTL_S) or wasted (none did, or its history changed); `tokens_wasted` and
    `cpu_wasted_s` are what the wasted ones cost. CPU seconds are the process's CPU time
    while the engine did warm-up work (it does only when no reply needs it), plus the
    reader thread's for disk reads."""

    asked: int = 0  # warm-ups asked for (a member started typing)
    started: int = 0  # ... that had work to do: a restore, a read from disk, an evaluation
    used: int = 0
    wasted: int = 0
    restored: int = 0  # states restored ahead of their message (from disk, or RAM into a slot)
    tokens: int = 0  # tokens evaluated by warm-ups
    tokens_wasted: int = 0
    cpu_s: float = 0.0
    cpu_wasted_s: float = 0.0
    preempted: int = 0  # warm-up decodes a reply interrupted


@dataclass(frozen=True)
class EngineStats:
    """How busy an in-process engine is, for /status (numbers kept in memory: cheap to read)."""

    busy_slots: int
    slots: int
    cached_states: int  # conversations whose KV state waits in RAM for their next message
    cache_bytes: int
    cache_limit_bytes: int  # KV_CACHE_MB
    warm: WarmStats = field(default_factory=WarmStats)


class Backend(Protocol):
    """What the chat layer needs from a model."""

    n_ctx: int  # tokens per conversation
    info: ModelInfo  # for `auto`: the chat template and special tokens, when known
    applies_template: bool  # True when the server renders the chat itself (/template has no effect)
    can_warm: bool  # True when `warm` can make a conversation's state ready ahead of its message
    on_fatal: Callable[[str], None] | None  # called (from any thread) if the backend gives up for good

    @property
    def dead(self) -> str | None:
        """Why the backend gave up for good (the process should exit and restart); None while it serves."""
        ...

    def stats(self) -> EngineStats | None:
        """Slots and KV cache of an in-process engine; None where a server keeps them."""
        ...

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each plain text (an estimate where the server cannot count)."""
        ...

    async def count_images(self, images: Sequence[Image]) -> list[int]:
        """Tokens each image takes in a prompt (an estimate where the server does the counting)."""
        ...

    def image_support(self) -> str | None:
        """None when images reach the model; else why they cannot (one line, for a note)."""
        ...

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        """The prompt for `messages`; their images go in front of their text where the model can see."""
        ...

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling) -> Generation:
        """Start a reply for conversation `key`; call on the event loop."""
        ...

    def forget(self, key: str) -> None:
        """The conversation's history changed: drop whatever is cached for it."""
        ...

    def warm(self, key: str, prompt: PreparedPrompt) -> bool:
        """A message extending `prompt` is probably coming (someone is typing): make the
        conversation's state ready for it, in the background, at the lowest priority (never
        delaying a reply; dropped after WARM_TTL_S). True if a warm-up is on its way. Call on
        the event loop; returns at once."""
        ...

    def describe(self) -> str: ...

    async def close(self) -> None: ...


class ModelUnavailable(ModelError):
    """A catalogue model cannot serve now (missing, damaged, too big for MODEL_MEMORY_MB, or
    every other model is busy): one line for the channel's note; other models go on serving."""


@dataclass(frozen=True)
class ModelStatus:
    """One catalogue model as /model and /status show it."""

    name: str
    loaded: bool
    default: bool
    memory_bytes: int | None  # what it takes (loaded: measured; else estimated, None if unknown)
    last_used: float | None  # time.time() of its last reply, None: none yet
    busy: bool = False  # a reply is running or queued on it
    load_s: float | None = None  # how long its last load took


class Models(Protocol):
    """Several models chosen per conversation (bot.engine.pool for local ones, a server's list
    for a remote backend). The default model's backend is always ready."""

    default: str
    on_fatal: Callable[[str], None] | None  # called (from any thread) if any model's engine gives up for good

    @property
    def complete(self) -> bool:
        """Whether `names` is the whole list (a server's is unknown until it answers): until it
        is, a conversation's choice missing from it is kept, not dropped."""
        ...

    def names(self) -> list[str]:
        """Every model that may be chosen, the default first."""
        ...

    async def refresh(self) -> None:
        """Read the list again where it can change (a server's); nothing for local models."""
        ...

    def sees_images(self) -> bool:
        """Some model can see images (so images are taken and stored; one that cannot reads a placeholder)."""
        ...

    def loaded(self, name: str) -> Backend | None:
        """The model's backend if it serves now, without loading it."""
        ...

    def hold(self, name: str) -> contextlib.AbstractAsyncContextManager[Backend]:
        """The model's backend, loaded on demand (raises ModelUnavailable), kept loaded until
        the block ends: start the generation inside it (a running generation keeps it loaded too)."""
        ...

    def forget(self, key: str) -> None:
        """A conversation's history changed: drop its cached state in every model."""
        ...

    def status(self) -> list[ModelStatus]: ...

    async def close(self) -> None: ...
