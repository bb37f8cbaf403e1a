"""Who may use the bot, where, and how often; and which messages are addressed to it.

BLOCKED_USER_IDS, ALLOWED_CHANNEL_IDS, ALLOWED_ROLE_IDS and ALLOW_DMS decide who may
talk to the bot at all (messages, slash commands and buttons alike); admins (Manage
Messages, Administrator, or an ADMIN_ROLE_IDS role; anyone in their own DMs) may
change a channel's settings and stop anyone's reply; USER_COOLDOWN_S paces each user.
"""

from __future__ import annotations

import contextlib
import logging
import time

import discord

from bot.config import Settings
from bot.conversations.records import ChatMode
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.output import post_note
from bot.discord_adapter.scopes import DiscordScope

log = logging.getLogger(__name__)

REFUSED_BLOCKED = "Sorry, you can't use this bot."
REFUSED_CHANNEL = "I'm not available in this channel."
REFUSED_ROLE = "You need one of the roles allowed to use this bot here."
REFUSED_DMS = "I don't take direct messages; talk to me in the server."
SLOW_DOWN = "Please slow down a little: I answer one message from you every {s:g} seconds."


def refusal(settings: Settings, *, user_id: int, channel_ids: set[int], role_ids: set[int] | None, in_dm: bool) -> str | None:
    """Why this person may not use the bot here (one of the REFUSED_* texts), or None when they may.

    BLOCKED_USER_IDS applies everywhere. In guilds, ALLOWED_CHANNEL_IDS lists channels
    (a thread counts when its parent is listed: `channel_ids` holds both) and ALLOWED_ROLE_IDS
    roles (an ADMIN_ROLE_IDS role counts too; `role_ids` None: not known yet, see
    `Access.refusal_fetching_roles`). DMs follow `settings.dms_open`: closed by default
    as soon as either list restricts the bot, so "only these channels" also means "not in DMs"."""
    if user_id in settings.blocked_user_ids:
        return REFUSED_BLOCKED
    if in_dm:
        return None if settings.dms_open else REFUSED_DMS
    if settings.allowed_channel_ids and not channel_ids & settings.allowed_channel_ids:
        return REFUSED_CHANNEL
    if settings.allowed_role_ids and role_ids is not None and not role_ids & (settings.allowed_role_ids | settings.admin_role_ids):
        return REFUSED_ROLE
    return None


def is_admin(settings: Settings, interaction: discord.Interaction) -> bool:
    """In DMs anyone; in guilds Manage Messages, Administrator, or an ADMIN_ROLE_IDS role.

    Checked by the bot on every call, not only by hiding commands in Discord's UI."""
    if interaction.guild is None:
        return True
    perms = interaction.permissions
    if perms.administrator or perms.manage_messages:
        return True
    roles = getattr(interaction.user, "roles", [])
    return any(role.id in settings.admin_role_ids for role in roles)


def may_stop(settings: Settings, interaction: discord.Interaction, author_id: int) -> bool:
    """One rule for /stop and the Stop button: the author of the message being answered, or an admin."""
    return interaction.user.id == author_id or is_admin(settings, interaction)


def _places(channel: object, channel_id: int | None) -> set[int]:
    """A channel and, for a thread, its parent (ALLOWED_CHANNEL_IDS lists either)."""
    return {i for i in (channel_id, getattr(channel, "parent_id", None)) if i}


class Access:
    """The access rules applied to messages and interactions, and the per-user cooldown."""

    def __init__(self, ctx: BotContext, client: discord.Client) -> None:
        self.ctx = ctx
        self.client = client
        self._accepted_at: dict[int, float] = {}  # user id -> when we last took a message
        self._warned: set[int] = set()

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def wants_answer(self, message: discord.Message) -> bool:
        """A message from a person, of a normal kind, addressed to the bot, by someone who may use it here."""
        if message.author.bot or message.webhook_id is not None:
            return False  # never bots, including this one
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return False  # joins, pins, boosts...
        if not self.addressed(message):
            return False
        why = self.refusal_of(message)
        if why is not None:  # no answer at all, not even a note: the bot is not for them here
            log.debug("not answering message %s from user %s in channel %s: %s", message.id, message.author.id, message.channel.id, why)
            return False
        return True

    def addressed(self, message: discord.Message) -> bool:
        """DMs, mentions, replies to the bot, every message in chat-enabled channels, and
        every message in the threads the bot started in a /chat threads channel."""
        if message.guild is None:
            return True
        me = self.client.user
        assert me is not None
        if any(user.id == me.id for user in message.mentions):
            return True
        ref = message.reference
        if ref is not None and isinstance(ref.resolved, discord.Message) and ref.resolved.author.id == me.id:
            return True
        channel = message.channel
        parent_id = getattr(channel, "parent_id", None)
        if {channel.id, parent_id} & set(self.settings.chat_channels):
            return True
        guild_id = message.guild.id
        chat = self.ctx.chat
        if parent_id and chat.chat_mode(DiscordScope.channel(guild_id, parent_id).key) == ChatMode.THREADS and getattr(channel, "owner_id", None) == me.id:
            return True  # the bot's own thread (Discord remembers who started it, across restarts)
        return any(chat.chat_mode(DiscordScope.channel(guild_id, i).key) == ChatMode.ON for i in (channel.id, parent_id) if i)

    def refusal_of(self, message: discord.Message, role_ids: set[int] | None = None) -> str | None:
        """`refusal` for a message. A live message carries its author's roles; one fetched
        later (after a restart) does not: then roles are not checked unless given."""
        if role_ids is None and isinstance(message.author, discord.Member):
            role_ids = {role.id for role in message.author.roles}
        return refusal(
            self.settings,
            user_id=message.author.id,
            channel_ids=_places(message.channel, message.channel.id),
            role_ids=role_ids,
            in_dm=message.guild is None,
        )

    async def refusal_fetching_roles(self, message: discord.Message) -> str | None:
        """`refusal_of` for a message read back from Discord (resumed, caught up), fetching
        its author's roles when ALLOWED_ROLE_IDS needs them."""
        role_ids = None
        if message.guild is not None and self.settings.allowed_role_ids and not isinstance(message.author, discord.Member):
            try:
                member = await message.guild.fetch_member(message.author.id)
                role_ids = {role.id for role in member.roles}
            except discord.NotFound:
                role_ids = set()  # no longer a member
            except discord.HTTPException as exc:
                log.warning("could not read the roles of user %s: %s", message.author.id, exc)
                role_ids = set()
        return self.refusal_of(message, role_ids)

    async def check_interaction(self, interaction: discord.Interaction) -> bool:
        """Slash commands and button presses from someone who may not use the bot here get a
        short ephemeral refusal. The decision is logged at debug level."""
        why = refusal(
            self.settings,
            user_id=interaction.user.id,
            channel_ids=_places(interaction.channel, interaction.channel_id),
            role_ids={role.id for role in interaction.user.roles} if isinstance(interaction.user, discord.Member) else set(),
            in_dm=interaction.guild_id is None,
        )
        name = interaction.command.name if interaction.command else interaction.type.name
        log.debug("interaction %s from user %s in channel %s: %s", name, interaction.user.id, interaction.channel_id, why or "allowed")
        if why is None:
            return True
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.send_message(why, ephemeral=True)
        return False

    async def take_from(self, message: discord.Message) -> bool:
        """The per-user cooldown: one answered message per USER_COOLDOWN_S seconds (the first
        one turned away gets a note; the rest of a flood, silence)."""
        cooldown = self.settings.user_cooldown_s
        now = time.monotonic()
        uid = message.author.id
        last = self._accepted_at.get(uid)
        if last is not None and now - last < cooldown:
            if uid not in self._warned:
                self._warned.add(uid)
                await post_note(message, SLOW_DOWN.format(s=cooldown))
            return False
        if len(self._accepted_at) > 10_000:  # keep memory bounded under a flood of new users
            self._accepted_at = {u: t for u, t in self._accepted_at.items() if now - t < cooldown}
            self._warned &= self._accepted_at.keys()
        self._accepted_at[uid] = now
        self._warned.discard(uid)
        return True
