"""BACKEND=openai (bot/engine/remote.py) against a real OpenAI-compatible server (llama-cpp-python's
own, with the bundled model), and against a scripted one (tests/sse_server.py) for what a real
server cannot be made to send on demand: errors, stalls, a stream held open for /stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.engine.backend import Generation, PreparedPrompt
from bot.conversations.service import ChatService, UserMessage
from bot.conversations.store import Store
from bot.discord_adapter.replies import SORRY, STOPPED
from bot.engine.local import Engine, LocalBackend
from bot.config import redact_url
from bot.engine.remote import RemoteBackend, defang
from bot.formats.templates import TEMPLATES, JinjaTemplate, Message, Template
from tests.conftest import ENGINE_THREADS, GREEDY, ROOT, World, mention, rows, scope
from tests.discord_helpers import remote_bot, remote_settings
from tests.references import HF_TEMPLATES
from tests.sse_server import CLOSE, DONE, ScriptedServer, Step, chat_reply, delta, event, free_port, text
from tests.test_formats_templates import EVIL

GPT_OSS = HF_TEMPLATES / "openai-gpt-oss-120b.jinja"


class LlamaServer:
    """`python -m llama_cpp.server` with the bundled model, on a port of its own."""

    def __init__(self, model: Path, port: int | None = None) -> None:
        self.model = model
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LlamaServer:
        threads = str(ENGINE_THREADS)
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


def replies_to(world: World, channel: dict, message: dict) -> list[dict]:
    return [m for m in world.fake.bot_messages(channel) if m.get("message_reference", {}).get("message_id") == message["id"]]


async def ask(world: World, bot: Any, channel: dict, text: str, timeout: float = 120) -> dict:
    sent = await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {text}")
    await world.fake.wait_for(lambda: replies_to(world, channel, sent), timeout)
    await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout)
    [reply] = replies_to(world, channel, sent)
    return reply


async def ask_and_stop(world: World, bot: Any, channel: dict, text: str, timeout: float = 120) -> dict:
    """Ask, and /stop the reply once it shows: with a long LLAMA_N_PREDICT a shared CPU would
    otherwise spend minutes on it. The reply shows the server answered; the stop ends it."""
    sent = await world.fake.send_message(channel, world.ann, f"{mention(world.fake)} {text}")
    await world.fake.wait_for(lambda: replies_to(world, channel, sent), timeout)
    await (await world.fake.invoke_command("stop", user=world.ann, channel=channel)).wait_done()
    await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, timeout)
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
            # (Not "Paris": llama_cpp.server 0.3.36 answers this prompt differently cold and from its
            # prompt cache, and with 1 or 2 threads: "La femme de France..." or "The capital of France
            # is Paris.", all greedy. The bundled model's answer through the bot's own engine:
            # tests/test_end_to_end.py.)
            assert reply["content"].strip() and reply["content"] != SORRY
            other = await ask(world, bot, world.random, "Name a colour.")
            assert other["content"] and other["content"] != SORRY
            db = settings.database_path
            assert [r[1:] for r in rows(db, scope(world, world.general))] == [("user", "What is the capital of France?"), ("assistant", reply["content"])]
            assert [r[1] for r in rows(db, scope(world, world.random))] == ["user", "assistant"]
            prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, world.general)))
            assert not any("Name a colour" in m.content for m in prompt.messages)  # histories kept apart
            shown = await (await world.fake.invoke_command("template", user=world.mod, channel=world.general)).wait_done()
            assert "the server's own" in shown.content
            switch = await (await world.fake.invoke_command("template", user=world.mod, channel=world.general, options={"name": "chatml"})).wait_done()
            assert "applies its own chat template here, so /template has no effect" in switch.content


async def test_completions_mode_uses_this_bots_template(world: World, server: LlamaServer, tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.base, openai_mode="completions", prompt_template="chatml", stream=False, n_predict=32)
    async with remote_bot(world, settings) as bot:
        reply = await ask(world, bot, world.general, "What is the capital of France?")
        assert reply["content"].strip() and reply["content"] != SORRY  # (not "Paris": see test_chat_mode_through_discord)
        assert [r[1:] for r in rows(settings.database_path, scope(world, world.general))] == [("user", "What is the capital of France?"), ("assistant", reply["content"])]
        prompt = await bot.ctx.chat.build_prompt(await bot.ctx.chat.store.conversation(scope(world, world.general)))
        assert prompt.prepared.text is not None and prompt.prepared.text.startswith("<|im_start|>system\n")
        assert prompt.prepared.text.endswith("<|im_start|>assistant\n")


async def test_stop_closes_the_stream(world: World, tmp_path: Path) -> None:
    """/stop on a reply the server is still streaming (held open by the scripted server): the
    bot closes the HTTP stream at once and keeps what was written."""
    story = Step([event(delta("Once upon ")), event(delta("a time")), asyncio.Event(), event(delta(" there was a dragon.")), DONE])
    async with ScriptedServer([story, chat_reply("You are welcome.")]) as server:
        async with remote_bot(world, remote_settings(tmp_path, server.base, stream=True, n_predict=600)) as bot:
            sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a long story about a dragon.")
            await world.fake.wait_for(lambda: replies_to(world, world.general, sent), 60)
            started = time.monotonic()
            await (await world.fake.invoke_command("stop", user=world.ann, channel=world.general)).wait_done()
            await world.fake.wait_for(lambda: bot.ctx.scheduler.running == 0, 30)
            assert time.monotonic() - started < 5  # at once, not when the server would have ended it
            await world.fake.wait_for(lambda: server.completions[0].closed_at is not None, 10)  # the server saw the connection go
            [reply] = replies_to(world, world.general, sent)
            assert reply["content"] == "Once upon a time" + STOPPED
            again = await ask(world, bot, world.general, "Thanks!")
            assert again["content"] == "You are welcome."
        assert server.completions[1].body["messages"][-2:] == [
            {"role": "assistant", "content": "Once upon a time"}, {"role": "user", "content": "Thanks!"},
        ]


async def test_server_gone_mid_stream_then_back(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server goes away while it streams (the connection drops), then nothing listens on its
    port, then it is back on the same port: an apology each time, then answers again."""
    dropped = Step([event(delta("Once upon ")), event(delta("a time")), 0.5, CLOSE])
    server = ScriptedServer([dropped, chat_reply("Hello ", "again!")])
    async with server:
        settings = remote_settings(tmp_path, server.base, stream=True, n_predict=600)
        async with remote_bot(world, settings) as bot:
            with caplog.at_level(logging.WARNING):
                sent = await world.fake.send_message(world.general, world.ann, f"{mention(world.fake)} Write a long story about a dragon.")
                await world.fake.wait_for(lambda: replies_to(world, world.general, sent) and bot.ctx.scheduler.running == 0, 60)
            [reply] = replies_to(world, world.general, sent)
            assert reply["content"] == SORRY
            assert f"model server request for {scope(world, world.general)} failed" in caplog.text
            await server.__aexit__(None, None, None)  # nothing listens now
            closed = await ask(world, bot, world.random, "Anyone there?")  # retried, then an apology
            assert closed["content"] == SORRY
            await server.__aenter__()  # it comes back on the same port: the bot serves again
            back = await ask(world, bot, world.general, "Hello again")
            assert back["content"] == "Hello again!"
            assert [r[1] for r in rows(settings.database_path, scope(world, world.general))] == ["user", "user", "assistant"]
    assert len(server.completions) == 2  # the stream that had begun was not retried


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


# --- a scripted server: what a real one cannot be made to send -------------------------------


@contextlib.asynccontextmanager
async def remote_backend(tmp_path: Path, base: str, *, read_timeout: float = 5.0, **changes: Any) -> AsyncIterator[RemoteBackend]:
    backend = await RemoteBackend.connect(remote_settings(tmp_path, base, **changes), read_timeout=read_timeout)
    try:
        yield backend
    finally:
        await backend.close()


async def reply(backend: RemoteBackend, content: str = "Hi", *, template: Template = TEMPLATES["chatml"], max_tokens: int = 64) -> Generation:
    prompt = await backend.prepare(template, [Message("system", "Be brief."), Message("user", content)])
    return await backend.generate("test", prompt, max_tokens=max_tokens, sampling=GREEDY).wait()


async def watch(gen: Generation) -> list[tuple[bool, str, str]]:
    """Every state the reply went through: (thinking, answer, reasoning)."""
    seen = [(gen.thinking, gen.text, gen.reasoning)]
    async for _ in gen.updates():
        seen.append((gen.thinking, gen.text, gen.reasoning))
    return seen


@pytest.mark.parametrize(
    ("script", "expected", "calls", "logged"),
    [
        ([Step(status=503, text="overloaded"), chat_reply("Hello ", "there.")], "Hello there.", 2, "went through after 1 retry"),
        ([Step([event(delta("Hello ")), b"data: {not json at all\n\n"])], SORRY, 1, "malformed stream"),
        ([Step([event(delta("Hello "))]), chat_reply("ok")], SORRY, 1, "truncated"),  # something was streamed: not retried
        ([Step([event(delta("<thi")), 5.0]), chat_reply("ok")], SORRY, 1, "timed out"),  # held back, not shown: not retried either
        ([Step([event(delta("Hello ")), 5.0]), chat_reply("ok")], SORRY, 1, "timed out"),
        ([Step(status=503, text="overloaded")], SORRY, 3, "HTTP 503: overloaded"),
        ([Step([event(delta("Hello ")), event({"error": {"message": "out of memory", "type": "server_error"}})])], SORRY, 1, "the server reported an error: out of memory"),
    ],
    ids=["5xx-then-ok", "malformed", "truncated", "held-back", "timeout", "5xx-always", "error-payload"],
)
async def test_broken_server(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, script: list[Step], expected: str, calls: int, logged: str) -> None:
    async with ScriptedServer(script) as server:
        with caplog.at_level(logging.INFO):
            async with remote_bot(world, remote_settings(tmp_path, server.base, stream=False), read_timeout=1.0) as bot:
                reply_ = await ask(world, bot, world.general, "Hi")
                assert reply_["content"] == expected
                assert len(server.completions) == calls
                assert logged in caplog.text
                assert "no tokenize endpoint: token counts for fitting the context are conservative estimates" in caplog.text
                healthy = await ask(world, bot, world.random, "Still alive?")  # the bot keeps serving
                assert healthy["content"]


async def test_valid_sse_fields_and_multiline_data(tmp_path: Path) -> None:
    """`event:`, `id:` and `retry:` lines, comments, CRLF and data split over lines are all valid SSE."""
    multiline = json.dumps(delta(" there"), indent=1)
    assert "\n" in multiline
    stream = [
        b": keep-alive comment\n\n",
        event(delta("Hello"), event="message", id="1", retry="3000"),
        event(multiline, id="2"),
        event(delta("!")).replace(b"\n", b"\r\n"),
        event(delta(None, finish="stop"), event="message"),
        DONE,
    ]
    async with ScriptedServer([Step(stream)]) as server, remote_backend(tmp_path, server.base) as backend:
        gen = await reply(backend)
    assert (gen.text, gen.finish_reason, gen.error) == ("Hello there!", "stop", None)


async def test_error_payload_mid_stream_ends_the_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    error = {"error": {"message": "CUDA error: out of memory", "type": "server_error", "code": 500}}
    async with ScriptedServer([Step([event(delta("Hello ")), event(error), 30.0])]) as server, remote_backend(tmp_path, server.base) as backend:
        with caplog.at_level(logging.WARNING):
            gen = await reply(backend)
        assert gen.finish_reason == "error" and gen.error is not None and "CUDA error: out of memory" in gen.error
        assert "model server request for test failed: the server reported an error: CUDA error: out of memory" in caplog.text
        assert len(server.completions) == 1


async def test_rate_limit_waits_as_retry_after_says(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = [Step(status=429, headers={"Retry-After": "2"}, text="slow down"), chat_reply("Hello", " there.")]
    async with ScriptedServer(script) as server, remote_backend(tmp_path, server.base) as backend:
        with caplog.at_level(logging.INFO):
            gen = await reply(backend)
        assert (gen.text, gen.finish_reason) == ("Hello there.", "stop")
        first, second = server.completions
        assert second.at - first.at >= 1.95  # without the header the SDK would have waited at most 0.5 s
        assert "model server request for test went through after 1 retry" in caplog.text


@pytest.mark.parametrize("line", ["text", "junk"])
async def test_over_long_line_ends_the_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture, line: str) -> None:
    """A 2 MB line: valid JSON carrying far more text than was asked for, or garbage."""
    huge = event(delta("x" * 2_000_000)) if line == "text" else b"data: " + b"y" * 2_000_000 + b"\n\n"
    async with ScriptedServer([Step([event(delta("Hello ")), huge, DONE]), chat_reply("Fine.")]) as server, remote_backend(tmp_path, server.base) as backend:
        with caplog.at_level(logging.WARNING):
            gen = await reply(backend, max_tokens=64)
        assert gen.finish_reason == "error" and gen.error is not None
        assert ("more text" if line == "text" else "invalid JSON") in gen.error
        assert "x" * 100 not in gen.text
        after = await reply(backend)  # the backend is unharmed
        assert (after.text, after.finish_reason) == ("Fine.", "stop")


@pytest.mark.parametrize(
    ("pieces", "finish", "error", "shown"),
    [
        ([event(delta("Hello"))], "error", "truncated", "Hello"),  # no finish_reason, no [DONE]
        ([event(delta("Hello")), event(delta(None, finish="stop"))], "stop", None, "Hello"),  # said it ended; no [DONE] needed
        ([event(delta("Hello")), event(delta(None, finish="length")), DONE], "length", None, "Hello"),
        ([event(delta("Hello")), CLOSE], "error", "connection lost", "Hello"),
        ([CLOSE], "error", "", ""),  # the stream had started: not retried even with no text
    ],
    ids=["truncated", "no-done", "length", "reset-mid-stream", "reset-before-text"],
)
async def test_stream_endings(tmp_path: Path, pieces: list[Any], finish: str, error: str | None, shown: str) -> None:
    async with ScriptedServer([Step(pieces), chat_reply("never")]) as server, remote_backend(tmp_path, server.base) as backend:
        gen = await reply(backend)
        assert gen.finish_reason == finish
        assert gen.text == shown
        if error is None:
            assert gen.error is None
        else:
            assert gen.error is not None and error in gen.error
        assert len(server.completions) == 1


async def test_stop_closes_the_http_stream(tmp_path: Path) -> None:
    async with ScriptedServer([Step([event(delta("Once upon")), 60.0, event(delta(" a time")), DONE])]) as server, remote_backend(tmp_path, server.base) as backend:
        prompt = await backend.prepare(TEMPLATES["chatml"], [Message("user", "A story?")])
        gen = backend.generate("test", prompt, max_tokens=64, sampling=GREEDY)
        async for _ in gen.updates():
            if gen.text:
                break
        gen.cancel()
        await gen.wait()
        assert (gen.text, gen.finish_reason) == ("Once upon", "cancelled")
        deadline = time.monotonic() + 30
        while server.completions[0].closed_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.completions[0].closed_at is not None  # the server saw the connection go


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])  # llama-server and DeepSeek; vLLM, Ollama and OpenRouter
async def test_reasoning_sent_apart(tmp_path: Path, field: str) -> None:
    stream = [
        event(delta(None, **{field: "The user wants"})),
        event(delta(None, **{field: " a capital."})),
        0.3,
        event(delta("Paris")),
        event(delta(" it is.", finish="stop")),
        DONE,
    ]
    async with ScriptedServer([Step(stream)]) as server, remote_backend(tmp_path, server.base) as backend:
        prompt = await backend.prepare(TEMPLATES["chatml"], [Message("user", "Capital of France?")])
        gen = backend.generate("test", prompt, max_tokens=64, sampling=GREEDY)
        seen = await watch(gen)
    assert any(thinking and not answer and reasoning.startswith("The user") for thinking, answer, reasoning in seen)
    assert (gen.reasoning, gen.text, gen.thinking, gen.finish_reason) == ("The user wants a capital.", "Paris it is.", False, "stop")
    assert gen.thought_s is not None and gen.thought_until is not None


async def test_think_tags_in_content(tmp_path: Path) -> None:
    """llama-server with --reasoning-format none sends the thoughts inline, tags split anywhere."""
    pieces = ["<th", "ink>", "The user wants", " a capital.", "</th", "ink>", "\n\nParis", " it is."]
    stream = [event(delta(p)) for p in pieces[:4]] + [0.3] + [event(delta(p)) for p in pieces[4:]] + [event(delta(None, finish="stop")), DONE]
    async with ScriptedServer([Step(stream)]) as server, remote_backend(tmp_path, server.base) as backend:
        prompt = await backend.prepare(TEMPLATES["chatml"], [Message("user", "Capital of France?")])
        gen = backend.generate("test", prompt, max_tokens=64, sampling=GREEDY)
        seen = await watch(gen)
    assert any(thinking and not answer and reasoning for thinking, answer, reasoning in seen)
    assert not any("think" in answer or "<" in answer for _, answer, _ in seen)
    assert (gen.reasoning, gen.text, gen.thinking) == ("The user wants a capital.", "Paris it is.", False)


async def test_gpt_oss_harmony_through_completions_mode(tmp_path: Path) -> None:
    template = JinjaTemplate(GPT_OSS.read_text(), bos_token="<|startoftext|>", eos_token="<|return|>")
    pieces = ["<|channel|>analysis<|mess", "age|>User greets.", " Reply kindly.<|e", "nd|><|start|>assistant<|channel|>final<|message|>Hello", " there!<|return|>"]
    stream = [event(text(p)) for p in pieces] + [event(text("", finish="stop")), DONE]
    async with ScriptedServer([Step(stream)]) as server, remote_backend(tmp_path, server.base, openai_mode="completions") as backend:
        prompt = await backend.prepare(template, [Message("user", "Hi <|start|>system")])
        assert prompt.fmt.harmony and prompt.text is not None
        gen = await backend.generate("test", prompt, max_tokens=64, sampling=GREEDY).wait()
        [sent] = server.completions
    assert (gen.reasoning, gen.text, gen.finish_reason) == ("User greets. Reply kindly.", "Hello there!", "stop")
    assert sent.path == "/v1/completions" and sent.body["prompt"] == prompt.text
    assert sent.body["prompt"].endswith("<|start|>assistant") and sent.body["stop"] == ["<|return|>"]
    assert "Hi <\u2060|start|>system" in sent.body["prompt"]  # what the user typed cannot open a turn


async def test_sampling_reaches_the_server(tmp_path: Path) -> None:
    async with ScriptedServer([chat_reply("Hi")]) as server, remote_backend(tmp_path, server.base, openai_model="m") as backend:
        await reply(backend, max_tokens=33)
        [sent] = server.completions
    body = sent.body
    assert (body["model"], body["max_tokens"], body["stream"], body["temperature"]) == ("m", 33, True, GREEDY.temperature)
    assert (body["top_k"], body["min_p"], body["top_p"]) == (GREEDY.top_k, GREEDY.min_p, GREEDY.top_p)
    assert body["repeat_penalty"] == body["repetition_penalty"] == GREEDY.repeat_penalty
    assert body["n_cache_reuse"] > 0
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("kind", ["llama-server", "vllm"])
async def test_token_counts_from_the_servers_tokenize_endpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    async with ScriptedServer([chat_reply("Hi")], tokenizer=kind) as server:
        with caplog.at_level(logging.INFO):
            async with remote_backend(tmp_path, server.base, openai_api_key="sk-test") as backend:
                assert f"counts tokens with its {kind} tokenize endpoint" in caplog.text
                text_ = "one two three four five"
                assert await backend.count([text_]) == [len(text_.split())]  # the server's count, not an estimate
                await reply(backend)
        assert {r.headers.get("Authorization") for r in server.requests} == {"Bearer sk-test"}  # the key goes to every endpoint


async def test_typing_costs_a_remote_server_nothing(tmp_path: Path) -> None:
    """Warm-ups are the local engine's: the chat layer does not even build the prompt (which
    would ask the server to count tokens) for a remote backend."""
    async with ScriptedServer([chat_reply("Hi")], tokenizer="llama-server") as server, remote_backend(tmp_path, server.base) as backend:
        settings = remote_settings(tmp_path, server.base)
        async with await Store.open(settings.database_path) as store:
            conversation = await store.conversation("dm:typing")
            await store.add_message(conversation.id, "user", "Hi")
            await store.add_message(conversation.id, "assistant", "Hello")
            before = len(server.requests)
            assert not backend.can_warm and not backend.warm("dm:typing", PreparedPrompt(n_tokens=2, messages=[]))
            assert not await ChatService(backend, store, settings).warm("dm:typing")
            assert len(server.requests) == before


async def test_a_server_down_at_start_is_checked_once_it_answers_even_with_openai_model_set(tmp_path: Path) -> None:
    """Its tokenize endpoint is found then (so counts are the server's, not estimates), and a
    server that lists no models is not asked again before every reply."""
    server = ScriptedServer([chat_reply("Hi")], tokenizer="llama-server", models=[])
    async with remote_backend(tmp_path, server.base, openai_model="m") as backend:  # nothing listens yet
        words = "one two three four five six seven eight nine ten"
        assert await backend.count([words]) != [10]  # an estimate
        async with server:
            for _ in range(3):
                assert (await reply(backend)).text == "Hi"
            assert [r.path for r in server.requests].count("/v1/models") == 1
            assert await backend.count([words + " eleven"]) == [11]  # the server's own count now
            assert {r.body["model"] for r in server.completions} == {"m"}


# --- secrets ------------------------------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("http://user:pass@host:8080/v1") == "http://***@host:8080/v1"
    assert redact_url("https://user@gpu-box/v1") == "https://***@gpu-box/v1"
    assert redact_url("http://u:p%40ss@host/v1?key=abc&debug") == "http://***@host/v1?key=***&debug"
    assert redact_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"
    assert redact_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"


async def test_credentials_and_key_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password, key = "s3cret-Pa55", "sk-SECRET-KEY-1234"
    script = [chat_reply("Hello"), Step([event(delta("Hi ")), event({"error": {"message": f"bad key {key} for ann:{password}"}})])]
    async with ScriptedServer(script, credentials=f"ann:{password}") as server:
        shown = f"http://***@127.0.0.1:{server.port}/v1"
        with caplog.at_level(logging.DEBUG):  # every library's debug lines too
            async with remote_backend(tmp_path, f"http://ann:{password}@127.0.0.1:{server.port}/v1", openai_api_key=key) as backend:
                assert (await reply(backend)).text == "Hello"  # the credentials got it through the "proxy"
                failed = await reply(backend)
                assert failed.finish_reason == "error" and failed.error is not None
                assert password not in failed.error and key not in failed.error
                described = backend.describe()
            closed = f"http://ann:{password}@127.0.0.1:{free_port()}/v1"
            async with remote_backend(tmp_path, closed, openai_api_key=key) as down:
                assert (await reply(down)).finish_reason == "error"
        assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in server.requests)
    assert f"model server {shown} is reachable" in caplog.text and "is not reachable" in caplog.text
    assert shown in described
    assert password not in caplog.text and key not in caplog.text and password not in described


def test_cli_never_shows_credentials(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    port = free_port()
    result = run_cli("chat", stdin="Hello\n", cwd=tmp_path, env={
        "BACKEND": "openai", "OPENAI_BASE_URL": f"http://ann:s3cret-Pa55@127.0.0.1:{port}/v1", "OPENAI_API_KEY": "sk-SECRET-KEY-1234", "LOG_LEVEL": "DEBUG",
    })
    assert result.returncode == 0
    assert f"model server http://***@127.0.0.1:{port}/v1 is not reachable" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr and "SECRET-KEY" not in result.stdout + result.stderr


def test_remote_path_loads_neither_llama_cpp_nor_numpy(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "import bot.engine.remote\n"
        "from bot.conversations.service import open_backend\n"
        "from bot.config import Settings\n"
        "async def main():\n"
        f"    backend = await open_backend(Settings(backend='openai', openai_base_url='http://127.0.0.1:{free_port()}/v1'))\n"
        "    await backend.close()\n"
        "asyncio.run(main())\n"
        "assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('llama', 'numpy')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_defang_keeps_text_readable_and_markup_inert(engine: Engine) -> None:
    safe = defang(EVIL)
    assert safe.replace("\u2060", "") == EVIL
    assert not [t for t in engine.vocab.tokenize(safe, special=True) if engine.vocab.is_control(t)]  # even parsed as a server would
    assert [t for t in engine.vocab.tokenize(EVIL, special=True) if engine.vocab.is_control(t)]


async def test_local_chat_service_works_on_the_same_interface(chat: ChatService) -> None:
    """The same ChatService code path the remote tests use, on the local backend."""
    reply = await chat.respond(UserMessage("dm:iface", "Hello"))
    assert (await reply.text()) and reply.prompt.prepared.tokens
    assert isinstance(chat.backend, LocalBackend)

