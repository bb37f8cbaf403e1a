"""/status: the model, how busy the bot is, and a channel's context use and reply speed.

Everything comes from numbers already in memory (nothing is tokenized or queried),
so it answers at once even while every slot is generating.
"""

from __future__ import annotations

import time

import discord

from bot.conversations.attachments import human_size
from bot.conversations.scheduler import FairScheduler
from bot.conversations.service import ChatService, LastReply, ModelStatus


def status_embed(chat: ChatService, scheduler: FairScheduler, scope: str, *, started_at: float) -> discord.Embed:
    info = chat.backend.info
    embed = discord.Embed(title="Status")
    model = f"{info.path.name}\n{info.description}"
    if info.size_bytes:
        model += f", {human_size(info.size_bytes)}"
    model += f"\ncontext: {chat.backend.n_ctx} tokens per conversation"
    if info.n_ctx_train and info.n_ctx_train != chat.backend.n_ctx:
        model += f" (trained for {info.n_ctx_train})"
    why_not = chat.cannot_see()
    model += "\nsees images: " + ("yes" if why_not is None else f"no ({why_not})")
    embed.add_field(name="Model" + (" (the default)" if chat.models is not None else ""), value=cut(model, 1024), inline=False)
    models = chat.model_status()
    if models:
        embed.add_field(name="Models", value=cut(_models(models), 1024), inline=False)
    embed.add_field(name="Backend", value=cut(chat.backend.describe(), 1024), inline=False)
    embed.add_field(name="Uptime", value=_duration(time.time() - started_at))
    engine = chat.engine_stats()
    load = f"{scheduler.running} writing, {scheduler.waiting} waiting"
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


def _models(models: list[ModelStatus]) -> str:
    """Each catalogue model: loaded or not, its memory, when it was last used."""
    now = time.time()
    lines = []
    for m in models:
        if not m.loaded:
            lines.append(f"{m.name}: not loaded")
            continue
        used = "answering now" if m.busy else f"last used {_duration(now - m.last_used)} ago" if m.last_used else "not used yet"
        lines.append(f"{m.name}{' (default)' if m.default else ''}: loaded, {human_size(m.memory_bytes or 0)}, {used}")
    return "\n".join(lines)


def _window(last: LastReply) -> str:
    gen = last.generation
    text = f"last prompt: {last.prompt_tokens} of the {last.budget} tokens its window holds"
    if last.model is not None:
        text = f"model: {last.model}\n" + text
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


def cut(text: str, limit: int) -> str:
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
