"""Images: the real engine and bundled SmolLM2 with a random LLaVA-style projector (tests/projector.py).

The projector's weights are random, so what the model "sees" is nonsense; what is tested
is the pipeline: different images give different greedy replies, the same image the same
reply in two channels at once, a follow-up evaluates only its new tokens and matches a
cold run, the disk tier restores an image turn after a restart, bad images get a note while
the text is answered, images are stored, removed and exported with their conversation, the
remote backend sends them as content parts, and the terminal takes `/image PATH`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from bot.config import Sampling, Settings, bundled_model_path
from bot.conversations.export import ExportInfo, export_markdown
from bot.conversations.images import ImageInput
from bot.conversations.service import IMAGES_CUT_NOTE, ChatService, UserMessage
from bot.conversations.store import Store
from bot.engine.local import Engine, EngineOptions, LocalBackend
from bot.engine.remote import IMAGES_REFUSED_NOTE, RemoteBackend
from bot.formats.templates import Image, Message, get_template
from tests.conftest import ENGINE_THREADS, make_settings, run_cli
from tests.projector import tiny
from tests.sse_server import ScriptedServer, Step, chat_reply

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
N_CTX = 1024


def picture(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A noise picture: a different one for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def image(seed: int, **kw: object) -> Image:
    data = picture(seed, **kw)  # type: ignore[arg-type]
    with PILImage.open(io.BytesIO(data)) as img:
        width, height = img.size
    return Image(hashlib.sha256(data).hexdigest(), data, "image/png", width, height, f"noise{seed}.png")


@pytest.fixture(scope="module")
def projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny(tmp_path_factory.mktemp("mmproj"))


def load(projector: Path, **options: object) -> Engine:
    return Engine.load_sync(
        bundled_model_path(),
        EngineOptions(n_ctx=N_CTX, n_threads=ENGINE_THREADS, parallel=4, kv_cache_mb=64, mmproj=projector, **options),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def seeing(projector: Path) -> Iterator[Engine]:
    """The bundled model with the tiny projector: it can see."""
    engine = load(projector)
    yield engine
    engine.close_sync()


@pytest.fixture
async def chat(seeing: Engine, settings: Settings) -> AsyncIterator[ChatService]:
    async with await Store.open(settings.database_path) as store:
        yield ChatService(LocalBackend(seeing), store, settings)


async def prompt(engine: Engine, text: str, *images: Image, history: tuple[Message, ...] = ()):
    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    messages = [Message("system", "You are a helpful assistant."), *history, Message("user", text, tuple(images))]
    return await LocalBackend(engine).prepare(template, messages)


async def reply(engine: Engine, key: str, prepared, max_tokens: int = 12):  # noqa: ANN001, ANN201
    return await LocalBackend(engine).generate(key, prepared, max_tokens=max_tokens, sampling=GREEDY).wait()


# --- the engine ----------------------------------------------------------------------------


async def test_an_image_is_laid_out_as_libmtmd_tokenizes_it(seeing: Engine) -> None:
    without = await prompt(seeing, "What is this?")
    with_one = await prompt(seeing, "What is this?", image(1))
    [part] = with_one.images
    assert part.n_tokens == part.n_pos == 16  # 32 px images, patch 8: 16 embeddings (the tiny projector)
    assert with_one.n_tokens == without.n_tokens + 16
    assert all(t < 0 for t in with_one.tokens[part.start : part.start + 16])  # its synthetic ids
    assert with_one.tokens[: part.start] == without.tokens[: part.start]  # the marker sits before the text, after the markup
    assert with_one.tokens[part.start + 16 :] == without.tokens[part.start :]


async def test_a_model_that_can_see_generates_without_waiting_for_encodes_it_does_not_need(seeing: Engine) -> None:
    """The engine thread waits for an image's encode only when it has nothing else to do: a
    text reply (and an image reply, once its image is in) never waits between its tokens.
    (Each such wait cost up to 0.25 s per token.)"""
    waits = seeing.encode_waits
    text = await reply(seeing, "no-image", await prompt(seeing, "Count from one to twenty."), max_tokens=12)
    assert text.n_generated == 12 or text.finish_reason == "stop"
    assert seeing.encode_waits == waits
    pictured = await reply(seeing, "one-image", await prompt(seeing, "What is this?", image(9)), max_tokens=12)
    assert pictured.tokens
    assert seeing.encode_waits - waits <= 1  # at most the one round with nothing to do but wait for that encode


async def test_two_images_give_different_replies_and_the_same_image_the_same(seeing: Engine) -> None:
    first = await reply(seeing, "img-a", await prompt(seeing, "Describe the picture.", image(1)))
    second = await reply(seeing, "img-b", await prompt(seeing, "Describe the picture.", image(2)))
    again = await reply(seeing, "img-c", await prompt(seeing, "Describe the picture.", image(1)))
    assert first.finish_reason in ("stop", "length") and first.tokens
    assert first.tokens != second.tokens
    assert again.tokens == first.tokens


async def test_the_same_image_gives_the_same_reply_in_two_channels_at_once(seeing: Engine) -> None:
    prepared = await prompt(seeing, "What do you see?", image(3))
    alone = await reply(seeing, "alone", prepared)
    encoded = seeing.vision.images_encoded  # type: ignore[union-attr]
    batched = seeing.batched_steps
    backend = LocalBackend(seeing)
    gens = [backend.generate(f"twin-{i}", prepared, max_tokens=12, sampling=GREEDY) for i in range(2)]
    together = [(await g.wait()).tokens for g in gens]
    assert together == [alone.tokens, alone.tokens]
    assert seeing.batched_steps > batched  # they generated in shared decode steps
    assert seeing.vision.images_encoded == encoded  # type: ignore[union-attr]  # encoded once, kept


async def test_follow_up_after_an_image_evaluates_only_its_new_tokens(seeing: Engine) -> None:
    pic = image(4)
    first_prompt = await prompt(seeing, "Look at this.", pic)
    first = await reply(seeing, "follow", first_prompt)
    history = (Message("user", "Look at this.", (pic,)), Message("assistant", first.text))
    follow = await prompt(seeing, "And what colour is it?", history=history)
    # other channels in between, more than there are slots: the state is saved and restored
    for i in range(seeing.options.parallel + 1):
        await reply(seeing, f"busy-{i}", await prompt(seeing, f"Count to {i}."), max_tokens=3)
    encoded = seeing.vision.images_encoded  # type: ignore[union-attr]
    warm = await reply(seeing, "follow", follow)
    assert warm.n_cached >= len(first_prompt.tokens) + len(first.tokens) - 2
    assert warm.n_evaluated <= len(follow.tokens) - len(first_prompt.tokens) - len(first.tokens) + 3
    assert seeing.vision.images_encoded == encoded  # type: ignore[union-attr]  # the image was not needed again
    cold = await reply(seeing, "follow-cold", follow)
    assert cold.n_cached == 0 and cold.n_evaluated == follow.n_tokens
    assert warm.tokens == cold.tokens


async def test_a_different_image_at_the_same_place_is_never_reused(seeing: Engine) -> None:
    one = await prompt(seeing, "Same words.", image(5))
    await reply(seeing, "swap", one)
    other = await prompt(seeing, "Same words.", image(6))
    second = await reply(seeing, "swap", other)
    assert second.n_cached <= other.images[0].start
    assert second.n_evaluated >= 16


async def test_a_restart_restores_an_image_turn_from_disk(projector: Path, tmp_path: Path) -> None:
    pic = image(7)
    first = load(projector, kv_disk_dir=tmp_path / "kv", kv_disk_mb=64)
    try:
        first_prompt = await prompt(first, "Remember this picture.", pic)
        said = await reply(first, "restart", first_prompt)
        history = (Message("user", "Remember this picture.", (pic,)), Message("assistant", said.text))
        follow = await prompt(first, "What was in it?", history=history)
        cold = await reply(first, "restart-cold", follow)
    finally:
        first.close_sync()  # saves the slots' states for the next start
    second = load(projector, kv_disk_dir=tmp_path / "kv", kv_disk_mb=64)
    try:
        warm = await reply(second, "restart", follow)
        assert second.disk_restores == 1
        assert warm.n_cached >= len(first_prompt.tokens) + len(said.tokens) - 2
        assert second.vision.images_encoded == 0  # type: ignore[union-attr]  # the image came back with the state
        assert warm.tokens == cold.tokens
    finally:
        second.close_sync()


async def test_a_model_without_projector_reads_placeholders(engine: Engine) -> None:
    backend = LocalBackend(engine)
    assert backend.image_support() is not None and "MMPROJ_PATH" in backend.image_support()  # type: ignore[operator]
    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    prepared = await backend.prepare(template, [Message("user", "hi", (image(1),))])
    assert not prepared.images and engine.vocab.text_of(prepared.tokens or []).count("[image] hi") == 1


# --- the conversation layer ------------------------------------------------------------------


async def test_images_are_stored_answered_and_go_with_their_conversation(chat: ChatService, settings: Settings) -> None:
    assert chat.can_see and chat.image_note() is None
    message_id = await chat.receive(UserMessage("dm:img", "What is this?", author_name="Ann", platform_message_id="501"))
    assert message_id is not None
    notes = await chat.add_images(message_id, [ImageInput("cat.png", picture(11)), ImageInput("broken.png", b"\x89PNG not really")])
    assert len(notes) == 1 and "broken.png" in notes[0]
    answer = await chat.answer("dm:img", message_id)
    assert answer is not None and answer.prompt.n_images == 1
    assert (await answer.text()).strip() and answer.finish_reason in ("stop", "length")
    await answer.save()
    with sqlite3.connect(settings.database_path) as db:
        assert db.execute("SELECT name, mime FROM message_images").fetchall() == [("cat.png", "image/png")]
        (stored,) = db.execute("SELECT data FROM image_blobs").fetchone()
    assert stored == picture(11)  # a small PNG is kept byte for byte
    conversation = await chat.store.conversation("dm:img")
    exported = export_markdown(ExportInfo("dm", "bot", "auto", "sys", datetime.now()), await chat.store.messages(conversation.id))
    assert "*Images:* `cat.png`" in exported
    assert await chat.reset("dm:img") == 2
    with sqlite3.connect(settings.database_path) as db:
        assert db.execute("SELECT COUNT(*) FROM image_blobs").fetchone() == (0,)


async def test_an_image_alone_is_a_turn(chat: ChatService) -> None:
    message_id = await chat.receive(UserMessage("dm:only", "", author_name="Ann", platform_message_id="601"))
    assert message_id is not None
    assert await chat.add_images(message_id, [ImageInput("only.webp", picture(12, fmt="WEBP"))]) == []
    answer = await chat.answer("dm:only", message_id)
    assert answer is not None and answer.prompt.n_images == 1
    assert answer.prompt.messages[-1].content == "" and answer.prompt.messages[-1].images[0].mime == "image/jpeg"  # a WebP photo is stored as JPEG
    assert (await answer.text()).strip()
    await answer.save()


async def test_a_refused_image_gets_a_note_and_the_text_is_answered(chat: ChatService, settings: Settings) -> None:
    big = picture(13, size=(600, 600))  # noise does not compress: ~1 MB
    small = make_settings(settings.database_path.parent, image_max_kb=len(big) // 2048)
    chat.settings = small
    assert chat.image_refusal("big.png", len(big)) is not None  # refused by its declared size, before a download
    assert chat.image_refusal("ok.png", 1000) is None
    message_id = await chat.receive(UserMessage("dm:refused", "Say hello.", author_name="Ann"))
    assert message_id is not None
    notes = await chat.add_images(message_id, [ImageInput("big.png", big)])
    assert len(notes) == 1 and "big.png" in notes[0] and "at most" in notes[0]
    answer = await chat.answer("dm:refused", message_id)
    assert answer is not None and answer.prompt.n_images == 0
    assert (await answer.text()).strip()
    await answer.save()


async def test_large_images_are_scaled_down_not_refused(chat: ChatService, settings: Settings) -> None:
    chat.settings = make_settings(settings.database_path.parent, image_max_pixels=64 * 64)
    message_id = await chat.receive(UserMessage("dm:scaled", "Look.", author_name="Ann"))
    assert message_id is not None
    gif = io.BytesIO()
    frames = [PILImage.fromarray(np.full((300, 200, 3), c, dtype=np.uint8)) for c in (200, 10)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert await chat.add_images(message_id, [ImageInput("anim.gif", gif.getvalue()), ImageInput("photo.jpg", picture(14, size=(320, 240), fmt="JPEG"))]) == []
    stored = await chat.store.message(message_id)
    assert stored is not None
    gif_row, jpeg_row = stored.images
    assert gif_row.mime == "image/png" and gif_row.width * gif_row.height <= 64 * 64 and gif_row.width < gif_row.height  # shape kept
    assert jpeg_row.mime == "image/jpeg" and jpeg_row.width * jpeg_row.height <= 64 * 64
    data = await chat.store.image_data(gif_row.sha256)
    with PILImage.open(io.BytesIO(data or b"")) as first_frame:
        assert first_frame.convert("RGB").getpixel((5, 5))[0] > 150  # the first frame (light), not the second (dark)


async def test_deletes_and_edits_remove_images(chat: ChatService, settings: Settings) -> None:
    message_id = await chat.receive(UserMessage("dm:edit", "Two pictures.", author_name="Ann", platform_message_id="701"))
    assert message_id is not None
    await chat.add_images(message_id, [ImageInput("a.png", picture(21)), ImageInput("b.png", picture(22))])
    await chat.edit_message("701", "One picture.", image_names=["b.png"])
    stored = await chat.store.message(message_id)
    assert stored is not None and [i.name for i in stored.images] == ["b.png"] and stored.content == "One picture."
    await chat.delete_message("701")
    with sqlite3.connect(settings.database_path) as db:
        assert db.execute("SELECT COUNT(*) FROM image_blobs").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM message_images").fetchone() == (0,)


async def test_older_images_give_way_to_placeholders_before_text(chat: ChatService, settings: Settings) -> None:
    """A window that holds few images: the newest turns keep theirs, older ones read [image],
    and no text turn is dropped while images can make room."""
    conversation = await chat.store.conversation("dm:many")
    budget = N_CTX - settings.n_predict
    for i in range(16):  # the text takes under half the window, with the 48 images (16 tokens each) it is too much
        stored = await chat.store.add_message(conversation.id, "user", f"Pictures {i}.", author_name="Ann")
        await chat.store.add_images(stored, [(await _stored(chat, 3 * i + j), picture(100 + 3 * i + j)) for j in range(3)])
        await chat.store.add_message(conversation.id, "assistant", "Nice.")
    answer = await chat.respond(UserMessage("dm:many", "Which was the first picture?", author_name="Ann"))
    users = [m for m in answer.prompt.messages if m.role == "user"]
    assert users[0].content == "[image] [image] [image] Pictures 0."  # the oldest turn is still there, as text
    assert not users[0].images and users[-2].images  # older images gave way, newer ones stayed
    assert answer.prompt.prepared.n_tokens <= budget
    await answer.text()
    await answer.save()
    again = await chat.respond(UserMessage("dm:many", "And the last one?", author_name="Ann"))
    await again.text()
    assert [len(m.images) for m in again.prompt.messages[: len(answer.prompt.messages)]] == [len(m.images) for m in answer.prompt.messages]
    assert again.generation.n_cached >= answer.prompt.prepared.n_tokens - 2  # the same prefix: its KV state reused
    await again.save()


async def test_an_image_that_does_not_fit_with_its_message_gives_way(chat: ChatService, seeing: Engine, settings: Settings) -> None:
    text = "This sentence repeats to fill the window. " * 40
    text_only = await prompt(seeing, text)  # the same system prompt as the test settings'
    chat.settings = make_settings(settings.database_path.parent, n_predict=N_CTX - text_only.n_tokens - 4)  # room for the text, not its image
    message_id = await chat.receive(UserMessage("dm:tight", text, author_name="Ann"))
    assert message_id is not None
    await chat.add_images(message_id, [ImageInput("tight.png", picture(31))])
    answer = await chat.answer("dm:tight", message_id)
    assert answer is not None
    assert answer.prompt.images_cut and IMAGES_CUT_NOTE in answer.notes
    assert answer.prompt.n_images == 0 and not answer.prompt.cut  # the text is whole
    assert answer.prompt.messages[-1].content.startswith("[image] This sentence")
    answer.stop()  # (its length limit is what room the text left: hundreds of tokens)
    await answer.text()
    await answer.save()


async def _stored(chat: ChatService, i: int):  # noqa: ANN202
    from bot.conversations import images as pictures

    return pictures.prepare(ImageInput(f"p{i}.png", picture(100 + i)), max_kb=10240, max_pixels=1 << 20)[0]


# --- the remote backend ------------------------------------------------------------------------


async def test_remote_chat_sends_images_as_content_parts(tmp_path: Path) -> None:
    async with ScriptedServer([chat_reply("A ", "picture.")]) as server:
        settings = make_settings(tmp_path, backend="openai", openai_base_url=server.base, n_ctx=2048)
        backend = await RemoteBackend.connect(settings)
        try:
            async with await Store.open(settings.database_path) as store:
                chat = ChatService(backend, store, settings)
                assert chat.can_see
                message_id = await chat.receive(UserMessage("dm:remote", "What is it?", author_name="Ann"))
                assert message_id is not None
                await chat.add_images(message_id, [ImageInput("r.png", picture(41))])
                answer = await chat.answer("dm:remote", message_id)
                assert answer is not None and await answer.text() == "A picture."
                await answer.save()
        finally:
            await backend.close()
        [request] = server.completions
    user = request.body["messages"][-1]
    assert user["role"] == "user"
    image_part, text_part = user["content"]
    assert image_part["type"] == "image_url"
    head, _, b64 = image_part["image_url"]["url"].partition(",")
    assert head == "data:image/png;base64" and base64.b64decode(b64) == picture(41)
    assert text_part == {"type": "text", "text": "What is it?"}


async def test_remote_refusal_gets_a_note_and_the_text_is_answered(tmp_path: Path) -> None:
    refusal = Step(status=400, text='{"error": {"message": "image input is not supported"}}', headers={"Content-Type": "application/json"})
    async with ScriptedServer([refusal, chat_reply("Hello.")]) as server:
        settings = make_settings(tmp_path, backend="openai", openai_base_url=server.base, n_ctx=2048)
        backend = await RemoteBackend.connect(settings)
        try:
            async with await Store.open(settings.database_path) as store:
                chat = ChatService(backend, store, settings)
                message_id = await chat.receive(UserMessage("dm:refuse", "Say hello.", author_name="Ann"))
                assert message_id is not None
                await chat.add_images(message_id, [ImageInput("r.png", picture(42))])
                answer = await chat.answer("dm:refuse", message_id)
                assert answer is not None and await answer.text() == "Hello."
                assert answer.notes == [IMAGES_REFUSED_NOTE.format(why="HTTP 400")]
                await answer.save()
                assert not chat.can_see and "refused" in (chat.image_note() or "")  # not sent again
        finally:
            await backend.close()
        first, second = server.completions
    assert isinstance(first.body["messages"][-1]["content"], list)
    assert second.body["messages"][-1]["content"] == "[image] Say hello."


async def test_remote_completions_mode_sends_no_images(tmp_path: Path) -> None:
    async with ScriptedServer([chat_reply("x")]) as server:
        settings = make_settings(tmp_path, backend="openai", openai_base_url=server.base, openai_mode="completions", n_ctx=2048)
        backend = await RemoteBackend.connect(settings)
        try:
            async with await Store.open(settings.database_path) as store:
                chat = ChatService(backend, store, settings)
                assert not chat.can_see and "completions" in (chat.image_note() or "")
                message_id = await chat.receive(UserMessage("dm:c", "hi", author_name="Ann"))
                assert message_id is not None
                assert await chat.add_images(message_id, [ImageInput("c.png", picture(43))]) == [chat.image_note()]
        finally:
            await backend.close()


# --- the terminal ----------------------------------------------------------------------------


def test_terminal_image_command(projector: Path, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(picture(51))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    db = tmp_path / "chat.sqlite3"
    script = "/image cat.png What is this?\n/image bad.png\n/image missing.png\n"
    result = run_cli("chat", "--db", str(db), "--mmproj", str(projector), "--n-predict", "12", "--ctx-size", "1024",
                     stdin=script, cwd=tmp_path, env={"TEMPERATURE": "0"})
    assert result.returncode == 0, result.stderr
    assert "[INFO] Images: this model can see them" in result.stderr
    out = result.stdout
    assert "[USER]:\n/image cat.png What is this?\n[ASSISTANT]:\n" in out
    assert "[INFO] I could not look at bad.png" in out
    assert "[ERROR] Cannot read missing.png" in out
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT m.role, m.content, m.status, i.name FROM messages m LEFT JOIN message_images i ON i.message_id = m.id ORDER BY m.id").fetchall()
    assert rows[:2] == [("user", "What is this?", "ok", "cat.png"), ("assistant", rows[1][1], "ok", None)]
    assert rows[1][1].strip()


def test_terminal_without_projector_says_so(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(picture(52))
    result = run_cli("chat", "--db", str(tmp_path / "c.sqlite3"), "--n-predict", "8", stdin="/image cat.png\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[INFO] Images: this model cannot see images" in result.stderr and "MMPROJ_PATH" in result.stderr
    assert "[INFO] I can't see images: this model cannot see images" in result.stdout


def test_a_missing_or_wrong_projector_is_one_line(tmp_path: Path) -> None:
    missing = run_cli("chat", "--mmproj", str(tmp_path / "nope.gguf"), stdin="", cwd=tmp_path)
    assert missing.returncode == 2 and "MMPROJ_PATH" in missing.stderr and "Traceback" not in missing.stderr
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(bundled_model_path().read_bytes()[: 1 << 20])  # a GGUF, but no projector
    result = run_cli("chat", "--mmproj", str(wrong), stdin="", cwd=tmp_path)
    assert result.returncode == 2 and "projector" in result.stderr and "Traceback" not in result.stderr


def test_image_settings_are_checked(tmp_path: Path) -> None:
    from bot.config import ConfigError, load_settings

    settings = load_settings({"IMAGE_MAX_KB": "2048", "IMAGE_MAX_PIXELS": "500000", "MMPROJ_PATH": str(bundled_model_path())})
    assert (settings.image_max_kb, settings.image_max_pixels, settings.mmproj_path) == (2048, 500_000, bundled_model_path())
    for name, value in (("IMAGE_MAX_KB", "-1"), ("IMAGE_MAX_PIXELS", "10"), ("MMPROJ_PATH", str(tmp_path / "none.gguf"))):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})
