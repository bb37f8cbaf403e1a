"""Configuration: every bad value is one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bot.config import ConfigError, load_env, load_settings
from tests.conftest import run_cli

# (variable, bad value, words the one-line error must contain)
BAD_VALUES = [
    ("LLAMA_N_CTX", "lots", "LLAMA_N_CTX must be a whole number"),
    ("LLAMA_N_CTX", "10", "LLAMA_N_CTX must be a whole number from 64"),
    ("LLAMA_N_PREDICT", "-5", "LLAMA_N_PREDICT must be a whole number"),
    ("LLAMA_LOG", "maybe", "LLAMA_LOG must be 1 or 0"),
    ("MODEL_PATH", "/nowhere/model.gguf", "MODEL_PATH points to '/nowhere/model.gguf', which is not a file"),
    ("PROMPT_TEMPLATE", "llama-9", "unknown prompt template 'llama-9'; valid: auto, llama-2-chat"),
    ("TEMPERATURE", "hot", "TEMPERATURE must be a number"),
    ("TEMPERATURE", "nan", "TEMPERATURE must be a number"),
    ("TOP_P", "1.5", "TOP_P must be a number from 0.0 to 1.0"),
    ("TOP_K", "x", "TOP_K must be a whole number"),
    ("MIN_P", "-1", "MIN_P must be a number"),
    ("REPEAT_PENALTY", "high", "REPEAT_PENALTY must be a number"),
    ("REPEAT_LAST_N", "1.5", "REPEAT_LAST_N must be a whole number"),
    ("SEED", "-1", "SEED must be a whole number"),
    ("N_THREADS", "0", "N_THREADS must be a whole number from 1"),
    ("PARALLEL", "0", "PARALLEL must be a whole number from 1"),
    ("KV_CACHE_MB", "big", "KV_CACHE_MB must be a whole number"),
    ("MAX_QUEUE", "-1", "MAX_QUEUE must be a whole number"),
    ("STREAM", "sometimes", "STREAM must be 1 or 0"),
    ("USER_COOLDOWN_S", "soon", "USER_COOLDOWN_S must be a number"),
    ("DISCORD_API_BASE", "discord.com/api", "DISCORD_API_BASE must be a URL starting with http:// or https://"),
    ("DISCORD_GATEWAY_URL", "http://x", "DISCORD_GATEWAY_URL must be a URL starting with ws:// or wss://"),
    ("DEV_GUILD_ID", "my-guild", "DEV_GUILD_ID must be a whole number"),
    ("ADMIN_ROLE_IDS", "admins", "ADMIN_ROLE_IDS must be a comma-separated list of numeric Discord ids"),
    ("CHAT_CHANNELS", "1,two", "CHAT_CHANNELS must be a comma-separated list of numeric Discord ids"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
    ("SHARD_COUNT", "many", "SHARD_COUNT must be a whole number"),
    ("BACKEND", "cloud", "BACKEND must be one of local, openai, got 'cloud'"),
    ("OPENAI_BASE_URL", "localhost:8080", "OPENAI_BASE_URL must be a URL starting with http:// or https://"),
    ("OPENAI_MODE", "edits", "OPENAI_MODE must be one of chat, completions"),
    ("FLASH_ATTN", "yes", "FLASH_ATTN must be one of off, on, auto"),
    ("WARM_ON_TYPING", "sometimes", "WARM_ON_TYPING must be 1 or 0"),
    ("WARM_TTL_S", "0", "WARM_TTL_S must be a number from 1.0 to 3600.0"),
    ("WARM_TTL_S", "soon", "WARM_TTL_S must be a number"),
]


@pytest.mark.parametrize(("variable", "value", "expected"), BAD_VALUES, ids=[f"{v}={x}" for v, x, _ in BAD_VALUES])
def test_bad_value_is_a_clear_error(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [BAD_VALUES[0], BAD_VALUES[4], BAD_VALUES[5], BAD_VALUES[20]],
    ids=["ctx", "model", "template", "api-base"],
)
def test_cli_reports_bad_value_in_one_line(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    """The real CLI: one `error:` line on stderr, exit 2, no traceback."""
    result = run_cli("chat", env={variable: value}, stdin="hello\n", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][len('error: '):]}"] and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_value_in_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# settings\nLLAMA_N_PREDICT=plenty\n")
    result = run_cli("chat", stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: LLAMA_N_PREDICT must be a whole number from 1 to 1048576, got 'plenty'"


def test_n_predict_must_be_below_context(tmp_path: Path) -> None:
    result = run_cli("chat", "--ctx-size", "128", "--n-predict", "200", "--db", str(tmp_path / "x.sqlite3"), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2
    assert "LLAMA_N_PREDICT (200) must be less than the context size LLAMA_N_CTX (128)" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model")
    result = run_cli("chat", "--model", str(fake), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {fake} is not a GGUF model file (it does not start with the GGUF signature)"


def test_env_file_and_environment_merge(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LLAMA_N_CTX=1024\nLLAMA_N_PREDICT=100\nSYSTEM_PROMPT=Be brief.\\nVery brief.\n")
    values = load_env(env_file, environ={"LLAMA_N_PREDICT": "50"})
    settings = load_settings(values)
    assert settings.n_ctx == 1024
    assert settings.n_predict == 50  # the environment wins over .env
    assert settings.system_prompt == "Be brief.\nVery brief."


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    settings = load_settings({})
    assert settings.prompt_template == "auto"
    assert settings.n_ctx is None  # resolved against the model: min(4096, trained size)
    assert settings.n_threads == len(os.sched_getaffinity(0))
    assert settings.sampling.seed is None
    assert settings.resolved_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert load_settings({"PROMPT_TEMPLATE": "Mistral-Instruct-v0.1"}).prompt_template == "mistral-instruct"
    assert settings.warm_on_typing is True and settings.warm_ttl_s == 30.0
    assert settings.resolved_flash_attn_cache() == Path("bot.sqlite3.flash-attn.json")  # beside the database
    off = load_settings({"WARM_ON_TYPING": "0", "WARM_TTL_S": "12.5", "DATABASE_PATH": "/srv/bot/db.sqlite3"})
    assert off.warm_on_typing is False and off.warm_ttl_s == 12.5
    assert off.resolved_flash_attn_cache() == Path("/srv/bot/db.sqlite3.flash-attn.json")


def test_token_never_in_repr() -> None:
    settings = load_settings({"DISCORD_TOKEN": "MTIz.secret.token", "OPENAI_API_KEY": "sk-hidden"})
    assert settings.discord_token == "MTIz.secret.token" and settings.openai_api_key == "sk-hidden"
    assert "secret" not in repr(settings) and "hidden" not in repr(settings)


def test_openai_backend_needs_a_base_url() -> None:
    with pytest.raises(ConfigError, match="BACKEND=openai needs OPENAI_BASE_URL"):
        load_settings({"BACKEND": "openai"})
    assert load_settings({"SHARD_COUNT": "auto"}).shard_count == 0
    assert load_settings({"SHARD_COUNT": "2"}).shard_count == 2


def test_env_example_documents_every_variable_with_its_default() -> None:
    import re
    from dataclasses import replace

    from tests.conftest import ROOT

    example = ROOT / ".env.example"
    source = (ROOT / "bot" / "config.py").read_text()
    read = set(re.findall(r'take\("([A-Z_]+)"', source))
    documented = set(re.findall(r"^([A-Z_]+)=", example.read_text(), re.M))
    assert read == documented
    from_example = load_settings(load_env(example, environ={}))
    defaults = load_settings({})
    assert replace(from_example, database_path=defaults.database_path) == defaults


def test_credentials_in_the_base_url_never_show(tmp_path) -> None:
    """A URL with user:pass is never printed with them: not in the settings' repr, not in an error."""
    settings = load_settings({"BACKEND": "openai", "OPENAI_BASE_URL": "http://bob:hunter2@gpu-box:8000/v1"})
    assert settings.openai_base_url == "http://bob:hunter2@gpu-box:8000/v1"  # kept for use
    assert "hunter2" not in repr(settings) and "***@gpu-box" in repr(settings)
    with pytest.raises(ConfigError) as error:
        load_settings({"OPENAI_BASE_URL": "ftp://bob:hunter2@gpu-box/v1"})
    assert "hunter2" not in str(error.value) and "OPENAI_BASE_URL must be a URL" in str(error.value)


def test_new_variables_parse_and_refuse_bad_values() -> None:
    s = load_settings({"ALLOWED_CHANNEL_IDS": "1, 2", "ALLOWED_ROLE_IDS": "3", "BLOCKED_USER_IDS": "4 5", "ATTACHMENT_MAX_KB": "64", "ATTACHMENT_MAX_FILES": "2"})
    assert (s.allowed_channel_ids, s.allowed_role_ids, s.blocked_user_ids) == ({1, 2}, {3}, {4, 5})
    assert (s.attachment_max_kb, s.attachment_max_files, s.dms_open) == (64, 2, False)
    assert load_settings({"ALLOWED_CHANNEL_IDS": "1", "ALLOW_DMS": "1"}).dms_open
    for name, value, words in [
        ("BLOCKED_USER_IDS", "bob", "BLOCKED_USER_IDS must be a comma-separated list of numeric Discord ids"),
        ("ALLOWED_CHANNEL_IDS", "#general", "ALLOWED_CHANNEL_IDS must be a comma-separated list"),
        ("ATTACHMENT_MAX_KB", "-1", "ATTACHMENT_MAX_KB must be a whole number from 0 to 8192"),
        ("ATTACHMENT_MAX_FILES", "11", "ATTACHMENT_MAX_FILES must be a whole number from 0 to 10"),
        ("ALLOW_DMS", "perhaps", "ALLOW_DMS must be 1 or 0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_settings({name: value})


# --- what cannot be used at start: one line, exit 2 ---------------------------------------------


def test_unusable_database_is_a_clear_error_at_start(tmp_path: Path) -> None:
    not_sqlite = tmp_path / "notes.sqlite3"
    not_sqlite.write_text("shopping list: milk, eggs\n" * 50)
    result = run_cli("chat", "--db", str(not_sqlite), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2 and "is not a SQLite database" in result.stderr and "Traceback" not in result.stderr
    assert not_sqlite.read_text().startswith("shopping list")  # left untouched

    read_only = tmp_path / "ro.sqlite3"
    assert run_cli("chat", "--db", str(read_only), stdin="", cwd=tmp_path).returncode == 0  # create it
    with _read_only(read_only):
        result = run_cli("chat", "--db", str(read_only), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "is read-only" in result.stderr and "Traceback" not in result.stderr


class _read_only:
    """Make a file read-only for this process, root included (root ignores mode bits, not chattr +i)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.immutable = os.geteuid() == 0 and shutil.which("chattr") is not None

    def __enter__(self) -> None:
        self.path.chmod(0o444)
        if self.immutable:
            subprocess.run(["chattr", "+i", str(self.path)], check=True)

    def __exit__(self, *exc: object) -> None:
        if self.immutable:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        self.path.chmod(0o600)


def test_truncated_model_is_a_clear_error_at_start(tmp_path: Path, model_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src:
        truncated.write_bytes(src.read(20_000_000))
    result = run_cli("chat", "--model", str(truncated), stdin="hi\n", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: llama.cpp could not load {truncated}: the file is truncated, corrupt or of an unsupported architecture (LLAMA_LOG=1 shows why)"
