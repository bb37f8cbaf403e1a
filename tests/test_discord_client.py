"""The Discord client (bot/discord_adapter/client.py): several gateway connections (SHARD_COUNT),
each answering its own guilds. On the scripted model (tests/scripted.py)."""

from __future__ import annotations

from pathlib import Path

from bot.conversations.service import ChatService
from bot.conversations.store import Store
from bot.discord_adapter.client import ShardedLlamaBot, create_bot
from tests.conftest import make_settings, rows
from tests.fakediscord import FakeDiscord
from tests.scripted import ScriptedBackend


async def test_two_shards_each_answer_their_guild(scripted: ScriptedBackend, tmp_path: Path) -> None:
    async with FakeDiscord(shard_count=2) as fake:
        ann = fake.add_user("ann")
        guilds = [fake.add_guild(f"shard-{i}", shard=i) for i in range(2)]
        channels = [fake.add_channel(g, "general") for g in guilds]
        for g in guilds:
            fake.add_member(g, ann)
        settings = make_settings(tmp_path, discord_token=fake.token, shard_count=2, stream=False, user_cooldown_s=0.0)
        async with await Store.open(settings.database_path) as store:
            bot = create_bot(settings, ChatService(scripted, store, settings), guild_ready_timeout=0.1)
            assert isinstance(bot, ShardedLlamaBot)
            bot.before_identify_hook = _no_wait  # type: ignore[method-assign]
            async with fake.running(bot):
                for i, channel in enumerate(channels):
                    sent = await fake.send_message(channel, ann, f"<@{fake.bot_user['id']}> My number is {i + 41}.")
                    await fake.wait_for_bot_message(channel, after=sent, timeout=60)
                    await fake.wait_for(lambda: bot.ctx.scheduler.running == 0, 60)
                assert sorted(p["shard"] for p in fake.identify_payloads) == [[0, 2], [1, 2]]
                assert {bot.get_guild(int(g["id"])).shard_id for g in guilds} == {0, 1}
                for i, (g, channel) in enumerate(zip(guilds, channels)):
                    stored = rows(settings.database_path, f"guild:{g['id']}:channel:{channel['id']}")
                    assert [r[2] for r in stored if r[1] == "user"] == [f"My number is {i + 41}."]
                    assert [m["content"] for m in fake.bot_messages(channel)] == [f"You said: My number is {i + 41}."]
                await bot.shutdown(grace=30)


async def _no_wait(shard_id: int | None, *, initial: bool = False) -> None:
    return None
