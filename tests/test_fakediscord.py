"""Self-test of tests/fakediscord.py: drives a bare discord.py client (not our bot) through the fake.

Run: python -m pytest tests/test_fakediscord.py -q -o asyncio_mode=auto -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

try:
    from fakediscord import FakeDiscord, Interaction, Permissions
except ImportError:  # when tests/ is imported as a package
    from tests.fakediscord import FakeDiscord, Interaction, Permissions  # type: ignore[no-redef]

pytestmark = pytest.mark.asyncio

FAST: dict[str, Any] = {"guild_ready_timeout": 0.1}  # discord.py waits this long after the last GUILD_CREATE


class TinyBot(commands.Bot):
    """A bare discord.py bot with a few message reactions and two app commands."""

    def __init__(self, *, guild_id: int | None = None, intents: discord.Intents | None = None) -> None:
        if intents is None:
            intents = discord.Intents.default()
            intents.message_content = True
        super().__init__(command_prefix="!", intents=intents, **FAST)
        self.sync_guild_id = guild_id
        self.received: list[discord.Message] = []
        self.edits: list[tuple[discord.Message, discord.Message]] = []
        self.deleted: list[discord.Message] = []
        self.errors: list[BaseException] = []

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None  # discord.py sleeps 5 s before a re-IDENTIFY; not needed against the fake

    async def setup_hook(self) -> None:
        @self.tree.command(description="Echo text back, privately")
        async def echo(interaction: discord.Interaction, text: str) -> None:
            await interaction.response.send_message(text, ephemeral=True)

        @self.tree.command(description="Think, then answer")
        async def slow(interaction: discord.Interaction, who: discord.Member) -> None:
            await interaction.response.defer(thinking=True)
            await asyncio.sleep(0.05)
            await interaction.followup.send(f"done for {who.display_name}")

        await self.tree.sync()
        if self.sync_guild_id is not None:
            guild = discord.Object(self.sync_guild_id)

            @self.tree.command(description="Guild only", guild=guild)
            async def local(interaction: discord.Interaction, n: int) -> None:
                await interaction.response.send_message(f"n+1={n + 1}")
                await interaction.edit_original_response(content=f"n+1 = {n + 1}")

            await self.tree.sync(guild=guild)

    async def on_message(self, message: discord.Message) -> None:
        self.received.append(message)
        if message.author == self.user:
            return
        try:
            await self.react_to(message)
        except discord.HTTPException as exc:
            self.errors.append(exc)

    async def react_to(self, message: discord.Message) -> None:
        text = message.content
        if text == "ping":
            await message.channel.send(
                f"pong {message.author.mention}", allowed_mentions=discord.AllowedMentions.none()
            )
        elif text == "shout":
            await message.channel.send("@everyone listen")
        elif text == "reply":
            await message.reply("replied", mention_author=False)
        elif text == "react":
            await message.add_reaction("\N{THUMBS UP SIGN}")
        elif text == "unreact" and message.reference and isinstance(message.reference.resolved, discord.Message):
            await message.reference.resolved.remove_reaction("\N{THUMBS UP SIGN}", self.user)  # type: ignore[arg-type]
        elif text == "history":
            older = [m async for m in message.channel.history(limit=3, before=message)]
            fetched = await message.channel.fetch_message(older[-1].id)
            channel = await self.fetch_channel(message.channel.id)
            await message.channel.send(f"{len(older)} {fetched.content} {channel.name}")  # type: ignore[union-attr]
        elif text == "type":
            async with message.channel.typing():
                await message.channel.send("typed")
        elif text == "edit-me":
            sent = await message.channel.send("v1")
            await sent.edit(content="v2")
        elif text == "delete-me":
            sent = await message.channel.send("short-lived")
            await sent.delete()
        elif text == "delete-you":
            await message.delete()
        elif text == "dm":
            await message.author.send("hello in private")
        elif text == "file":
            await message.channel.send("see file", file=discord.File(__file__, filename="x.py"))
        elif text == "too-long":
            await message.channel.send("x" * 2001)
        elif text == "read-attachment" and message.attachments:
            data = await message.attachments[0].read()
            await message.channel.send(f"got {len(data)} bytes")

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        self.edits.append((before, after))

    async def on_message_delete(self, message: discord.Message) -> None:
        self.deleted.append(message)


@pytest_asyncio.fixture
async def fake() -> Any:
    server = FakeDiscord()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
    assert server.unknown_routes == []


@pytest.fixture
def world(fake: FakeDiscord) -> dict[str, Any]:
    guild = fake.add_guild("guild")
    channel = fake.add_channel(guild, "general")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    return {"guild": guild, "channel": channel, "alice": alice}


def ids(messages: list[discord.Message]) -> list[str]:
    return [str(m.id) for m in messages]


# --------------------------------------------------------------------------- login / ready


async def test_login_ready_and_guild_cache(fake: FakeDiscord, world: dict[str, Any]) -> None:
    thread = fake.add_channel(world["guild"], "a-thread", type=11, parent_id=world["channel"]["id"])
    bot = TinyBot()
    async with fake.running(bot):
        assert bot.user is not None and bot.user.id == fake.application_id and bot.user.bot
        assert bot.application_id == fake.application_id
        guild = bot.get_guild(int(world["guild"]["id"]))
        assert guild is not None and guild.name == "guild"
        assert guild.get_channel(int(world["channel"]["id"])).name == "general"  # type: ignore[union-attr]
        assert guild.get_thread(int(thread["id"])).parent_id == int(world["channel"]["id"])  # type: ignore[union-attr]
        assert guild.me is not None and guild.default_role.id == guild.id
        assert not guild.default_role.permissions.manage_messages
        assert fake.identify_count == 1 and fake.connections == 1
        paths = [(r["method"], r["path"]) for r in fake.requests]
        assert ("GET", "/users/@me") in paths and ("GET", "/oauth2/applications/@me") in paths
        assert ("PUT", f"/applications/{fake.application_id}/commands") in paths

        # a channel created while connected arrives as CHANNEL_CREATE
        late = fake.add_channel(world["guild"], "late")
        await fake.wait_for(lambda: guild.get_channel(int(late["id"])))

        # sequence numbers increase within the session
        seqs = [e["s"] for e in fake.events if e["op"] == 0]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # the Content-Type discord.py insists on, and the auth checks
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{fake.api_base}/users/@me", headers={"Authorization": f"Bot {fake.token}"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            async with http.get(f"{fake.api_base}/users/@me", headers={"Authorization": "Bot nope"}) as r:
                assert r.status == 401 and await r.json() == {"message": "401: Unauthorized", "code": 0}
    assert fake.connections == 0


async def test_wrong_token_is_login_failure(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.default(), **FAST)
    with fake.patched():
        async with client:
            with pytest.raises(discord.LoginFailure):
                await client.login("wrong-token")


async def test_unknown_routes_are_recorded(fake: FakeDiscord) -> None:
    headers = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as http, http.get(f"{fake.api_base}/no/such/route", headers=headers) as r:
        assert r.status == 404 and await r.json() == {"message": "404: Not Found", "code": 0}
    assert fake.unknown_routes == ["GET /no/such/route"]
    fake.unknown_routes.clear()  # keep the fixture's final check green


# --------------------------------------------------------------------------- messages


async def test_message_round_trip_and_pings(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        ping = await fake.send_message(chan, alice, "ping")
        [pong] = await fake.wait_for_bot_message(chan, after=ping)
        assert pong["content"] == f"pong <@{alice['id']}>"
        assert pong["_pinged"] == [] and pong["mentions"] == [] and pong["mention_everyone"] is False
        assert fake.requests_to("POST", r"/messages$")[-1]["json"]["allowed_mentions"] == {"parse": []}

        # the bot's own message is echoed back through the gateway, exactly once
        await fake.wait_for(lambda: str(pong["id"]) in ids(bot.received))
        assert ids(bot.received).count(str(pong["id"])) == 1
        assert ids(bot.received).count(str(ping["id"])) == 1

        shout = await fake.send_message(chan, alice, "shout")
        [loud] = await fake.wait_for_bot_message(chan, after=shout)
        assert loud["mention_everyone"] is True and loud["_pinged"] == ["everyone"]

        ask = await fake.send_message(chan, alice, "reply")
        [answer] = await fake.wait_for_bot_message(chan, after=ask)
        assert answer["type"] == 19 and answer["message_reference"]["message_id"] == ask["id"]
        assert answer["referenced_message"]["content"] == "reply" and answer["_pinged"] == []

        # a user message mentioning the bot is parsed into mentions by the client
        hey = await fake.send_message(chan, alice, f"hey <@{fake.bot_user['id']}>")
        await fake.wait_for(lambda: str(hey["id"]) in ids(bot.received))
        assert bot.user in next(m for m in bot.received if str(m.id) == hey["id"]).mentions

        too_long = await fake.send_message(chan, alice, "too-long")
        await fake.wait_for(lambda: bot.errors)
        assert isinstance(bot.errors[0], discord.HTTPException) and bot.errors[0].code == 50035
        assert fake.bot_messages(chan)[-1]["id"] < too_long["id"]


async def test_edit_delete_reactions_typing_files(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        original = await fake.send_message(chan, alice, "typo")
        await fake.wait_for(lambda: str(original["id"]) in ids(bot.received))
        await fake.edit_message(original, "fixed")
        await fake.wait_for(lambda: bot.edits)
        assert bot.edits[0][0].content == "typo" and bot.edits[0][1].content == "fixed"
        await fake.delete_message(original)
        await fake.wait_for(lambda: bot.deleted)
        assert bot.deleted[0].id == int(original["id"]) and original["id"] not in [m["id"] for m in fake.messages(chan)]

        trigger = await fake.send_message(chan, alice, "edit-me")
        [mine] = await fake.wait_for_bot_message(chan, after=trigger)
        await fake.wait_for(lambda: mine["content"] == "v2")
        assert len(mine["_edits"]) == 1 and mine["edited_timestamp"] is not None
        await fake.wait_for(lambda: any(after.content == "v2" for _, after in bot.edits))

        trigger = await fake.send_message(chan, alice, "delete-me")
        await fake.wait_for(lambda: fake.requests_to("DELETE", r"/messages/\d+$"))
        assert fake.bot_messages(chan)[-1]["id"] < trigger["id"]

        # deleting someone else's message needs MANAGE_MESSAGES
        victim = await fake.send_message(chan, alice, "delete-you")
        await fake.wait_for(lambda: bot.errors)
        assert isinstance(bot.errors[0], discord.Forbidden)
        mods = fake.add_role(guild, "mods", permissions=Permissions.MANAGE_MESSAGES)
        fake.add_member(guild, fake.bot_user, roles=[mods])
        me = bot.get_guild(int(guild["id"])).me  # type: ignore[union-attr]
        await fake.wait_for(lambda: me.guild_permissions.manage_messages)  # reaches the client without GUILD_MEMBERS
        again = await fake.send_message(chan, alice, "delete-you")
        await fake.wait_for(lambda: fake.message(again["id"]) is None)
        assert fake.message(victim["id"]) is not None

        react = await fake.send_message(chan, alice, "react")
        await fake.wait_for(lambda: fake.reactions.get((chan["id"], react["id"])))
        assert fake.reactions[(chan["id"], react["id"])] == ["\N{THUMBS UP SIGN}"]
        await fake.add_reaction(react, alice, "\N{THUMBS UP SIGN}")  # user-side reactions exist too
        assert react["reactions"][0]["count"] == 2 and react["reactions"][0]["me"] is True
        await fake.send_message(chan, alice, "unreact", reply_to=react)
        await fake.wait_for(lambda: fake.reactions[(chan["id"], react["id"])] == [])
        assert react["reactions"][0]["count"] == 1 and react["reactions"][0]["me"] is False

        t = await fake.send_message(chan, alice, "type")
        await fake.wait_for_bot_message(chan, after=t)
        assert fake.typing and fake.typing[-1][0] == chan["id"]

        f = await fake.send_message(chan, alice, "file")
        [with_file] = await fake.wait_for_bot_message(chan, after=f)
        assert with_file["attachments"][0]["filename"] == "x.py" and with_file["attachments"][0]["size"] > 0
        assert fake.requests_to("POST", r"/messages$")[-1]["json"]["content"] == "see file"

        up = await fake.send_message(
            chan, alice, "read-attachment", attachments=[{"filename": "a.txt", "data": b"12345"}]
        )
        [got] = await fake.wait_for_bot_message(chan, after=up)
        assert got["content"] == "got 5 bytes"


async def test_history_fetch_and_subcommands(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    for text in ("one", "two", "three", "four"):
        await fake.send_message(chan, alice, text)
    bot = TinyBot()

    group = app_commands.Group(name="cfg", description="Configuration")

    @group.command(description="Set a value")
    async def set(interaction: discord.Interaction, key: str, value: float = 1.5) -> None:
        await interaction.response.send_message(f"{key}={value}")

    bot.tree.add_command(group)
    async with fake.running(bot):
        trigger = await fake.send_message(chan, alice, "history")
        [answer] = await fake.wait_for_bot_message(chan, after=trigger)
        assert answer["content"] == "3 two general"
        history = fake.requests_to("GET", r"/messages$")
        assert history[0]["query"]["limit"] == "3" and history[0]["query"]["before"] == trigger["id"]

        await bot.tree.sync()
        it = await fake.invoke_command("cfg set", user=alice, channel=chan, options={"key": "k", "value": 2})
        await it.wait_done(5)
        assert it.content == "k=2.0" and not it.ephemeral
        assert it.payload["data"]["options"][0]["type"] == 1

        with pytest.raises(TimeoutError, match="never"):
            await fake.wait_for(lambda: False, 0.05, description="never")


async def test_dm_round_trip(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        await fake.send_message(chan, alice, "dm")
        dm = fake.dm_channel(alice)
        [hello] = await fake.wait_for_bot_message(dm)
        assert hello["content"] == "hello in private" and "guild_id" not in hello
        assert fake.requests_to("POST", r"^/users/@me/channels$")
        ping = await fake.send_message(dm, alice, "ping")
        [pong] = await fake.wait_for_bot_message(dm, after=ping)
        assert pong["content"].startswith("pong")


async def test_without_message_content_intent_content_is_stripped(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot(intents=discord.Intents.default())
    async with fake.running(bot):
        plain = await fake.send_message(chan, alice, "ping")
        mention = await fake.send_message(chan, alice, f"<@{fake.bot_user['id']}> ping")
        await fake.wait_for(lambda: str(mention["id"]) in ids(bot.received))
        got = {str(m.id): m.content for m in bot.received}
        assert got[plain["id"]] == "" and got[mention["id"]] == mention["content"]


async def test_catch_up_history_after_an_id(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    # Nobody is connected: messages (and a thread) are stored, nobody is notified.
    posted = [await fake.send_message(chan, alice, f"m{i}") for i in range(130)]
    dm = fake.dm_channel(alice)
    dms = [await fake.send_message(dm, alice, f"d{i}") for i in range(5)]
    thread = await fake.start_thread(chan, alice, "while you were away", message=posted[0])
    in_thread = [await fake.send_message(thread, alice, f"t{i}") for i in range(4)]
    assert fake.events == [] and fake.connections == 0
    assert [m["content"] for m in fake.messages(chan)] == [f"m{i}" for i in range(130)]

    bot = TinyBot()
    async with fake.running(bot):
        channel = bot.get_channel(int(chan["id"]))
        assert isinstance(channel, discord.TextChannel)
        after = discord.Object(int(posted[9]["id"]))
        got = [m async for m in channel.history(after=after, oldest_first=True, limit=50)]
        assert [str(m.id) for m in got] == [m["id"] for m in posted[10:60]]
        # More than one page (Discord's maximum is 100 per request): still exactly the later ones, in order.
        before_requests = len(fake.requests_to("GET", rf"^/channels/{chan['id']}/messages$"))
        after = discord.Object(int(posted[4]["id"]))
        everything = [m async for m in channel.history(after=after, oldest_first=True, limit=None)]
        assert [m.content for m in everything] == [f"m{i}" for i in range(5, 130)]
        pages = fake.requests_to("GET", rf"^/channels/{chan['id']}/messages$")[before_requests:]
        assert len(pages) >= 2 and all("after" in r["query"] and int(r["query"]["limit"]) <= 100 for r in pages)

        user = await bot.fetch_user(int(alice["id"]))
        dm_channel = await user.create_dm()
        assert dm_channel.id == int(dm["id"])
        after = discord.Object(int(dms[1]["id"]))
        got = [m async for m in dm_channel.history(after=after, oldest_first=True, limit=10)]
        assert [m.content for m in got] == ["d2", "d3", "d4"]

        cached = bot.get_guild(int(guild["id"])).get_thread(int(thread["id"]))  # type: ignore[union-attr]
        assert cached is not None  # known from GUILD_CREATE's "threads"
        after = discord.Object(int(in_thread[0]["id"]))
        got = [m async for m in cached.history(after=after, oldest_first=True, limit=2)]
        assert [m.content for m in got] == ["t1", "t2"] and all(m.channel.id == cached.id for m in got)
        [first] = [m async for m in cached.history(oldest_first=True, limit=1)]
        assert first.type is discord.MessageType.thread_starter_message
        assert first.reference is not None and first.reference.message_id == int(posted[0]["id"])

        # Old messages are not replayed as new ones to a client that connects later.
        assert not [e for e in fake.events if e["t"] == "MESSAGE_CREATE"] and bot.received == []


# --------------------------------------------------------------------------- interactions


async def test_slash_commands(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    bot = TinyBot(guild_id=int(guild["id"]))
    async with fake.running(bot):
        assert {c["name"] for c in fake.commands["global"]} == {"echo", "slow"}
        assert [c["name"] for c in fake.commands[guild["id"]]] == ["local"]
        [echo_def] = [c for c in fake.commands["global"] if c["name"] == "echo"]
        option = echo_def["options"][0]
        assert (option["type"], option["name"], option["required"]) == (3, "text", True)

        echo = await fake.invoke_command("echo", user=alice, channel=chan, options={"text": "secret"})
        await echo.wait_done(5)
        assert echo.ephemeral and echo.content == "secret" and echo.responses[0]["type"] == 4
        assert echo.latency is not None and echo.latency < 3
        assert all(m["content"] != "secret" for m in fake.messages(chan))  # ephemeral: not in the channel

        slow = await fake.invoke_command("slow", user=alice, channel=chan, options={"who": alice})
        await slow.wait_done(5)
        assert slow.deferred and not slow.ephemeral and slow.content == "done for alice"
        assert [r["type"] for r in slow.responses] == [5]
        assert slow.original is not None and slow.original in fake.bot_messages(chan)
        assert slow.original["interaction_metadata"]["name"] == "slow"
        await fake.wait_for(lambda: any(a.content == "done for alice" for _, a in bot.edits))

        local = await fake.invoke_command("local", user=alice, channel=chan, options={"n": "41"})
        await local.wait_done(5)
        await fake.wait_for(lambda: local.content == "n+1 = 42")
        assert local.original is not None and len(local.original["_edits"]) == 1
        assert local.payload["data"]["guild_id"] == guild["id"]
        assert local.errors == [] and echo.errors == [] and slow.errors == []

        with pytest.raises(LookupError):
            await fake.invoke_command("nope", user=alice, channel=chan)


async def test_late_interaction_ack_is_rejected(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    fake.interaction_ack_timeout = 0.0  # every callback is "too late"
    bot = TinyBot()
    async with fake.running(bot):
        it = await fake.invoke_command("echo", user=alice, channel=chan, options={"text": "x"})
        await fake.wait_for(lambda: it.errors)
        assert "callback" in it.errors[0] and not it.done and isinstance(it, Interaction)


# --------------------------------------------------------------------------- message components


class Panel(discord.ui.View):
    """A persistent view: no timeout, every button has a custom_id."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Again", style=discord.ButtonStyle.primary, custom_id="panel:again")
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button[Panel]) -> None:
        where = type(interaction.channel).__name__
        await interaction.response.send_message(f"again by {interaction.user.name} in {where}", ephemeral=True)

    @discord.ui.button(label="Later", style=discord.ButtonStyle.secondary, custom_id="panel:later")
    async def later(self, interaction: discord.Interaction, button: discord.ui.Button[Panel]) -> None:
        await interaction.response.defer()  # type 6 on a component
        await interaction.edit_original_response(content="later done")
        await interaction.followup.send("and a followup")

    @discord.ui.button(label="Stop", style=discord.ButtonStyle.danger, custom_id="panel:stop")
    async def stop_(self, interaction: discord.Interaction, button: discord.ui.Button[Panel]) -> None:
        await interaction.response.edit_message(content="stopped", view=None)  # type 7, components removed

    @discord.ui.button(label="Off", custom_id="panel:off", disabled=True)
    async def off(self, interaction: discord.Interaction, button: discord.ui.Button[Panel]) -> None:
        raise AssertionError("a disabled button cannot be pressed")


class PanelBot(TinyBot):
    """Registers the persistent Panel at start, as a bot must to serve buttons after a restart."""

    async def setup_hook(self) -> None:
        await super().setup_hook()
        self.add_view(Panel())

    async def react_to(self, message: discord.Message) -> None:
        if message.content == "panel":
            await message.channel.send("choose", view=Panel())
        elif message.content == "unpanel" and message.reference and message.reference.message_id:
            panel = await message.channel.fetch_message(message.reference.message_id)
            await panel.edit(content="no buttons", view=None)
        else:
            await super().react_to(message)


async def test_persistent_view_buttons_survive_a_client_restart(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    async with fake.running(PanelBot()):
        trigger = await fake.send_message(chan, alice, "panel")
        [panel] = await fake.wait_for_bot_message(chan, after=trigger)
        [row] = panel["components"]
        assert row["type"] == 1
        buttons = [(b["type"], b["custom_id"], b["style"], b["label"], b.get("disabled")) for b in row["components"]]
        assert buttons == [
            (2, "panel:again", 1, "Again", False),
            (2, "panel:later", 2, "Later", False),
            (2, "panel:stop", 4, "Stop", False),
            (2, "panel:off", 2, "Off", True),
        ]
        ids = [row["id"]] + [b["id"] for b in row["components"]]
        assert len(set(ids)) == 5 and all(isinstance(i, int) and i > 0 for i in ids)  # Discord numbers components

        again = await fake.press_button(panel, "panel:again", alice)
        await again.wait_done(5)
        assert again.response_types == [4] and again.ephemeral and again.errors == []
        assert again.content == "again by alice in TextChannel"
        payload = again.payload
        assert payload["type"] == 3 and payload["data"]["custom_id"] == "panel:again"
        assert payload["data"]["component_type"] == 2 and payload["message"]["id"] == panel["id"]
        assert payload["member"]["user"]["id"] == alice["id"] and "user" not in payload
        assert int(payload["member"]["permissions"]) == fake.permissions_of(guild, alice)
        assert payload["guild_id"] == guild["id"] and payload["channel_id"] == chan["id"] and payload["version"] == 1
        answer = again.original
        assert answer is not None and answer["message_reference"]["message_id"] == panel["id"]
        assert answer["interaction_metadata"]["type"] == 3
        assert answer["interaction_metadata"]["interacted_message_id"] == panel["id"]
        assert all(m["id"] != answer["id"] for m in fake.messages(chan))  # ephemeral: not in the channel

        with pytest.raises(ValueError, match="disabled"):
            await fake.press_button(panel, "panel:off", alice)
        with pytest.raises(ValueError, match="no button"):
            await fake.press_button(panel, "panel:nope", alice)

    # A new client instance against the same fake: the persistent view still answers.
    restarted = PanelBot()
    async with fake.running(restarted):
        assert fake.identify_count == 2
        later = await fake.press_button(panel, "panel:later", alice)
        await fake.wait_for(lambda: panel["content"] == "later done" and later.followups)
        assert later.response_types == [6] and later.deferred and later.errors == []
        [followup] = later.followups
        assert followup["content"] == "and a followup" and followup in fake.messages(chan)
        assert followup["message_reference"]["message_id"] == panel["id"]
        assert panel["components"] == [row]  # the edit of @original left the buttons alone

        stop = await fake.press_button(panel, "panel:stop", alice)
        await fake.wait_for(lambda: panel["components"] == [])
        assert stop.response_types == [7] and stop.errors == [] and stop.content == "stopped"
        assert panel["content"] == "stopped"
        await fake.wait_for(
            lambda: any(
                e["t"] == "MESSAGE_UPDATE" and e["d"]["id"] == panel["id"] and e["d"]["content"] == "stopped"
                for e in fake.events
            )
        )
        with pytest.raises(ValueError, match="no button"):
            await fake.press_button(panel, "panel:stop", alice)
        # the @original edit (webhook PATCH) and the type 7 update are bot edits in the channel
        assert [e["via"] for e in fake.edit_log] == ["webhook", "update"]
        assert restarted.errors == []


async def test_component_edits_dms_and_late_acks(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = PanelBot()
    async with fake.running(bot):
        trigger = await fake.send_message(chan, alice, "panel")
        [panel] = await fake.wait_for_bot_message(chan, after=trigger)
        # A REST edit with view=None sends components: [] and removes the buttons.
        await fake.send_message(chan, alice, "unpanel", reply_to=panel)
        await fake.wait_for(lambda: panel["content"] == "no buttons")
        assert panel["components"] == []
        assert fake.requests_to("PATCH", r"/messages/\d+$")[-1]["json"]["components"] == []

        dm = fake.dm_channel(alice)
        trigger = await fake.send_message(dm, alice, "panel")
        [dm_panel] = await fake.wait_for_bot_message(dm, after=trigger)
        it = await fake.press_button(dm_panel, "panel:again", alice)
        await it.wait_done(5)
        assert it.content == "again by alice in DMChannel"
        assert it.payload["user"]["id"] == alice["id"] and "member" not in it.payload and "guild_id" not in it.payload

        # Discord's components checks: duplicated custom ids are refused.
        channel = bot.get_channel(int(chan["id"]))
        assert isinstance(channel, discord.TextChannel)
        twice = discord.ui.View()
        twice.add_item(discord.ui.Button(label="a", custom_id="same"))
        twice.add_item(discord.ui.Button(label="b", custom_id="same"))
        with pytest.raises(discord.HTTPException) as refused:
            await channel.send("dupes", view=twice)
        assert refused.value.code == 50035 and "In components.0.components.1.custom_id" in refused.value.text

        fake.interaction_ack_timeout = 0.0  # every callback is now "too late"
        trigger = await fake.send_message(chan, alice, "panel")
        [fresh] = await fake.wait_for_bot_message(chan, after=trigger)
        late = await fake.press_button(fresh, "panel:stop", alice)
        await fake.wait_for(lambda: late.errors)
        assert "callback" in late.errors[0] and not late.done and fresh["content"] == "choose"


# --------------------------------------------------------------------------- threads


class ThreadBot(TinyBot):
    """Opens threads on request and answers inside them (TinyBot's "ping" works in threads too)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads_created: list[discord.Thread] = []

    async def on_thread_create(self, thread: discord.Thread) -> None:
        self.threads_created.append(thread)

    async def react_to(self, message: discord.Message) -> None:
        if message.content == "thread":
            thread = await message.create_thread(name="about that", auto_archive_duration=60)
            await thread.send("inside the thread")
        elif message.content == "private" and isinstance(message.channel, discord.TextChannel):
            thread = await message.channel.create_thread(name="just us", type=discord.ChannelType.private_thread)
            await thread.send("psst")
        elif message.content == "where":
            channel = message.channel
            parent = channel.parent_id if isinstance(channel, discord.Thread) else None
            await channel.send(f"{type(channel).__name__} parent={parent}")
        else:
            await super().react_to(message)


async def test_threads_from_messages_and_without(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    bot = ThreadBot()
    async with fake.running(bot):
        trigger = await fake.send_message(chan, alice, "thread")
        await fake.wait_for(lambda: fake.threads_of(chan) and fake.bot_messages(fake.threads_of(chan)[0]))
        [thread] = fake.threads_of(chan)
        assert thread["id"] == trigger["id"]  # a thread started from a message has the message's id
        assert (thread["type"], thread["parent_id"], thread["owner_id"]) == (11, chan["id"], fake.bot_user["id"])
        assert thread["name"] == "about that" and thread["thread_metadata"]["auto_archive_duration"] == 60
        assert fake.requests_to("POST", rf"^/channels/{chan['id']}/messages/{trigger['id']}/threads$")
        assert trigger["flags"] & (1 << 5) and trigger["thread"]["id"] == thread["id"]  # HAS_THREAD

        # the thread begins with a THREAD_STARTER_MESSAGE pointing at the message, then the bot's post
        starter, posted = fake.messages(thread)
        assert starter["type"] == 21 and starter["message_reference"]["message_id"] == trigger["id"]
        assert posted["content"] == "inside the thread" and posted["channel_id"] == thread["id"]
        assert thread["message_count"] == 1 and thread["last_message_id"] == posted["id"]

        create = next(e for e in fake.events if e["t"] == "THREAD_CREATE")
        assert create["d"]["newly_created"] is True and create["d"]["id"] == thread["id"]
        update = next(e for e in fake.events if e["t"] == "MESSAGE_UPDATE" and e["d"]["id"] == trigger["id"])
        assert update["d"]["thread"]["id"] == thread["id"] and fake.events.index(update) > fake.events.index(create)

        # discord.py's cache knows the thread, and its messages arrive as messages in the thread
        cached = bot.get_guild(int(guild["id"])).get_thread(int(thread["id"]))  # type: ignore[union-attr]
        assert isinstance(cached, discord.Thread) and cached.parent_id == int(chan["id"])
        assert [t.id for t in bot.threads_created] == [int(thread["id"])]
        ask = await fake.send_message(thread, alice, "where")
        [answer] = await fake.wait_for_bot_message(thread, after=ask)
        assert answer["content"] == f"Thread parent={chan['id']}"
        received = next(m for m in bot.received if m.id == int(ask["id"]))
        assert isinstance(received.channel, discord.Thread) and received.channel.parent_id == int(chan["id"])

        # a second thread from the same message is refused, as on Discord
        channel = bot.get_channel(int(chan["id"]))
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as again:
            await channel.get_partial_message(int(trigger["id"])).create_thread(name="again")
        assert again.value.code == 160004

        # without a message: a private thread (type 12)
        trigger = await fake.send_message(chan, alice, "private")
        await fake.wait_for(lambda: len(fake.threads_of(chan)) == 2 and fake.bot_messages(fake.threads_of(chan)[1]))
        private = fake.threads_of(chan)[1]
        assert private["type"] == 12 and private["thread_metadata"]["invitable"] is True
        assert private["id"] != trigger["id"] and not trigger["flags"] & (1 << 5)
        assert [m["content"] for m in fake.messages(private)] == ["psst"]

        # a user's thread: the bot is told (THREAD_CREATE) and answers in it
        users = await fake.start_thread(chan, alice, "alice's corner")
        await fake.wait_for(lambda: len(bot.threads_created) == 3)
        assert users["owner_id"] == alice["id"] and fake.threads_of(chan)[-1] is users
        ping = await fake.send_message(users, alice, "ping")
        [pong] = await fake.wait_for_bot_message(users, after=ping)
        assert pong["content"].startswith("pong") and bot.errors == []


async def test_thread_names_and_permissions(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan = world["guild"], world["channel"]
    bot = ThreadBot()
    async with fake.running(bot):
        channel = bot.get_channel(int(chan["id"]))
        assert isinstance(channel, discord.TextChannel)
        for name in ("", "x" * 101):
            with pytest.raises(discord.HTTPException) as bad:
                await channel.create_thread(name=name, type=discord.ChannelType.public_thread)
            assert bad.value.status == 400 and bad.value.code == 50035 and "In name" in bad.value.text
        refused = fake.requests_to("POST", r"/threads$")[-1]
        assert refused["status"] == 400
        assert fake.threads_of(chan) == []

        thread = await channel.create_thread(name="x" * 100, type=discord.ChannelType.public_thread)
        assert thread.name == "x" * 100 and thread.type is discord.ChannelType.public_thread

        # without CREATE_PUBLIC_THREADS / SEND_MESSAGES_IN_THREADS the bot is refused
        taken = Permissions.CREATE_PUBLIC_THREADS | Permissions.SEND_MESSAGES_IN_THREADS
        fake.set_role_permissions(guild, guild, Permissions.DEFAULT_EVERYONE & ~taken)
        me = bot.get_guild(int(guild["id"])).me  # type: ignore[union-attr]
        await fake.wait_for(lambda: not me.guild_permissions.create_public_threads)
        with pytest.raises(discord.Forbidden):
            await channel.create_thread(name="no", type=discord.ChannelType.public_thread)
        with pytest.raises(discord.Forbidden):
            await thread.send("no")
        assert await channel.send("the channel itself still works")
        assert len(fake.threads_of(chan)) == 1 and fake.bot_messages(thread.id) == []


# --------------------------------------------------------------------------- edit rate


class EditorBot(TinyBot):
    """Edits one message six times in a row, as a bot streaming a reply might."""

    async def react_to(self, message: discord.Message) -> None:
        if message.content == "burst":
            sent = await message.channel.send("0")
            for i in range(1, 7):
                await sent.edit(content=str(i))
        else:
            await super().react_to(message)


async def test_max_edits_in_window_slides_over_recorded_times() -> None:
    fake = FakeDiscord()
    bot_id = fake.bot_user["id"]
    for t in (0.0, 1.0, 2.0, 6.0, 6.5, 7.0, 7.2):
        fake.edit_log.append({"time": t, "channel_id": "1", "message_id": "9", "editor_id": bot_id, "via": "rest"})
    fake.edit_log.append({"time": 6.1, "channel_id": "2", "message_id": "8", "editor_id": bot_id, "via": "rest"})
    assert fake.max_edits_in_window("1", 5.0) == 4  # 6.0, 6.5, 7.0, 7.2
    assert fake.max_edits_in_window("1", 1.0) == 3  # 6.5, 7.0, 7.2
    assert fake.max_edits_in_window("1", 6.0) == 5  # 2.0 .. 7.2
    assert fake.max_edits_in_window("2", 5.0) == 1 and fake.max_edits_in_window("3") == 0


async def test_edit_accounting_and_enforced_edit_rate(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = EditorBot()
    async with fake.running(bot):
        trigger = await fake.send_message(chan, alice, "burst")
        [sent] = await fake.wait_for_bot_message(chan, after=trigger)
        await fake.wait_for(lambda: sent["content"] == "6")
        assert len(sent["_edits"]) == 6 and fake.max_edits_in_window(chan, 60.0) == 6
        assert fake.max_edits_in_window(chan, 1e-9) == 1
        assert fake.max_edits_in_window(chan, 60.0, author=alice) == 0
        await fake.edit_message(trigger, "burst!")
        assert fake.max_edits_in_window(chan, 60.0, author=alice) == 1
        assert fake.max_edits_in_window(chan, 60.0) == 6

        # With the limit on, the 4th edit inside 0.5 s gets a real 429; discord.py waits and retries.
        fake.edit_rate_limit = (3, 0.5)
        trigger = await fake.send_message(chan, alice, "burst")
        [limited] = await fake.wait_for_bot_message(chan, after=trigger)
        await fake.wait_for(lambda: limited["content"] == "6", 20)
        patches = fake.requests_to("PATCH", rf"^/channels/{chan['id']}/messages/{limited['id']}$")
        statuses = [r["status"] for r in patches]
        assert statuses.count(200) == 6 and 429 in statuses and statuses[-1] == 200
        edit_times = sorted(e["time"] for e in fake.edit_log if e["message_id"] == limited["id"])
        assert len(edit_times) == 6
        assert all(b - a >= 0.5 for a, b in zip(edit_times, edit_times[3:]))  # never 4 within the window
        assert bot.errors == []

        # The 429 as discord.py sees it: JSON body, Via and X-RateLimit-* headers.
        fake.edit_rate_limit = (3, 30.0)  # a wide window: the 4th request is surely inside it
        headers = {"Authorization": f"Bot {fake.token}"}
        url = f"{fake.api_base}/channels/{chan['id']}/messages/{limited['id']}"
        async with aiohttp.ClientSession() as http:
            statuses = []
            for i in range(4):
                async with http.patch(url, json={"content": f"raw {i}"}, headers=headers) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        body, rate_headers = await r.json(), r.headers
        assert statuses[-1] == 429
        assert body["global"] is False and 0 < body["retry_after"] <= 30.1 and body["message"]
        assert rate_headers["Content-Type"] == "application/json" and rate_headers["Via"]
        assert rate_headers["X-RateLimit-Remaining"] == "0" and rate_headers["X-RateLimit-Scope"] == "user"
        assert rate_headers["X-RateLimit-Limit"] == "3" and float(rate_headers["X-RateLimit-Reset-After"]) > 0


class CommandBot(TinyBot):
    """Commands with permission defaults, rich (embed + file) answers, and one reporting its channel."""

    async def setup_hook(self) -> None:
        @self.tree.command(description="Moderators only")
        @app_commands.guild_only()
        @app_commands.default_permissions(manage_messages=True)
        async def purge(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("purged", ephemeral=True)

        @self.tree.command(description="Administrators only")
        @app_commands.default_permissions()
        async def shutdown(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("bye")

        @self.tree.command(description="An embed and a file, then more")
        async def report(interaction: discord.Interaction) -> None:
            summary = discord.Embed(title="Summary", description="all good")
            first = discord.File(io.BytesIO(b"first file"), filename="a.txt")
            await interaction.response.send_message("report", embed=summary, file=first, ephemeral=True)
            more = discord.File(io.BytesIO(b"second"), filename="b.log")
            await interaction.followup.send(embeds=[discord.Embed(title="More")], files=[more], ephemeral=True)

        @self.tree.command(description="Where am I")
        async def where(interaction: discord.Interaction) -> None:
            channel = interaction.channel
            parent = channel.parent_id if isinstance(channel, discord.Thread) else None
            await interaction.response.send_message(f"{type(channel).__name__} parent={parent}")

        await super().setup_hook()  # syncs the tree


async def test_command_permissions_rich_answers_and_threads(fake: FakeDiscord, world: dict[str, Any]) -> None:
    guild, chan, alice = world["guild"], world["channel"], world["alice"]
    mod = fake.add_user("mod")
    fake.add_member(guild, mod, roles=[fake.add_role(guild, "mods", permissions=Permissions.MANAGE_MESSAGES)])
    owner = fake.guild_members(guild)[guild["owner_id"]]["user"]
    bot = CommandBot()
    async with fake.running(bot):
        synced = {c["name"]: c for c in fake.commands["global"]}
        purge, shutdown = synced["purge"], synced["shutdown"]
        assert purge["default_member_permissions"] == str(Permissions.MANAGE_MESSAGES)  # a string, as Discord returns
        assert purge["dm_permission"] is False and purge["contexts"] == [0]
        assert shutdown["default_member_permissions"] == "0" and shutdown["dm_permission"] is True
        assert synced["report"]["default_member_permissions"] is None
        fetched = {c.name: c for c in await bot.tree.fetch_commands()}
        assert fetched["purge"].default_member_permissions == discord.Permissions(manage_messages=True)
        assert fetched["purge"].dm_permission is False and fetched["shutdown"].dm_permission is True

        with pytest.raises(PermissionError):
            await fake.invoke_command("purge", user=alice, channel=chan)
        with pytest.raises(PermissionError):
            await fake.invoke_command("purge", user=mod, channel=fake.dm_channel(mod))
        purged = await (await fake.invoke_command("purge", user=mod, channel=chan)).wait_done(5)
        assert purged.content == "purged" and purged.ephemeral
        with pytest.raises(PermissionError):  # "0": administrators only
            await fake.invoke_command("shutdown", user=mod, channel=chan)
        assert (await (await fake.invoke_command("shutdown", user=owner, channel=chan)).wait_done(5)).content == "bye"

        report = await fake.invoke_command("report", user=alice, channel=chan)
        await fake.wait_for(lambda: len(report.visible_messages) == 2)
        assert report.ephemeral and all(m["flags"] & 64 for m in report.visible_messages)
        assert [e["title"] for e in report.embeds] == ["Summary", "More"]
        assert report.embeds[0]["description"] == "all good"
        assert report.files == [("a.txt", b"first file"), ("b.log", b"second")]
        assert all("report" not in m["content"] for m in fake.messages(chan))
        callback = fake.requests_to("POST", r"^/interactions/\d+/[^/]+/callback$")[-1]
        assert callback["files"][0]["field"] == "files[0]" and callback["files"][0]["data"] == b"first file"

        thread = await fake.start_thread(chan, alice, "a thread")
        cache = bot.get_guild(int(guild["id"]))
        assert cache is not None
        await fake.wait_for(lambda: cache.get_thread(int(thread["id"])))
        here = await (await fake.invoke_command("where", user=alice, channel=thread)).wait_done(5)
        assert here.content == f"Thread parent={chan['id']}" and here.payload["channel"]["type"] == 11
        assert here.original in fake.messages(thread) and here.payload["channel_id"] == thread["id"]
        assert bot.errors == []


# --------------------------------------------------------------------------- gateway faults


async def test_reconnect_op7_resumes_without_losing_events(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        await fake.request_reconnect()
        during = await fake.send_message(chan, alice, "sent during the reconnect")
        await fake.wait_for(lambda: fake.resume_count == 1)
        await fake.wait_for(lambda: str(during["id"]) in ids(bot.received))
        after = await fake.send_message(chan, alice, "ping")
        await fake.wait_for_bot_message(chan, after=after)
        await asyncio.sleep(0.1)
        assert ids(bot.received).count(str(during["id"])) == 1
        replayed = [e for e in fake.events if e.get("replay")]
        assert [e["d"]["id"] for e in replayed] == [during["id"]]
        assert fake.identify_count == 1 and fake.connections == 1
        assert any(e["t"] == "RESUMED" for e in fake.events)


async def test_dropped_connection_reconnects(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        await fake.drop_connections(code=4000)
        missed = await fake.send_message(chan, alice, "while disconnected")
        await fake.wait_for(lambda: fake.resume_count == 1 and fake.connections == 1)
        await fake.wait_for(lambda: str(missed["id"]) in ids(bot.received))

        await fake.drop_connections(abrupt=True)
        await fake.wait_for(lambda: fake.resume_count == 2 and fake.connections == 1)

        await fake.invalid_session(resumable=True)
        await fake.wait_for(lambda: fake.resume_count == 3 and fake.connections == 1)
        assert fake.identify_count == 1

        # a non-resumable invalid session makes discord.py IDENTIFY again
        await fake.invalid_session(resumable=False)
        await fake.wait_for(lambda: fake.identify_count == 2)
        await fake.wait_ready()
        ping = await fake.send_message(chan, alice, "ping")
        await fake.wait_for_bot_message(chan, after=ping)
        assert ids(bot.received).count(str(missed["id"])) == 1


async def test_rest_failures_are_retried(fake: FakeDiscord, world: dict[str, Any]) -> None:
    chan, alice = world["channel"], world["alice"]
    bot = TinyBot()
    async with fake.running(bot):
        fake.fail_next("POST", r"^/channels/\d+/messages$", 429, times=2, retry_after=0.05)
        ping = await fake.send_message(chan, alice, "ping")
        [pong] = await fake.wait_for_bot_message(chan, after=ping)
        assert pong["content"].startswith("pong")
        posts = fake.requests_to("POST", r"^/channels/\d+/messages$")
        assert [r["status"] for r in posts] == [429, 429, 200] and fake.injected_failures == 2
        assert len(fake.bot_messages(chan)) == 1

        fake.fail_next("POST", r"^/channels/\d+/messages$", 500)
        ping2 = await fake.send_message(chan, alice, "ping")
        await fake.wait_for_bot_message(chan, after=ping2, timeout=10)
        posts = fake.requests_to("POST", r"^/channels/\d+/messages$")
        assert [r["status"] for r in posts[3:]] == [500, 200] and fake.injected_failures == 3
        assert len(fake.bot_messages(chan)) == 2 and bot.errors == []


# --------------------------------------------------------------------------- sharding / intents


class ShardedClient(discord.AutoShardedClient):
    def __init__(self) -> None:
        super().__init__(intents=discord.Intents.default(), **FAST)
        self.seen: list[tuple[int | None, int]] = []  # (shard id of the message's guild, message id)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append((message.guild.shard_id if message.guild else None, message.id))


async def test_two_shards_each_get_their_guild() -> None:
    async with FakeDiscord(shard_count=2) as fake:
        g0 = fake.add_guild("zero", shard=0)
        g1 = fake.add_guild("one", shard=1)
        c1 = fake.add_channel(g1, "general")
        user = fake.add_user("bob")
        fake.add_member(g1, user)
        client = ShardedClient()
        async with fake.running(client):
            assert client.shard_count == 2 and fake.requests_to("GET", r"^/gateway/bot$")
            assert sorted(p["shard"] for p in fake.identify_payloads) == [[0, 2], [1, 2]]
            assert client.get_guild(int(g0["id"])).shard_id == 0  # type: ignore[union-attr]
            assert client.get_guild(int(g1["id"])).shard_id == 1  # type: ignore[union-attr]
            creates = [(e["shard"], e["d"]["id"]) for e in fake.events if e["t"] == "GUILD_CREATE"]
            assert sorted(creates) == [([0, 2], g0["id"]), ([1, 2], g1["id"])]

            msg = await fake.send_message(c1, user, "hello shard one")
            await fake.wait_for(lambda: client.seen)
            assert client.seen == [(1, int(msg["id"]))]
            assert [e["shard"] for e in fake.events if e["t"] == "MESSAGE_CREATE"] == [[1, 2]]
        assert fake.unknown_routes == []


async def test_refused_privileged_intents_raise(fake: FakeDiscord, world: dict[str, Any]) -> None:
    fake.refuse_privileged_intents = True
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with fake.running(TinyBot()):
            pass
    assert fake.identify_count == 0
