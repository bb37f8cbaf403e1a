"""A Discord message as the model reads it, and names derived from text."""

from __future__ import annotations

import re

import discord


def text_of(message: discord.Message, me: int) -> str:
    """The message text with the bot's own mention (`me`) removed and other mentions as names."""
    text = re.sub(rf"<@!?{me}>", " ", message.content)
    names = {str(u.id): u.display_name for u in message.mentions}
    text = re.sub(r"<@!?(\d+)>", lambda m: "@" + names.get(m.group(1), "someone"), text)
    guild = message.guild
    if guild is not None:
        text = re.sub(r"<@&(\d+)>", lambda m: "@" + _role_name(guild, int(m.group(1))), text)
        text = re.sub(r"<#(\d+)>", lambda m: "#" + _channel_name(guild, int(m.group(1))), text)
    return text.strip()


def thread_name(text: str) -> str:
    """A thread's name from the message that starts it: its first line, at most 100 characters."""
    line = " ".join(text.split("\n", 1)[0].split()) or "Conversation"
    return line if len(line) <= 100 else line[:99].rstrip() + "\u2026"


def _role_name(guild: discord.Guild, role_id: int) -> str:
    role = guild.get_role(role_id)
    return role.name if role else "role"


def _channel_name(guild: discord.Guild, channel_id: int) -> str:
    channel = guild.get_channel_or_thread(channel_id)
    return channel.name if channel else "channel"
