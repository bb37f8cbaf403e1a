"""Text attachments: which files the bot reads, and how their text joins a user's turn.

Pure functions on names, content types and bytes. The Discord adapter does the
(bounded) downloading and hands the bytes here; the result is plain text that
is stored with the message and put in the user's turn, where templates render
it as user text like any other (never as control tokens).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Files read as text by their extension, whatever content type the uploader's client claims.
TEXT_EXTENSIONS = frozenset(
    "txt md markdown rst py pyi js mjs cjs ts tsx jsx json jsonl yaml yml toml ini cfg conf csv tsv log sh bash zsh fish"
    " ps1 bat c h cc cpp cxx hpp hh rs go java kt kts scala swift rb php pl lua r sql html htm css scss sass less xml"
    " svg tex diff patch env gitignore dockerfile makefile cmake gradle proto graphql vue svelte cs fs dart ex exs erl"
    " hs ml nim zig v jl".split()
)
# Content types that are text without saying text/*.
TEXT_TYPES = frozenset(
    {
        "application/json", "application/x-ndjson", "application/xml", "application/yaml", "application/x-yaml",
        "application/toml", "application/x-sh", "application/javascript", "application/x-javascript",
        "application/sql", "application/x-httpd-php", "application/x-python", "application/x-tex",
    }
)
IMAGE_EXTENSIONS = frozenset("png jpg jpeg gif webp bmp tif tiff heic avif ico".split())
MEDIA_EXTENSIONS = frozenset("mp3 wav ogg oga opus flac m4a aac mp4 m4v mov webm mkv avi".split())
BINARY_EXTENSIONS = frozenset(
    "pdf zip gz tgz bz2 xz zst 7z rar tar jar exe dll so dylib bin iso img dmg apk deb rpm msi class o a"
    " doc docx xls xlsx ppt pptx odt ods odp epub psd ttf otf woff woff2 sqlite db pyc wasm gguf safetensors pt".split()
)

# What `kind_of` says about a file before it is downloaded.
TEXT, IMAGE, MEDIA, BINARY, UNKNOWN = "text", "image", "media", "binary", "unknown"

MAX_NAME = 100  # characters of a file name shown to the model and in notes


@dataclass(frozen=True)
class TextFile:
    """A file read as text. `cut`: only its first `read_bytes` of `size` bytes were read."""

    name: str
    text: str
    size: int
    read_bytes: int
    cut: bool = False


@dataclass(frozen=True)
class Skipped:
    """A file that was not read, and why (for the reply's note)."""

    name: str
    why: str


def kind_of(filename: str, content_type: str | None) -> str:
    """TEXT, IMAGE, MEDIA or BINARY from the name and declared type; UNKNOWN: download and look."""
    ext = extension(filename)
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ext in TEXT_EXTENSIONS or ctype.startswith("text/") or ctype in TEXT_TYPES:
        return TEXT
    if ext in IMAGE_EXTENSIONS or ctype.startswith("image/"):
        return IMAGE
    if ext in MEDIA_EXTENSIONS or ctype.startswith(("audio/", "video/")):
        return MEDIA
    if ext in BINARY_EXTENSIONS:
        return BINARY
    return UNKNOWN


def extension(filename: str) -> str:
    """The lower-case extension, or the whole name for extension-less files like `Makefile`."""
    base = filename.rsplit("/", 1)[-1].lower()
    return base.rsplit(".", 1)[-1] if "." in base else base


def decode_text(data: bytes, *, cut: bool) -> str | None:
    """The bytes as text if they are UTF-8 text (a BOM is dropped), else None.

    `cut`: the bytes are the beginning of a longer file, so a character split at
    the end is dropped instead of making the file look binary. NUL bytes or many
    control characters mean binary, even when the bytes happen to be valid UTF-8."""
    if b"\x00" in data:
        return None
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    try:
        text = decoder.decode(data, final=not cut)
    except UnicodeDecodeError:
        return None
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f")
    if controls > max(8, len(text) // 100):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def safe_name(filename: str) -> str:
    """A file name fit to show: one line, no Markdown code markers, not too long."""
    name = re.sub(r"[\x00-\x1f\x7f`]", "_", filename).strip() or "file"
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "\u2026"


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def render_files(files: Sequence[TextFile]) -> str | None:
    """The files as they go into the user's turn: each a fenced block headed by its name.

    The fence is longer than any run of backticks inside the file, so a file
    holding Markdown code blocks cannot close it early."""
    blocks = []
    for f in files:
        longest = max((len(run) for run in re.findall(r"`{3,}", f.text)), default=0)
        fence = "`" * max(3, longest + 1)
        lang = extension(f.name)
        lang = lang if lang.isalnum() and lang != f.name.lower() else ""
        cut = f" (only its first {human_size(f.read_bytes)} of {human_size(f.size)})" if f.cut else ""
        body = f.text if f.text.endswith("\n") else f.text + "\n"
        blocks.append(f"Attached file {safe_name(f.name)}{cut}:\n{fence}{lang}\n{body}{fence}")
    return "\n\n".join(blocks) or None


def notes_for(files: Sequence[TextFile], skipped: Sequence[Skipped]) -> list[str]:
    """The short notes under the reply: files read only in part, and files not read."""
    notes = []
    cut = [f for f in files if f.cut]
    if cut:
        parts = ", ".join(f"{safe_name(f.name)} ({human_size(f.read_bytes)} of {human_size(f.size)})" for f in cut)
        notes.append(f"I read only the beginning of {parts}: the rest is past my size limit for files.")
    if skipped:
        notes.append("I did not read " + ", ".join(f"{safe_name(s.name)} ({s.why})" for s in skipped) + ".")
    return notes


SKIP_REASONS = {
    IMAGE: "an image: I can't see images",
    MEDIA: "audio or video: I can only read text",
    BINARY: "not a text file",
}
