"""The slash commands: /reset, /template, /model, /chat (on, off, threads), /stop, /system, /settings,
/status, /export.

Each answers ephemerally, well inside Discord's 3 seconds. Who may use the bot at all
(ALLOWED_CHANNEL_IDS, ALLOWED_ROLE_IDS, BLOCKED_USER_IDS) is checked before any command
runs (`interaction_check`). Admin commands are checked by the bot itself on every call
(`access.is_admin`), not only hidden in Discord's UI: `default_permissions(manage_messages=True)`
hides them from other members, but a server can change that in its Integrations settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import logging
import re
import time

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import THINKING_MODES
from bot.conversations.export import ExportInfo, export_markdown
from bot.conversations.service import ChannelOptions, ModelChoiceError, ModelStatus, SettingError, TemplateChoiceError
from bot.conversations.records import ChatMode, MessageStatus, StoreBusy
from bot.discord_adapter.access import Access, is_admin, may_stop
from bot.discord_adapter.context import BotContext
from bot.discord_adapter.scopes import DiscordScope
from bot.discord_adapter.status import cut, status_embed
from bot.formats.templates import NAMES

log = logging.getLogger(__name__)

COMMAND_FAILED = "Sorry, that did not work (the error is in the bot's log). Please try again."
STORAGE_BUSY = "My storage is busy right now (another program is using the database). Please try again in a minute."
NEED_ADMIN = "You need the Manage Messages permission (or an admin role) to use /{name} here."
NOT_YOUR_REPLY = "Only the person I am answering (or a moderator) can stop this reply."
EXPORT_LIMIT = 8 * 1024 * 1024  # bytes: under Discord's smallest upload limit for bots (10 MiB)
ADMIN_ONLY = discord.Permissions(manage_messages=True)  # who sees the admin-only commands by default
CHAT_MODES = {"on": ChatMode.ON, "off": ChatMode.OFF, "threads": ChatMode.THREADS}
CHAT_ANSWERS = {
    ChatMode.ON: "every message in this channel.",
    ChatMode.OFF: "only when mentioned or replied to.",
    ChatMode.THREADS: "mentions here by starting a thread for each conversation; in those threads I answer every message.",
}
NO_THREADS_IN_THREADS = "Use /chat threads in a text channel: a thread cannot have threads of its own."
NEED_OWNER = "In DMs, only the bot's owners (OWNER_IDS, or the Discord application's owner) can switch the model."
ONE_MODEL = "Only one model is offered here: **{name}** (set MODELS or MODELS_DIR to offer more)."
CANNOT_THREAD = "(But I lack the Create Public Threads permission here: until I get it, I answer in the channel.)"


def _scope(interaction: discord.Interaction) -> str:
    return DiscordScope.of_interaction(interaction).key


class Commands(commands.Cog):
    """Every slash command, over the conversation service and the context."""

    def __init__(self, bot: commands.Bot, ctx: BotContext, access: Access) -> None:
        self.bot = bot
        self.ctx = ctx
        self.access = access
        self.started_at = time.time()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        return await self.access.check_interaction(interaction)

    async def cog_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CheckFailure):
            return  # refused by interaction_check, which said why
        name = interaction.command.name if interaction.command else "?"
        busy = isinstance(getattr(error, "original", None), StoreBusy)
        if busy:
            log.warning("/%s in %s: %s", name, _scope(interaction), error.original)  # type: ignore[attr-defined]
        else:
            log.error("/%s failed in %s: %s", name, _scope(interaction), error, exc_info=error)
        text = STORAGE_BUSY if busy else COMMAND_FAILED
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)

    async def _refuse_unless_admin(self, interaction: discord.Interaction, name: str) -> bool:
        if is_admin(self.ctx.settings, interaction):
            return False
        await interaction.response.send_message(NEED_ADMIN.format(name=name), ephemeral=True)
        return True

    @app_commands.command(name="reset", description="Forget this channel's conversation with the bot")
    @app_commands.default_permissions(ADMIN_ONLY)
    async def reset(self, interaction: discord.Interaction) -> None:
        if await self._refuse_unless_admin(interaction, "reset"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        removed = await self.ctx.chat.reset(_scope(interaction))
        await interaction.followup.send(f"Conversation cleared ({removed} messages).", ephemeral=True)

    @app_commands.command(name="template", description="Show or switch the prompt template used in this channel")
    @app_commands.describe(name="the template to use here; leave empty to see the current one")
    @app_commands.choices(name=[app_commands.Choice(name=n, value=n) for n in NAMES])
    async def template(self, interaction: discord.Interaction, name: str | None = None) -> None:
        chat = self.ctx.chat
        scope = _scope(interaction)
        if name is None:
            current = chat.describe_template(await chat.conversation(scope))
            await interaction.response.send_message(f"Template here: **{current}**. Available: {', '.join(NAMES)}.", ephemeral=True)
            return
        if await self._refuse_unless_admin(interaction, "template"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            key = await chat.set_template(scope, name)
        except TemplateChoiceError as exc:  # e.g. a name that was not offered (a crafted client)
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        await interaction.followup.send(f"Template here is now **{key}**.", ephemeral=True)

    @app_commands.command(name="model", description="Show the models, or switch the one answering in this channel")
    @app_commands.describe(name="the model to use here; leave empty to see the current one and what is loaded")
    async def model(self, interaction: discord.Interaction, name: str | None = None) -> None:
        chat = self.ctx.chat
        scope = _scope(interaction)
        names = chat.model_names()
        if not names:
            await interaction.response.send_message(ONE_MODEL.format(name=chat.backend.info.path.name), ephemeral=True)
            return
        if name is None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await chat.refresh_models()  # a model server's list may have changed
            current = chat.model_name(await chat.conversation(scope))
            await interaction.followup.send(cut(_describe_models(current, chat.model_status()), 2000), ephemeral=True)
            return
        if await self._refuse_unless_admin(interaction, "model"):
            return
        if interaction.guild is None and not await self._is_owner(interaction.user):
            await interaction.response.send_message(NEED_OWNER, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            chosen = await chat.set_model(scope, name.strip())
        except ModelChoiceError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        log.info("model switched to %s in %s", chosen, scope)
        status = next((m for m in chat.model_status() if m.name == chosen), None)
        when = "" if status is None or status.loaded else " It is loaded with the next message here."
        await interaction.followup.send(f"Model here is now **{chosen}**; the conversation so far stays.{when}", ephemeral=True)

    @model.autocomplete("name")
    async def _model_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        typed = current.lower()
        return [app_commands.Choice(name=n, value=n) for n in self.ctx.chat.model_names() if typed in n.lower()][:25]

    async def _is_owner(self, user: discord.abc.User) -> bool:
        """One of the bot's owners: OWNER_IDS, or (when that is empty) the Discord application's owner or team."""
        owners = self.ctx.settings.owner_ids
        if owners:
            return user.id in owners
        try:
            return await self.bot.is_owner(user)
        except discord.HTTPException:
            return False

    @app_commands.command(name="chat", description="Answer every message here (on), only mentions (off), or each mention in a new thread")
    @app_commands.guild_only()
    @app_commands.default_permissions(ADMIN_ONLY)
    @app_commands.choices(mode=[app_commands.Choice(name=m, value=m) for m in CHAT_MODES])
    async def chat(self, interaction: discord.Interaction, mode: str) -> None:
        if await self._refuse_unless_admin(interaction, "chat"):
            return
        chosen = CHAT_MODES.get(mode)
        if chosen is None:
            await interaction.response.send_message("Use /chat on, /chat off or /chat threads.", ephemeral=True)
            return
        if chosen == ChatMode.THREADS and isinstance(interaction.channel, discord.Thread):
            await interaction.response.send_message(NO_THREADS_IN_THREADS, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.ctx.chat.set_chat_mode(_scope(interaction), chosen)
        what = CHAT_ANSWERS[chosen]
        if chosen == ChatMode.THREADS and not interaction.app_permissions.create_public_threads:
            what += " " + CANNOT_THREAD
        await interaction.followup.send(f"OK: I now answer {what}", ephemeral=True)

    @app_commands.command(name="stop", description="Stop the reply being written in this channel")
    async def stop(self, interaction: discord.Interaction) -> None:
        writing = self.ctx.replies.in_scope(_scope(interaction))
        if writing is None:
            await interaction.response.send_message("Nothing is being written here.", ephemeral=True)
            return
        if not may_stop(self.ctx.settings, interaction, writing.author):
            await interaction.response.send_message(NOT_YOUR_REPLY, ephemeral=True)
            return
        writing.reply.stop()
        await interaction.response.send_message("Stopped.", ephemeral=True)

    @app_commands.command(name="system", description="Show or set this channel's system prompt (the bot's persona)")
    @app_commands.default_permissions(ADMIN_ONLY)
    @app_commands.describe(
        text="the new system prompt, or 'reset' for the default one; leave empty to see the current one",
        reset="go back to the default system prompt (SYSTEM_PROMPT)",
    )
    async def system(self, interaction: discord.Interaction, text: str | None = None, reset: bool = False) -> None:
        if await self._refuse_unless_admin(interaction, "system"):
            return
        chat = self.ctx.chat
        scope = _scope(interaction)
        if text is None and not reset:
            conversation = await chat.conversation(scope)
            own = conversation.system_prompt is not None
            embed = discord.Embed(
                title="System prompt here" + ("" if own else " (the default)"),
                description=cut(chat.system_prompt(conversation) or "(none)", 4000),
            )
            await interaction.response.send_message(embed=embed, ephemeral=True)
            return
        back_to_default = reset or (text or "").strip().lower() == "reset"
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await chat.set_system_prompt(scope, None if back_to_default else text)
        except SettingError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        log.info("system prompt %s in %s", "reset" if back_to_default else "changed", scope)
        done = "System prompt here is back to the default." if back_to_default else "System prompt here is changed; the next reply uses it."
        await interaction.followup.send(done, ephemeral=True)

    @app_commands.command(name="settings", description="Show or change this channel's temperature, top_p, reply length and reasoning display")
    @app_commands.describe(
        temperature="0 to 5: lower is more focused, higher more varied (0 always picks the likeliest word)",
        top_p="0 to 1: sample only from the likeliest words that add up to this share",
        reply_length="most tokens in one reply, from 1 to the bot's maximum (LLAMA_N_PREDICT)",
        thinking="how a reasoning model's thoughts are shown: hide, spoiler or show",
        reset="put every setting of this channel back to the bot's defaults",
    )
    @app_commands.choices(thinking=[app_commands.Choice(name=m, value=m) for m in THINKING_MODES])
    async def settings(
        self,
        interaction: discord.Interaction,
        temperature: float | None = None,
        top_p: float | None = None,
        reply_length: int | None = None,
        thinking: str | None = None,
        reset: bool = False,
    ) -> None:
        chat = self.ctx.chat
        most = self.ctx.settings.n_predict
        scope = _scope(interaction)
        if temperature is None and top_p is None and reply_length is None and thinking is None and not reset:
            options = chat.options(await chat.conversation(scope))
            await interaction.response.send_message(_describe_options(options, most), ephemeral=True)
            return
        if await self._refuse_unless_admin(interaction, "settings"):
            return
        try:
            chat.check_options(temperature=temperature, top_p=top_p, n_predict=reply_length, thinking=thinking)
        except SettingError as exc:
            await interaction.response.send_message(f"Not changed: {exc}", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        options = await chat.change_options(scope, temperature=temperature, top_p=top_p, n_predict=reply_length, thinking=thinking, reset=reset)
        log.info("settings changed in %s: %s", scope, ", ".join(sorted(options.own)) or "all defaults")
        await interaction.followup.send("Changed. " + _describe_options(options, most), ephemeral=True)

    @app_commands.command(name="status", description="The model, how busy the bot is, this channel's context use and reply speed")
    async def status(self, interaction: discord.Interaction) -> None:
        embed = status_embed(self.ctx.chat, self.ctx.scheduler, _scope(interaction), started_at=self.started_at)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="export", description="This channel's conversation as a Markdown file (only you see it)")
    @app_commands.default_permissions(ADMIN_ONLY)
    async def export(self, interaction: discord.Interaction) -> None:
        if await self._refuse_unless_admin(interaction, "export"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        chat = self.ctx.chat
        conversation, messages = await chat.history(_scope(interaction))
        now = datetime.datetime.now(datetime.timezone.utc)
        info = ExportInfo(
            title=_place(interaction),
            bot_name=self.bot.user.display_name if self.bot.user else "bot",
            template=chat.describe_template(conversation),
            system_prompt=chat.system_prompt(conversation),
            exported_at=now,
        )
        text = await asyncio.to_thread(export_markdown, info, messages)
        left_out = 0
        while len(text.encode()) > EXPORT_LIMIT and len(messages) > left_out + 1:  # too big to upload: the oldest go
            left_out += max(1, (len(messages) - left_out) // 4)
            text = await asyncio.to_thread(export_markdown, info, messages[left_out:], left_out)
        name = f"conversation-{_slug(info.title)}-{now:%Y%m%d-%H%M}.md"
        shown = sum(1 for m in messages[left_out:] if m.status != MessageStatus.PENDING)
        summary = f"This conversation: {shown} messages (messages still waiting for an answer are not included)."
        if left_out:
            summary += f" The {left_out} oldest are left out to stay under Discord's file size limit."
        await interaction.followup.send(summary, file=discord.File(io.BytesIO(text.encode()), filename=name), ephemeral=True)


def _describe_options(options: ChannelOptions, most: int) -> str:
    def mark(key: str) -> str:
        return " (set here)" if key in options.own else " (default)"

    s = options.sampling
    return (
        "Settings here:\n"
        f"- temperature: {s.temperature:g}{mark('temperature')}\n"
        f"- top_p: {s.top_p:g}{mark('top_p')}\n"
        f"- reply length: {options.n_predict} tokens{mark('n_predict')}; at most {most}\n"
        f"- thinking: {options.thinking}{mark('thinking')}"
    )


def _describe_models(current: str | None, models: list[ModelStatus]) -> str:
    """/model without a name: this channel's model, and each model's state and memory."""
    lines = [f"Model here: **{current}**", "Models:"]
    now = time.time()
    for m in models:
        if m.loaded and m.memory_bytes is None:
            what = "on the model server"  # (BACKEND=openai: the server loads and unloads)
        else:
            what = "loaded" if m.loaded else "not loaded"
            if m.memory_bytes:
                what += f", {'uses' if m.loaded else 'needs about'} {m.memory_bytes / 2**20:.0f} MiB"
        if m.busy:
            what += ", answering now"
        elif m.last_used is not None:
            what += f", last used {max(0, now - m.last_used):.0f} s ago"
        lines.append(f"- {m.name}{' (default)' if m.default else ''}: {what}")
    return "\n".join(lines)


def _place(interaction: discord.Interaction) -> str:
    """A title for an export: the channel and server, or the DM."""
    if interaction.guild_id is None:
        return f"direct messages with {interaction.user.display_name}"
    channel = getattr(interaction.channel, "name", None) or str(interaction.channel_id)
    guild = interaction.guild.name if interaction.guild else str(interaction.guild_id)
    return f"#{channel} in {guild}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "conversation"
