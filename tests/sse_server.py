"""A small OpenAI-compatible server that sends exactly the bytes a test scripts.

The real `llama_cpp.server` in tests/test_engine_remote.py shows the bot working
against a real model; this one shows what a real server cannot be made to do
on demand: SSE `event:`/`id:`/`retry:` fields and multi-line `data:`, an error
payload in the middle of a stream, a 429 with `Retry-After`, an over-long line,
a stream that stops early or stalls, reasoning sent as separate deltas, and
llama-server's or vLLM's tokenize endpoints. It runs on 127.0.0.1 (aiohttp.web)
and records every request it gets, with the time it arrived.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"
CLOSE = "close"  # a piece that drops the connection mid-stream


@dataclass
class Step:
    """One scripted answer to a completion request.

    `pieces` are written in order: bytes as they are, a float sleeps that many
    seconds, an asyncio.Event holds the stream open until the test sets it, CLOSE
    drops the connection. A status other than 200 answers with `text` and `headers`
    instead of a stream."""

    pieces: Sequence[bytes | float | str | asyncio.Event] = ()
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""


@dataclass
class Recorded:
    path: str
    at: float  # time.monotonic() when the request arrived
    headers: dict[str, str]
    body: dict[str, Any]
    closed_at: float | None = None  # when the client went away mid-stream


RECORDED = web.RequestKey("recorded", Recorded)


def event(data: object, **fields: str) -> bytes:
    """One server-sent event: optional fields (event, id, retry) then `data:` (JSON unless a str)."""
    lines = [f"{name}: {value}" for name, value in fields.items()]
    text = data if isinstance(data, str) else json.dumps(data)
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def delta(content: str | None = None, *, finish: str | None = None, **extra: str) -> dict[str, Any]:
    """A /v1/chat/completions chunk; `extra` adds delta fields such as reasoning_content."""
    body: dict[str, Any] = {"role": "assistant"}
    if content is not None:
        body["content"] = content
    body.update(extra)
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "delta": body, "finish_reason": finish}]}


def text(piece: str, *, finish: str | None = None) -> dict[str, Any]:
    """A /v1/completions chunk."""
    return {"id": "c1", "object": "text_completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]}


def chat_reply(*pieces: str, finish: str = "stop") -> Step:
    """A well-formed chat stream of these pieces."""
    chunks = [event(delta(p)) for p in pieces]
    return Step([*chunks, event(delta(None, finish=finish)), DONE])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScriptedServer:
    """Answers completion requests from `script`, one step per request (the last one repeats).

    `tokenizer` adds a tokenize endpoint in the style of "llama-server" or
    "vllm" (it counts whitespace-separated words); `models` is what /v1/models lists; `credentials` ("user:pass")
    makes every request need them as HTTP basic auth, as a reverse proxy would."""

    def __init__(
        self, script: Sequence[Step], *, tokenizer: str | None = None, credentials: str | None = None, models: Sequence[str] = ("scripted",)
    ) -> None:
        self.script = list(script)
        self.models = list(models)
        self.tokenizer = tokenizer
        self.credentials = credentials
        self.requests: list[Recorded] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def completions(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("completions")]

    async def __aenter__(self) -> ScriptedServer:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/tokenize", self._tokenize)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else {}
        request[RECORDED] = Recorded(request.path, time.monotonic(), dict(request.headers), body)
        self.requests.append(request[RECORDED])
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.json_response({"error": {"message": "unauthorized"}}, status=401)
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in self.models]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = request[RECORDED].body
        if self.tokenizer == "llama-server" and "content" in body:
            return web.json_response({"tokens": list(range(len(body["content"].split())))})
        if self.tokenizer == "vllm" and "prompt" in body:
            return web.json_response({"count": len(body["prompt"].split()), "max_model_len": 2048, "tokens": []})
        return web.json_response({"error": {"message": "no such endpoint"}}, status=404)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        step = self.script[min(len(self.completions) - 1, len(self.script) - 1)]
        if step.status != 200:
            return web.Response(status=step.status, text=step.text, headers=step.headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **step.headers})
        await response.prepare(request)
        recorded = request[RECORDED]
        for piece in step.pieces:
            if piece == CLOSE:
                assert request.transport is not None
                request.transport.close()
                return response
            if isinstance(piece, (float, asyncio.Event)):
                if not await self._sleep(request, piece):
                    recorded.closed_at = time.monotonic()
                    return response
                continue
            assert isinstance(piece, bytes)
            try:
                await response.write(piece)
            except ConnectionError:
                recorded.closed_at = time.monotonic()
                return response
        return response

    async def _sleep(self, request: web.Request, until: float | asyncio.Event) -> bool:
        """Wait `until` seconds have passed or the event is set, watching the connection;
        False as soon as the client has closed it."""
        deadline = time.monotonic() + until if isinstance(until, float) else float("inf")
        held = until if isinstance(until, asyncio.Event) else asyncio.Event()
        while not held.is_set() and time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                return False
            await asyncio.sleep(0.02)
        return True
