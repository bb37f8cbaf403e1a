"""FLASH_ATTN=auto: flash attention on or off, by measuring both on this CPU.

llama.cpp's own "auto" turns flash attention on wherever the backend has it. On
CPUs that is not always faster: on a 2-core Xeon, with SmolLM2, reading a 32-token
follow-up after 1,536 tokens of history ran at 45 tokens/s with it on and 187 with
it off, and generating at 29 vs 57 tokens/s, while near an empty context "on" was
a little faster. A chat channel lives at 1,000-4,000 tokens of history, so the
choice is measured where the bot works, once per CPU, thread count, model file and
llama.cpp build, and kept in a small JSON file (`cache_path`; deleting it only
means measuring again at the next start).

The measurement takes about two seconds: for each setting a small context of its
own reads 32 tokens and generates a few, near an empty context and after DEPTH
tokens of history. Reaching that depth by evaluating 1,536 tokens would take ~6 s
per setting; instead the history is written into the context as a state (the
cells of one real token, repeated at DEPTH positions), which is what the attention
kernels' speed depends on: how many cells they read, not what the cells hold.

The rule (`choose`): the shorter expected reply time, summed over a reply near an
empty context and one after DEPTH tokens, each being the 32-token read plus
`n_predict` generated tokens. Both situations happen (new channels, long ones);
adding their times lets each count by how much time it actually costs, so the long
history, where the two settings differ most, weighs the most, and a reply length
of a few tokens still lets a faster read win.

The two settings do not compute the same numbers: without flash attention llama.cpp's
CPU path rounds attention scores to f16, and greedy replies can differ (SmolLM2 agreed
with itself on 97.5% of next tokens over a 121-token text; the first token of "What is
the capital of France?" flips). That is the same order as KV_TYPE=q8_0's 97%. As a
guard against a broken kernel, the measurement also compares both settings' greedy
next tokens over the 32-token read of a real text: below MIN_AGREEMENT, auto keeps
flash attention on. Each value is the best of two rounds (the second is skipped when the first is
clear: one setting's expected reply time CLEAR times the other's), against other
work on a shared CPU; the log line at start shows what was measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import llama_cpp as L
import numpy as np

log = logging.getLogger(__name__)

DEPTH = 1536  # tokens of history for the "long conversation" case
READ = 32  # tokens of a follow-up message
DECODE = 6  # generated tokens timed per case
ROUNDS = 2  # best of this many, alternating the settings (one when the first is CLEAR)
CLEAR = 2.0  # one setting's expected reply this many times the other's: the second round is skipped
MIN_AGREEMENT = 0.8  # off is chosen only if its greedy next tokens match on's this often
TEXT = (
    "The capital of France is Paris. It lies on the Seine, and people visit it for its museums, "
    "its old streets and its food. In the evening the cafes fill up and the river is full of light."
)
MAX_ENTRIES = 32  # cache entries kept (one per CPU, thread count, model and build)
SETTINGS = ("on", "off")
FLASH_TYPES = {"on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO}
CPU_FIELDS = (
    "vendor_id", "cpu family", "model", "model name", "stepping", "flags",  # x86
    "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision", "Features",  # ARM
)


@dataclass(frozen=True)
class Timings:
    """Seconds, for one setting: reading a READ-token message and generating one token,
    near an empty context and after DEPTH tokens."""

    read_near: float
    decode_near: float
    read_deep: float
    decode_deep: float

    def reply_s(self, n_predict: int) -> float:
        """Expected time of a reply near an empty context plus one after DEPTH tokens."""
        return self.read_near + n_predict * self.decode_near + self.read_deep + n_predict * self.decode_deep


@dataclass(frozen=True)
class Measurement:
    timings: dict[str, Timings]
    agreement: float | None  # share of the text's positions where both settings' greedy next token is the same


@dataclass(frozen=True)
class Choice:
    """What FLASH_ATTN resolved to, and how."""

    setting: str  # "on", "off", or "auto" when it could not be measured (llama.cpp decides)
    source: str  # "setting" (on/off given), "kv_type" (q8_0 needs it), "cache", "measured", "unmeasured"
    timings: dict[str, Timings] | None = None
    agreement: float | None = None


def choose(timings: dict[str, Timings], n_predict: int, agreement: float | None = None) -> str:
    """The setting with the shorter expected reply time (see the module's docstring); on
    when off's greedy tokens agree with on's less than MIN_AGREEMENT."""
    if agreement is not None and agreement < MIN_AGREEMENT and "on" in timings:
        return "on"
    return min(timings, key=lambda s: (timings[s].reply_s(n_predict), s != "on"))


def cpu_identity() -> dict[str, str]:
    """The CPU as /proc/cpuinfo describes its first processor: family, model, stepping and
    flags, not just the model name (which can be as vague as "Intel(R) Xeon(R) Processor")."""
    fields: dict[str, str] = {"machine": platform.machine()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if len(fields) > 1:
                    break  # the first processor's block is enough
                continue
            name, _, value = line.partition(":")
            name = name.strip()
            if name in CPU_FIELDS and name not in fields:
                fields[name] = " ".join(sorted(value.split())) if name in ("flags", "Features") else value.strip()
    return fields


def cache_key(model: Path, *, n_threads: int, kv_type: str) -> dict[str, object]:
    """Everything the measured speeds depend on."""
    st = model.stat()
    return {
        "cpu": cpu_identity(),
        "n_threads": n_threads,
        "model": {"path": str(model.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "kv_type": kv_type,
        "llama_cpp": L.__version__,
        "llama_build": L.llama_print_system_info().decode(errors="replace").strip(),
    }


def key_id(key: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def default_cache_path() -> Path:
    """Where the choice is kept when the caller names no file (tests, the benchmark)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamabot" / "flash-attn.json"


def resolve(
    requested: str, model: ctypes.c_void_p, path: Path, *, n_threads: int, kv_type: str, type_kv: int, n_predict: int, cache_path: Path | None
) -> Choice:
    """FLASH_ATTN as it will be used: on/off as given; on for KV_TYPE=q8_0 (which needs it);
    for auto, the cached measurement for this CPU, thread count, model and build, or a new
    one (about two seconds), saved for the next start."""
    if requested in SETTINGS:
        return Choice(requested, "setting")
    if kv_type != "f16":
        return Choice("on", "kv_type")
    cache_path = cache_path or default_cache_path()
    key = cache_key(path, n_threads=n_threads, kv_type=kv_type)
    ident = key_id(key)
    entries = _read_cache(cache_path)
    entry = entries.get(ident)
    if isinstance(entry, dict):
        try:
            timings = {s: Timings(**entry["timings"][s]) for s in entry["timings"]}
            agreement = entry.get("agreement")
        except (KeyError, TypeError):
            timings = {}
        if timings and (agreement is None or isinstance(agreement, float)):
            return Choice(choose(timings, n_predict, agreement), "cache", timings, agreement)
    started = time.perf_counter()
    measured = measure(model, n_threads=n_threads, type_kv=type_kv, n_predict=n_predict)
    if measured is None:
        log.warning("flash attention could not be measured with this model; llama.cpp decides (FLASH_ATTN=on or off chooses)")
        return Choice("auto", "unmeasured")
    timings, agreement = measured.timings, measured.agreement
    setting = choose(timings, n_predict, agreement)
    log.info("measured flash attention in %.1f s: %s", time.perf_counter() - started, describe(timings, n_predict, agreement))
    if agreement is not None and agreement < MIN_AGREEMENT:
        log.warning("without flash attention the model's greedy next tokens matched those with it only %.0f%% of the time: keeping it on", 100 * agreement)
    entries[ident] = {
        "key": key, "timings": {s: asdict(t) for s, t in timings.items()}, "agreement": agreement,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_cache(cache_path, entries)
    return Choice(setting, "measured", timings, agreement)


def describe(timings: dict[str, Timings], n_predict: int, agreement: float | None = None) -> str:
    """One line: each setting's read and decode speed and expected reply time."""
    parts = [] if agreement is None else [f"greedy next tokens agree {100 * agreement:.0f}%"]
    for s, t in timings.items():
        parts.append(
            f"{s}: read {READ / t.read_near:.0f} / {READ / t.read_deep:.0f} tok/s, generate {1 / t.decode_near:.0f} / {1 / t.decode_deep:.0f} tok/s "
            f"(empty / {DEPTH} tokens of history), {t.reply_s(n_predict):.2f} s for two {n_predict}-token replies"
        )
    return "; ".join(parts)


def _read_cache(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the flash-attention cache %s (%s); measuring again", path, exc)
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return dict(entries) if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, object]) -> None:
    """Write atomically; newest MAX_ENTRIES kept. A folder that cannot be written only costs a measurement next time."""
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump({"version": 1, "entries": kept}, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("could not save the flash-attention choice to %s (%s); it will be measured again at the next start", path, exc.strerror or exc)


# --- the measurement -----------------------------------------------------------------------


def measure(model: ctypes.c_void_p, *, n_threads: int, type_kv: int, n_predict: int = 512) -> Measurement | None:
    """Time both settings (best of ROUNDS, alternating), with KV cells of ggml type `type_kv`.
    None if the model's state cannot be laid out at DEPTH (not a plain KV cache); a setting
    whose context cannot be made is left out."""
    text = (_tokenize(model, TEXT) * 2)[: READ + DECODE]
    if len(text) < READ + DECODE:
        return None
    contexts: dict[str, _Bench] = {}
    try:
        for setting in SETTINGS:
            bench = _Bench.make(model, setting, text, n_threads=n_threads, type_kv=type_kv)
            if bench is not None:
                contexts[setting] = bench
        if not contexts or not all(b.ready for b in contexts.values()):
            return None
        rounds: dict[str, list[list[float]]] = {s: [] for s in contexts}
        for _ in range(ROUNDS):
            for setting, bench in contexts.items():
                rounds[setting].append(bench.run())
            timings = {s: Timings(*(min(column) for column in zip(*r))) for s, r in rounds.items()}
            replies = sorted(t.reply_s(n_predict) for t in timings.values())
            if replies[-1] > CLEAR * replies[0]:
                break  # clear already: a second round would not change the choice
        agreement = None
        if len(contexts) == 2:
            on, off = contexts["on"].greedy, contexts["off"].greedy
            agreement = sum(a == b for a, b in zip(on, off)) / max(1, len(on))
        return Measurement(timings, agreement)
    finally:
        for bench in contexts.values():
            bench.free()


def _tokenize(model: ctypes.c_void_p, text: str) -> list[int]:
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    out = (L.llama_token * (len(raw) + 8))()
    n = L.llama_tokenize(vocab, raw, len(raw), out, len(out), False, False)
    return list(out[: max(0, n)])


class _Bench:
    """One measuring context (one sequence, DEPTH + READ + a few cells) and its deep state."""

    def __init__(self, ctx: ctypes.c_void_p, text: list[int], n_vocab: int) -> None:
        self.ctx = ctx
        self.mem = L.llama_get_memory(ctx)
        self.batch = L.llama_batch_init(READ, 0, 1)
        self.tokens = text  # a real text: its greedy next tokens compare the two settings' numbers
        self.n_vocab = n_vocab
        self.greedy: list[int] = []  # the next token after each of the read's positions (near an empty context)
        self.deep: ctypes.Array[ctypes.c_uint8] | None = None
        self.ready = False

    @classmethod
    def make(cls, model: ctypes.c_void_p, setting: str, text: list[int], *, n_threads: int, type_kv: int) -> _Bench | None:
        params = L.llama_context_default_params()
        params.n_ctx = DEPTH + 256
        params.n_seq_max = 1
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_TYPES[setting]
        params.type_k = params.type_v = type_kv
        params.no_perf = True
        ctx = L.llama_init_from_model(model, params)
        if not ctx:
            log.info("flash attention %s: llama.cpp cannot make a context with it for this model", setting)
            return None
        bench = cls(ctx, text, L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
        bench.ready = bench._prepare()
        return bench

    def _prepare(self) -> bool:
        """Read the text once, untimed (the first decode of that size sets llama.cpp's graph up),
        keeping its greedy next tokens; then lay one token's cell out at DEPTH positions."""
        if not self._decode(self.tokens[:READ], 0, every=True):
            return False
        logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(READ, self.n_vocab))
        self.greedy = logits.argmax(axis=1).tolist()
        L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        if not self._decode(self.tokens[:1], 0):
            return False
        size = L.llama_state_seq_get_size(self.ctx, 0)
        one = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(self.ctx, one, size, 0) != size:
            return False
        deep = repeat_cell(bytes(one), DEPTH)
        if deep is None:
            return False
        self.deep = (ctypes.c_uint8 * len(deep)).from_buffer_copy(deep)
        L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        return self._load_deep()

    def _load_deep(self) -> bool:
        assert self.deep is not None
        return L.llama_state_seq_set_data(self.ctx, self.deep, len(self.deep), 0) == len(self.deep)

    def run(self) -> list[float]:
        """[read_near, decode_near, read_deep, decode_deep] in seconds (decode: per token)."""
        L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        near = self._case(0)
        L.llama_memory_seq_rm(self.mem, 0, DEPTH, -1)
        if L.llama_memory_seq_pos_max(self.mem, 0) != DEPTH - 1:  # the deep state went with the near case's cells
            L.llama_memory_seq_rm(self.mem, 0, -1, -1)
            self._load_deep()
        deep = self._case(DEPTH)
        L.llama_memory_seq_rm(self.mem, 0, DEPTH, -1)
        return [*near, *deep]

    def _case(self, start: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self._decode(self.tokens[:READ], start)
        t1 = time.perf_counter()
        for i in range(DECODE):
            self._decode([self.tokens[READ + i]], start + READ + i)
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / DECODE

    def _decode(self, tokens: list[int], start: int, *, every: bool = False) -> bool:
        """Decode `tokens` from position `start` (`every`: logits for each of them, not only the last)."""
        b = self.batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = every or i == len(tokens) - 1
        b.n_tokens = len(tokens)
        return L.llama_decode(self.ctx, b) == 0

    def free(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)


_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


def repeat_cell(state: bytes, n: int) -> bytes | None:
    """A one-sequence state of one cell (as llama_state_seq_get_data gives it) turned into
    one of `n` cells at positions 0..n-1, each holding that cell's keys and values.

    The layout is llama.cpp's (src/llama-kv-cache.cpp, state_write): a magic and the
    sequence id; the stream count; per stream a cell count, each cell's position,
    sequence count, model-specific extra fields and sequence ids; then the V layout
    flag, the layer count, and per layer the keys (type, row size, one row per cell),
    then the values (the same, or when transposed: type, element size, width, and
    per element one value per cell). The extra fields' size is found by trying sizes
    until the rest parses to the exact length. None if it does not."""
    try:
        magic, seq, n_stream = struct.unpack_from("<IiI", state, 0)
        off = 12
        if n_stream != 1 or _U32.unpack_from(state, off)[0] != 1:
            return None
        off += 4
        for ext in range(0, 65, 4):
            parsed = _parse_data(state, off + 12 + ext)
            if parsed is not None:
                break
        else:
            return None
        cell = state[off : off + 12 + ext]  # pos, n_seq_id, ext, seq id
        v_trans, layers_k, layers_v = parsed
        out = [struct.pack("<IiII", magic, seq, n_stream, n)]
        out += [_I32.pack(i) + cell[4:] for i in range(n)]
        out.append(struct.pack("<II", v_trans, len(layers_k)))
        for head, row in layers_k:
            out += [head, row * n]
        for head, values in layers_v:
            if v_trans:  # values: one element per row of the width; each repeated per cell
                out.append(head)
                out += [el * n for el in values]
            else:
                out += [head, values[0] * n]
        return b"".join(out)
    except struct.error:
        return None


def _parse_data(state: bytes, off: int) -> tuple[int, list[tuple[bytes, bytes]], list[tuple[bytes, list[bytes]]]] | None:
    """The data part of a one-cell state from `off`: (v_trans, [(key head, row)], [(value head, parts)]),
    or None unless it ends exactly at the end of `state`."""
    try:
        v_trans, n_layer = struct.unpack_from("<II", state, off)
        if v_trans > 1 or not 0 < n_layer < 4096:
            return None
        off += 8
        keys = []
        for _ in range(n_layer):
            head = state[off : off + 12]
            (row,) = _U64.unpack_from(state, off + 4)
            off += 12
            keys.append((head, state[off : off + row]))
            off += row
        values: list[tuple[bytes, list[bytes]]] = []
        for _ in range(n_layer):
            if off == len(state):
                break  # a model whose layers keep no values
            if v_trans:
                head = state[off : off + 12]
                el, width = struct.unpack_from("<II", state, off + 4)
                off += 12
                values.append((head, [state[off + j * el : off + (j + 1) * el] for j in range(width)]))
                off += el * width
            else:
                head = state[off : off + 12]
                (row,) = _U64.unpack_from(state, off + 4)
                off += 12
                values.append((head, [state[off : off + row]]))
                off += row
        if off != len(state) or any(len(r) == 0 for _, r in keys):
            return None
        return v_trans, keys, values
    except struct.error:
        return None
