"""BACKEND=openai against a real OpenAI-compatible server (llama-cpp-python's own, with the
bundled model), and sharding through the local Discord API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import LocalBackend
from bot.chat import ChatService, UserMessage
from bot.config import Settings
from bot.discord_bot import SORRY, STOPPED, ShardedLlamaBot, create_bot
from bot.engine import Engine
from bot.remote import RemoteBackend, defang
from bot.store import Store
from tests.conftest import World, make_settings, mention, rows, scope
from tests.fakediscord import FakeDiscord
from tests.test_templates import EVIL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` with the bundled model, on a port of its own."""

    def __init__(self, model: Path, port: int | None = None) -> None:
        self.model = model
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LlamaServer:
        threads = str(len(os.sched_getaffinity(0)))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", "2048", "--n_threads", threads, "--n_threads_batch", threads],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("llama_cpp.server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaServer]:
    srv = LlamaServer(model_path).start()
    yield srv
    srv.stop()


def remote_settings(tmp_path: Path, base: str, **changes: Any) -> Settings:
    return make_settings(tmp_path, backend="openai", openai_base_url=base, n_ctx=2048, **changes)


@contextlib.asynccontextmanager
async def remote_bot(world: World, settings: Settings, **connect: Any) -> AsyncIterator[Any]:
    backend = await RemoteBackend.connect(settings, **connect)
    try:
        async with await Store.open(settings.database_path) as store:
            bot = create_bot(settings, ChatService(backend, store, settings), guild_ready_timeout=0.1)
            async with world.fake.running(bot):
                try:
                    yield bot
                finally:
                    await bot.shutdown(grace=30)
    finally:
        await backend.close()


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


async def ask(world: World, bot: Any, channel: dict, text: str, timeout: float = 120) -> dict:
    sent = await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {text}")
    await world.fake.wait_for(lambda: replies_to(world, channel, sent), timeout)
    await world.fake.wait_for(lambda: bot.scheduler.running == 0, timeout)
    [reply] = replies_to(world, channel, sent)
    return reply


# --- a real server --------------------------------------------------------------------------


async def test_chat_mode_through_discord(world: World, server: LlamaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = remote_settings(tmp_path, server.base, stream=True, n_predict=48)
    with caplog.at_level(logging.INFO):
        async with remote_bot(world, settings) as bot:
            assert f"model server {server.base} is reachable and serves" in caplog.text
            assert "counts tokens with its llama-cpp-python tokenize endpoint" in caplog.text
            reply = await ask(world, bot, world.general, "What is the capital of France?")
            assert "Paris" in reply["content"]
            other = await ask(world, bot, world.random, "Name a colour.")
            assert other["content"] and other["content"] != SORRY
            db = settings.database_path
            assert [r[1] for r in rows(db, scope(world, world.general))] == ["user", "assistant"]
            assert [r[1] for r in rows(db, scope(world, world.random))] == ["user", "assistant"]
            prompt = await bot.chat.build_prompt(await bot.chat.store.conversation(scope(world, world.general)))
            assert not any("Name a colour" in m.content for m in prompt.messages)  # histories kept apart
            shown = await (await world.fake.invoke_command("template", user=world.mod, channel=world.general)).wait_done()
            assert "the server's own" in shown.content
            switch = await (await world.fake.invoke_command("template", user=world.mod, channel=world.general, options={"name": "chatml"})).wait_done()
            assert "applies its own chat template here, so /template has no effect" in switch.content


async def test_completions_mode_uses_this_bots_template(world: World, server: LlamaServer, tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.base, openai_mode="completions", prompt_template="chatml", stream=False, n_predict=32)
    async with remote_bot(world, settings) as bot:
        reply = await ask(world, bot, world.general, "What is the capital of France?")
        assert "Paris" in reply["content"]
        prompt = await bot.chat.build_prompt(await bot.chat.store.conversation(scope(world, world.general)))
        assert prompt.prepared.text is not None and prompt.prepared.text.startswith("<|im_start|>system\n")
        assert prompt.prepared.text.endswith("<|im_start|>assistant\n")


async def test_stop_closes_the_stream(world: World, server: LlamaServer, tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.base, stream=True, n_predict=600)
    async with remote_bot(world, settings) as bot:
        sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a long story about a dragon.")
        await world.fake.wait_for(lambda: replies_to(world, world.general, sent), 60)
        started = time.monotonic()
        await (await world.fake.invoke_command("stop", user=world.ann, channel=world.general)).wait_done()
        await world.fake.wait_for(lambda: bot.scheduler.running == 0, 30)
        assert time.monotonic() - started < 5  # at once, not after 600 tokens
        [reply] = replies_to(world, world.general, sent)
        assert reply["content"].endswith(STOPPED)
        again = await ask(world, bot, world.general, "Thanks!")
        assert again["content"] != SORRY


async def test_server_killed_mid_stream_then_back(world: World, model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = LlamaServer(model_path).start()
    try:
        settings = remote_settings(tmp_path, srv.base, stream=True, n_predict=600)
        async with remote_bot(world, settings) as bot:
            sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a long story about a dragon.")
            await world.fake.wait_for(lambda: replies_to(world, world.general, sent), 60)
            with caplog.at_level(logging.WARNING):
                srv.stop()  # the server dies while it streams
                await world.fake.wait_for(lambda: bot.scheduler.running == 0, 60)
            [reply] = replies_to(world, world.general, sent)
            assert reply["content"] == SORRY
            assert f"model server request for {scope(world, world.general)} failed" in caplog.text
            closed = await ask(world, bot, world.random, "Anyone there?")  # nothing listens now: retried, then an apology
            assert closed["content"] == SORRY
            srv.start()  # it comes back on the same port: the bot serves again
            back = await ask(world, bot, world.general, "Hello again")
            assert back["content"] != SORRY
            assert [r[1] for r in rows(settings.database_path, scope(world, world.general))] == ["user", "user", "assistant"]
    finally:
        srv.stop()


async def test_closed_port_is_reported_at_start(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.INFO):
        async with remote_bot(world, remote_settings(tmp_path, base, stream=False)) as bot:
            assert f"model server {base} is not reachable (cannot connect" in caplog.text
            reply = await ask(world, bot, world.general, "Hello?")
            assert reply["content"] == SORRY


def test_cli_health_check_says_unreachable(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    base = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli("chat", stdin="Hello\n", cwd=tmp_path, env={"BACKEND": "openai", "OPENAI_BASE_URL": base, "LOG_LEVEL": "INFO"})
    assert result.returncode == 0
    assert f"model server {base} is not reachable" in result.stderr
    assert "[ERROR]" not in result.stdout and "Sorry, something went wrong while answering" in result.stdout


# --- a broken server (a real server cannot be made to send malformed streams) ------------------


class BrokenServer:
    """Answers /v1/chat/completions according to `script`: one behaviour per request."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.calls = 0
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def __aenter__(self) -> BrokenServer:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "broken"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        behaviour = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if behaviour == "503":
            return web.Response(status=503, text="overloaded")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = "[INS" if behaviour == "held" else "Hello "  # "held": could start a stop string, so not shown yet
        chunk = '{"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}' % first
        await response.write(f"data: {chunk}\n\n".encode())
        if behaviour == "ok":
            done = '{"choices": [{"index": 0, "delta": {"content": "there."}, "finish_reason": "stop"}]}'
            await response.write(f"data: {done}\n\ndata: [DONE]\n\n".encode())
        elif behaviour == "malformed":
            await response.write(b"data: {not json at all\n\n")
        elif behaviour in ("stall", "held"):
            await asyncio.sleep(5)
        # "truncated": end the stream here, with no finish_reason and no [DONE]
        return response


@pytest.mark.parametrize(
    ("script", "expected", "calls", "logged"),
    [
        (["503", "ok"], "Hello there.", 2, "retrying"),  # nothing streamed yet: retried
        (["malformed"], SORRY, 1, "malformed stream"),
        (["truncated", "ok"], SORRY, 1, "truncated"),  # something was streamed: not retried
        (["held", "ok"], SORRY, 1, "timed out"),  # text came in, though none was shown yet: not retried either
        (["stall", "ok"], SORRY, 1, "timed out"),
        (["503", "503", "503"], SORRY, 3, "HTTP 503"),
    ],
    ids=["5xx-then-ok", "malformed", "truncated", "held-back", "timeout", "5xx-always"],
)
async def test_broken_server(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, script: list[str], expected: str, calls: int, logged: str) -> None:
    async with BrokenServer(script) as broken:
        with caplog.at_level(logging.INFO):
            async with remote_bot(world, remote_settings(tmp_path, broken.base, stream=False), read_timeout=1.0) as bot:
                reply = await ask(world, bot, world.general, "Hi")
                assert reply["content"] == expected
                assert broken.calls == calls
                assert logged in caplog.text
                assert "no tokenize endpoint: token counts for fitting the context are conservative estimates" in caplog.text
                healthy = await ask(world, bot, world.random, "Still alive?")  # the bot keeps serving
                assert healthy["content"]


def test_defang_keeps_text_readable_and_markup_inert(engine: Engine) -> None:
    safe = defang(EVIL)
    assert safe.replace("\u2060", "") == EVIL
    assert not [t for t in engine.vocab.tokenize(safe, special=True) if engine.vocab.is_control(t)]  # even parsed as a server would
    assert [t for t in engine.vocab.tokenize(EVIL, special=True) if engine.vocab.is_control(t)]


# --- sharding ----------------------------------------------------------------------------------


async def test_two_shards_each_answer_their_guild(engine: Engine, tmp_path: Path) -> None:
    async with FakeDiscord(shard_count=2) as fake:
        ann = fake.add_user("ann")
        guilds = [fake.add_guild(f"shard-{i}", shard=i) for i in range(2)]
        channels = [fake.add_channel(g, "general") for g in guilds]
        for g in guilds:
            fake.add_member(g, ann)
        settings = make_settings(tmp_path, discord_token=fake.token, shard_count=2, stream=False, user_cooldown_s=0.0)
        async with await Store.open(settings.database_path) as store:
            bot = create_bot(settings, ChatService(LocalBackend(engine), store, settings), guild_ready_timeout=0.1)
            assert isinstance(bot, ShardedLlamaBot)
            bot.before_identify_hook = _no_wait  # type: ignore[method-assign]
            async with fake.running(bot):
                for i, channel in enumerate(channels):
                    sent = await fake.send_message(channel, ann, f"<@{fake.bot_user['id']}> My number is {i + 41}.")
                    await fake.wait_for_bot_message(channel, after=sent, timeout=60)
                    await fake.wait_for(lambda: bot.scheduler.running == 0, 60)
                assert sorted(p["shard"] for p in fake.identify_payloads) == [[0, 2], [1, 2]]
                assert {bot.get_guild(int(g["id"])).shard_id for g in guilds} == {0, 1}
                for i, (g, channel) in enumerate(zip(guilds, channels)):
                    stored = rows(settings.database_path, f"guild:{g['id']}:channel:{channel['id']}")
                    assert [r[2] for r in stored if r[1] == "user"] == [f"My number is {i + 41}."]
                await bot.shutdown(grace=30)


async def _no_wait(shard_id: int | None, *, initial: bool = False) -> None:
    return None


async def test_local_chat_service_works_on_the_same_interface(chat: ChatService) -> None:
    """The same ChatService code path the remote tests use, on the local backend."""
    reply = await chat.respond(UserMessage("dm:iface", "Hello"))
    assert (await reply.text()) and reply.prompt.prepared.tokens
    assert isinstance(chat.backend, LocalBackend)

