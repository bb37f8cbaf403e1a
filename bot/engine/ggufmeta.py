"""What a model will cost in memory, read from its GGUF header before loading it.

The pool (bot.engine.pool) must decide whether a model fits MODEL_MEMORY_MB before it
loads it, so it reads the few metadata values that size the KV cache (layers, KV heads,
head sizes, trained context) straight from the file's header: a GGUF header is a list of
typed key-value pairs in front of the tensors, cheap to walk with `mmap` (the tokenizer's
arrays are skipped, not decoded). Nothing is loaded into llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from bot.engine.backend import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}  # bytes per cached element (q8_0: 32 values in 34 bytes)
CTX_PAD = 256  # llama.cpp rounds each sequence's cells up to this


@dataclass(frozen=True)
class KVShape:
    """What sizes a model's KV cache: per token, per slot."""

    n_layer: int
    n_embd_k: int  # K values per token and layer (head size x KV heads)
    n_embd_v: int
    n_ctx_train: int

    def bytes_per_token(self, kv_type: str) -> float:
        return self.n_layer * (self.n_embd_k + self.n_embd_v) * KV_BYTES[kv_type]


def read_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, object]:
    """The header's key-value pairs (only `wanted` keys, if given; arrays come back as their length)."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _walk(m, wanted)
    except OSError as exc:
        raise ModelError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except (struct.error, IndexError):
        raise ModelError(f"{path} is not a readable GGUF model file (its header is truncated or damaged)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a readable GGUF model file ({exc})") from None


def _walk(m: mmap.mmap, wanted: set[str] | None) -> dict[str, object]:
    if m[:4] != b"GGUF":
        raise ValueError("no GGUF signature")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    at = 4 + 4 + 8 + 8
    out: dict[str, object] = {}

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", m, at)
        return m[at + 8 : at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

    def skip(kind: int, at: int) -> tuple[object, int]:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, m, at)[0], at + struct.calcsize(fmt)
        if kind == _STRING:
            return string(at)
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", m, at)
            at += 12
            if item in _SCALARS:
                size = struct.calcsize(_SCALARS[item])
                values = [struct.unpack_from(_SCALARS[item], m, at + i * size)[0] for i in range(min(n, 4096))]
                return (values if n <= 4096 else n), at + n * size
            for _ in range(n):
                _, at = skip(item, at)
            return n, at
        raise ValueError(f"unknown value type {kind}")

    for _ in range(n_kv):
        key, at = string(at)
        (kind,) = struct.unpack_from("<I", m, at)
        value, at = skip(kind, at + 4)
        if wanted is None or key in wanted:
            out[key] = value
        if at > len(m):
            raise ValueError("truncated header")
    return out


def kv_shape(path: Path) -> KVShape:
    """The KV cache's shape from the header (ModelError when the file does not say)."""
    meta = read_metadata(path, None)  # one pass (the architecture, which prefixes the keys, comes first)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} does not name its architecture (general.architecture)")

    def get(key: str, default: object = None) -> object:
        return meta.get(f"{arch}.{key}", default)

    n_layer, n_embd = get("block_count"), get("embedding_length")
    heads = _most(get("attention.head_count"))
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or not heads:
        raise ModelError(f"{path} lacks the metadata that sizes its KV cache ({arch}.block_count, .embedding_length, .attention.head_count)")
    kv_heads = _most(get("attention.head_count_kv")) or heads
    k_len = get("attention.key_length") or n_embd // heads
    v_len = get("attention.value_length") or n_embd // heads
    n_ctx_train = get("context_length")
    return KVShape(n_layer, int(k_len) * kv_heads, int(v_len) * kv_heads, int(n_ctx_train) if isinstance(n_ctx_train, int) else 4096)


def _most(value: object) -> int:
    """A per-layer value (a list in some models' metadata) at its largest, or the value."""
    if isinstance(value, list):
        return max((int(v) for v in value), default=0)
    return int(value) if isinstance(value, int) else 0


def kv_bytes(shape: KVShape, n_ctx: int, parallel: int, kv_type: str) -> int:
    """The KV cache of `parallel` slots of `n_ctx` tokens (an upper bound: sliding-window layers take less)."""
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    return int(shape.bytes_per_token(kv_type) * cells * parallel)
