"""The Discord client: the intents, the features wired together, start-up and shutdown.

Each feature is a cog over one shared `BotContext`: `Intake` (messages in), `Buttons`
(Stop, Regenerate, Continue), `Commands` (slash commands), `Recovery` (resume and catch
up after a restart), `Following` (edits and deletes), `Warming` (a head start while someone
types). `Replier` writes the replies.
"""

from __future__ import annotations

import logging


import discord
from discord.ext import commands

from bot.config import Settings
from bot.conversations.service import ChatService
from bot.discord_adapter.access import Access
from bot.discord_adapter.buttons import Buttons
from bot.discord_adapter.commands import Commands
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.following import Following
from bot.discord_adapter.intake import Intake
from bot.discord_adapter.output import NO_PINGS
from bot.discord_adapter.recovery import Recovery
from bot.discord_adapter.replies import Replier
from bot.discord_adapter.views import ReplyButton
from bot.discord_adapter.warming import Warming

log = logging.getLogger(__name__)

# What the invite asks for. Create Public Threads: /chat threads starts a thread for each conversation.
PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, create_public_threads=True, read_message_history=True,
)

discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # a text bot: no voice warnings


def intents(typing: bool = False) -> discord.Intents:
    """Guilds, guild and DM messages, and Message Content (privileged: turned on in the Developer
    Portal); with `typing` (WARM_ON_TYPING), who starts typing (not privileged)."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True
    wanted.guild_typing = wanted.dm_typing = typing
    return wanted


class LlamaBot(commands.Bot):
    """The bot: `ctx` holds what its features share (settings, `chat`, the queue, the edit budget)."""

    def __init__(self, settings: Settings, chat: ChatService, **options: object) -> None:
        super().__init__(command_prefix=commands.when_mentioned, help_command=None, intents=intents(settings.warm_on_typing), allowed_mentions=NO_PINGS, **options)  # type: ignore[arg-type]
        self.ctx = BotContext.create(settings, chat)
        self.access = Access(self.ctx, self)
        self._unsynced_guild: int | None = None  # DEV_GUILD_ID, while Discord refuses its commands (not invited yet)

    async def setup_hook(self) -> None:
        ctx = self.ctx
        await ctx.chat.load_chat_modes()
        replier = Replier(ctx)
        intake = Intake(self, ctx, self.access, replier)
        for cog in (
            intake,
            Buttons(self, ctx, self.access, replier),
            Commands(self, ctx, self.access),
            Recovery(self, ctx, self.access, intake),
            Following(self, ctx),
            Warming(self, ctx, self.access),
        ):
            await self.add_cog(cog)
        self.add_dynamic_items(ReplyButton)  # buttons on replies posted by earlier runs work too
        await self._sync_commands()

    async def _sync_commands(self) -> None:
        """Register the slash commands: in DEV_GUILD_ID at once, else globally. A refusal never
        stops the bot: it answers messages without slash commands meanwhile."""
        guild_id = self.ctx.settings.dev_guild_id
        try:
            if guild_id:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
                log.info("slash commands synced to guild %s", guild_id)
            else:
                await self.tree.sync()
                log.info("slash commands synced globally (new commands can take a while to appear)")
            self._unsynced_guild = None
        except discord.HTTPException as exc:
            if guild_id and exc.status == 403 and exc.code == 50001:  # Missing Access: not in that server (yet)
                self._unsynced_guild = guild_id
                assert self.application_id is not None
                log.warning(
                    "DEV_GUILD_ID=%s: the bot is not in that server yet (or was invited without the applications.commands scope), "
                    "so Discord refused its slash commands there (403 Missing Access). Invite it with %s ; its commands are added when it joins.",
                    guild_id, invite_link(self.application_id),
                )
            else:
                log.warning("could not register the slash commands (%s); answering messages without them", exc)

    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Invited at last into DEV_GUILD_ID: its slash commands go there now (never globally as
        well meanwhile: that would list every command twice in that server)."""
        if guild.id == self._unsynced_guild:
            await self._sync_commands()

    async def on_guild_available(self, guild: discord.Guild) -> None:
        """The same, when the guild arrives as "available" (Discord's GUILD_CREATE for a guild it
        already knew the bot in, e.g. invited while the bot was reconnecting)."""
        if guild.id == self._unsynced_guild:
            await self._sync_commands()

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: messages are the `Intake` cog's (this replaces Bot's `process_commands`)."""

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("logged in as %s (id %s) in %d guild(s); invite link: %s", self.user, self.user.id, len(self.guilds), invite_link(self.user.id))

    async def shutdown(self, grace: float = 20.0) -> None:
        """Finish in-flight replies (or stop them after `grace` s, keeping what was written), then log out.

        Messages still waiting their turn stay pending in the database: the next start answers them."""
        self.ctx.cancel_background()
        await self.ctx.scheduler.close(grace, wind_down=self.ctx.stop_all)
        await self.close()


class ShardedLlamaBot(LlamaBot, commands.AutoShardedBot):
    """The same bot over several gateway connections (SHARD_COUNT), for very large bots.

    LlamaBot's methods come first; AutoShardedBot's connection handling
    replaces plain Bot's underneath them.
    """


def create_bot(settings: Settings, chat: ChatService, **options: object) -> LlamaBot:
    """A single connection by default; AutoShardedBot when SHARD_COUNT is set (0 = auto)."""
    if settings.shard_count is None:
        return LlamaBot(settings, chat, **options)
    return ShardedLlamaBot(settings, chat, shard_count=settings.shard_count or None, **options)


def invite_link(application_id: int) -> str:
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands"))
