"""The Discord adapter's slash commands: /reset, /template, /chat (on, off, threads), /stop,
/system, /settings, /status, /export.

Each answers ephemerally, well inside Discord's 3 seconds, and admin commands
are checked by the bot itself on every call (see `LlamaBot.is_admin`), not only
hidden in Discord's UI (`default_permissions(manage_messages=True)` hides the
admin-only ones from other members; a server can change that in its
Integrations settings, so the bot's own check is what counts). Who may use the
bot at all (ALLOWED_CHANNEL_IDS, ALLOWED_ROLE_IDS, BLOCKED_USER_IDS) is checked
before any command runs (`LlamaBot.check_interaction`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import logging
import re
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.conversations.attachments import human_size
from bot.conversations.service import THINKING_MODES, ChannelOptions, LastReply, SettingError, TemplateChoiceError
from bot.conversations.export import ExportInfo, export_markdown
from bot.conversations.store import CHAT_OFF, CHAT_ON, CHAT_THREADS
from bot.formats.templates import NAMES

if TYPE_CHECKING:
    from bot.discord_adapter.client import LlamaBot

log = logging.getLogger(__name__)

COMMAND_FAILED = "Sorry, that did not work (the error is in the bot's log). Please try again."
NEED_ADMIN = "You need the Manage Messages permission (or an admin role) to use /{name} here."
EXPORT_LIMIT = 8 * 1024 * 1024  # bytes: under Discord's smallest upload limit for bots (10 MiB)
ADMIN_ONLY = discord.Permissions(manage_messages=True)  # who sees the admin-only commands by default
CHAT_MODES = {"on": CHAT_ON, "off": CHAT_OFF, "threads": CHAT_THREADS}
CHAT_ANSWERS = {
    "on": "every message in this channel.",
    "off": "only when mentioned or replied to.",
    "threads": "mentions here by starting a thread for each conversation; in those threads I answer every message.",
}
NO_THREADS_IN_THREADS = "Use /chat threads in a text channel: a thread cannot have threads of its own."
CANNOT_THREAD = "(But I lack the Create Public Threads permission here: until I get it, I answer in the channel.)"


def register_commands(bot: LlamaBot) -> None:
    """Every slash command. Each answers ephemerally, well inside 3 seconds."""

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
    @app_commands.default_permissions(ADMIN_ONLY)
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
    @app_commands.default_permissions(ADMIN_ONLY)
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

    @bot.tree.command(name="system", description="Show or set this channel's system prompt (the bot's persona)")
    @app_commands.default_permissions(ADMIN_ONLY)
    @app_commands.describe(
        text="the new system prompt, or 'reset' for the default one; leave empty to see the current one",
        reset="go back to the default system prompt (SYSTEM_PROMPT)",
    )
    async def system(interaction: discord.Interaction, text: str | None = None, reset: bool = False) -> None:
        if await refuse_unless_admin(interaction, "system"):
            return
        scope = bot.scope_of(interaction)
        if text is None and not reset:
            conversation = await bot.chat.store.conversation(scope)
            own = conversation.system_prompt is not None
            embed = discord.Embed(
                title="System prompt here" + ("" if own else " (the default)"),
                description=_cut(bot.chat.system_prompt(conversation) or "(none)", 4000),
            )
            await interaction.response.send_message(embed=embed, ephemeral=True)
            return
        back_to_default = reset or (text or "").strip().lower() == "reset"
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await bot.chat.set_system_prompt(scope, None if back_to_default else text)
        except SettingError as exc:
            await interaction.followup.send(str(exc), ephemeral=True)
            return
        log.info("system prompt %s in %s", "reset" if back_to_default else "changed", scope)
        done = "System prompt here is back to the default." if back_to_default else "System prompt here is changed; the next reply uses it."
        await interaction.followup.send(done, ephemeral=True)

    @bot.tree.command(name="settings", description="Show or change this channel's temperature, top_p, reply length and reasoning display")
    @app_commands.describe(
        temperature="0 to 5: lower is more focused, higher more varied (0 always picks the likeliest word)",
        top_p="0 to 1: sample only from the likeliest words that add up to this share",
        reply_length="most tokens in one reply, from 1 to the bot's maximum (LLAMA_N_PREDICT)",
        thinking="how a reasoning model's thoughts are shown: hide, spoiler or show",
        reset="put every setting of this channel back to the bot's defaults",
    )
    @app_commands.choices(thinking=[app_commands.Choice(name=m, value=m) for m in THINKING_MODES])
    async def settings(
        interaction: discord.Interaction,
        temperature: float | None = None,
        top_p: float | None = None,
        reply_length: int | None = None,
        thinking: str | None = None,
        reset: bool = False,
    ) -> None:
        scope = bot.scope_of(interaction)
        if temperature is None and top_p is None and reply_length is None and thinking is None and not reset:
            conversation = await bot.chat.store.conversation(scope)
            await interaction.response.send_message(_describe_options(bot.chat.options(conversation), bot.settings.n_predict), ephemeral=True)
            return
        if await refuse_unless_admin(interaction, "settings"):
            return
        try:
            bot.chat.check_options(temperature=temperature, top_p=top_p, n_predict=reply_length, thinking=thinking)
        except SettingError as exc:
            await interaction.response.send_message(f"Not changed: {exc}", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        options = await bot.chat.change_options(scope, temperature=temperature, top_p=top_p, n_predict=reply_length, thinking=thinking, reset=reset)
        log.info("settings changed in %s: %s", scope, ", ".join(sorted(options.own)) or "all defaults")
        await interaction.followup.send("Changed. " + _describe_options(options, bot.settings.n_predict), ephemeral=True)

    @bot.tree.command(name="status", description="The model, how busy the bot is, this channel's context use and reply speed")
    async def status(interaction: discord.Interaction) -> None:
        # Only numbers kept in memory are read here (nothing is tokenized or queried), so it
        # answers at once even while every slot is generating.
        await interaction.response.send_message(embed=status_embed(bot, bot.scope_of(interaction)), ephemeral=True)

    @bot.tree.command(name="export", description="This channel's conversation as a Markdown file (only you see it)")
    @app_commands.default_permissions(ADMIN_ONLY)
    async def export(interaction: discord.Interaction) -> None:
        if await refuse_unless_admin(interaction, "export"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        conversation = await bot.chat.store.conversation(bot.scope_of(interaction))
        messages = await bot.chat.store.messages(conversation.id)
        now = datetime.datetime.now(datetime.timezone.utc)
        info = ExportInfo(
            title=_place(interaction),
            bot_name=bot.user.display_name if bot.user else "bot",
            template=bot.chat.describe_template(conversation),
            system_prompt=bot.chat.system_prompt(conversation),
            exported_at=now,
        )
        text = await asyncio.to_thread(export_markdown, info, messages)
        left_out = 0
        while len(text.encode()) > EXPORT_LIMIT and len(messages) > left_out + 1:  # too big to upload: the oldest go
            left_out += max(1, (len(messages) - left_out) // 4)
            text = await asyncio.to_thread(export_markdown, info, messages[left_out:], left_out)
        name = f"conversation-{_slug(info.title)}-{now:%Y%m%d-%H%M}.md"
        shown = sum(1 for m in messages[left_out:] if m.status != "pending")
        summary = f"This conversation: {shown} messages (messages still waiting for an answer are not included)."
        if left_out:
            summary += f" The {left_out} oldest are left out to stay under Discord's file size limit."
        await interaction.followup.send(summary, file=discord.File(io.BytesIO(text.encode()), filename=name), ephemeral=True)


def status_embed(bot: LlamaBot, scope: str) -> discord.Embed:
    """/status: everything comes from numbers already in memory (cheap, on the event loop)."""
    chat = bot.conversations.service
    info = chat.backend.info
    embed = discord.Embed(title="Status")
    model = f"{info.path.name}\n{info.description}"
    if info.size_bytes:
        model += f", {human_size(info.size_bytes)}"
    model += f"\ncontext: {chat.backend.n_ctx} tokens per conversation"
    if info.n_ctx_train and info.n_ctx_train != chat.backend.n_ctx:
        model += f" (trained for {info.n_ctx_train})"
    embed.add_field(name="Model", value=_cut(model, 1024), inline=False)
    embed.add_field(name="Backend", value=_cut(chat.backend.describe(), 1024), inline=False)
    embed.add_field(name="Uptime", value=_duration(time.time() - bot.started_at))
    engine = chat.engine_stats()
    load = f"{bot.scheduler.running} writing, {bot.scheduler.waiting} waiting"
    if engine is not None:
        load = f"slots busy: {engine.busy_slots} of {engine.slots}\n" + load
    embed.add_field(name="Load", value=load)
    if engine is not None:
        cache = f"{engine.cached_states} conversations saved\n{human_size(engine.cache_bytes)} of {human_size(engine.cache_limit_bytes)}"
    else:
        cache = "kept by the model server"
    embed.add_field(name="KV cache", value=cache)
    here = chat.last_replies.get(scope)
    if here is None:
        embed.add_field(name="This channel", value="no reply here since the bot started", inline=False)
    else:
        embed.add_field(name="This channel", value=_window(here), inline=False)
    last = here or chat.last_reply
    if last is not None:
        embed.add_field(name="Last reply" + (" here" if here else " (any channel)"), value=_speed(last), inline=False)
    return embed


def _window(last: LastReply) -> str:
    gen = last.generation
    text = f"last prompt: {last.prompt_tokens} of the {last.budget} tokens its window holds"
    if gen.started_at is not None:
        text += f"\n{gen.n_cached} of them reused from the KV cache, {gen.n_evaluated} read anew"
    return text


def _speed(last: LastReply) -> str:
    gen = last.generation
    if gen.started_at is None:
        return "waiting for a free slot"
    parts = []
    if gen.first_token_at is not None:
        prompt_s = max(gen.first_token_at - gen.started_at, 1e-6)
        parts.append(f"prompt: {gen.n_evaluated} tokens in {prompt_s:.2f} s ({gen.n_evaluated / prompt_s:.0f} tokens/s)")
        if gen.finished_at is not None and gen.n_generated > 1:
            gen_s = max(gen.finished_at - gen.first_token_at, 1e-6)
            parts.append(f"reply: {gen.n_generated} tokens in {gen_s:.2f} s ({(gen.n_generated - 1) / gen_s:.1f} tokens/s)")
    if not gen.done:
        parts.append(f"being written ({gen.n_generated} tokens so far)")
    elif gen.first_token_at is None:
        parts.append("stopped before its first token" if gen.finish_reason == "cancelled" else f"ended before its first token ({gen.finish_reason})")
    return "\n".join(parts)


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


def _place(interaction: discord.Interaction) -> str:
    """A title for an export: the channel and server, or the DM."""
    if interaction.guild_id is None:
        return f"direct messages with {interaction.user.display_name}"
    channel = getattr(interaction.channel, "name", None) or str(interaction.channel_id)
    guild = interaction.guild.name if interaction.guild else str(interaction.guild_id)
    return f"#{channel} in {guild}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "conversation"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"
