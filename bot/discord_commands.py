"""The Discord adapter's slash commands: /reset, /template, /chat (on, off, threads), /stop.

Each answers ephemerally, well inside Discord's 3 seconds, and admin commands
are checked by the bot itself on every call (see `LlamaBot.is_admin`), not only
hidden in Discord's UI.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.chat import TemplateChoiceError
from bot.store import CHAT_OFF, CHAT_ON, CHAT_THREADS
from bot.templates import NAMES

if TYPE_CHECKING:
    from bot.discord_bot import LlamaBot

log = logging.getLogger(__name__)

COMMAND_FAILED = "Sorry, that did not work (the error is in the bot's log). Please try again."
NEED_ADMIN = "You need the Manage Messages permission (or an admin role) to use /{name} here."
CHAT_MODES = {"on": CHAT_ON, "off": CHAT_OFF, "threads": CHAT_THREADS}
CHAT_ANSWERS = {
    "on": "every message in this channel.",
    "off": "only when mentioned or replied to.",
    "threads": "mentions here by starting a thread for each conversation; in those threads I answer every message.",
}
NO_THREADS_IN_THREADS = "Use /chat threads in a text channel: a thread cannot have threads of its own."
CANNOT_THREAD = "(But I lack the Create Public Threads permission here: until I get it, I answer in the channel.)"


def register_commands(bot: LlamaBot) -> None:
    """/reset, /template, /chat and /stop. Each answers ephemerally, well inside 3 seconds."""

    async def refuse_unless_admin(interaction: discord.Interaction, name: str) -> bool:
        if bot.is_admin(interaction):
            return False
        await interaction.response.send_message(NEED_ADMIN.format(name=name), ephemeral=True)
        return True

    @bot.tree.error
    async def on_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        name = interaction.command.name if interaction.command else "?"
        log.error("/%s failed in %s: %s", name, bot.scope_of(interaction), error, exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(COMMAND_FAILED, ephemeral=True)
            else:
                await interaction.response.send_message(COMMAND_FAILED, ephemeral=True)

    @bot.tree.command(name="reset", description="Forget this channel's conversation with the bot")
    async def reset(interaction: discord.Interaction) -> None:
        if await refuse_unless_admin(interaction, "reset"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        removed = await bot.chat.reset(bot.scope_of(interaction))
        await interaction.followup.send(f"Conversation cleared ({removed} messages).", ephemeral=True)

    @bot.tree.command(name="template", description="Show or switch the prompt template used in this channel")
    @app_commands.describe(name="the template to use here; leave empty to see the current one")
    @app_commands.choices(name=[app_commands.Choice(name=n, value=n) for n in NAMES])
    async def template(interaction: discord.Interaction, name: str | None = None) -> None:
        scope = bot.scope_of(interaction)
        if name is None:
            conversation = await bot.chat.store.conversation(scope)
            current = bot.chat.describe_template(conversation)
            await interaction.response.send_message(f"Template here: **{current}**. Available: {', '.join(NAMES)}.", ephemeral=True)
            return
        if await refuse_unless_admin(interaction, "template"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            key = await bot.chat.set_template(scope, name)
        except TemplateChoiceError as exc:  # e.g. a name that was not offered (a crafted client)
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        await interaction.followup.send(f"Template here is now **{key}**.", ephemeral=True)

    @bot.tree.command(name="chat", description="Answer every message here (on), only mentions (off), or each mention in a new thread")
    @app_commands.guild_only()
    @app_commands.choices(mode=[app_commands.Choice(name=m, value=m) for m in CHAT_MODES])
    async def chat(interaction: discord.Interaction, mode: str) -> None:
        if await refuse_unless_admin(interaction, "chat"):
            return
        if mode not in CHAT_MODES:
            await interaction.response.send_message("Use /chat on, /chat off or /chat threads.", ephemeral=True)
            return
        if mode == "threads" and isinstance(interaction.channel, discord.Thread):
            await interaction.response.send_message(NO_THREADS_IN_THREADS, ephemeral=True)
            return
        scope = bot.scope_of(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        await bot.chat.store.set_chat_mode(scope, CHAT_MODES[mode])
        (bot.chat_scopes.add if mode == "on" else bot.chat_scopes.discard)(scope)
        (bot.thread_scopes.add if mode == "threads" else bot.thread_scopes.discard)(scope)
        what = CHAT_ANSWERS[mode]
        if mode == "threads" and not interaction.app_permissions.create_public_threads:
            what += " " + CANNOT_THREAD
        await interaction.followup.send(f"OK: I now answer {what}", ephemeral=True)

    @bot.tree.command(name="stop", description="Stop the reply being written in this channel")
    async def stop(interaction: discord.Interaction) -> None:
        reply = bot.replies.get(bot.scope_of(interaction))
        if reply is None:
            await interaction.response.send_message("Nothing is being written here.", ephemeral=True)
            return
        reply.stop()
        await interaction.response.send_message("Stopped.", ephemeral=True)
