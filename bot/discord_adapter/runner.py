"""`python -m bot run`: the process around the Discord client.

Loads the model, opens the store, serves Discord until SIGINT/SIGTERM, and exits with
a status a service manager can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import aiohttp
import discord
import yarl

from bot.config import Settings
from bot.conversations.service import open_chat
from bot.health import Heartbeat, heartbeat_path
from bot.discord_adapter.client import LlamaBot, create_bot
from bot.engine.backend import ModelError

log = logging.getLogger(__name__)


def configure_endpoints(settings: Settings) -> None:
    """Point discord.py at DISCORD_API_BASE / DISCORD_GATEWAY_URL (a proxy, or the tests' fake)."""
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


async def run_bot(settings: Settings) -> int:
    """`python -m bot run`: load the model, open the store, serve Discord until SIGINT/SIGTERM.

    A signal stops it on time in every state: loading the model, logging in, connected,
    or waiting to reconnect to an unreachable Discord. Exit status 0 after a signal, 2
    for a configuration problem Discord reports, 1 when the model engine gave up (so a
    service manager restarts it; messages waiting stay pending and are answered then)."""
    assert settings.discord_token
    configure_endpoints(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    aborted = threading.Event()  # tells a model load in progress to give up
    fatal: list[str] = []

    def request_stop() -> None:
        stop.set()
        aborted.set()

    def engine_gave_up(why: str) -> None:  # called from the engine thread
        fatal.append(why)
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop)
    try:
        async with open_chat(settings, abort=aborted) as chat:
            if stop.is_set():
                return 0
            chat.on_backend_fatal(engine_gave_up)
            bot = create_bot(settings, chat)
            # <DATABASE_PATH>.health for `python -m bot health` (a container's HEALTHCHECK)
            probe = lambda: (bot.is_ready() and not bot.is_closed(), not chat.backend_dead())  # noqa: E731
            async with Heartbeat(heartbeat_path(settings.database_path), probe):
                runner = asyncio.ensure_future(_serve_discord(bot, settings.discord_token, stop))
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper.done():
                    log.info("shutting down: finishing replies in progress")
                    await bot.shutdown(grace=0.0 if fatal else 20.0)
                stopper.cancel()
                try:
                    # After close(), discord.py may still be asleep in its reconnect back-off: don't wait for it.
                    await asyncio.wait_for(asyncio.shield(runner), 5.0)
                except asyncio.TimeoutError:
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                except discord.PrivilegedIntentsRequired:
                    log.error(
                        "Discord refused the Message Content intent. Turn on 'Message Content Intent' on your "
                        "application's Bot page (https://discord.com/developers/applications), then start the bot again."
                    )
                    return 2
                except discord.LoginFailure:
                    log.error("Discord rejected DISCORD_TOKEN. Copy a fresh token from the Developer Portal (Bot > Reset Token) into .env.")
                    return 2
                finally:
                    if not bot.is_closed():
                        await bot.close()
    except ModelError:
        if stop.is_set():
            log.info("stopped while loading the model")
            return 0
        raise
    if fatal:
        log.critical("exiting so that the service manager restarts the bot: %s", fatal[0])
        return 1
    log.info("stopped")
    return 0


async def _serve_discord(bot: LlamaBot, token: str, stop: asyncio.Event) -> None:
    """Log in (retrying while Discord cannot be reached, until a stop), then stay connected."""
    delay = 1.0
    while True:
        try:
            await bot.login(token)
            break
        except (OSError, aiohttp.ClientError, discord.DiscordServerError) as exc:
            log.warning("cannot reach Discord (%s); trying again in %.0f s", exc, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = min(delay * 2, 60.0)
    await bot.connect()
