"""The one small interface between conversations and whatever runs the model.

`ChatService` talks to a `Backend` and never looks past it. `LocalBackend`
wraps the in-process llama.cpp engine (the default); `bot.remote.RemoteBackend`
sends the same work to an OpenAI-compatible server (llama-server, vLLM,
Ollama, ...). Both hand back a `Generation`, so streaming, /stop and the
Discord adapter work the same way on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.config import Sampling
from bot.engine import Engine, Generation, ModelInfo
from bot.templates import Message, Template


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to send: how many tokens it takes, and the form the backend wants."""

    n_tokens: int
    tokens: list[int] | None = None  # local engine: exact token ids
    text: str | None = None  # remote /v1/completions: the rendered prompt
    messages: list[dict[str, str]] | None = None  # remote /v1/chat/completions: the server renders


class Backend(Protocol):
    """What the chat layer needs from a model."""

    n_ctx: int  # tokens per conversation
    info: ModelInfo  # for `auto`: the chat template and special tokens, when known
    applies_template: bool  # True when the server renders the chat itself (/template has no effect)

    async def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each plain text (an estimate where the server cannot count)."""
        ...

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt: ...

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling, stop: Sequence[str]) -> Generation:
        """Start a reply for conversation `key`; call on the event loop."""
        ...

    def forget(self, key: str) -> None:
        """The conversation's history changed: drop whatever is cached for it."""
        ...

    def describe(self) -> str: ...

    async def close(self) -> None: ...


class LocalBackend:
    """The in-process engine: one preloaded GGUF, exact tokens, KV reuse, batching."""

    applies_template = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_ctx = engine.n_ctx
        self.info = engine.info

    async def count(self, texts: Sequence[str]) -> list[int]:
        return [len(self.engine.tokenize(t, special=False)) for t in texts]

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        tokens = self.engine.encode(template.render(messages))
        return PreparedPrompt(n_tokens=len(tokens), tokens=tokens)

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling, stop: Sequence[str]) -> Generation:
        assert prompt.tokens is not None
        return self.engine.generate(key, prompt.tokens, max_tokens=max_tokens, sampling=sampling, stop=stop)

    def forget(self, key: str) -> None:
        self.engine.forget(key)

    def describe(self) -> str:
        return f"{self.info.path.name} ({self.info.description}), in this process"

    async def close(self) -> None:
        await self.engine.close()
