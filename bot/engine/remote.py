"""BACKEND=openai: generation on an OpenAI-compatible server (llama-server,
llama-cpp-python's server, vLLM, Ollama, LM Studio).

Two modes, since servers differ. `completions` sends the prompt this bot built
with its own template to /v1/completions, so the template names mean what they
say. `chat` sends the messages to /v1/chat/completions and the server applies
its own template. Replies stream into the same `Generation` the local engine
produces, so streaming edits and /stop work unchanged.

The official `openai` package does the talking: requests, server-sent events,
timeouts, typed errors, and retries (honouring `Retry-After`) that happen only
before a stream starts, so no reply is ever sent twice. Plain HTTP remains for
what the SDK does not know: the servers' tokenize endpoints.

Images go only in `chat` mode, as OpenAI content parts (`image_url` with a base64
`data:` URL), which llama-server, vLLM, Ollama and the OpenAI API accept. A server
that refuses them (a 4xx, or llama-server's error for a model without a projector)
gets the same request again with each image a `[image]` placeholder, the reply says
so in a note, and no image is sent to it again until the bot restarts. `completions`
mode sends text only, so images become placeholders there too.

A reasoning model's thoughts arrive either separately (`reasoning_content` as
llama-server and DeepSeek send them, `reasoning` as vLLM, Ollama and OpenRouter
do) or inline in the text (`<think>…</think>`, gpt-oss harmony). Both end up in
`Generation.reasoning`, never in the answer, exactly as with the local engine.

Servers tokenize prompt strings with special tokens parsed, so text people
typed is defanged first: a word joiner goes inside anything shaped like a
control token (`<|im_start|>`, `[INST]`, `</s>`), which leaves it readable but
no longer a token the server would turn into markup.

Secrets stay out of logs: a base URL with credentials
(`http://user:pass@host/v1`) is logged as `http://***@host/v1`, the credentials
go out as HTTP basic auth, and neither they nor the API key appear in any
message this module logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx2
import openai

from bot.engine.backend import Generation, ModelInfo, ModelStatus, ModelUnavailable, PreparedPrompt
from bot.config import Sampling, Settings, redact_url
from bot.formats.reasoning import ReplyFormat, ReplyText
from bot.formats.templates import Image, Message, Template, reply_format

log = logging.getLogger(__name__)

RETRIES = 2  # the SDK's retries; they cover only the request, never a stream that has started
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 10.0  # health check and tokenize calls
CACHE_REUSE = 256  # llama-server: reuse cached prompt chunks this long after old history drops out
MAX_CHARS_PER_TOKEN = 64  # a reply longer than max_tokens * this is a broken server, not a reply
NO_KEY = "no-key"  # the SDK insists on a key; servers started without one ignore it
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk|start_of_turn|end_of_turn)>|\[/?INST\]|<</?SYS>>")
WORD_JOINER = "\u2060"
IMAGE_TOKENS_ESTIMATE = 768  # what an image costs in the window, where the server counts (OpenAI: 765 for 1024 px, high detail)
IMAGE_PLACEHOLDER = "[image]"
IMAGES_REFUSED_NOTE = "(The model server refused the images ({why}), so I answered the text only: its model may not see images.)"


def defang(text: str) -> str:
    """Break control-token lookalikes in user text so a server cannot parse them as markup."""
    return _SPECIAL.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def split_credentials(url: str) -> tuple[str, httpx2.BasicAuth | None]:
    """The URL without `user:pass@`, and those credentials as HTTP basic auth.

    The HTTP client logs every request's URL, so the credentials must not be in it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), httpx2.BasicAuth(unquote(user), unquote(password))


class RemoteError(Exception):
    """The server failed this request; the message says how, for the log."""


class RemoteBackend:
    """An OpenAI-compatible server. Create with `await RemoteBackend.connect(settings)`."""

    def __init__(self, settings: Settings, *, read_timeout: float = 120.0) -> None:
        assert settings.openai_base_url
        self.settings = settings
        self.shown_base = redact_url(settings.openai_base_url)
        base, auth = split_credentials(settings.openai_base_url)
        self.root = re.sub(r"/v1/?$", "", base)  # where the tokenize endpoints live
        self.mode = settings.openai_mode
        self.applies_template = self.mode == "chat"
        self.can_warm = False
        self.model = settings.openai_model
        self.n_ctx = settings.n_ctx or 4096
        self.info = ModelInfo(
            path=Path(self.shown_base), description="remote", n_ctx_train=self.n_ctx, chat_template=None,
            bos_token="", eos_token="", add_bos=False, size_bytes=0,
        )
        key = settings.openai_api_key
        if auth is not None and key:
            log.warning("OPENAI_BASE_URL carries credentials and OPENAI_API_KEY is set: the credentials are sent (HTTP basic auth), the key is not")
        parts = urlsplit(settings.openai_base_url)
        password = unquote(parts.password or "") or unquote(parts.username or "")  # a lone user name is a token
        self._secrets = [s for s in (key, password) if s]  # scrubbed from every failure this module logs
        timeout = openai.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)  # read: the longest silence inside a stream
        self._http = openai.DefaultAsyncHttpxClient(auth=auth, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {key}"} if key and auth is None else {}
        self.client = openai.AsyncOpenAI(base_url=base, api_key=key or NO_KEY, http_client=self._http, timeout=timeout, max_retries=RETRIES)
        self._tasks: set[asyncio.Task[None]] = set()
        self._tokenizer: str | None = None  # which tokenize flavour the server speaks, if any
        self._checked = False  # the health check got an answer (until then, each reply tries it first)
        self._counts: OrderedDict[str, int] = OrderedDict()
        self.on_fatal: Callable[[str], None] | None = None  # a server never ends this process: it may come back
        self.dead: str | None = None
        self._images_refused: str | None = None  # why the server refused images (then none are sent again)
        self.served: list[str] | None = None  # the server's models (/v1/models) when last asked; None: not yet known

    @classmethod
    async def connect(cls, settings: Settings, *, read_timeout: float = 120.0) -> RemoteBackend:
        """Create the client and run the health check (which only logs: the server may come up later)."""
        backend = cls(settings, read_timeout=read_timeout)
        await backend.health_check()
        return backend

    async def health_check(self) -> bool:
        """Say clearly, at start, whether the server answers and which model it serves."""
        try:
            page = await self.client.with_options(max_retries=0, timeout=PROBE_TIMEOUT_S).models.list()
            served = [str(getattr(m, "id", "?")) for m in page.data]
        except Exception as exc:  # anything at all: the bot starts regardless
            log.warning("model server %s is not reachable (%s); replies will fail until it is", self.shown_base, self._reason(exc))
            return False
        self._checked = True
        self.served = served
        self.model = self.model or (served[0] if served else None)
        log.info("model server %s is reachable and serves %s; using %s in %s mode", self.shown_base, ", ".join(served) or "no model", self.model, self.mode)
        await self._probe_tokenizer()
        return True

    # --- token counts: the server's tokenize endpoint, else an estimate ------------------

    async def _probe_tokenizer(self) -> None:
        """Find the server's tokenize endpoint; without one, token counts are estimates."""
        for kind in ("llama-server", "vllm", "llama-cpp-python"):
            self._tokenizer = kind
            try:
                if await self._count_remote("probe") > 0:
                    log.info("model server counts tokens with its %s tokenize endpoint", kind)
                    return
            except (httpx2.HTTPError, ValueError, KeyError, TypeError):
                pass
        self._tokenizer = None
        log.info("model server has no tokenize endpoint: token counts for fitting the context are conservative estimates")

    async def _count_remote(self, text: str) -> int:
        url, body, key = {
            "llama-server": (f"{self.root}/tokenize", {"content": text}, "tokens"),
            "vllm": (f"{self.root}/tokenize", {"prompt": text, "model": self.model}, "count"),
            "llama-cpp-python": (f"{self.root}/extras/tokenize/count", {"input": text}, "count"),
        }[self._tokenizer or ""]
        resp = await self._http.post(url, json=body, headers=self._headers, timeout=PROBE_TIMEOUT_S)
        resp.raise_for_status()
        value = resp.json()[key]
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
            except (httpx2.HTTPError, ValueError, KeyError, TypeError):
                pass
        self._counts[text] = count
        if len(self._counts) > 20_000:
            self._counts.popitem(last=False)
        return count

    # --- the Backend interface ---------------------------------------------------------

    def image_support(self) -> str | None:
        if self.mode != "chat":
            return "OPENAI_MODE=completions sends the model server text only"
        if self._images_refused is not None:
            return f"the model server refused images ({self._images_refused})"
        return None

    async def count_images(self, images: Sequence[Image]) -> list[int]:
        """The server counts an image's tokens itself; this is a conservative estimate."""
        return [IMAGE_TOKENS_ESTIMATE for _ in images]

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        sending = self.image_support() is None
        if self.mode == "chat":  # the server renders, so no stop strings or harmony of ours apply
            texts = [defang(m.content if sending else _placeholders(m)) for m in messages]
            payload: list[dict[str, Any]] = []
            n_images = 0
            for m, text in zip(messages, texts):
                if m.images and sending:  # images first, then the text, as llama-server places them
                    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in m.images]
                    parts += [{"type": "text", "text": text}] if text else []
                    payload.append({"role": m.role, "content": parts})
                    n_images += len(m.images)
                else:
                    payload.append({"role": m.role, "content": text})
            counts = await self.count(texts)
            return PreparedPrompt(n_tokens=sum(counts) + 8 * len(payload) + IMAGE_TOKENS_ESTIMATE * n_images, messages=payload, fmt=ReplyFormat())
        messages = [Message(m.role, _placeholders(m)) for m in messages]
        segments = template.render(messages)
        text = "".join(s.text if s.special else defang(s.text) for s in segments)
        [n] = await self.count([text])
        return PreparedPrompt(n_tokens=n, text=text, fmt=reply_format(template, segments))

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling) -> Generation:
        gen = Generation(key=key, n_prompt=prompt.n_tokens, loop=asyncio.get_running_loop())
        task = asyncio.ensure_future(self._run(gen, prompt, max_tokens, sampling))
        gen._on_cancel = task.cancel  # /stop closes the stream at once
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return gen

    def stats(self) -> None:
        """The server keeps its own slots and cache."""
        return None

    def forget(self, key: str) -> None:
        """Nothing is cached here (the server keeps its own prompt cache)."""

    def warm(self, key: str, prompt: PreparedPrompt) -> bool:
        """No warm-ups: the server's prompt cache is its own (and `can_warm` is False, so the
        chat layer does not even build the prompt)."""
        return False

    def describe(self) -> str:
        return f"{self.model or 'the default model'} on {self.shown_base} ({self.mode} mode)"

    def for_model(self, name: str) -> RemoteBackend:
        """The same server and connection, asking for another of its models (RemoteModels)."""
        other = copy.copy(self)
        other.model = name
        other._counts = OrderedDict()  # another model, another tokenizer
        other._images_refused = None
        return other

    async def list_models(self) -> list[str] | None:
        """The server's models now (/v1/models); None if it does not answer."""
        try:
            page = await self.client.with_options(max_retries=0, timeout=PROBE_TIMEOUT_S).models.list()
        except Exception as exc:
            log.warning("could not list the models of %s (%s)", self.shown_base, self._reason(exc))
            return None
        self.served = [str(getattr(m, "id", "?")) for m in page.data]
        return self.served

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    # --- one reply ---------------------------------------------------------------------

    async def _run(self, gen: Generation, prompt: PreparedPrompt, max_tokens: int, sampling: Sampling) -> None:
        """Stream one reply into `gen`. Whatever happens, `gen` ends; nothing escapes."""
        reader = _Reader(gen, prompt.fmt, max_chars=max_tokens * MAX_CHARS_PER_TOKEN)
        try:
            if not self._checked:  # the server was down at start: learn its model and tokenizer now
                await self.health_check()
            try:
                stream = await self._open(gen.key, prompt, max_tokens, sampling)
            except openai.APIStatusError as exc:
                text_only = _without_images(prompt) if _refuses_images(exc) else None
                if text_only is None:
                    raise
                self._images_refused = f"HTTP {exc.status_code}"
                log.warning("model server refused the images for %s (%s); answering the text only, and sending no images from now on", gen.key, self._reason(exc))
                gen.notes.append(IMAGES_REFUSED_NOTE.format(why=self._images_refused))
                stream = await self._open(gen.key, text_only, max_tokens, sampling)
            gen.started_at = gen.started_at or time.perf_counter()
            async with stream:
                async for chunk in stream:
                    if reader.add(chunk):
                        break  # a stop string (or gpt-oss's end) ended the reply: close the stream
            reader.finish()
        except asyncio.CancelledError:
            reader.finish("cancelled")
        except Exception as exc:  # whatever it is, the user gets an apology and the log one clean line
            reason = self._reason(exc)  # (no traceback: its text could carry a secret)
            log.warning("model server request for %s failed: %s", gen.key, reason)
            reader.finish("error", reason)

    async def _open(self, key: str, prompt: PreparedPrompt, max_tokens: int, s: Sampling) -> Any:
        """Start the request; the SDK retries it (connection errors, timeouts, 408/409/429/5xx,
        waiting as `Retry-After` says) until the server answers with a stream."""
        args: dict[str, Any] = {
            "model": self.model or openai.omit,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed if s.seed is not None else openai.omit,
            "stream": True,
            "extra_body": {
                "top_k": s.top_k,
                "min_p": s.min_p,
                "repeat_penalty": s.repeat_penalty,  # llama.cpp's name
                "repetition_penalty": s.repeat_penalty,  # vLLM's name
                "n_cache_reuse": CACHE_REUSE,
            },
        }
        if prompt.messages is not None:
            raw = await self.client.chat.completions.with_raw_response.create(messages=prompt.messages, **args)  # type: ignore[arg-type]
        else:
            stops = [stop for stop in prompt.fmt.stop if stop][:4]  # OpenAI's limit; the rest are cut here
            raw = await self.client.completions.with_raw_response.create(prompt=prompt.text or "", stop=stops or openai.omit, **args)
        if raw.retries_taken:
            log.info("model server request for %s went through after %d %s", key, raw.retries_taken, "retry" if raw.retries_taken == 1 else "retries")
        return raw.parse()

    def _reason(self, exc: BaseException) -> str:
        """One line for the log, with no secret in it."""
        text = _describe(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Reader:
    """Turns a stream of chunks into a Generation: answer, reasoning, thinking, outcome."""

    def __init__(self, gen: Generation, fmt: ReplyFormat, *, max_chars: int) -> None:
        self.gen = gen
        self.out = ReplyText(fmt)  # inline reasoning (<think>, harmony) and stop strings
        self.max_chars = max_chars
        self.received = 0  # characters of answer and reasoning
        self.server_reason: str | None = None  # the finish_reason the server sent
        self.reasoning_apart = False  # thoughts are arriving as separate deltas right now

    def add(self, chunk: Any) -> bool:
        """Take one chunk; True once the reply is complete (a stop string ended it)."""
        choices = getattr(chunk, "choices", None)
        if not choices:
            return False  # a usage summary or a keep-alive: nothing to show
        choice = choices[0]
        self.server_reason = getattr(choice, "finish_reason", None) or self.server_reason
        delta = getattr(choice, "delta", None)
        if delta is not None:  # /v1/chat/completions
            content = getattr(delta, "content", None)
            thought = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
        else:  # /v1/completions
            content, thought = getattr(choice, "text", None), None
        if not isinstance(content, (str, type(None))) or not isinstance(thought, (str, type(None))):
            raise RemoteError(f"malformed stream: a chunk's text is a {type(content or thought).__name__}")
        if not content and not thought:
            return False
        gen = self.gen
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()
        gen.n_generated += 1
        self.received += len(content or "") + len(thought or "")
        if self.received > self.max_chars:
            raise RemoteError(f"malformed stream: more text ({self.received} characters) than the requested tokens can hold")
        reasoning, answer = "", ""
        if thought:
            self.reasoning_apart = True
            reasoning = thought
        if content:
            self.reasoning_apart = False  # the answer has begun
            inline, answer = self.out.add(content)
            reasoning += inline
        thinking = self.out.thinking or self.reasoning_apart
        if reasoning or answer or thinking != gen.thinking:
            gen._deliver(answer, reasoning=reasoning, thinking=thinking)
        return self.out.stopped

    def finish(self, reason: str | None = None, error: str | None = None) -> None:
        """End the Generation. With no reason, the stream ran out: it must have said how it ended."""
        gen = self.gen
        if gen.done:
            return
        if reason is None and not self.out.stopped and self.server_reason is None:
            reason, error = "error", "malformed stream: it ended before the reply did (truncated)"
            log.warning("model server request for %s failed: %s", gen.key, error)
        if reason == "error":
            gen._deliver("", "error", error, thinking=False)
            return
        late_reasoning, rest = self.out.finish()
        reason = reason or ("length" if self.server_reason == "length" and not self.out.stopped else "stop")
        gen._deliver(rest, reason, None, reasoning=late_reasoning, thinking=False)


def data_url(image: Image) -> str:
    """An image as a `data:` URL, the form OpenAI-compatible servers take inline."""
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"


def _placeholders(message: Message) -> str:
    """A turn's text with a placeholder in front for each image it had."""
    return " ".join([IMAGE_PLACEHOLDER] * len(message.images) + ([message.content] if message.content else []))


def _without_images(prompt: PreparedPrompt) -> PreparedPrompt | None:
    """The same chat request with each image a placeholder (None: it had no image)."""
    if prompt.messages is None or not any(isinstance(m["content"], list) for m in prompt.messages):
        return None
    payload = []
    for m in prompt.messages:
        content = m["content"]
        if isinstance(content, list):
            n = sum(1 for part in content if part.get("type") == "image_url")
            text = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            content = " ".join([IMAGE_PLACEHOLDER] * n + ([text] if text else []))
        payload.append({**m, "content": content})
    return dataclasses.replace(prompt, messages=payload)


def _refuses_images(exc: openai.APIStatusError) -> bool:
    """Whether a failed request with images looks like the server not taking images: a client
    error other than auth, rate or size limits, or a server error that says so (llama-server
    without a projector answers 500 "image input is not supported")."""
    status = exc.status_code
    if 400 <= status < 500:
        return status not in (401, 403, 404, 408, 409, 413, 429)
    try:
        body = exc.response.text.lower()
    except (httpx2.HTTPError, httpx2.StreamError):
        body = ""
    return any(word in body for word in ("image", "mmproj", "multimodal", "vision"))


def _describe(exc: BaseException) -> str:
    """What went wrong, in words (exceptions' own texts are often empty or generic)."""
    cause = exc.__cause__
    detail = (str(cause) or type(cause).__name__) if cause is not None else "no detail"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot connect ({detail})" if isinstance(cause, httpx2.ConnectError) else f"connection lost ({detail})"
    if isinstance(exc, openai.APIStatusError):
        try:
            body = " ".join(exc.response.text.split())[:200]  # the SDK has read it before raising
        except (httpx2.HTTPError, httpx2.StreamError):
            body = ""
        return f"HTTP {exc.status_code}" + (f": {body}" if body else "")
    if isinstance(exc, openai.APIError):  # an error payload inside the stream
        return f"the server reported an error: {exc.message}"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed stream: invalid JSON ({exc.msg} at character {exc.pos})"
    if isinstance(exc, UnicodeDecodeError):
        return "malformed stream: text that is not UTF-8"
    if isinstance(exc, RemoteError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RemoteModels:
    """A server's models (its /v1/models), chosen per conversation: the request names the
    conversation's model and the server loads it (llama-server's router mode, vLLM serving
    several models, Ollama, LiteLLM). OPENAI_MODEL, or the first model listed, is the default.
    Nothing is loaded or unloaded here: the server keeps its own budget."""

    def __init__(self, backend: RemoteBackend) -> None:
        self.backend = backend
        self.default = backend.model or ""
        self.on_fatal: Callable[[str], None] | None = None  # a server never ends this process
        self._views: dict[str, RemoteBackend] = {}
        self._last_used: dict[str, float] = {}

    @property
    def complete(self) -> bool:
        """Whether the server's list is known: until it is, no conversation's choice is dropped."""
        return self.backend.served is not None

    def names(self) -> list[str]:
        served = self.backend.served or []
        return [self.default] + [m for m in served if m != self.default] if self.default else list(served)

    def loaded(self, name: str) -> RemoteBackend | None:
        if name == self.default or not name:
            return self.backend
        if name not in self._views:
            self._views[name] = self.backend.for_model(name)
        return self._views[name]

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> Any:
        if self.complete and name not in self.names():
            raise ModelUnavailable(f"the model server {self.backend.shown_base} no longer serves {name!r}")
        self._last_used[name] = time.time()
        backend = self.loaded(name)
        assert backend is not None
        yield backend

    def forget(self, key: str) -> None:
        """Nothing is cached here (the server keeps its own prompt cache)."""

    def sees_images(self) -> bool:
        return self.backend.image_support() is None

    async def refresh(self) -> None:
        """Ask the server again which models it serves (for /model)."""
        await self.backend.list_models()

    def status(self) -> list[ModelStatus]:
        return [ModelStatus(n, True, n == self.default, None, self._last_used.get(n)) for n in self.names()]

    async def close(self) -> None:
        await self.backend.close()
