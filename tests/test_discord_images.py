"""Images on Discord: attached to a message, or to the message it replies to, they go into that
message's turn for a model that can see; a picture alone is answered; a model that cannot see
answers the text and says why; a picture too big by its declared size is never downloaded."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

from PIL import Image as Pillow

from tests.conftest import World, mention, rows, scope
from tests.scripted import ScriptedBackend


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30), *, noisy: bool = False) -> bytes:
    out = io.BytesIO()
    picture = Pillow.effect_noise(size, 64).convert("RGB") if noisy else Pillow.new("RGB", size, colour)
    picture.save(out, format="PNG")
    return out.getvalue()


def stored_images(db: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT name, width, height FROM message_images ORDER BY message_id, position").fetchall()


async def test_a_picture_alone_is_answered_with_the_image_in_its_turn(world: World, start_bot, scripted: ScriptedBackend) -> None:
    fake = world.fake
    async with start_bot() as bot:
        sent = await fake.send_message(
            world.general, world.ann, mention(fake), attachments=[{"filename": "cat.png", "data": png((200, 30, 30)), "content_type": "image/png"}]
        )
        [reply] = await fake.wait_for_bot_message(world.general, after=sent, timeout=30)
        db = bot.ctx.settings.database_path
    [call] = scripted.calls
    [image] = call.messages[-1].images
    assert (image.name, image.width, image.height, image.mime) == ("cat.png", 40, 30, "image/png")
    assert reply["content"] == "You said:"  # the scripted echo of an empty text: the turn was answered
    assert stored_images(db) == [("cat.png", 40, 30)]
    assert [r[1] for r in rows(db, scope(world, world.general))] == ["user", "assistant"]


async def test_the_picture_of_the_replied_to_message_joins_the_turn(world: World, start_bot, scripted: ScriptedBackend) -> None:
    fake = world.fake
    async with start_bot() as bot:
        photo = await fake.send_message(
            world.general, world.mod, "our new logo", attachments=[{"filename": "logo.png", "data": png((0, 90, 200)), "content_type": "image/png"}]
        )
        sent = await fake.send_message(world.general, world.ann, f"{mention(fake)} what colour is this?", reply_to=photo)
        await fake.wait_for_bot_message(world.general, after=sent, timeout=30)
        db = bot.ctx.settings.database_path
    [call] = scripted.calls
    assert [i.name for i in call.messages[-1].images] == ["logo.png"] and call.messages[-1].content == "what colour is this?"
    assert stored_images(db) == [("logo.png", 40, 30)]


async def test_a_picture_too_big_by_its_declared_size_is_never_downloaded(world: World, start_bot, scripted: ScriptedBackend) -> None:
    fake = world.fake
    async with start_bot(image_max_kb=1) as bot:  # 1 KB: a picture of noise is more
        data = png((1, 2, 3), size=(100, 100), noisy=True)
        assert len(data) > 1024
        sent = await fake.send_message(
            world.general, world.ann, f"{mention(fake)} look", attachments=[{"filename": "big.png", "data": data, "content_type": "image/png"}]
        )
        [reply] = await fake.wait_for_bot_message(world.general, after=sent, timeout=30)
        db = bot.ctx.settings.database_path
    assert fake.attachment_downloads == 0
    assert reply["content"].startswith("You said: look") and "big.png" in reply["content"]
    assert stored_images(db) == [] and scripted.calls[0].messages[-1].images == ()


async def test_a_model_that_cannot_see_answers_the_text_and_says_why(world: World, start_bot, scripted: ScriptedBackend) -> None:
    scripted.sees = False
    fake = world.fake
    async with start_bot() as bot:
        both = await fake.send_message(
            world.general, world.ann, f"{mention(fake)} hello", attachments=[{"filename": "cat.png", "data": png((9, 9, 9)), "content_type": "image/png"}]
        )
        [reply] = await fake.wait_for_bot_message(world.general, after=both, timeout=30)
        alone = await fake.send_message(
            world.random, world.ann, mention(fake), attachments=[{"filename": "dog.png", "data": png((8, 8, 8)), "content_type": "image/png"}]
        )
        [note] = await fake.wait_for_bot_message(world.random, after=alone, timeout=30)
        status = await fake.invoke_command("status", user=world.ann, channel=world.general)
        await status.wait_done()
        db = bot.ctx.settings.database_path
    assert reply["content"].startswith("You said: hello") and "cat.png" in reply["content"] and "MMPROJ_PATH" in reply["content"]
    assert "dog.png" in note["content"] and "MMPROJ_PATH" in note["content"] and len(scripted.calls) == 1
    assert fake.attachment_downloads == 0 and stored_images(db) == []
    model = next(f["value"] for f in status.embeds[0]["fields"] if f["name"] == "Model")
    assert "sees images: no" in model
