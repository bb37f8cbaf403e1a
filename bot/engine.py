"""The model engine: one preloaded GGUF serving every conversation.

Everything that touches the llama.cpp context runs on one worker thread (a
context must never be used by two threads at once), so the asyncio event loop
stays free for Discord. That thread runs a loop in the style of llama.cpp's own
server: each conversation being answered owns a *slot* (one KV-cache sequence);
every step decodes a single batch holding the next token of each generating slot
plus chunks of waiting prompts, so several channels generate together.

A slot keeps its conversation's tokens after the reply ends. The next message
in that channel only evaluates what is new (the prompt shares its prefix with
what the slot holds). When a slot is needed for another channel, the idle one
used longest ago is saved to a byte-bounded LRU cache in RAM and restored when
its channel speaks again.

Nothing here knows about Discord or the store: callers pass token ids in and
get text out.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import ctypes
import logging
import mmap
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as L
import numpy as np

from bot.config import Sampling
from bot.templates import Segment

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")


class ModelError(Exception):
    """The model file cannot be used. The message is one line for the user."""


class PromptTooLong(ValueError):
    """A prompt does not fit in a conversation's context window."""


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the bot needs to know about the loaded model."""

    path: Path
    description: str
    n_ctx_train: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    size_bytes: int


@dataclass(frozen=True)
class EngineOptions:
    """How to run the model (see `Settings` for where each value comes from)."""

    n_ctx: int | None = None  # tokens per conversation; None: min(4096, trained size)
    n_threads: int = 1
    parallel: int = 4  # slots: conversations decoded together
    kv_cache_mb: int = 256  # RAM for KV state of conversations that lost their slot
    n_batch: int = 512  # tokens per decode step
    reuse: bool = True  # False: re-evaluate every prompt from scratch (for benchmarks)
    flash_attn: str = "auto"  # "auto" (llama.cpp decides; on for CPUs), "on" or "off" (see bench/)
    llama_log: bool = False


@dataclass
class Generation:
    """One reply being generated: an async stream of text plus its outcome.

    Created by `Engine.generate` on the event loop; the engine thread reports
    into it with `call_soon_threadsafe`. Iterate it for text as it arrives, or
    `await gen.wait()` for the whole reply.
    """

    key: str
    n_prompt: int
    loop: asyncio.AbstractEventLoop
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    n_cached: int = 0  # prompt tokens reused from the KV cache
    n_evaluated: int = 0  # prompt tokens actually evaluated
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when a slot took it
    first_token_at: float | None = None
    finished_at: float | None = None
    n_generated: int = 0  # tokens generated (kept also where token ids are not known)
    _cancel: bool = False
    _on_cancel: Callable[[], None] | None = None  # tells the producer to look now
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop as soon as possible, even mid-prompt; text generated so far is kept."""
        self._cancel = True
        if self._on_cancel is not None and not self.done:
            self._on_cancel()

    async def wait(self) -> Generation:
        while not self.done:
            await self._changed.wait()
            self._changed.clear()
        return self

    async def stream(self) -> AsyncIterator[str]:
        """Yield new text as it arrives (pieces coalesce when the reader is slower)."""
        sent = 0
        while True:
            if len(self.text) > sent:
                chunk, sent = self.text[sent:], len(self.text)
                yield chunk
                continue
            if self.done:
                return
            await self._changed.wait()
            self._changed.clear()

    # called on the event loop, scheduled by the engine thread
    def _deliver(self, text: str, finish_reason: str | None, error: str | None) -> None:
        self.text += text
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
            self.finished_at = time.perf_counter()
        self._changed.set()


REPORT_EVERY_S = 0.05
"""Streamed text reaches the caller at most this often (the first piece at once). Each
delivery wakes the event loop, which on a 2-core box takes CPU from the decoding threads:
one wake-up per token measured 2-3% off decode speed. 50 ms is finer than a reader, or
Discord's one edit a second, can tell."""


class _Request:
    """Engine-thread state of one generation."""

    def __init__(self, gen: Generation, prompt: list[int], max_tokens: int, sampling: Sampling, stop: Sequence[str]):
        self.gen = gen
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.out = StopText(stop)
        self.pending: list[int] = []  # prompt tokens not yet evaluated
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.sampler: int | None = None  # llama.cpp's sampler chain; None for plain greedy
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n_generated = 0
        # Greedy with no repeat penalty is a plain argmax over the logits: numpy does it in
        # microseconds, where the sampler chain first copies all n_vocab logits (~3% of a step).
        self.argmax = sampling.temperature <= 0 and (sampling.repeat_penalty == 1.0 or not sampling.repeat_last_n)
        self.unsent = ""  # text shown but not yet delivered (see REPORT_EVERY_S)
        self.reported_at = 0.0


@dataclass
class _Slot:
    seq: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)  # exactly what the KV cache holds for this seq
    last_used: float = 0.0
    request: _Request | None = None


def _state_buffer(size: int) -> ctypes.Array[ctypes.c_uint8]:
    """Room for one saved KV state, in its own anonymous memory mapping.

    States are megabytes each and come and go all day. From malloc, glibc soon serves
    blocks that size from its heap, where freed ones leave holes the process keeps
    (seen in the soak: RSS swinging 80 MiB above the live cache). A mapping is given
    back to the system the moment the state is dropped."""
    return (ctypes.c_uint8 * size).from_buffer(mmap.mmap(-1, size))


class _StateCache:
    """Saved KV state of conversations that lost their slot: an LRU bounded in bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._entries: collections.OrderedDict[str, tuple[ctypes.Array[ctypes.c_uint8], list[int]]] = collections.OrderedDict()

    def put(self, key: str, data: ctypes.Array[ctypes.c_uint8], tokens: list[int]) -> None:
        self.drop(key)
        if len(data) > self.limit:
            return
        while self.used + len(data) > self.limit:
            _, (old, _) = self._entries.popitem(last=False)
            self.used -= len(old)
        self._entries[key] = (data, tokens)
        self.used += len(data)

    def take(self, key: str) -> tuple[ctypes.Array[ctypes.c_uint8], list[int]] | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= len(entry[0])
        return entry

    def drop(self, key: str) -> None:
        self.take(key)

    def __len__(self) -> int:
        return len(self._entries)


_log_callback_ref = None  # keeps the ctypes callback alive for the process lifetime
_backend_ready = False


def _init_backend(verbose: bool) -> None:
    """Route llama.cpp's own log lines to `logging` (or drop them), once per process."""
    global _log_callback_ref, _backend_ready
    levels = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level; 5 continues a line

    @L.llama_log_callback
    def forward(level: int, text: bytes, _data: ctypes.c_void_p) -> None:
        if verbose and text:
            llama_log.log(levels.get(level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip("\n"))

    _log_callback_ref = forward
    L.llama_log_set(forward, ctypes.c_void_p(0))
    if not _backend_ready:
        L.llama_backend_init()
        _backend_ready = True


def check_model_file(path: Path) -> None:
    """Fail early, in one line, on a path that cannot be a GGUF model."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF model file (it does not start with the GGUF signature)")


class Engine:
    """The shared model. Create it with `await Engine.load(...)`; `close()` when done."""

    def __init__(self) -> None:  # use Engine.load
        self.info: ModelInfo
        self.options: EngineOptions
        self.n_ctx: int  # tokens per conversation
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._lock = threading.Condition()
        self._incoming: collections.deque[_Request] = collections.deque()
        self._forget: set[str] = set()
        self._stopping = False
        self._serving: concurrent.futures.Future[None] | None = None
        self._abort_now = False  # set on shutdown: abort the decode in progress
        self._watched: list[Generation] = []  # generations in the decode in progress
        self._piece_cache: dict[int, bytes] = {}
        self._poison_next = 0  # fault drills: decodes to feed an invalid token (see inject_decode_failure)
        # counters (read by tests and the benchmark)
        self.steps = 0
        self.batched_steps = 0  # steps that decoded more than one sequence
        self.tokens_evaluated = 0

    # --- loading -----------------------------------------------------------------------

    @classmethod
    async def load(cls, path: Path, options: EngineOptions) -> Engine:
        """Load and warm the model on the engine thread, then start serving."""
        return await asyncio.to_thread(cls.load_sync, path, options)

    @classmethod
    def load_sync(cls, path: Path, options: EngineOptions) -> Engine:
        """`load` for code without an event loop (the tests' session fixture)."""
        engine = cls()
        try:
            engine._executor.submit(engine._load, path, options).result()
        except BaseException:
            engine._executor.shutdown(wait=False)
            raise
        engine._serving = engine._executor.submit(engine._serve)
        return engine

    def _load(self, path: Path, options: EngineOptions) -> None:
        check_model_file(path)
        _init_backend(options.llama_log)
        mparams = L.llama_model_default_params()
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelError(f"llama.cpp could not load {path}: the file is truncated, corrupt or of an unsupported architecture (LLAMA_LOG=1 shows why)")
        self._model = model
        self._vocab = L.llama_model_get_vocab(model)
        n_ctx_train = L.llama_model_n_ctx_train(model)
        n_ctx = options.n_ctx or min(4096, n_ctx_train)
        if n_ctx > n_ctx_train:
            log.warning("LLAMA_N_CTX=%d is more than the model was trained for (%d)", n_ctx, n_ctx_train)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx * options.parallel
        cparams.n_seq_max = options.parallel
        cparams.kv_unified = False  # each conversation gets its own n_ctx cells
        cparams.n_batch = cparams.n_ubatch = options.n_batch
        cparams.n_threads = cparams.n_threads_batch = options.n_threads
        cparams.no_perf = not options.llama_log
        cparams.flash_attn_type = {"off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED}.get(
            options.flash_attn, L.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} x {options.parallel} tokens (out of memory?)")
        self._ctx = ctx
        self._mem = L.llama_get_memory(ctx)
        self.n_ctx = L.llama_n_ctx_seq(ctx)
        self.options = options
        self._batch = L.llama_batch_init(options.n_batch, 0, 1)
        self._slots = [_Slot(seq) for seq in range(options.parallel)]
        self._states = _StateCache(options.kv_cache_mb * 1024 * 1024)
        self._abort_cb = L.ggml_abort_callback(self._should_abort)
        self._no_abort = L.ggml_abort_callback()  # a NULL callback: no per-node Python call
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.info = _describe(model, path)
        self._bos = L.llama_vocab_bos(self._vocab)
        self._space_prefix = self._detect_space_prefix()
        self._anchor = self.tokenize("\n", special=False)
        self._warm_up()
        log.info("model loaded: %s (%s), context %d tokens x %d slots, %d threads", path.name, self.info.description, self.n_ctx, options.parallel, options.n_threads)

    def _warm_up(self) -> None:
        """One real decode, so the first user does not pay for page faults and graph setup."""
        tokens = self.tokenize("Hello", special=False) or [0]
        self._fill_batch([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        if L.llama_decode(self._ctx, self._batch) != 0:
            raise ModelError("the model failed its first decode")
        L.llama_memory_seq_rm(self._mem, 0, -1, -1)

    # --- tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Text to token ids. `special=True` only for template markup, never for user text."""
        data = text.encode("utf-8")
        if not data:
            return []
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        return list(buf[:n])

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """A rendered prompt to token ids, parsing special tokens in markup only.

        Segments are tokenized one by one and joined, so text a user typed can
        never turn into a control token. Spaces at a boundary move to the start
        of the next segment, where whole-string tokenization would put them.
        """
        texts = [s.text for s in segments]
        for i in range(len(texts) - 1):
            stripped = texts[i].rstrip(" ")
            if stripped != texts[i]:
                texts[i + 1] = texts[i][len(stripped) :] + texts[i + 1]
                texts[i] = stripped
        tokens: list[int] = []
        for text, seg in zip(texts, segments):
            if text:
                tokens += self._tokenize_continuation(text, seg.special) if tokens else self.tokenize(text, special=seg.special)
        if self.info.add_bos and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tokens

    def _detect_space_prefix(self) -> bool:
        """SentencePiece vocabularies put a space before every tokenize call's text."""
        return self._piece_text(self.tokenize("a", special=False)).startswith(" ")

    def _tokenize_continuation(self, text: str, special: bool) -> list[int]:
        """Tokenize `text` as it would be in the middle of a prompt.

        With a space-prefixing vocabulary, tokenize after an anchor and cut the
        anchor's tokens off, so no spurious space is added at the seam.
        """
        if not self._space_prefix:
            return self.tokenize(text, special=special)
        both = self.tokenize("\n" + text, special=special)
        if both[: len(self._anchor)] == self._anchor:
            return both[len(self._anchor) :]
        return self.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text; control tokens render as nothing."""
        return self._piece_text(tokens)

    def _piece_text(self, tokens: Sequence[int]) -> str:
        return b"".join(self._cached_piece(t) for t in tokens).decode("utf-8", "replace")

    def _cached_piece(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._piece_cache[token] = self._piece(token, special=False)
        return piece

    def _piece(self, token: int, *, special: bool) -> bytes:
        return _piece(self._vocab, token, special=special)

    def is_control(self, token: int) -> bool:
        """True for control tokens (`<|im_start|>`, `</s>`, ...), which no user text may produce."""
        return bool(L.llama_vocab_get_attr(self._vocab, token) & L.LLAMA_TOKEN_ATTR_CONTROL) or bool(L.llama_vocab_is_eog(self._vocab, token))

    # --- serving -----------------------------------------------------------------------

    def generate(self, key: str, prompt: list[int], *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()) -> Generation:
        """Start generating a reply to `prompt` for conversation `key`. Call on the event loop."""
        if len(prompt) >= self.n_ctx:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        if not prompt:
            raise ValueError("empty prompt")
        gen = Generation(key=key, n_prompt=len(prompt), loop=asyncio.get_running_loop(), _on_cancel=self.wake)
        request = _Request(gen, list(prompt), max_tokens, sampling, stop)
        with self._lock:
            if self._stopping:
                raise RuntimeError("engine is closed")
            self._incoming.append(request)
            self._lock.notify()
        return gen

    def forget(self, key: str) -> None:
        """Drop a conversation's cached KV state (after /reset, /template, edits)."""
        with self._lock:
            self._forget.add(key)
            self._lock.notify()

    def inject_decode_failure(self, times: int = 1) -> None:
        """Fault drill: give llama.cpp an invalid token in the next `times` decode steps.

        llama_decode then really fails, and everything downstream (resync, the
        apology, serving on) runs for real. Used by the reliability tests.
        """
        with self._lock:
            self._poison_next += times
            self._lock.notify()

    def wake(self) -> None:
        """Make the engine thread look at cancellations now."""
        with self._lock:
            self._lock.notify()

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    @property
    def cached_states(self) -> int:
        return len(self._states)

    @property
    def cache_bytes(self) -> int:
        return self._states.used

    async def close(self) -> None:
        """Finish: cancel what is running, stop the thread, free llama.cpp memory."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._lock:
            self._stopping = True
            self._abort_now = True
            self._lock.notify()
        if self._serving is not None:
            self._serving.result()
        self._executor.submit(self._free).result()
        self._executor.shutdown(wait=True)

    def _free(self) -> None:
        for slot in self._slots:
            if slot.request is not None and slot.request.sampler:
                L.llama_sampler_free(slot.request.sampler)
        L.llama_batch_free(self._batch)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)

    # --- the engine thread -------------------------------------------------------------

    def _serve(self) -> None:
        """The loop: admit requests, decode one batch, sample, report; until closed."""
        while True:
            with self._lock:
                while not self._stopping and not self._incoming and not self._forget and not self._active():
                    self._lock.wait()
                if self._stopping:
                    break
                forget, self._forget = self._forget, set()
                incoming = self._take_admissible()
            for key in forget:
                self._drop_key(key)
            for request in incoming:
                self._admit(request)
            for slot in self._active():
                if slot.request is not None and slot.request.gen._cancel:
                    self._finish(slot, "cancelled")
            if self._active():
                try:
                    self._step()
                except Exception as exc:  # a failed decode must not take the other channels down
                    log.exception("decode step failed")
                    for slot in self._active():
                        self._finish(slot, "error", f"{type(exc).__name__}: {exc}")
                        self._clear(slot)
        for slot in self._active():
            self._finish(slot, "cancelled")
        with self._lock:
            leftovers, self._incoming = list(self._incoming), collections.deque()
        for request in leftovers:
            self._report(request, "", "cancelled")

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None]

    def _take_admissible(self) -> list[_Request]:
        """Requests that can get a slot now (called with the lock held)."""
        free = sum(1 for s in self._slots if s.request is None)
        taken = []
        while self._incoming and len(taken) < free:
            taken.append(self._incoming.popleft())
        return taken

    def _drop_key(self, key: str) -> None:
        self._states.drop(key)
        for slot in self._slots:
            if slot.key == key and slot.request is None:
                self._clear(slot)

    def _clear(self, slot: _Slot) -> None:
        L.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.tokens = []
        slot.key = None

    def _admit(self, request: _Request) -> None:
        """Give a request a slot, reusing as much cached KV as possible."""
        key = request.gen.key
        idle = [s for s in self._slots if s.request is None]
        slot = next((s for s in idle if s.key == key), None)
        if slot is None:
            slot = next((s for s in idle if s.key is None), None) or min(idle, key=lambda s: s.last_used)
            if slot.key is not None:
                self._evict(slot)
            self._restore(slot, key)
        if not self.options.reuse:
            self._clear(slot)
        slot.key = key
        slot.request = request
        slot.last_used = time.perf_counter()
        request.gen.started_at = slot.last_used
        prompt = request.prompt
        keep = _common_prefix(slot.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # the last prompt token must be evaluated again to get its logits
        if keep < len(slot.tokens):
            if not L.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
                self._clear(slot)
                keep = 0
            del slot.tokens[keep:]
        request.pending = prompt[keep:]
        request.gen.n_cached = keep
        request.gen.n_evaluated = len(request.pending)
        request.sampler = None if request.argmax else self._make_sampler(request.sampling, prompt)

    def _evict(self, slot: _Slot) -> None:
        """Save an idle slot's KV state to the RAM cache, then empty the slot."""
        assert slot.key is not None
        if self.options.reuse and slot.tokens and self._states.limit:
            size = L.llama_state_seq_get_size(self._ctx, slot.seq)
            if 0 < size <= self._states.limit:
                data = _state_buffer(size)
                if L.llama_state_seq_get_data(self._ctx, data, size, slot.seq) == size:
                    self._states.put(slot.key, data, list(slot.tokens))
        self._clear(slot)

    def _restore(self, slot: _Slot, key: str) -> None:
        entry = self._states.take(key)
        if entry is None or not self.options.reuse:
            return
        data, tokens = entry
        if L.llama_state_seq_set_data(self._ctx, data, len(data), slot.seq) == len(data):
            slot.tokens = tokens
        else:
            log.warning("could not restore cached state for %s; evaluating its prompt again", key)
            self._clear(slot)

    def _make_sampler(self, s: Sampling, prompt: list[int]) -> int:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0 and s.repeat_last_n:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(self._n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else secrets.randbelow(2**32 - 1)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        # the repeat penalty looks at recent prompt tokens too, as llama.cpp's server does
        for token in prompt[-s.repeat_last_n :] if s.repeat_last_n else []:
            L.llama_sampler_accept(chain, token)
        return chain

    def _fill_batch(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Write (token, position, sequence, wants_logits) rows into the shared batch."""
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)

    def _step(self) -> None:
        """Decode one batch: a token for each generating slot, then prompt chunks."""
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Slot, int]] = []  # slots that sample from this batch, with batch index
        grown: list[tuple[_Slot, list[int], bool]] = []  # (slot, tokens added, are they prompt tokens)
        budget = self.options.n_batch
        for slot in self._active():
            req = slot.request
            assert req is not None
            if req.next_token is not None:
                outputs.append((slot, len(entries)))
                entries.append((req.next_token, len(slot.tokens), slot.seq, True))
                grown.append((slot, [req.next_token], False))
                budget -= 1
        prompt_tokens = 0
        for slot in self._active():
            req = slot.request
            assert req is not None
            if req.next_token is None and req.pending and budget > 0:
                chunk = req.pending[:budget]
                start = len(slot.tokens)
                last = len(chunk) == len(req.pending)
                for j, token in enumerate(chunk):
                    entries.append((token, start + j, slot.seq, last and j == len(chunk) - 1))
                if last:
                    outputs.append((slot, len(entries) - 1))
                grown.append((slot, chunk, True))
                budget -= len(chunk)
                prompt_tokens += len(chunk)
        if not entries:
            return
        if self._poison_next:
            self._poison_next -= 1
            entries[0] = (self._n_vocab + 1, *entries[0][1:])  # an id the vocabulary does not have
        self._fill_batch(entries)
        # The abort callback runs once per graph node; only pay for it on long prompt chunks.
        watch = prompt_tokens >= 32
        self._watched = [s.request.gen for s, _, _ in grown if s.request is not None] if watch else []
        L.llama_set_abort_callback(self._ctx, self._abort_cb if watch else self._no_abort, None)
        rc = L.llama_decode(self._ctx, self._batch)
        self.steps += 1
        self.batched_steps += len(grown) > 1
        if rc != 0:
            self._after_failed_decode(rc, grown)
            return
        for slot, toks, prompt in grown:
            req = slot.request
            assert req is not None
            if prompt:
                del req.pending[: len(toks)]
                self.tokens_evaluated += len(toks)
            else:
                req.next_token = None
            slot.tokens += toks
        for slot, index in outputs:
            self._sample(slot, index)

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        """Called by llama.cpp between graph nodes: stop now if a /stop or shutdown came in."""
        return self._abort_now or any(g._cancel for g in self._watched)

    def _after_failed_decode(self, rc: int, grown: list[tuple[_Slot, list[int], bool]]) -> None:
        """An aborted (/stop) or failed decode: resync each slot with what the KV really holds."""
        for slot, toks, prompt in grown:
            req = slot.request
            assert req is not None
            kept = L.llama_memory_seq_pos_max(self._mem, slot.seq) + 1  # -1 when empty
            processed = max(0, kept - len(slot.tokens))
            slot.tokens += toks[:processed]
            if prompt:
                del req.pending[:processed]
            elif processed:
                req.next_token = None
        if rc == 2:  # aborted on purpose: the cancelled ones finish, the others simply continue
            for slot, _, _ in grown:
                if slot.request is not None and slot.request.gen._cancel:
                    self._finish(slot, "cancelled")
            return
        log.error("llama_decode failed with code %d; ending the replies in that batch: %s", rc, ", ".join(s.key or "?" for s, _, _ in grown))
        for slot, _, _ in grown:
            self._finish(slot, "error", f"llama_decode returned {rc}")

    def _sample(self, slot: _Slot, index: int) -> None:
        req = slot.request
        assert req is not None
        if req.sampler is None:  # plain greedy (req.argmax)
            token = int(np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,)).argmax())
        else:
            token = L.llama_sampler_sample(req.sampler, self._ctx, index)
        gen = req.gen
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()
        if self.is_control(token):
            self._finish(slot, "stop")
            return
        req.n_generated += 1
        gen.tokens.append(token)
        gen.n_generated = req.n_generated
        shown = req.out.add(req.decoder.decode(self._cached_piece(token)))
        if req.out.stopped:
            self._finish(slot, "stop")
            return
        if shown:
            req.unsent += shown
            now = time.perf_counter()
            if now - req.reported_at >= REPORT_EVERY_S:
                self._report(req, req.unsent, None)
                req.unsent, req.reported_at = "", now
        if req.n_generated >= req.max_tokens or len(slot.tokens) + 1 >= self.n_ctx:
            req.out.text += req.decoder.decode(b"", final=True)
            self._finish(slot, "length")
            return
        req.next_token = token
        if gen._cancel:
            self._finish(slot, "cancelled")

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        req = slot.request
        assert req is not None
        self._report(req, req.unsent + req.out.rest(), reason, error)
        if req.sampler is not None:
            L.llama_sampler_free(req.sampler)
            req.sampler = None
        slot.request = None
        slot.last_used = time.perf_counter()
        if self.options.llama_log:
            g = req.gen
            prompt_s = (g.first_token_at or time.perf_counter()) - (g.started_at or g.queued_at)
            gen_s = time.perf_counter() - (g.first_token_at or time.perf_counter())
            log.info(
                "timings %s: prompt %d tokens (%d cached) in %.3f s; generated %d tokens in %.3f s (%.1f tokens/s); %s",
                g.key, g.n_prompt, g.n_cached, prompt_s, req.n_generated, gen_s, req.n_generated / gen_s if gen_s > 0 else 0.0, reason,
            )

    def _report(self, req: _Request, text: str, reason: str | None, error: str | None = None) -> None:
        try:
            req.gen.loop.call_soon_threadsafe(req.gen._deliver, text, reason, error)
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            req.gen._cancel = True


def _piece(vocab: int, token: int, *, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def _describe(model: int, path: Path) -> ModelInfo:
    vocab = L.llama_model_get_vocab(model)

    def special_text(token: int) -> str:
        return _piece(vocab, token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, len(desc))
    template = L.llama_model_chat_template(model, None)
    return ModelInfo(
        path=path,
        description=desc.value.decode("utf-8", "replace"),
        n_ctx_train=L.llama_model_n_ctx_train(model),
        chat_template=template.decode("utf-8", "replace") if template else None,
        bos_token=special_text(L.llama_vocab_bos(vocab)),
        eos_token=special_text(L.llama_vocab_eos(vocab)),
        add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
        size_bytes=L.llama_model_size(model),
    )


def read_model_info(path: Path, *, verbose: bool = False) -> ModelInfo:
    """Read a model's metadata (chat template, special tokens) without loading its weights."""
    check_model_file(path)
    _init_backend(verbose)
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp could not read {path}: the file is truncated, corrupt or of an unsupported architecture")
    try:
        return _describe(model, path)
    finally:
        L.llama_model_free(model)


class StopText:
    """A reply's text as it arrives: cut where a stop string appears, and held back
    while its end could still be the start of one, so no stop marker is ever shown."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0  # how much of `text` was handed out
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append a piece; returns the text now safe to show (empty once a stop string ended it)."""
        self.text += piece
        cut = find_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return ""
        safe = len(self.text) - held_back(self.text, self.stops)
        if safe <= self.emitted:
            return ""
        shown, self.emitted = self.text[self.emitted : safe], safe
        return shown

    def rest(self) -> str:
        """Everything not handed out yet (at the end of the reply)."""
        rest, self.emitted = self.text[self.emitted :], len(self.text)
        return rest


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index of the earliest stop string in `text` (searching only where one could newly appear)."""
    best: int | None = None
    for stop in stops:
        at = text.find(stop, max(0, emitted - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string, so must wait."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
