"""A scripted model: a real implementation of the bot's `Backend` protocol whose replies a test writes.

Where only the bot's logic is the subject (commands, buttons, access, queueing, edits
and deletes, durability, streaming and splitting), a test runs the real discord.py
client against the local Discord API and a real SQLite file, with this in place of
the model, as `simonw/llm` tests through its MockModel plugin. A reply says exactly
what the test scripted, at the pace the test sets, and a reply that must still be
running when something happens is held open by the script (`Script.hold`), never by
asking a model for many tokens: so no outcome depends on the CPU's speed.

Without a script, a reply is `You said: <the newest user message>` (`echo`; a test may set
`default` to pace it), so a test can see which message was answered. Every prompt is
rendered by the conversation's template as for the real model and recorded in `calls`,
so a test can see what the model was asked, with which history.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import Sampling
from bot.engine.backend import Generation, ModelInfo, PreparedPrompt
from bot.formats.templates import Image, Message, Template, prompt_text, reply_format

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Script:
    """What one reply does: its reasoning, then its answer, a piece at a time ("tokens").

    `every_s`: pause between pieces. `hold`: the reply waits for this event after
    `hold_after` answer pieces (a /stop, delete or shutdown ends the wait as it ends the
    reply). `finish`: how it ends when all pieces are out ("stop", "length", or "error"
    with `error`); more pieces than the reply length allows end it at "length"."""

    pieces: Sequence[str] = ("Hello!",)
    reasoning: Sequence[str] = ()
    every_s: float = 0.0
    hold: asyncio.Event | None = None
    hold_after: int = 1
    finish: str = "stop"
    error: str | None = None

    @classmethod
    def text(cls, text: str, *, words_per_piece: int = 1, **options: object) -> Script:
        """A reply of `text`, one word (with its following space) per piece."""
        words = text.split(" ")
        pieces = [" ".join(words[i : i + words_per_piece]) + " " for i in range(0, len(words), words_per_piece)]
        pieces[-1] = pieces[-1].rstrip(" ")
        return cls(pieces=pieces, **options)  # type: ignore[arg-type]


@dataclass
class Call:
    """One reply the bot asked for."""

    key: str
    prompt: str  # as the template rendered it
    messages: list[Message]
    max_tokens: int
    sampling: Sampling
    generation: Generation


@dataclass
class ScriptedBackend:
    """Replies from a queue of scripts (`then`), or `default(call)` (`You said: …`) when it is empty."""

    n_ctx: int = 1024
    applies_template: bool = False
    info: ModelInfo = field(
        default_factory=lambda: ModelInfo(
            path=Path("scripted.gguf"), description="scripted replies (tests)", n_ctx_train=1024, chat_template=CHATML,
            bos_token="", eos_token="", add_bos=False, size_bytes=0,
        )
    )
    sees: bool = True  # False: a model without a vision projector
    on_fatal: Callable[[str], None] | None = None
    dead: str | None = None
    default: Callable[[Call], Script] = field(default=lambda call: echo(call))
    calls: list[Call] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    can_warm: bool = True
    warmed: list[tuple[str, str]] = field(default_factory=list)  # (key, prompt text) of each warm-up asked for
    _scripts: collections.deque[Script | Callable[[Call], Script]] = field(default_factory=collections.deque)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def then(self, *scripts: Script | str | Callable[[Call], Script]) -> ScriptedBackend:
        """The next replies, in order (a str is `Script.text(str)`; a callable makes one from the call)."""
        for script in scripts:
            self._scripts.append(Script.text(script) if isinstance(script, str) else script)
        return self

    @property
    def waiting_scripts(self) -> int:
        return len(self._scripts)

    async def count(self, texts: Sequence[str]) -> list[int]:
        return [tokens(t) for t in texts]

    async def count_images(self, images: Sequence[Image]) -> list[int]:
        return [IMAGE_TOKENS for _ in images]

    def image_support(self) -> str | None:
        """A seeing scripted model gets the images in `Call.messages` (each `Message.images`)."""
        return None if self.sees else "this model cannot see images: set MMPROJ_PATH to its vision projector (an mmproj file)"

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        segments = template.render(messages)
        text = prompt_text(segments)
        shown = [{"role": m.role, "content": m.content, "images": m.images} for m in messages]
        return PreparedPrompt(n_tokens=tokens(text), text=text, messages=shown, fmt=reply_format(template, segments))

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling) -> Generation:
        gen = Generation(key=key, n_prompt=prompt.n_tokens, loop=asyncio.get_running_loop())
        messages = [Message(m["role"], m["content"], m.get("images", ())) for m in prompt.messages or []]
        call = Call(key, prompt.text or "", messages, max_tokens, sampling, gen)
        self.calls.append(call)
        script = self._scripts.popleft() if self._scripts else self.default
        if callable(script):
            script = script(call)
        task = asyncio.ensure_future(self._run(gen, script, max_tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return gen

    async def _run(self, gen: Generation, script: Script, max_tokens: int) -> None:
        changed = asyncio.Event()
        gen._on_cancel = changed.set
        gen.started_at = time.perf_counter()
        gen.n_evaluated = gen.n_prompt
        try:
            await asyncio.sleep(0)
            for piece in script.reasoning:
                if await self._pause(gen, changed, script.every_s):
                    return
                if gen.n_generated >= max_tokens:
                    gen._deliver("", "length")
                    return
                self._token(gen)
                gen._deliver("", reasoning=piece, thinking=True)
            for i, piece in enumerate(script.pieces):
                if gen._cancel:
                    break
                if gen.n_generated >= max_tokens:
                    gen._deliver("", "length")
                    return
                if script.hold is not None and i == script.hold_after and await self._hold(gen, changed, script.hold):
                    return
                if i and await self._pause(gen, changed, script.every_s):
                    return
                self._token(gen)
                gen._deliver(piece, thinking=False if script.reasoning and i == 0 else None)
            if gen._cancel:
                gen._deliver("", "cancelled")
            elif script.finish == "error":
                gen._deliver("", "error", script.error or "scripted failure")
            else:
                gen._deliver("", script.finish)
        except asyncio.CancelledError:
            if not gen.done:
                gen._deliver("", "cancelled")
            raise

    @staticmethod
    def _token(gen: Generation) -> None:
        gen.n_generated += 1
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()

    @staticmethod
    async def _pause(gen: Generation, changed: asyncio.Event, seconds: float) -> bool:
        """Wait between pieces; True when the reply was cancelled meanwhile (and is now ended)."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), seconds)
        else:
            await asyncio.sleep(0)
        if gen._cancel:
            gen._deliver("", "cancelled")
            return True
        return False

    @staticmethod
    async def _hold(gen: Generation, changed: asyncio.Event, hold: asyncio.Event) -> bool:
        """Hold the reply open until `hold` is set; True when it was cancelled first."""
        while not hold.is_set() and not gen._cancel:
            waiter = asyncio.ensure_future(hold.wait())
            canceller = asyncio.ensure_future(changed.wait())
            await asyncio.wait({waiter, canceller}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            canceller.cancel()
            changed.clear()
        if gen._cancel:
            gen._deliver("", "cancelled")
            return True
        return False

    def forget(self, key: str) -> None:
        self.forgotten.append(key)

    def warm(self, key: str, prompt: PreparedPrompt) -> bool:
        """Recorded: the prompt a warm-up would make ready (there is no state to make ready)."""
        self.warmed.append((key, prompt.text or ""))
        return self.can_warm

    def describe(self) -> str:
        return "scripted replies (tests), in this process"

    def stats(self) -> None:
        return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


IMAGE_TOKENS = 16
"""What one image costs in the scripted model's context."""


def tokens(text: str) -> int:
    """A stand-in token count: about four characters a token, as for English text."""
    return max(1, (len(text) + 3) // 4)


def echo(call: Call, **options: object) -> Script:
    """`You said: <the newest user message>`, one word a piece (`options`: Script's, e.g. `every_s`)."""
    said = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
    return Script.text(f"You said: {said}", **options)
