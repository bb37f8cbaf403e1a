"""Which conversation a Discord message belongs to: one per guild channel or thread, one per DM user.

The conversation layer files a conversation under an opaque key; this is the only
place that builds such keys for Discord and reads them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import discord

_KEY = re.compile(r"guild:(?P<guild>\d+):channel:(?P<channel>\d+)|dm:(?P<user>\d+)")


@dataclass(frozen=True)
class DiscordScope:
    """A Discord conversation: a guild channel or thread (`guild_id`, `channel_id`), or the DMs of one user (`user_id`)."""

    guild_id: int | None = None
    channel_id: int | None = None
    user_id: int | None = None

    @classmethod
    def channel(cls, guild_id: int, channel_id: int) -> DiscordScope:
        return cls(guild_id=guild_id, channel_id=channel_id)

    @classmethod
    def dm(cls, user_id: int) -> DiscordScope:
        return cls(user_id=user_id)

    @classmethod
    def of(cls, guild_id: int | None, channel_id: int | None, user_id: int) -> DiscordScope:
        """Where something happened: in a guild, its channel (or thread); in DMs, the user."""
        if guild_id is None or channel_id is None:
            return cls.dm(user_id)
        return cls.channel(guild_id, channel_id)

    @classmethod
    def of_interaction(cls, interaction: discord.Interaction) -> DiscordScope:
        return cls.of(interaction.guild_id, interaction.channel_id, interaction.user.id)

    @classmethod
    def parse(cls, key: str) -> DiscordScope | None:
        """The scope a stored key names; None for a key that is not Discord's (the terminal chat's)."""
        match = _KEY.fullmatch(key)
        if match is None:
            return None
        if match["user"] is not None:
            return cls.dm(int(match["user"]))
        return cls.channel(int(match["guild"]), int(match["channel"]))

    @property
    def key(self) -> str:
        """The key the conversation is stored under (the schema's `conversations.scope`)."""
        if self.guild_id is None:
            return f"dm:{self.user_id}"
        return f"guild:{self.guild_id}:channel:{self.channel_id}"

    @property
    def in_guild(self) -> bool:
        return self.guild_id is not None

    def __str__(self) -> str:
        return self.key
