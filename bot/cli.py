"""The command line: `python -m bot [run | chat | render-prompt | health]`.

Plain `python -m bot` starts the Discord bot when a token is configured, and
the terminal chat otherwise. Every known mistake (configuration, model file,
database) ends as one `error:` line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from bot.config import ConfigError, Settings, load_env, load_settings
from bot.engine.backend import ModelError
from bot.conversations.records import StoreError
from bot.formats.templates import NAMES, AUTO, Message, TemplateError, get_template, prompt_text
from bot.health import MAX_AGE_S, check, heartbeat_path

log = logging.getLogger("bot")

EXIT_CONFIG = 2
NO_TOKEN_HELP = """\
DISCORD_TOKEN is not set, so the bot cannot log in to Discord.
  1. Open https://discord.com/developers/applications, create an application, and open its "Bot" page.
  2. Press "Reset Token" and copy the token.
  3. On the same page, turn on "Message Content Intent" (the bot reads messages to answer them).
  4. Put the token in .env next to where you run the bot:   DISCORD_TOKEN=your-token-here
See the README ("Run it on Discord") for the invite link and the other settings."""

# Command-line options are just another source of the same variables, checked the same way.
OPTION_VARIABLES = {
    "model": "MODEL_PATH",
    "mmproj": "MMPROJ_PATH",
    "prompt_template": "PROMPT_TEMPLATE",
    "ctx_size": "LLAMA_N_CTX",
    "n_predict": "LLAMA_N_PREDICT",
    "system_prompt": "SYSTEM_PROMPT",
    "db": "DATABASE_PATH",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description="A Discord chat bot running a local LLM.")
    parser.add_argument("--env-file", default=".env", help="settings file to read (default: .env)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the Discord bot (needs DISCORD_TOKEN)")
    chat = sub.add_parser("chat", help="chat in the terminal: [USER]: / [ASSISTANT]:")
    chat.add_argument("--model", metavar="PATH", help="GGUF model file (default: MODEL_PATH or the bundled SmolLM2)")
    chat.add_argument("--mmproj", metavar="PATH", help="the model's vision projector (mmproj GGUF), so it can see images (MMPROJ_PATH)")
    chat.add_argument("--prompt-template", metavar="NAME", help=f"one of: {', '.join(NAMES)}")
    chat.add_argument("--ctx-size", metavar="N", help="context size in tokens (LLAMA_N_CTX)")
    chat.add_argument("--n-predict", metavar="N", help="most tokens per reply (LLAMA_N_PREDICT)")
    chat.add_argument("--system-prompt", metavar="TEXT", help="system prompt (SYSTEM_PROMPT)")
    chat.add_argument("--db", metavar="PATH", help="SQLite database file (DATABASE_PATH)")
    render = sub.add_parser("render-prompt", help="print the prompt a template builds for a JSON list of messages")
    render.add_argument("--template", required=True, metavar="NAME", help=f"one of: {', '.join(NAMES)}")
    render.add_argument("--messages", required=True, metavar="FILE.json", help='a JSON list of {"role": ..., "content": ...}')
    render.add_argument("--model", metavar="PATH", help="model whose embedded template `auto` uses")
    health = sub.add_parser("health", help="exit 0 if `python -m bot run` is serving (reads its heartbeat file, never the database)")
    health.add_argument("--max-age", type=float, default=MAX_AGE_S, metavar="SECONDS", help=f"oldest acceptable heartbeat (default: {MAX_AGE_S:.0f})")
    return parser


def setup_logging(settings: Settings, *, quiet: bool) -> None:
    """discord.py's log format for everything; the terminal chat only shows warnings by default."""
    import discord.utils

    level = logging.getLevelName(settings.log_level) if settings.log_level else logging.WARNING if quiet else logging.INFO
    if settings.llama_log:
        level = min(level, logging.INFO)
    discord.utils.setup_logging(level=level, root=True)
    logging.getLogger("aiosqlite").setLevel(max(level, logging.INFO))  # one DEBUG line per query is noise
    logging.getLogger("httpx2").setLevel(max(level, logging.WARNING))  # the remote backend's HTTP client: a line per request
    for name in ("discord.client", "discord.shard"):  # SHARD_COUNT: each shard logs its own reconnects
        logging.getLogger(name).addFilter(_one_line_reconnects)


def _one_line_reconnects(record: logging.LogRecord) -> bool:
    """discord.py logs every reconnect attempt during an outage with a full traceback; a
    server owner reading the journal needs one line saying why."""
    if record.exc_info and str(record.msg).startswith("Attempting a reconnect"):
        exc = record.exc_info[1]
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        record.msg = f"{record.msg} (Discord cannot be reached: %s)"
        record.args = (*(record.args if isinstance(record.args, tuple) else ()), reason)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values = load_env(args.env_file)
        for option, variable in OPTION_VARIABLES.items():
            value = getattr(args, option, None)
            if value is not None:
                values[variable] = value
        settings = load_settings(values)
        if args.command == "health":
            return health(settings, args.max_age)
        if args.command == "render-prompt":
            return render_prompt(args.template, Path(args.messages), settings)
        if args.command == "run":
            if not settings.discord_token:
                print(NO_TOKEN_HELP, file=sys.stderr)
                return EXIT_CONFIG
            return start_discord(settings)
        if args.command is None and settings.discord_token:
            print("[INFO] DISCORD_TOKEN is set: starting the Discord bot.", file=sys.stderr)
            return start_discord(settings)
        if args.command is None:
            print(no_token_line(Path(args.env_file), interactive=sys.stdin.isatty()), file=sys.stderr)
            print("[INFO] To run the Discord bot, put DISCORD_TOKEN=... in .env (see README).", file=sys.stderr)
        return start_terminal(settings)
    except (ConfigError, ModelError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def no_token_line(env_file: Path, *, interactive: bool) -> str:
    """Why plain `python -m bot` starts the terminal chat, naming the .env it read (a service
    owner reading the journal sees the real cause: the token was looked for in the wrong place)."""
    where = str(env_file.resolve()) + ("" if env_file.is_file() else " (no such file)")
    if interactive:
        return f"[INFO] No DISCORD_TOKEN in {where} or the environment: starting the terminal chat instead."
    return (
        f"[INFO] No DISCORD_TOKEN in {where} or the environment, and standard input is not a terminal: "
        "starting the terminal chat on standard input, until it ends (a service runs `python -m bot run`)."
    )


def start_terminal(settings: Settings) -> int:
    from bot.conversations.service import open_chat
    from bot.terminal import TerminalChat

    setup_logging(settings, quiet=True)

    async def run() -> None:
        async with open_chat(settings, parallel=1) as chat:
            conversation = await chat.conversation(TerminalChat.scope)
            print(f"[INFO] Model: {chat.backend.describe()}", file=sys.stderr)
            print(f"[INFO] Prompt template: {chat.describe_template(conversation)}; history: {settings.database_path}", file=sys.stderr)
            print(f"[INFO] Context size: {chat.backend.n_ctx}; reply length: {settings.n_predict} tokens. Type /help for commands.", file=sys.stderr)
            print(f"[INFO] Images: {'this model can see them (/image PATH)' if chat.can_see else chat.cannot_see()}", file=sys.stderr)
            await TerminalChat(chat).run()

    asyncio.run(run())
    return 0


def start_discord(settings: Settings) -> int:
    from bot.discord_adapter.runner import run_bot

    setup_logging(settings, quiet=False)
    return asyncio.run(run_bot(settings))


def health(settings: Settings, max_age: float) -> int:
    """A container's HEALTHCHECK: one line, exit 0 when the serving bot's heartbeat is fresh and good."""
    ok, why = check(heartbeat_path(settings.database_path), max_age)
    print(why)
    return 0 if ok else 1


def render_prompt(template_name: str, messages_file: Path, settings: Settings) -> int:
    """Print exactly the prompt text a template builds, generation prompt included."""
    try:
        raw = json.loads(messages_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {messages_file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{messages_file} is not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in raw):
        raise ConfigError(f'{messages_file} must hold a JSON list of {{"role": ..., "content": ...}} objects')
    bad_roles = {m["role"] for m in raw} - {"system", "user", "assistant"}
    if bad_roles:
        raise ConfigError(f"{messages_file}: unknown role(s) {', '.join(sorted(bad_roles))}; use system, user or assistant")
    try:
        from bot.formats.templates import canonical_name

        key = canonical_name(template_name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    kwargs = {}
    if key == AUTO:
        from bot.engine.vocab import read_model_info

        info = read_model_info(settings.resolved_model_path())
        kwargs = dict(gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    template = get_template(key, **kwargs)
    try:
        segments = template.render([Message(m["role"], m["content"]) for m in raw])
    except TemplateError as exc:  # e.g. roles that do not alternate, for a template that insists
        raise ConfigError(f"{messages_file}: the {template.name!r} template cannot render these messages: {exc}") from None
    sys.stdout.write(prompt_text(segments))
    sys.stdout.flush()
    return 0
