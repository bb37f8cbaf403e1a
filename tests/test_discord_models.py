"""/model in Discord (bot/discord_adapter/commands.py, replies.py): the real discord.py client
against the local Discord API, on a real pool of the bundled SmolLM2 (the default) and
Gemma 3 270M, each test its own (they load in about a second).

A channel switched to a model that is not loaded sees "Loading model X…", and that note
becomes the reply; a model that cannot load gives a short note there and nowhere else; after
a restart each channel is on the model it chose; in DMs only the bot's owners switch."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import ModelEntry, bundled_model_path
from bot.conversations.service import ChatService
from bot.conversations.store import Store
from bot.discord_adapter.client import LlamaBot
from bot.discord_adapter.commands import NEED_ADMIN, NEED_OWNER
from bot.discord_adapter.replies import LOADING
from bot.engine.pool import ModelPool
from tests.conftest import JSON, World, make_settings, scope
from tests.discord_helpers import ask, command, idle, send
from tests.fakediscord import Interaction
from tests.references import gemma3_model_path
from tests.test_conversations_models import open_pool


@pytest.fixture
def gemma_file() -> Path:
    """Gemma 3 270M (assembled once from its PyPI package into ~/.cache)."""
    return gemma3_model_path()


@contextlib.asynccontextmanager
async def models_bot(world: World, tmp_path: Path, pool: ModelPool, **changes: Any) -> AsyncIterator[LlamaBot]:
    settings = make_settings(tmp_path, discord_token=world.fake.token, n_predict=8, stream=False, **changes)
    async with await Store.open(settings.database_path) as store:
        bot = LlamaBot(settings, ChatService(pool.default_backend, store, settings, pool), guild_ready_timeout=0.1)
        async with world.fake.running(bot):
            try:
                yield bot
            finally:
                await bot.shutdown(grace=30)


async def model(world: World, user: JSON, channel: JSON, name: str | None = None) -> Interaction:
    """/model [name], answered."""
    interaction = await world.fake.invoke_command("model", user=user, channel=channel, options={"name": name} if name else None)
    return await interaction.wait_done(60)


def stored_models(db: Path) -> dict[str, str | None]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT scope, model FROM conversations"))


async def test_model_switches_a_channel_with_a_loading_note_that_becomes_the_reply(world: World, tmp_path: Path, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        async with models_bot(world, tmp_path, pool) as bot:
            [synced] = [c for c in world.fake.commands["global"] if c["name"] == "model"]
            assert synced["options"][0]["name"] == "name" and synced["options"][0]["autocomplete"] is True
            assert synced["default_member_permissions"] is None  # seeing is for everyone; switching is checked by the bot
            cog = bot.get_cog("Commands")
            choices = await cog._model_names(None, "GEM")  # what the autocomplete offers for "GEM"
            assert [c.value for c in choices] == ["gemma"]
            shown = await model(world, world.ann, world.general)
            assert shown.ephemeral and shown.content.startswith("Model here: **smol**\nModels:\n- smol (default): loaded, uses ")
            assert "- gemma: not loaded, needs about " in shown.content
            refused = await model(world, world.ann, world.general, "gemma")
            assert refused.content == NEED_ADMIN.format(name="model")
            unknown = await model(world, world.mod, world.general, "llama-70b")
            assert unknown.content.startswith("There is no model named 'llama-70b'. Available: smol, gemma")
            switched = await model(world, world.mod, world.general, "gemma")
            assert switched.content == "Model here is now **gemma**; the conversation so far stays. It is loaded with the next message here."

            sent = await send(world, world.general, world.ann, "Hello, who are you?")
            await world.fake.wait_for_bot_message(world.general, after=sent, timeout=60)
            await idle(world.fake, bot)
            [reply] = [m for m in world.fake.bot_messages(world.general) if int(m["id"]) > int(sent["id"])]
            assert reply["_first_content"] == LOADING.format(name="gemma")  # posted while gemma loaded...
            assert reply["content"] and reply["content"] != reply["_first_content"]  # ... then it became the reply
            gemma = pool.loaded("gemma")
            assert gemma is not None and bot.ctx.chat.last_replies[scope(world, world.general)].model == "gemma"
            # The other channel stays on the default model, with no note.
            [other] = await ask(world, bot, world.random, world.ann, "Hello, who are you?")
            assert not other["content"].startswith("\u23f3") and bot.ctx.chat.last_replies[scope(world, world.random)].model == "smol"
            status = await command(world, "status", world.ann, world.general)
            [models] = [f["value"] for f in status.embeds[0]["fields"] if f["name"] == "Models"]
            assert "smol (default): loaded" in models and "gemma: loaded" in models
            db = bot.ctx.settings.database_path
        assert stored_models(db) == {scope(world, world.general): "gemma", scope(world, world.random): None}

        # After a restart, each channel is on the model it chose.
        async with models_bot(world, tmp_path, pool) as bot:
            await ask(world, bot, world.general, world.ann, "And again?")
            await ask(world, bot, world.random, world.ann, "And again?")
            assert bot.ctx.chat.last_replies[scope(world, world.general)].model == "gemma"
            assert bot.ctx.chat.last_replies[scope(world, world.random)].model == "smol"
    finally:
        await pool.close()


async def test_a_model_that_cannot_load_gives_a_note_in_its_channel_only(world: World, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    raw = bundled_model_path().read_bytes()
    broken.write_bytes(raw[: len(raw) // 3])
    pool = await open_pool(tmp_path, ModelEntry("broken", broken))
    try:
        async with models_bot(world, tmp_path, pool) as bot:
            await model(world, world.mod, world.general, "broken")
            [note] = await ask(world, bot, world.general, world.ann, "Hello?")
            assert note["content"].startswith("\u26a0\ufe0f Sorry, I could not answer with this channel's model: the model broken could not be loaded:")
            [fine] = await ask(world, bot, world.random, world.ann, "Hello?")
            assert fine["content"] and not fine["content"].startswith("\u26a0")
            with sqlite3.connect(bot.ctx.settings.database_path) as conn:  # the turn is settled: not answered again after a restart
                assert conn.execute("SELECT COUNT(*) FROM messages WHERE status = 'pending'").fetchone() == (0,)
    finally:
        await pool.close()


async def test_in_dms_only_the_owners_switch_the_model(world: World, tmp_path: Path, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        owner_dm = world.fake.dm_channel(world.fake.app_owner)
        async with models_bot(world, tmp_path, pool):
            dm = world.fake.dm_channel(world.ann)
            assert (await model(world, world.ann, dm, "gemma")).content == NEED_OWNER
            assert (await model(world, world.ann, dm)).content.startswith("Model here: **smol**")  # seeing is fine
            done = await model(world, world.fake.app_owner, owner_dm, "gemma")  # the application's owner
            assert done.content.startswith("Model here is now **gemma**")
        async with models_bot(world, tmp_path, pool, owner_ids=frozenset({int(world.ann["id"])})):
            dm = world.fake.dm_channel(world.ann)
            assert (await model(world, world.ann, dm, "gemma")).content.startswith("Model here is now **gemma**")
            refused = await model(world, world.fake.app_owner, owner_dm, "smol")  # OWNER_IDS set: only those
            assert refused.content == NEED_OWNER
    finally:
        await pool.close()


async def test_a_thread_the_bot_starts_takes_its_channels_model(world: World, tmp_path: Path, gemma_file: Path) -> None:
    pool = await open_pool(tmp_path, ModelEntry("gemma", gemma_file))
    try:
        async with models_bot(world, tmp_path, pool) as bot:
            await command(world, "chat", world.mod, world.general, mode="threads")
            await model(world, world.mod, world.general, "gemma")
            sent = await send(world, world.general, world.ann, "Tell me something.")
            [thread] = await world.fake.wait_for(lambda: [t for t in world.fake.threads_of(world.general) if t["id"] == sent["id"]])
            await world.fake.wait_for_bot_message(thread, timeout=60)
            await idle(world.fake, bot)
            thread_scope = f"guild:{world.guild['id']}:channel:{thread['id']}"
            assert bot.ctx.chat.last_replies[thread_scope].model == "gemma"
            assert stored_models(bot.ctx.settings.database_path)[thread_scope] == "gemma"
    finally:
        await pool.close()
