"""BACKEND=openai: generation on an OpenAI-compatible server (llama-server,
llama-cpp-python's server, vLLM, Ollama, LM Studio).

Two modes, since servers differ. `completions` sends the prompt this bot built
with its own template to /v1/completions, so the template names mean what they
say. `chat` sends the messages to /v1/chat/completions and the server applies
its own template. Replies stream over SSE into the same `Generation` the local
engine produces, so streaming edits and /stop work unchanged.

Servers tokenize prompt strings with special tokens parsed, so text people
typed is defanged first: a word joiner goes inside anything shaped like a
control token (`<|im_start|>`, `[INST]`, `</s>`), which leaves it readable but
no longer a token the server would turn into markup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bot.backend import Generation, ModelInfo, PreparedPrompt
from bot.config import Sampling, Settings
from bot.reasoning import StopText
from bot.templates import Message, Template

log = logging.getLogger(__name__)

RETRIES = 2  # extra attempts, only while nothing has been streamed yet
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk|start_of_turn|end_of_turn)>|\[/?INST\]|<</?SYS>>")
WORD_JOINER = "\u2060"


def defang(text: str) -> str:
    """Break control-token lookalikes in user text so a server cannot parse them as markup."""
    return _SPECIAL.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


class RemoteError(Exception):
    """The server failed this request; the message says how, for the log."""


class _Retryable(RemoteError):
    pass


class RemoteBackend:
    """An OpenAI-compatible server. Create with `await RemoteBackend.connect(settings)`."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        assert settings.openai_base_url
        self.settings = settings
        self.base = settings.openai_base_url
        self.root = re.sub(r"/v1$", "", self.base)
        self.mode = settings.openai_mode
        self.applies_template = self.mode == "chat"
        self.model = settings.openai_model
        self.n_ctx = settings.n_ctx or 4096
        self.info = ModelInfo(
            path=Path(self.base), description="remote", n_ctx_train=self.n_ctx, chat_template=None,
            bos_token="", eos_token="", add_bos=False, size_bytes=0,
        )
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()
        self._tokenizer: str | None = None  # which /tokenize flavour the server speaks, if any
        self._counts: OrderedDict[str, int] = OrderedDict()

    @classmethod
    async def connect(cls, settings: Settings, *, read_timeout: float = 120.0) -> RemoteBackend:
        """Open a session and run the health check (which only logs: the server may come up later)."""
        headers = {"Authorization": f"Bearer {settings.openai_api_key}"} if settings.openai_api_key else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=read_timeout)
        backend = cls(settings, aiohttp.ClientSession(headers=headers, timeout=timeout))
        await backend.health_check()
        return backend

    async def health_check(self) -> bool:
        """Say clearly, at start, whether the server answers and which model it serves."""
        try:
            async with self._session.get(f"{self.base}/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise RemoteError(f"HTTP {resp.status}")
                served = [m.get("id") for m in (await resp.json(content_type=None)).get("data", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError, RemoteError, ValueError) as exc:
            log.warning("model server %s is not reachable (%s); replies will fail until it is", self.base, _reason(exc))
            return False
        self.model = self.model or (served[0] if served else None)
        log.info("model server %s is reachable and serves %s; using %s in %s mode", self.base, ", ".join(map(str, served)) or "no model", self.model, self.mode)
        await self._probe_tokenizer()
        return True

    async def _probe_tokenizer(self) -> None:
        """Find the server's tokenize endpoint; without one, token counts are estimates."""
        for kind in ("llama-server", "vllm", "llama-cpp-python"):
            self._tokenizer = kind
            try:
                if await self._count_remote("probe") > 0:
                    log.info("model server counts tokens with its %s tokenize endpoint", kind)
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError, RemoteError, ValueError, KeyError, TypeError):
                pass
        self._tokenizer = None
        log.info("model server has no tokenize endpoint: token counts for fitting the context are conservative estimates")

    async def _count_remote(self, text: str) -> int:
        url, body, key = {
            "llama-server": (f"{self.root}/tokenize", {"content": text}, "tokens"),
            "vllm": (f"{self.root}/tokenize", {"prompt": text, "model": self.model}, "count"),
            "llama-cpp-python": (f"{self.root}/extras/tokenize/count", {"input": text}, "count"),
        }[self._tokenizer or ""]
        async with self._session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise RemoteError(f"HTTP {resp.status}")
            value = (await resp.json(content_type=None))[key]
        return len(value) if isinstance(value, list) else int(value)

    async def count(self, texts: Sequence[str]) -> list[int]:
        return list(await asyncio.gather(*(self._count(t) for t in texts)))

    async def _count(self, text: str) -> int:
        if text in self._counts:
            self._counts.move_to_end(text)
            return self._counts[text]
        count = len(text.encode("utf-8")) // 3 + 1  # conservative: fewer than 3 bytes per token is rare
        if self._tokenizer is not None:
            try:
                count = await self._count_remote(text)
            except (aiohttp.ClientError, asyncio.TimeoutError, RemoteError, ValueError, KeyError):
                pass
        self._counts[text] = count
        if len(self._counts) > 20_000:
            self._counts.popitem(last=False)
        return count

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        if self.mode == "chat":
            payload = [{"role": m.role, "content": defang(m.content)} for m in messages]
            counts = await self.count([m["content"] for m in payload])
            return PreparedPrompt(n_tokens=sum(counts) + 8 * len(payload), messages=payload)
        text = "".join(s.text if s.special else defang(s.text) for s in template.render(messages))
        [n] = await self.count([text])
        return PreparedPrompt(n_tokens=n, text=text)

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling) -> Generation:
        gen = Generation(key=key, n_prompt=prompt.n_tokens, loop=asyncio.get_running_loop())
        task = asyncio.ensure_future(self._run(gen, prompt, max_tokens, sampling, tuple(s for s in prompt.fmt.stop if s)))
        gen._on_cancel = task.cancel  # /stop closes the stream at once
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return gen

    def forget(self, key: str) -> None:
        """Nothing is cached here (the server keeps its own prompt cache)."""

    def describe(self) -> str:
        return f"{self.model or 'the default model'} on {self.base} ({self.mode} mode)"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    # --- one request -----------------------------------------------------------------

    def _payload(self, prompt: PreparedPrompt, max_tokens: int, s: Sampling, stop: tuple[str, ...]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,  # llama.cpp's name
            "repetition_penalty": s.repeat_penalty,  # vLLM's name
            "stream": True,
        }
        if self.model:
            payload["model"] = self.model
        if s.seed is not None:
            payload["seed"] = s.seed
        if prompt.messages is not None:
            payload["messages"] = prompt.messages
        else:
            payload["prompt"] = prompt.text
            if stop:
                payload["stop"] = list(stop)[:4]  # OpenAI's limit; the rest are cut client-side
        return payload

    async def _run(self, gen: Generation, prompt: PreparedPrompt, max_tokens: int, sampling: Sampling, stop: tuple[str, ...]) -> None:
        url = f"{self.base}/chat/completions" if prompt.messages is not None else f"{self.base}/completions"
        payload = self._payload(prompt, max_tokens, sampling, stop)
        stream = _Stream(gen, stop)
        for attempt in range(RETRIES + 1):
            try:
                async with self._session.post(url, json=payload) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        raise _Retryable(f"HTTP {resp.status} from {url}")
                    if resp.status != 200:
                        raise RemoteError(f"HTTP {resp.status} from {url}: {(await resp.text())[:200]}")
                    gen.started_at = gen.started_at or time.perf_counter()
                    await stream.read(resp)
                return stream.finish()
            except asyncio.CancelledError:
                return stream.finish("cancelled")
            except (aiohttp.ClientError, asyncio.TimeoutError, _Retryable) as exc:
                if stream.received or attempt == RETRIES:
                    log.warning("model server request for %s failed: %s", gen.key, _reason(exc))
                    return stream.finish("error", _reason(exc))
                log.info("model server request for %s failed (%s); retrying", gen.key, _reason(exc))
                await asyncio.sleep(0.5 * (attempt + 1))
            except RemoteError as exc:
                log.warning("model server request for %s failed: %s", gen.key, exc)
                return stream.finish("error", str(exc))


class _Stream:
    """Reads an OpenAI server-sent-event stream into a Generation, cutting stop strings."""

    def __init__(self, gen: Generation, stop: tuple[str, ...]) -> None:
        self.gen = gen
        self.out = StopText(stop)
        self.reason: str | None = None

    @property
    def received(self) -> bool:
        """Any text came in (shown or held back): a retry would repeat it."""
        return self.gen.n_generated > 0

    async def read(self, resp: aiohttp.ClientResponse) -> None:
        done = False
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                raise RemoteError(f"malformed stream: unexpected line {line[:60]!r}")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                choice = json.loads(data)["choices"][0]
                piece = choice["delta"].get("content") or "" if "delta" in choice else choice.get("text") or ""
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise RemoteError(f"malformed stream: {data[:80]!r}") from None
            self.reason = choice.get("finish_reason") or self.reason
            if piece and self._add(piece):
                done = True
                break
        if not done and self.reason is None:
            raise RemoteError("the stream ended before the reply did (truncated)")

    def _add(self, piece: str) -> bool:
        """Append text; True when a stop string ended the reply."""
        gen = self.gen
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()
        gen.n_generated += 1
        shown = self.out.add(piece)
        if shown:
            gen._deliver(shown, None, None)
        if self.out.stopped:
            self.reason = "stop"
        return self.out.stopped

    def finish(self, reason: str | None = None, error: str | None = None) -> None:
        if self.gen.done:
            return
        reason = reason or ("length" if self.reason == "length" else "stop")
        rest = self.out.rest()
        self.gen._deliver(rest if reason != "error" else "", reason, error)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror if exc.os_error else exc})"
    return str(exc) or type(exc).__name__
