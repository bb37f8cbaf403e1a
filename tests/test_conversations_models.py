"""Several models chosen per conversation (bot/engine/pool.py, ChatService's /model), on both
real models: the bundled SmolLM2 (the default) and Gemma 3 270M.

Each test opens its own small pool (n_ctx 512, 2 slots) over a disk tier in tmp_path. Which
model wrote a reply is checked from what the engines did (their counters, the tokens each
alone gives the same prompt), not only from the name the chat layer reports."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ModelEntry, Settings, bundled_model_path, load_settings
from bot.conversations.images import ImageInput
from bot.conversations.service import BLIND_MODEL_NOTE, IMAGE_PLACEHOLDER, MODEL_GONE_NOTE, ChatService, ModelChoiceError, UserMessage
from bot.conversations.store import Store
from bot.engine.backend import ModelUnavailable
from bot.engine.local import EngineOptions
from bot.engine.pool import ModelPool, entry_options, estimate_bytes
from bot.formats.templates import FALLBACK
from tests.conftest import ENGINE_THREADS, make_settings
from tests.projector import tiny
from tests.references import gemma3_model_path
from tests.test_engine_images import picture
from tests.test_engine_kvdisk import state_files

MiB = 1024 * 1024
BASE = EngineOptions(n_ctx=512, n_threads=ENGINE_THREADS, parallel=2, kv_cache_mb=0, n_predict=16)


@pytest.fixture
def gemma_file() -> Path:
    """Gemma 3 270M (assembled once from its PyPI package into ~/.cache)."""
    return gemma3_model_path()


def base_options(folder: Path) -> EngineOptions:
    from dataclasses import replace

    return replace(BASE, kv_disk_dir=folder, kv_disk_mb=256)


async def open_pool(tmp_path: Path, *entries: ModelEntry, budget_mb: int = 4096) -> ModelPool:
    folder = tmp_path / "kv"
    base = base_options(folder)
    catalogue = (ModelEntry("smol", bundled_model_path()), *entries)
    return await ModelPool.open(catalogue, lambda e: entry_options(base, e), budget_bytes=budget_mb * MiB, disk_dir=folder, disk_bytes=256 * MiB)


@pytest.fixture
def smol_copy(tmp_path: Path) -> Path:
    """SmolLM2 under another file name: a third and fourth catalogue entry that load quickly."""
    path = tmp_path / "other-smol.gguf"
    os.symlink(bundled_model_path(), path)
    return path


def chat_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, n_predict=12, kv_disk_dir=tmp_path / "kv")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "bot.sqlite3")
    yield s
    await s.close()


async def say(chat: ChatService, scope: str, text: str, n: list[int] = [0]):  # noqa: B006 (a counter for message ids)
    n[0] += 1
    reply = await chat.respond(UserMessage(scope, text, author_id="u1", author_name="Ann", platform_message_id=f"m{n[0]}"))
    await reply.generation.wait()
    await reply.save()
    return reply


# --- the catalogue (config) ------------------------------------------------------------------


def test_models_and_models_dir_make_one_catalogue_with_the_default_first(tmp_path: Path, gemma_file: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    os.symlink(gemma_file, folder / "gemma-3-270m.gguf")
    os.symlink(bundled_model_path(), folder / "SmolLM2-135M-Instruct.Q4_1.gguf")  # the default: not listed twice
    (folder / "mmproj-gemma-3-270m-f16.gguf").write_bytes(b"GGUF")  # its projector, by name
    (folder / "notes.txt").write_text("not a model")
    settings = load_settings({"MODELS_DIR": str(folder), "MODELS": f"tiny={bundled_model_path()},parallel=1,n_ctx=1024"})
    catalogue = settings.catalogue()
    # MODEL_PATH's file (the bundled model) is in the folder too: listed once, as the default.
    assert [e.name for e in catalogue] == ["SmolLM2-135M-Instruct.Q4_1", "tiny", "gemma-3-270m"]
    assert catalogue[1].parallel == 1 and catalogue[1].n_ctx == 1024 and catalogue[1].mmproj is None
    assert catalogue[2].mmproj == folder / "mmproj-gemma-3-270m-f16.gguf"
    # A lone projector beside a lone model is its own.
    lone = tmp_path / "lone"
    lone.mkdir()
    os.symlink(gemma_file, lone / "g.gguf")
    (lone / "mmproj-f16.gguf").write_bytes(b"GGUF")
    assert load_settings({"MODELS_DIR": str(lone)}).catalogue()[1] == ModelEntry("g", lone / "g.gguf", lone / "mmproj-f16.gguf")
    # MODEL_PATH in the folder takes the projector found beside it there (unless MMPROJ_PATH names one).
    assert load_settings({"MODELS_DIR": str(lone), "MODEL_PATH": str(lone / "g.gguf")}).catalogue() == (ModelEntry("g", lone / "g.gguf", lone / "mmproj-f16.gguf"),)


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ("tiny", "MODELS: 'tiny' is not name=path"),
        ("mmproj=x.gguf", "MODELS: mmproj= must follow a name=path entry"),
        ("a=/no/such.gguf", "MODELS (a) points to '/no/such.gguf', which is not a file"),
        ("a={model};a={model}", "MODELS: the model name 'a' is used twice"),
        ("a={model},parallel=0", "MODELS (a parallel) must be a whole number from 1 to 64, got '0'"),
        ("a={model},n_ctx=20", "MODELS (a n_ctx) must be a whole number from 64 to 1048576, got '20'"),
        ("bad name={model}", "MODELS: 'bad name' is not a model name"),
    ],
)
def test_a_bad_catalogue_entry_is_one_line(models: str, error: str) -> None:
    from bot.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings({"MODELS": models.format(model=bundled_model_path())})
    assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_model_memory_and_idle_settings_are_checked() -> None:
    from bot.config import ConfigError

    s = load_settings({"MODEL_MEMORY_MB": "3000", "MODEL_IDLE_UNLOAD_S": "600", "OWNER_IDS": "1, 2"})
    assert (s.resolved_model_memory_mb(), s.model_idle_unload_s, s.owner_ids) == (3000, 600.0, frozenset({1, 2}))
    assert load_settings({}).resolved_model_memory_mb() >= 256  # from this machine's RAM
    with pytest.raises(ConfigError, match="MODEL_MEMORY_MB must be a whole number from 64"):
        load_settings({"MODEL_MEMORY_MB": "1"})


def test_the_estimate_reads_the_kv_cache_shape_from_the_file(gemma_file: Path) -> None:
    """SmolLM2: 30 layers, 3 KV heads of 64 (23,040 bytes a token in f16); Gemma 3 270M: 18 layers, 1 KV head of 256."""
    smol = ModelEntry("smol", bundled_model_path())
    one = estimate_bytes(smol, BASE)
    assert one - bundled_model_path().stat().st_size == 30 * 2 * 192 * 2 * 512 * 2
    gemma = estimate_bytes(ModelEntry("gemma", gemma_file), BASE)
    assert gemma - gemma_file.stat().st_size == 18 * 2 * 256 * 2 * 512 * 2


# --- two models at once -------------------------------------------------------------------------


async def test_two_channels_on_two_models_answer_at_once_each_with_its_own(tmp_path: Path, store: Store, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        assert chat.model_names() == ["smol", "gemma"]
        assert await chat.set_model("b", "gemma") == "gemma"
        assert await chat.model_to_load("b") == "gemma" and await chat.model_to_load("a") is None
        smol_engine = pool.default_backend.engine
        started = [
            await chat.respond(UserMessage("a", "Name three colours.", platform_message_id="a1")),
            await chat.respond(UserMessage("b", "Name three colours.", platform_message_id="b1")),
        ]
        await asyncio.gather(*(r.generation.wait() for r in started))
        a, b = started
        gemma_engine = pool.loaded("gemma").engine  # type: ignore[union-attr]
        assert chat.last_replies["a"].model == "smol" and chat.last_replies["b"].model == "gemma"
        assert a.generation.finish_reason in ("stop", "length") and b.generation.finish_reason in ("stop", "length")
        # Each prompt is its own model's: ChatML for SmolLM2, Gemma's fallback template (its file has none).
        assert a.prompt.template.name != FALLBACK and b.prompt.template.name == FALLBACK
        assert (a.prompt.prepared.tokens or [])[0] == smol_engine.vocab.tokenize("<|im_start|>", special=True)[0]
        # Each engine did its own reply's work: the same prompt on each engine alone gives the same tokens.
        for engine, reply in ((smol_engine, a), (gemma_engine, b)):
            alone = await engine.generate("solo", reply.prompt.prepared.tokens, max_tokens=12, sampling=chat.settings.sampling).wait()
            assert alone.tokens == reply.generation.tokens
        assert gemma_engine.tokens_evaluated >= b.generation.n_evaluated > 0
        # Every decode of both went through the shared gate, one at a time.
        assert pool.shared.gate.turns >= smol_engine.steps + gemma_engine.steps
    finally:
        await pool.close()


# --- the memory budget ----------------------------------------------------------------------------


async def test_over_budget_the_least_recently_used_idle_model_is_unloaded_never_a_busy_one(
    tmp_path: Path, store: Store, gemma_file: Path, smol_copy: Path
) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file), ModelEntry("smol2", smol_copy), ModelEntry("smol3", smol_copy))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        for scope, model in (("g", "gemma"), ("s2", "smol2"), ("s3", "smol3")):
            await chat.set_model(scope, model)
        await say(chat, "g", "Hello there.")
        await say(chat, "s2", "Hello there.")  # gemma is now the least recently used
        # Room for exactly what is loaded: the next model must make room.
        pool.budget = pool.used_bytes() + 8 * MiB
        await say(chat, "s3", "Hello there.")
        assert pool.unloads == ["gemma"] and pool.loaded("gemma") is None
        assert {m.name for m in pool.status() if m.loaded} == {"smol", "smol2", "smol3"}
        assert pool.used_bytes() <= pool.budget

        # gemma comes back: the least recently used is now smol2... but a reply is being
        # prepared on it (held), so smol3 goes instead.
        async with pool.hold("smol2"):
            await say(chat, "g", "And again.")
        assert pool.unloads == ["gemma", "smol3"]
        # The default is never unloaded; with every other model busy, a load is refused, clearly.
        async with pool.hold("smol2"), pool.hold("gemma"):
            with pytest.raises(ModelUnavailable, match="the model smol3 does not fit in memory now: the other loaded models are all answering"):
                await say(chat, "s3", "Hi?")
        assert pool.loaded("smol") is not None and pool.loaded("smol2") is not None and pool.loaded("gemma") is not None
    finally:
        await pool.close()


async def test_a_model_in_the_middle_of_a_reply_is_never_unloaded(tmp_path: Path, store: Store, gemma_file: Path, smol_copy: Path) -> None:
    """A real reply held in the middle: the test takes the engines' CPU gate, so gemma's reply,
    admitted, cannot decode its next step until the test lets go (no reliance on speed)."""
    import threading

    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file), ModelEntry("smol2", smol_copy), ModelEntry("smol3", smol_copy))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        for scope, model in (("s2", "smol2"), ("g", "gemma"), ("s3", "smol3")):
            await chat.set_model(scope, model)
        await say(chat, "g", "Hello there.")  # gemma first: the least recently used...
        await say(chat, "s2", "Hello there.")
        pool.budget = pool.used_bytes() + 8 * MiB

        taken, release = threading.Event(), threading.Event()

        def hold_the_cpu() -> None:
            with pool.shared.gate.turn(0):
                taken.set()
                release.wait(60)

        holder = threading.Thread(target=hold_the_cpu)
        holder.start()
        try:
            assert taken.wait(10)
            running = await chat.respond(UserMessage("g", "Tell me more.", platform_message_id="mid-reply"))  # ...but now mid-reply
            assert not running.generation.done
            load = asyncio.ensure_future(say(chat, "s3", "Hello there."))
            await asyncio.wait_for(_until(lambda: pool.unloads), 60)  # room is made before the load needs the CPU
            assert pool.unloads == ["smol2"] and pool.loaded("gemma") is not None
        finally:
            release.set()
            holder.join()
        await running.generation.wait()
        await load
        assert running.generation.finish_reason in ("stop", "length") and running.generation.n_evaluated > 0  # finished on gemma, not failed
        assert chat.last_replies["g"].model == "gemma" and chat.last_replies["s3"].model == "smol3"
    finally:
        await pool.close()


async def test_a_model_bigger_than_the_budget_leaves_the_others_serving(tmp_path: Path, store: Store, gemma_file: Path) -> None:
    smol_cost = estimate_bytes(ModelEntry("smol", bundled_model_path()), base_options(tmp_path / "kv"))
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file), budget_mb=smol_cost // MiB + 200)  # gemma needs ~260 MiB more
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await chat.set_model("g", "gemma")
        with pytest.raises(ModelUnavailable, match=r"the model gemma does not fit in memory now: it needs about \d+ MiB and MODEL_MEMORY_MB leaves"):
            await say(chat, "g", "Hello?")
        reply = await say(chat, "a", "Hello?")
        assert reply.generation.finish_reason in ("stop", "length") and chat.last_replies["a"].model == "smol"
    finally:
        await pool.close()


# --- the disk tier with several models --------------------------------------------------------------


async def test_switching_back_finds_the_state_on_disk_and_evaluates_only_the_new_tokens(tmp_path: Path, store: Store, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await chat.set_model("c", "gemma")
        first = await say(chat, "c", "My name is Zanzibar. Tell me about cats.")
        on_gemma = first.prompt.prepared.n_tokens + first.generation.n_generated
        await chat.set_model("c", "smol")  # the same conversation goes on with the default model
        second = await say(chat, "c", "And dogs?")
        assert chat.last_replies["c"].model == "smol" and second.generation.n_cached == 0  # SmolLM2 never saw it
        assert await pool.unload("gemma")  # its slots' states go to disk as it closes
        assert len(state_files(tmp_path / "kv", "c")) == 1  # gemma's (SmolLM2's is still in its slot)

        await chat.set_model("c", "gemma")
        third = await say(chat, "c", "And birds?")
        gemma_engine = pool.loaded("gemma").engine  # type: ignore[union-attr]
        assert gemma_engine.disk_restores == 1
        # What gemma read before came from disk (its whole first prompt; its answer as far as the
        # stored text tokenizes the same), and only what came after was evaluated.
        assert on_gemma > third.generation.n_cached >= first.prompt.prepared.n_tokens
        assert third.generation.n_evaluated == third.prompt.prepared.n_tokens - third.generation.n_cached
    finally:
        await pool.close()
    assert len(state_files(tmp_path / "kv", "c")) == 2  # the conversation's state of each model, side by side


async def test_forget_reaches_every_models_state(tmp_path: Path, store: Store, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await say(chat, "c", "Tell me about cats.")
        await chat.set_model("c", "gemma")
        await say(chat, "c", "And dogs?")
        await pool.unload("gemma")
        assert len(list((tmp_path / "kv").iterdir())) >= 1
        await chat.reset("c")  # the history is gone: no model may use a state of it
        pool.shared.disk.drain()  # type: ignore[union-attr]
        assert list((tmp_path / "kv").iterdir()) == []
    finally:
        await pool.close()


async def test_a_model_that_cannot_see_says_so_where_another_model_could(tmp_path: Path, store: Store, smol_copy: Path) -> None:
    """A catalogue where only the default model has a projector: images are taken and stored
    (some model can see them), and a channel switched to the model that cannot is told so with
    its reply, while that model reads a placeholder; the seeing channel gets no such note."""
    folder = tmp_path / "kv"
    base = base_options(folder)
    catalogue = (ModelEntry("smol", bundled_model_path(), mmproj=tiny(tmp_path)), ModelEntry("blind", smol_copy))
    pool = await ModelPool.open(catalogue, lambda e: entry_options(base, e), budget_bytes=4096 * MiB, disk_dir=folder, disk_bytes=256 * MiB)
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        assert chat.can_see and chat.image_note() is None
        await chat.set_model("b", "blind")
        replies = {}
        for scope in ("a", "b"):
            message_id = await chat.receive(UserMessage(scope, "What is in this picture?", platform_message_id=f"{scope}-1"))
            assert message_id is not None
            assert await chat.add_images(message_id, [ImageInput("noise.png", picture(1))]) == []
            reply = await chat.answer(scope, message_id)
            assert reply is not None
            await reply.generation.wait()
            await reply.save()
            replies[scope] = reply
        seeing, blind = replies["a"], replies["b"]
        assert seeing.prompt.model == "smol" and seeing.prompt.n_images == 1 and seeing.notes == []
        assert blind.prompt.model == "blind" and blind.prompt.n_images == 0
        assert blind.notes == [BLIND_MODEL_NOTE.format(model="blind")]
        assert blind.prompt.messages[-1].content.startswith(IMAGE_PLACEHOLDER) and not blind.prompt.messages[-1].images
        assert seeing.prompt.messages[-1].images and IMAGE_PLACEHOLDER not in seeing.prompt.messages[-1].content
    finally:
        await pool.close()


# --- files that cannot be loaded, models that left -------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_a_missing_or_corrupt_model_file_gives_a_clear_error_and_the_others_serve(damage: str, tmp_path: Path, store: Store) -> None:
    broken = tmp_path / "broken.gguf"
    raw = bundled_model_path().read_bytes()
    broken.write_bytes(raw[: len(raw) // 3])  # cut short: the header reads, the tensors do not
    pool = await open_pool(tmp_path, ModelEntry("broken", broken))
    try:
        if damage == "missing":
            broken.unlink()
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await chat.set_model("x", "broken")
        with pytest.raises(ModelUnavailable) as caught:
            await say(chat, "x", "Hello?")
        why = str(caught.value)
        assert why.startswith("the model broken c")
        assert ("No such file" in why or "not found" in why) if damage == "missing" else "truncated, corrupt" in why
        assert "\n" not in why
        assert pool.loaded("broken") is None and pool.loaded("smol") is not None
        reply = await say(chat, "y", "Hello?")
        assert reply.generation.finish_reason in ("stop", "length")
    finally:
        await pool.close()


async def test_a_model_that_left_the_catalogue_sends_its_channel_back_to_the_default(
    tmp_path: Path, store: Store, smol_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await open_pool(tmp_path, ModelEntry("old", smol_copy))
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await chat.set_model("c", "old")
    finally:
        await pool.close()
    pool = await open_pool(tmp_path, ModelEntry("new", smol_copy))  # the next start: "old" is gone
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        assert chat.model_name(await chat.conversation("c")) == "smol"
        with caplog.at_level(logging.WARNING):
            reply = await say(chat, "c", "Hello?")
        assert MODEL_GONE_NOTE.format(gone="old", default="smol") in reply.notes
        assert (await chat.conversation("c")).model is None and chat.last_replies["c"].model == "smol"
        with pytest.raises(ModelChoiceError, match="There is no model named 'old'"):
            await chat.set_model("c", "old")
    finally:
        await pool.close()


async def test_an_idle_model_is_unloaded_after_model_idle_unload_s(tmp_path: Path, store: Store, smol_copy: Path) -> None:
    folder = tmp_path / "kv"
    base = base_options(folder)
    catalogue = (ModelEntry("smol", bundled_model_path()), ModelEntry("other", smol_copy))
    pool = await ModelPool.open(catalogue, lambda e: entry_options(base, e), budget_bytes=4096 * MiB, idle_unload_s=0.2, disk_dir=folder, disk_bytes=64 * MiB)
    try:
        chat = ChatService(pool.default_backend, store, chat_settings(tmp_path), pool)
        await chat.set_model("c", "other")
        await say(chat, "c", "Hello?")
        await asyncio.wait_for(_until(lambda: pool.loaded("other") is None), 30)
        assert pool.unloads == ["other"] and pool.loaded("smol") is not None  # never the default
    finally:
        await pool.close()


async def _until(condition) -> None:  # noqa: ANN001
    while not condition():
        await asyncio.sleep(0.02)


# --- a model server's models (BACKEND=openai) ----------------------------------------------------


async def test_with_a_model_server_each_conversation_names_its_model_in_the_request(tmp_path: Path) -> None:
    """The server's /v1/models is the catalogue; the chosen name goes with each request (the
    server loads it: llama-server's router mode, vLLM, Ollama, LiteLLM)."""
    from bot.conversations.service import open_chat
    from tests.sse_server import ScriptedServer, chat_reply

    async with ScriptedServer([chat_reply("Hi.")], models=["alpha", "beta"]) as server:
        settings = make_settings(tmp_path, backend="openai", openai_base_url=server.base, n_ctx=2048, n_predict=12)
        async with open_chat(settings) as chat:
            assert chat.model_names() == ["alpha", "beta"]
            assert await chat.set_model("b", "beta") == "beta"
            server.models.append("gamma")  # the server serves one more now: /model finds it
            assert await chat.set_model("c", "gamma") == "gamma"
            for scope in ("a", "b", "c"):
                await say(chat, scope, "Hello?")
            assert [r.body["model"] for r in server.completions] == ["alpha", "beta", "gamma"]
            assert [chat.last_replies[s].model for s in ("a", "b", "c")] == ["alpha", "beta", "gamma"]
            server.models.remove("gamma")
            await chat.refresh_models()
            reply = await say(chat, "c", "Still there?")  # the server dropped it: back to its default, with a note
            assert MODEL_GONE_NOTE.format(gone="gamma", default="alpha") in reply.notes
            assert server.completions[-1].body["model"] == "alpha"


# --- the terminal chat ----------------------------------------------------------------------------


def test_terminal_chat_switches_model_with_slash_model(tmp_path: Path, smol_copy: Path) -> None:
    """The real `python -m bot chat` with MODELS: /model lists, /model NAME switches, the next
    message loads it (and says so); a model that cannot load is one line and the chat goes on."""
    from tests.conftest import run_cli

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    env = {"TEMPERATURE": "0", "MODELS": f"other={smol_copy};broken={broken}", "LLAMA_LOG": "1"}
    stdin = "/model\n/model other\nHello!\n/model broken\nHello again!\n/model nope\n"
    result = run_cli("chat", "--db", str(tmp_path / "chat.sqlite3"), "--n-predict", "8", "--ctx-size", "512", stdin=stdin, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[INFO] Model: SmolLM2-135M-Instruct.Q4_1; available: SmolLM2-135M-Instruct.Q4_1, other, broken; loaded: SmolLM2-135M-Instruct.Q4_1\n" in out
    assert "[INFO] Model: other\n[USER]:\n[INFO] Loading model other\u2026\n[ASSISTANT]:\n" in out.replace("[USER]:\nHello!\n", "[USER]:\n")
    assert "model other loaded in" in result.stderr
    assert "[ERROR] the model broken c" in out  # one line, and the chat went on:
    assert "[ERROR] There is no model named 'nope'." in out and "Traceback" not in result.stderr
