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
its channel speaks again. States leaving RAM go to the disk tier (`bot.engine.kvdisk`,
KV_DISK_DIR), which `close()` also fills with what RAM and the slots hold, so
the next process starts warm. A state on disk is read on an I/O thread before
its request reaches the engine thread, which then only copies it into place.

A model that can see (a projector, MMPROJ_PATH) takes images too: `bot.engine.vision`
lays each out in the prompt as ids made from its content hash (so reuse and the disk
tier work unchanged), encodes it on a thread of its own, and `_feed_images` decodes its
embeddings into the slot between decode steps.

A fault on the engine thread fails only the replies it touches; the thread
keeps serving. If it cannot go on, every waiting and later reply fails at once
and `on_fatal` tells the process to exit, so the service manager restarts it.

Nothing here knows about Discord or the store: callers pass token ids in and
get text out.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import llama_cpp as L
import numpy as np

from bot.engine import flashattn
from bot.engine.gate import FairGate
from bot.engine.backend import EngineStats, Generation, ImagePart, ModelError, ModelInfo, PreparedPrompt, PromptTooLong, WarmStats
from bot.config import Sampling
from bot.engine.kvdisk import SPARE_IDLE_S, ForgetClock, KVDisk, SavedState, StateBuffers, common_prefix, model_identity
from bot.formats.reasoning import ReplyFormat, ReplyText
from bot.formats.templates import Image, Message, Segment, Template, reply_format
from bot.engine.vision import MEDIA_MARKER, PLACEHOLDER, ChunkSize, ImageFeed, Vision, decode_embeddings, image_ids
from bot.engine.vocab import Vocab, check_model_file, init_backend

log = logging.getLogger(__name__)

FATAL_AFTER = 5
"""Faults in a row (with no successful step between them) after which the engine gives up."""

WARM_MIN_TOKENS = 32
"""A warm-up evaluates what a restored state lacks only from this many tokens up: the last
turn's closing markup (2-3 tokens) is left to the reply, so the slot stays what the disk
holds and can be given up without a save."""


class EngineDead(RuntimeError):
    """The engine thread cannot go on; the process should exit and be restarted."""


@dataclass(frozen=True)
class EngineOptions:
    """How to run the model (see `Settings` for where each value comes from)."""

    n_ctx: int | None = None  # tokens per conversation; None: min(4096, trained size)
    n_threads: int = 1
    parallel: int = 4  # slots: conversations decoded together
    kv_cache_mb: int = 256  # RAM for KV state of conversations that lost their slot
    # llama-server's defaults. A prompt read alone goes to llama.cpp n_batch tokens at a time (it
    # computes them n_ubatch at a time); while other slots generate, a step holds at most n_ubatch
    # tokens, so their next token never waits for more than one micro-batch (see bench/: prompt).
    n_batch: int = 2048
    n_ubatch: int = 512
    reuse: bool = True  # False: re-evaluate every prompt from scratch (for benchmarks)
    # "on", "off", or "auto": measured once per CPU (bot.engine.flashattn). The bot passes FLASH_ATTN (auto by
    # default); code that builds options itself gets on, llama.cpp's choice for CPUs, unless it asks to measure.
    flash_attn: str = "on"
    flash_attn_cache: Path | None = None  # where auto keeps its measurement; None: ~/.cache/llamabot/flash-attn.json
    n_predict: int = 512  # the configured reply length (auto weighs generating speed by it)
    warm_ttl_s: float = 30.0  # a warm-up no reply followed within this long is dropped (see Engine.warm)
    llama_log: bool = False
    kv_type: str = "f16"  # "f16" or "q8_0" (half the bytes per token; needs flash attention)
    kv_disk_dir: Path | None = None  # the disk tier's folder; None: no disk tier
    kv_disk_mb: int = 0  # the disk tier's budget; 0: no disk tier
    mmproj: Path | None = None  # a vision projector (MMPROJ_PATH): the model can see images


KV_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0}


@dataclass
class EngineShared:
    """What the engines of several loaded models share (bot.engine.pool): one forget clock (a
    conversation forgotten is stale in every model), state buffers, the disk tier's folder
    (each engine takes a view of it for its identity), and the gate that has them take turns
    on the CPU (bot.engine.gate)."""

    clock: ForgetClock = field(default_factory=ForgetClock)
    buffers: StateBuffers = field(default_factory=StateBuffers)
    disk: KVDisk | None = None  # None: no disk tier
    gate: FairGate | None = None


REPORT_EVERY_S = 0.05
"""Streamed text reaches the caller at most this often (the first piece at once). Each
delivery wakes the event loop, which on a 2-core box takes CPU from the decoding threads:
one wake-up per token measured 2-3% off decode speed. 50 ms is finer than a reader, or
Discord's one edit a second, can tell."""


class _Request:
    """Engine-thread state of one generation."""

    def __init__(self, gen: Generation, prompt: list[int], max_tokens: int, sampling: Sampling, fmt: ReplyFormat, grammar: str | None):
        self.gen = gen
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.out = ReplyText(fmt)
        self.special = fmt.harmony  # control tokens are part of the text (gpt-oss channels)
        self.grammar = grammar
        self.pending: list[int] = []  # prompt tokens not yet evaluated
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.sampler: int | None = None  # llama.cpp's sampler chain; None for plain greedy
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n_generated = 0
        # Greedy with no repeat penalty is a plain argmax over the logits: numpy does it in
        # microseconds, where the sampler chain first copies all n_vocab logits (~3% of a step).
        self.argmax = grammar is None and sampling.temperature <= 0 and (sampling.repeat_penalty == 1.0 or not sampling.repeat_last_n)
        self.unsent = ""  # answer text not yet delivered (see REPORT_EVERY_S)
        self.unsent_reasoning = ""
        self.reported_thinking = False
        self.reported_at = 0.0
        self.fetched = False  # its conversation's state was looked for on disk already
        self.saved: SavedState | None = None  # ... and this is what was read
        self.images: ImageFeed | None = None  # its prompt's images (bot.engine.vision), if any


@dataclass
class _Slot:
    seq: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)  # exactly what the KV cache holds for this seq
    last_used: float = 0.0
    request: _Request | None = None
    born: int = 0  # ForgetClock time when its content began (see bot.engine.kvdisk)
    # Its first `stored` tokens are a prefix of the disk file whose tokens have digest `disk_digest`:
    # while no token is added, evicting it needs no save (the file has it all).
    disk_digest: str | None = None
    stored: int = 0
    ahead: tuple[float, int] | None = None  # (last_used, tokens) when last saved ahead of its eviction (see Engine._save_ahead)

    def unchanged_on_disk(self) -> bool:
        return self.disk_digest is not None and len(self.tokens) <= self.stored


@dataclass
class _Warm:
    """A warm-up (see `Engine.warm`): a conversation's state being made ready for the message
    its member is typing."""

    key: str
    tokens: list[int]  # the prompt the next message will extend
    born: int  # ForgetClock time when asked: forgotten since, it is dropped
    deadline: float  # perf_counter: dropped (wasted) if no reply of `key` started by then
    started: bool = False  # it did work (restore, read, evaluation)
    done: bool = False  # nothing more to do: the state is as ready as it gets
    seq: int | None = None  # the slot it restored into or evaluates in
    reading: bool = False  # its state is being read from disk
    result: SavedState | None = None  # ... and this is what was read, not yet placed
    read_done: bool = False  # a read finished (None: the file was unusable)
    unreadable: bool = False  # ... and it was: evaluate instead of reading again
    waiters: list[tuple[_Request, bool]] = field(default_factory=list)  # replies waiting for that read (with `first`)
    evaluated: int = 0  # tokens it evaluated
    cpu_s: float = 0.0


class _StateCache:
    """Saved KV state of conversations that lost their slot: an LRU bounded in bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._entries: collections.OrderedDict[str, SavedState] = collections.OrderedDict()

    def put(self, key: str, state: SavedState, protect: frozenset[str] = frozenset()) -> list[tuple[str, SavedState]]:
        """Keep a state; returns the ones pushed out to make room (oldest first), or the state
        itself when it does not fit (without pushing out the `protect`ed keys). The caller
        takes out any older state of `key` first."""
        assert key not in self._entries
        size = len(state.data)
        movable = sum(len(s.data) for k, s in self._entries.items() if k not in protect)
        if self.used - movable + size > self.limit:
            return [(key, state)]
        out = []
        for old_key in list(self._entries):
            if self.used + size <= self.limit:
                break
            if old_key not in protect:
                old = self._entries.pop(old_key)
                self.used -= len(old.data)
                out.append((old_key, old))
        self._entries[key] = state
        self.used += size
        return out

    def peek(self, key: str) -> SavedState | None:
        """The state kept for `key`, left where it is."""
        return self._entries.get(key)

    def take(self, key: str) -> SavedState | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= len(entry.data)
        return entry

    def items(self) -> list[tuple[str, SavedState]]:
        return list(self._entries.items())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class Engine:
    """The shared model. Create it with `await Engine.load(...)`; `close()` when done."""

    def __init__(self) -> None:  # use Engine.load
        self.info: ModelInfo
        self.vocab: Vocab
        self.options: EngineOptions
        self.n_ctx: int  # tokens per conversation
        self.n_batch: int  # most tokens in one decode step
        self.n_ubatch: int  # most tokens in a step while other slots generate
        self.on_fatal: Callable[[str], None] | None = None  # called (from the engine thread) when it gives up
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._lock = threading.Condition()
        self._incoming: collections.deque[_Request] = collections.deque()
        self._forget: set[str] = set()
        self._stopping = False
        self._dead: str | None = None  # why the engine gave up, once it has
        self._serving: concurrent.futures.Future[None] | None = None
        self._abort_now = False  # set on shutdown: abort the decode in progress
        self._watched: list[Generation] = []  # generations in the decode in progress
        self._faults: collections.Counter[str] = collections.Counter()  # fault drills (see inject_fault)
        self._faults_in_a_row = 0
        # counters (read by tests and the benchmark)
        self.steps = 0
        self.batched_steps = 0  # steps that decoded more than one sequence
        self.tokens_evaluated = 0
        self.disk_restores = 0  # states restored from the disk tier
        self.image_batches = 0  # decodes of image embeddings
        self.encode_waits = 0  # rounds the engine thread had nothing to do but wait for an image's encode
        self.saves = 0  # slot states copied out of llama.cpp (evictions, shutdown, ahead of an eviction)
        self.saves_ahead = 0  # ... of which while the engine was idle, ahead of the slot's eviction
        self.saves_skipped = 0  # evictions that needed no copy: the disk held the slot's state unchanged
        self.spent: collections.Counter[str] = collections.Counter()  # seconds in "save", "save_ahead" and "restore" (state copies)
        self.flash_attn: flashattn.Choice  # FLASH_ATTN as resolved at load
        self.warm_stats = WarmStats()  # what warm-ups cost and brought (changed under the lock)
        self._warms: dict[str, _Warm] = {}  # live warm-ups, oldest first (under the lock)
        self._warm_due = False  # a warm-up may have work: look when idle
        self._warm_decoding: str | None = None  # the conversation a warm-up decode is running for (under the lock)
        self._reads: collections.Counter[str] = collections.Counter()  # replies whose state is being read from disk
        self._admitting = 0  # requests taken from the queue, not yet in a slot (see `busy`)
        self._clock = ForgetClock()
        self._buffers = StateBuffers()
        self._disk: KVDisk | None = None
        self._shared: EngineShared | None = None  # shared with other loaded models (bot.engine.pool)
        self._turn: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext  # held around each decode (FairGate)
        self.vision: Vision | None = None  # the projector, when the model can see images
        self._encodes_done = 0  # encodes finished (under _lock): wakes an engine thread that waits for one

    # --- loading -----------------------------------------------------------------------

    @classmethod
    async def load(cls, path: Path, options: EngineOptions, *, abort: threading.Event | None = None, shared: EngineShared | None = None) -> Engine:
        """Load and warm the model on the engine thread, then start serving.

        Setting `abort` (a shutdown signal) stops the load between tensors with a ModelError.
        `shared`: what it shares with other loaded models (bot.engine.pool)."""
        return await asyncio.to_thread(cls.load_sync, path, options, abort=abort, shared=shared)

    @classmethod
    def load_sync(cls, path: Path, options: EngineOptions, *, abort: threading.Event | None = None, shared: EngineShared | None = None) -> Engine:
        """`load` for code without an event loop (the tests' session fixture)."""
        engine = cls()
        if shared is not None:
            engine._shared = shared
            engine._clock, engine._buffers = shared.clock, shared.buffers
            if shared.gate is not None:
                engine._turn = functools.partial(shared.gate.turn, id(engine))
        try:
            engine._executor.submit(engine._load, path, options, abort).result()
        except BaseException:
            engine._executor.shutdown(wait=False)
            raise
        engine._serving = engine._executor.submit(engine._serve)
        engine._serving.add_done_callback(engine._serving_ended)
        return engine

    def _load(self, path: Path, options: EngineOptions, abort: threading.Event | None) -> None:
        check_model_file(path)
        init_backend(options.llama_log)
        mparams = L.llama_model_default_params()
        if abort is not None:
            keep_going = L.llama_progress_callback(lambda _progress, _data: not abort.is_set())
            mparams.progress_callback = keep_going
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            if abort is not None and abort.is_set():
                raise ModelError("stopped while loading the model")
            raise ModelError(f"llama.cpp could not load {path}: the file is truncated, corrupt or of an unsupported architecture (LLAMA_LOG=1 shows why)")
        self._model = model
        n_ctx_train = L.llama_model_n_ctx_train(model)
        n_ctx = options.n_ctx or min(4096, n_ctx_train)
        if n_ctx > n_ctx_train:
            log.warning("LLAMA_N_CTX=%d is more than the model was trained for (%d)", n_ctx, n_ctx_train)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx * options.parallel
        cparams.n_seq_max = options.parallel
        cparams.kv_unified = False  # each conversation gets its own n_ctx cells
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = min(options.n_ubatch, options.n_batch)
        cparams.n_threads = cparams.n_threads_batch = options.n_threads
        cparams.no_perf = not options.llama_log
        self.flash_attn = flashattn.resolve(
            options.flash_attn, model, path, n_threads=options.n_threads, kv_type=options.kv_type, type_kv=KV_TYPES[options.kv_type],
            n_predict=options.n_predict, cache_path=options.flash_attn_cache,
        )
        cparams.flash_attn_type = flashattn.FLASH_TYPES[self.flash_attn.setting]
        cparams.type_k = cparams.type_v = KV_TYPES[options.kv_type]
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} x {options.parallel} tokens (out of memory?)")
        self._ctx = ctx
        self._mem = L.llama_get_memory(ctx)
        self.n_ctx = L.llama_n_ctx_seq(ctx)
        self.n_batch, self.n_ubatch = L.llama_n_batch(ctx), L.llama_n_ubatch(ctx)  # as llama.cpp took them
        self.options = options
        self._batch = L.llama_batch_init(options.n_batch, 0, 1)
        self._slots = [_Slot(seq) for seq in range(options.parallel)]
        self._states = _StateCache(options.kv_cache_mb * 1024 * 1024)
        self._abort_flag = ctypes.create_string_buffer(2)  # b"\0\0": go on; b"\1\0": abort the decode
        self._abort_cb = _flag_reader()
        L.llama_set_abort_callback(ctx, self._abort_cb, ctypes.cast(self._abort_flag, ctypes.c_void_p))
        self.vocab = Vocab(model, path)
        self._vocab = L.llama_model_get_vocab(model)
        self.info = self.vocab.info
        self._warm_up()
        log.info(
            "model loaded: %s (%s), context %d tokens x %d slots, %d threads, flash attention %s",
            path.name, self.info.description, self.n_ctx, options.parallel, options.n_threads, self._describe_flash_attn(),
        )
        self._load_vision(options)
        if options.kv_disk_dir is not None and options.kv_disk_mb > 0 and options.reuse:
            seeing = {"mmproj": self.vision.identity} if self.vision is not None else {}  # embeddings depend on the projector
            # the setting in use, not "auto": its states differ in layout (V transposed without flash attention)
            # (and the slot count: a sequence's state holds one stream per slot, so PARALLEL=1's do not load into PARALLEL=4)
            identity = model_identity(
                path, n_ctx=self.n_ctx, kv_type=options.kv_type, flash_attn=self.flash_attn.setting, parallel=options.parallel, llama_cpp=L.__version__, **seeing
            )
            if self._shared is not None:  # several models: one folder, one budget; this model's view of it
                self._disk = self._shared.disk.view(identity, self._clock) if self._shared.disk is not None else None
            else:
                self._disk = KVDisk.open(options.kv_disk_dir, options.kv_disk_mb * 1024 * 1024, identity, self._clock, self._buffers)

    def _describe_flash_attn(self) -> str:
        choice = self.flash_attn
        why = {
            "setting": "(FLASH_ATTN)",
            "kv_type": "(KV_TYPE=q8_0 needs it)",
            "unmeasured": "(FLASH_ATTN=auto: llama.cpp decides; it could not be measured with this model)",
        }.get(choice.source)
        if why is None:
            when = "measured now" if choice.source == "measured" else "measured at an earlier start"
            cache = self.options.flash_attn_cache or flashattn.default_cache_path()
            why = f"(FLASH_ATTN=auto, {when} on this CPU and kept in {cache}, safe to delete"
            if choice.timings:
                why += f": {flashattn.describe(choice.timings, self.options.n_predict, choice.agreement)}"
            why += ")"
        return f"{choice.setting} {why}"

    def _load_vision(self, options: EngineOptions) -> None:
        """Load the projector beside the model (MMPROJ_PATH), and say whether the model can see."""
        if options.mmproj is None:
            log.info("images: this model cannot see images (no MMPROJ_PATH); images get a note and their text is answered")
            return
        try:
            self.vision = Vision.load(
                options.mmproj, self._model, n_threads=options.n_threads, verbose=options.llama_log, identity=model_identity(options.mmproj)
            )
        except BaseException:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            L.llama_model_free(self._model)
            raise
        log.info("images: this model can see images (projector %s%s)", options.mmproj.name, ", M-RoPE" if self.vision.mrope else "")

    def _warm_up(self) -> None:
        """One real decode, so the first user does not pay for page faults and graph setup."""
        tokens = self.vocab.tokenize("Hello", special=False) or [0]
        self._fill_batch([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        with self._turn():
            rc = L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise ModelError("the model failed its first decode")
        L.llama_memory_seq_rm(self._mem, 0, -1, -1)

    # --- serving -----------------------------------------------------------------------

    def generate(
        self,
        key: str,
        prompt: list[int],
        *,
        max_tokens: int,
        sampling: Sampling,
        fmt: ReplyFormat = ReplyFormat(),
        grammar: str | None = None,
        images: Sequence[ImagePart] = (),
    ) -> Generation:
        """Start generating a reply to `prompt` for conversation `key`. Call on the event loop.

        `fmt` says how the reply is laid out (stop strings, reasoning); `grammar`
        (GBNF) constrains what may be generated; `images` are the image chunks in
        `prompt` (see `LocalBackend.prepare`), whose places hold synthetic ids."""
        feed = self._image_feed(prompt, images)
        cells = len(prompt) + (feed.extra_cells if feed is not None else 0)
        if cells >= self.n_ctx:
            raise PromptTooLong(f"prompt of {cells} tokens does not fit the context of {self.n_ctx}")
        if not prompt:
            raise ValueError("empty prompt")
        gen = Generation(key=key, n_prompt=cells, loop=asyncio.get_running_loop(), _on_cancel=self.wake)
        request = _Request(gen, list(prompt), max_tokens, sampling, fmt, grammar)
        request.images = feed
        with self._lock:
            if self._dead is not None:
                raise EngineDead(self._dead)
            if self._stopping:
                raise RuntimeError("engine is closed")
            self._preempt_warm_up(key)
            fetch = self._only_on_disk(key) or key in self._warms and self._warms[key].reading
            if not fetch:
                self._incoming.append(request)
                self._lock.notify()
        if fetch:  # read it now, on the I/O thread; the request queues once the bytes are in memory
            self._fetch(request)
        return gen

    def warm(self, key: str, tokens: Sequence[int]) -> bool:
        """Someone is typing in conversation `key`: make its state ready for a message that
        will extend `tokens`, so that reply only evaluates the new message. Call on the event
        loop; returns at once, True if a warm-up is on its way.

        The engine thread does it when it has nothing else to do, at most one warm-up per
        slot: an idle slot that holds the state already needs nothing; a state in RAM goes
        into a free slot; one on disk is read (then into a free slot, or RAM); one that is
        nowhere is evaluated in an idle slot, a micro-batch per step. A reply arriving for
        another conversation aborts a warm-up's decode at once and takes what it needs; none
        starts while replies are waiting. A warm-up no reply of `key` follows within
        WARM_TTL_S is dropped, and counted as wasted (`warm_stats`)."""
        if not self.options.reuse or not tokens or len(tokens) >= self.n_ctx:
            return False
        deadline = time.perf_counter() + self.options.warm_ttl_s
        with self._lock:
            if self._dead is not None or self._stopping:
                return False
            if self._reads[key] or any(r.gen.key == key for r in self._incoming) or any(s.key == key and s.request is not None for s in self._slots):
                return False  # a reply of this conversation is on its way: its state will be where it is needed
            w = self._warms.get(key)
            if w is not None:
                w.deadline = deadline  # still typing
                if not w.started:
                    w.tokens = list(tokens)
                return True
            if len(self._warms) >= self.options.parallel:
                return False  # at most one warm-up per slot
            self._warms[key] = _Warm(key, list(tokens), self._clock.now(), deadline)
            self.warm_stats.asked += 1
            self._warm_due = True
            self._lock.notify()
        return True

    def forget(self, key: str) -> None:
        """Drop a conversation's cached KV state, in RAM and on disk (after /reset, /template,
        edits, deletes). No later reply of `key` sees the old state, even one already queued."""
        self._clock.forget(key)
        if self._disk is not None:
            self._disk.forget(key)
        with self._lock:
            self._forget.add(key)
            if self._warm_decoding == key:  # stop building the old history's state now
                self._abort_flag[0] = b"\x01"
            self._lock.notify()

    def inject_fault(self, where: str, times: int = 1) -> None:
        """Fault drill, for the reliability tests: make the next `times` passes through
        `where` fail for real.

        "decode" gives llama.cpp an invalid token, so llama_decode really fails;
        "admit", "restore" and "sample" raise inside those steps. Everything
        downstream (the apology, serving on) runs as it would for a real fault."""
        if where not in ("decode", "admit", "restore", "sample"):
            raise ValueError(f"unknown fault point {where!r}")
        with self._lock:
            self._faults[where] += times
            self._lock.notify()

    def _fault(self, where: str) -> bool:
        """True (once per injected fault) when a drill asks `where` to fail now."""
        if self._faults[where] <= 0:
            return False
        self._faults[where] -= 1
        return True

    def wake(self) -> None:
        """Make the engine thread look at cancellations now (aborting the decode under way
        if it holds a cancelled reply)."""
        if any(g._cancel for g in self._watched):
            self._abort_flag[0] = b"\x01"
        with self._lock:
            self._lock.notify()

    @property
    def warming(self) -> int:
        """Warm-ups with work left (reading, restoring or evaluating)."""
        with self._lock:
            return sum(1 for w in self._warms.values() if not w.done or w.reading or w.read_done)

    @property
    def warm_decoding(self) -> str | None:
        """The conversation a warm-up is evaluating tokens for right now (None: none is)."""
        return self._warm_decoding

    @property
    def busy(self) -> bool:
        """A reply is running, queued, or waiting for its state to be read from disk."""
        with self._lock:
            return bool(self._incoming) or bool(self._admitting) or any(self._reads.values()) or any(s.request is not None for s in self._slots)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    @property
    def cached_states(self) -> int:
        return len(self._states)

    @property
    def cache_bytes(self) -> int:
        return self._states.used

    @property
    def disk(self) -> KVDisk | None:
        """The disk tier (None when off); see its counters and `drain()`."""
        return self._disk if self._disk is not None and self._disk.enabled else None

    @property
    def dead(self) -> str | None:
        """Why the engine gave up (None while it serves)."""
        return self._dead

    async def close(self) -> None:
        """Finish: cancel what is running, stop the thread, free llama.cpp memory."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._lock:
            self._stopping = True
            self._abort_now = True
            self._abort_flag[0] = b"\x01"
            self._lock.notify()
        if self._serving is not None:
            with contextlib.suppress(Exception):  # a dead thread already said why
                self._serving.result()
        self._executor.submit(self._free).result()
        self._executor.shutdown(wait=True)

    def _free(self) -> None:
        try:
            self._save_for_restart()
        except Exception:  # a cache; closing goes on
            log.exception("could not save the KV states for the next start")
        for slot in self._slots:
            if slot.request is not None and slot.request.sampler:
                L.llama_sampler_free(slot.request.sampler)
        if self.vision is not None:
            self.vision.close()
        L.llama_batch_free(self._batch)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)
        if self._disk is not None and self._shared is None:
            self._disk.close()  # waits for the writes (a shared folder is closed by its pool)
        if self._shared is not None and self._shared.gate is not None:
            self._shared.gate.forget(id(self))

    def _save_for_restart(self) -> None:
        """Write what the slots and the RAM cache hold and the disk lacks, newest first within
        the disk budget, so the next process starts warm."""
        disk = self._disk
        if disk is None or not disk.enabled or self._dead is not None:
            return
        wanted: list[tuple[float, str, _Slot | SavedState]] = []
        for slot in self._slots:
            if slot.key is not None and slot.tokens and slot.request is None and not self._clock.stale(slot.key, slot.born):
                if not self._saved_already(slot):  # (a copy in RAM is written below)
                    wanted.append((slot.last_used, slot.key, slot))
        for key, state in self._states.items():
            if not self._clock.stale(key, state.born) and not disk.holds(key, state):
                state.shared = True  # the RAM cache keeps it while the writer reads it
                wanted.append((state.used_at, key, state))
        wanted.sort(key=lambda w: w[0], reverse=True)
        room = disk.limit
        chosen: list[tuple[str, SavedState]] = []
        for _, key, what in wanted:
            state = self._save_slot(what) if isinstance(what, _Slot) else what
            if state is None or disk.holds(key, state):
                continue
            if len(state.data) > room:
                continue
            room -= len(state.data)
            chosen.append((key, state))
        for key, state in reversed(chosen):  # oldest first: the newest ends up last in the LRU
            if not disk.write(key, state) and disk.enabled:
                disk.drain()  # the write queue was full: let it catch up, then try once more
                disk.write(key, state)
        if chosen:
            log.info("saving %d KV states to %s for the next start", len(chosen), disk.folder)

    # --- the engine thread -------------------------------------------------------------

    def _serve(self) -> None:
        """The loop: admit requests, decode one batch, sample, report; until closed.

        A fault fails only the replies it touches, and the loop goes on. After
        FATAL_AFTER faults in a row the engine gives up (see `_give_up`)."""
        while True:
            with self._lock:
                while (
                    not self._stopping and not self._incoming and not self._forget and not self._active()
                    and not self._warm_pending() and not self._room_for_reads() and self._save_ahead_due() is None
                ):
                    self._lock.wait(self._idle_timeout())
                    self._buffers.trim()
                if self._stopping:
                    break
                forget, self._forget = self._forget, set()
                incoming = self._take_admissible()
                self._admitting = len(incoming)
            try:
                for key in forget:
                    self._drop_key(key)
                self._place_warm_reads()
                for request in incoming:
                    self._admit_or_fail(request)
                self._admitting = 0
                for slot in self._active():
                    if slot.request is not None and slot.request.gen._cancel:
                        self._finish(slot, "cancelled")
                if self._active():
                    steps = self.steps
                    self._step()
                    if self.vision is not None:
                        self._feed_images(stepped=self.steps != steps)
                    self._faults_in_a_row = 0
                else:
                    for slot in self._room_for_reads():
                        self._evict(slot)
                    if self._warms:
                        self._warm_step()
                    with self._lock:
                        victim = self._save_ahead_due()
                    if victim is not None:
                        self._save_ahead(victim)
            except Exception as exc:  # whatever broke, the other channels keep being served
                log.exception("engine step failed; ending the replies it held: %s", ", ".join(s.key or "?" for s in self._active()))
                for slot in self._active():
                    self._fail(slot, exc)
                self._fault_seen(exc)
            if self._dead is not None:
                return
        for slot in self._active():
            self._finish(slot, "cancelled")
        with self._lock:
            leftovers, self._incoming = list(self._incoming), collections.deque()
        for request in leftovers:
            self._report(request, "", "cancelled")

    def _admit_or_fail(self, request: _Request) -> None:
        """Admit a request; if that fails, fail it (with its slot emptied) and nothing else."""
        if self._dead is not None:
            self._report(request, "", "error", self._dead)
            return
        try:
            self._admit(request)
        except Exception as exc:
            log.exception("could not start the reply for %s", request.gen.key)
            slot = next((s for s in self._slots if s.request is request), None)
            if slot is not None:
                self._fail(slot, exc)
            else:
                self._report(request, "", "error", f"{type(exc).__name__}: {exc}")
            self._fault_seen(exc)

    def _fault_seen(self, exc: BaseException) -> None:
        """Count a fault; FATAL_AFTER in a row, with nothing served between, and the engine gives up."""
        self._faults_in_a_row += 1
        if self._faults_in_a_row >= FATAL_AFTER and self._dead is None:
            self._give_up(f"{FATAL_AFTER} engine faults in a row, the last: {type(exc).__name__}: {exc}")

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        """End a slot's reply with an error and empty the slot: its KV may be half-written."""
        with contextlib.suppress(Exception):
            self._finish(slot, "error", f"{type(exc).__name__}: {exc}")
        slot.request = None
        with contextlib.suppress(Exception):
            self._clear(slot)

    def _give_up(self, why: str) -> None:
        """The engine cannot go on: fail every waiting reply now, refuse new ones, and say so."""
        log.critical("the model engine stopped: %s", why)
        with self._lock:
            self._dead = why
            leftovers, self._incoming = list(self._incoming), collections.deque()
        for slot in self._active():
            self._fail(slot, EngineDead(why))
        for request in leftovers:
            self._report(request, "", "error", why)
        if self.on_fatal is not None:
            self.on_fatal(why)

    def _serving_ended(self, future: concurrent.futures.Future[None]) -> None:
        """The engine thread ended by an exception that escaped everything: give up too."""
        exc = future.exception()
        if exc is not None and self._dead is None:
            self._give_up(f"the engine thread crashed: {type(exc).__name__}: {exc}")

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None]

    def _room_for_reads(self) -> list[_Slot]:
        """Idle slots to empty now for replies whose state is being read from disk: the
        save of the state a slot holds then overlaps the read, instead of following it.
        The least recently used, as admission would pick (warm-ups' last); only while the
        engine has nothing else to do."""
        with self._lock:
            wanted = sum(self._reads.values()) - sum(1 for s in self._slots if s.request is None and s.key is None)
            if wanted <= 0 or self._incoming or self._active():
                return []
            reading = {k for k, n in self._reads.items() if n}
            warming = self._warm_slots()
            idle = [s for s in self._slots if s.request is None and s.key is not None and s.key not in reading]
            return sorted(idle, key=lambda s: (s.seq in warming, s.last_used))[:wanted]

    def _take_admissible(self) -> list[_Request]:
        """Requests that can get a slot now (called with the lock held)."""
        free = sum(1 for s in self._slots if s.request is None)
        taken = []
        while self._incoming and len(taken) < free:
            taken.append(self._incoming.popleft())
        return taken

    def _drop_key(self, key: str) -> None:
        self._buffers.give(self._states.take(key))
        with self._lock:
            w = self._warms.get(key)
            if w is not None:
                self._end_warm_up(w, used=False)
        for slot in self._slots:
            if slot.key == key and slot.request is None:
                self._clear(slot)

    # --- images (bot.engine.vision) ------------------------------------------------------

    def _image_feed(self, prompt: Sequence[int], images: Sequence[ImagePart]) -> ImageFeed | None:
        if not images:
            return None
        if self.vision is None:
            raise ValueError("this model cannot see images (no projector loaded)")
        if any(p.start < 0 or p.start + p.n_pos > len(prompt) - 1 for p in images):
            raise ValueError("an image must lie inside the prompt, with text after it")
        return ImageFeed.of(self.vision, images)

    def _feed_images(self, *, stepped: bool) -> None:
        """Decode image embeddings into the slots whose prompt has reached an image.

        Embeddings cannot share a decode with token ids, so they get decodes of their own:
        one micro-batch per step while other slots generate (each of those gets its next
        token between two), as much as a prompt chunk when none does. The encoder thread is
        asked for every image a slot still needs as soon as the slot has it; with nothing
        else to do (`stepped`: this round decoded text), the engine thread waits for an encode
        to finish."""
        vision = self.vision
        assert vision is not None
        seen = self._encodes_done
        active = self._active()
        generating = sum(1 for s in active if s.request is not None and s.request.next_token is not None)
        budget = self.n_ubatch - generating if generating else self.n_batch
        fed = False
        for slot in active:
            req = slot.request
            feed = req.images if req is not None else None
            if req is None or feed is None or req.next_token is not None or not req.pending:
                continue
            pos = len(slot.tokens)
            feed.request(pos, self._encoded)
            part = feed.parts.get(pos)
            if part is None or budget <= 0:
                continue
            try:
                encoded = feed.ready(part)
            except Exception as exc:  # this reply cannot be given; the others go on
                log.warning("could not encode an image for %s: %s", slot.key, exc)
                self._finish(slot, "error", f"could not encode an image: {exc}")
                continue
            if encoded is None:
                continue  # still being encoded
            left = part.n_tokens - feed.done
            count = left if vision.non_causal else min(left, budget)  # non-causal attention: the whole image at once
            self._watched = [req.gen]
            self._abort_flag[0] = b"\x01" if self._abort_now or req.gen._cancel else b"\x00"
            with self._turn():
                rc = decode_embeddings(self._ctx, encoded, feed.done, count, pos, slot.seq, non_causal=vision.non_causal)
            self.image_batches += 1
            fed = True
            if rc != 0:
                L.llama_memory_seq_rm(self._mem, slot.seq, pos, -1)  # the image starts over, or not at all
                feed.done = 0
                if rc != 2:
                    log.error("llama_decode failed with code %d on an image for %s", rc, slot.key)
                    self._finish(slot, "error", f"llama_decode returned {rc} for an image")
                elif req.gen._cancel:
                    self._finish(slot, "cancelled")
                continue
            feed.done += count
            self.tokens_evaluated += count
            budget -= count
            if feed.done == part.n_tokens:
                slot.tokens += image_ids(part.image.digest, part.index, part.n_pos)
                del req.pending[: part.n_pos]
                feed.done = 0
            if generating:
                break
        if not fed and not stepped:
            with self._lock:
                if self._encodes_done == seen and not (self._incoming or self._forget or self._stopping):
                    self.encode_waits += 1
                    self._lock.wait(0.25)

    def _encoded(self) -> None:
        """An encode finished (encoder thread): wake the engine thread."""
        with self._lock:
            self._encodes_done += 1
            self._lock.notify()
    # --- warm-ups (see `warm`) ------------------------------------------------------------

    def _warm_pending(self) -> bool:
        """A warm-up may have work, or one has outlived its deadline (lock held)."""
        if not self._warms:
            return False
        if self._warm_due:
            return True
        now = time.perf_counter()
        return any((w.deadline <= now and not w.waiters) or w.read_done for w in self._warms.values())

    def _idle_timeout(self) -> float | None:
        """How long the idle engine thread may sleep: until the next warm-up deadline, or
        until spare state buffers are due to go back to the system (lock held)."""
        waits = [w.deadline - time.perf_counter() for w in self._warms.values()]
        if self._buffers.spare:
            waits.append(SPARE_IDLE_S)
        return max(0.0, min(waits)) if waits else None

    def _warm_slots(self) -> set[int]:
        """Slots holding the state of a live warm-up."""
        return {w.seq for w in self._warms.values() if w.seq is not None and self._slots[w.seq].key == w.key}

    def _preempt_warm_up(self, key: str) -> None:
        """A reply arrived (lock held): abort a warm-up decode of another conversation now.
        (One of its own conversation goes on: the reply needs that work.)"""
        if self._warm_decoding is not None and self._warm_decoding != key:
            self._abort_flag[0] = b"\x01"

    def _end_warm_up(self, w: _Warm, *, used: bool) -> None:
        """A warm-up ends: its reply started (used), or none did in time, or its history
        changed (wasted). Lock held."""
        if self._warms.get(w.key) is w:
            del self._warms[w.key]
        if w.read_done:
            self._buffers.give(w.result)
            w.result, w.read_done = None, False
        if not w.started:
            return
        stats = self.warm_stats
        if used:
            stats.used += 1
            return
        stats.wasted += 1
        stats.tokens_wasted += w.evaluated
        stats.cpu_wasted_s += w.cpu_s
        (log.info if w.evaluated else log.debug)(
            "warm-up of %s not followed by a message: %d tokens evaluated, %.2f s CPU for nothing (so far: %d of %d warm-ups wasted, %.1f s CPU)",
            w.key, w.evaluated, w.cpu_s, stats.wasted, stats.started, stats.cpu_wasted_s,
        )

    def _start_warm_up(self, w: _Warm) -> None:
        if not w.started:
            w.started = True
            with self._lock:
                self.warm_stats.started += 1

    def _spend(self, w: _Warm, cpu_s: float, tokens: int = 0) -> None:
        w.cpu_s += cpu_s
        w.evaluated += tokens
        with self._lock:
            self.warm_stats.cpu_s += cpu_s
            self.warm_stats.tokens += tokens

    def _warm_step(self) -> None:
        """One unit of warm-up work, on an engine with nothing else to do: drop what expired,
        then start or go on with the oldest warm-up that has work."""
        now = time.perf_counter()
        with self._lock:
            self._warm_due = False
            for w in list(self._warms.values()):
                if (w.deadline <= now and not w.waiters) or self._clock.stale(w.key, w.born):
                    self._end_warm_up(w, used=False)
            if self._incoming or sum(self._reads.values()):
                return  # replies first; they wake the loop again when done
            runnable = [w for w in self._warms.values() if not w.done and not w.reading and not w.read_done]
        for w in runnable:
            if self._warm_one(w):
                self._warm_due = True  # there may be more: the loop looks at replies first, then comes back
                return

    def _warm_one(self, w: _Warm) -> bool:
        """Move one warm-up on by one step; False if it had nothing to do (it is then done)."""
        key = w.key
        slot = next((s for s in self._slots if s.key == key), None)
        if slot is not None and slot.request is not None:
            w.done = True  # its reply is running (it ends as used when admitted)
            return False
        if slot is None:
            slot = self._warm_slot_from_memory(w)
            if slot is None:
                if w.reading or w.read_done:  # a read from disk started (it may even have finished)
                    return True
                return not w.done and self._warm_evaluate_from_scratch(w)
        w.seq = slot.seq
        keep = common_prefix(slot.tokens, w.tokens)
        rest = len(w.tokens) - keep
        if rest <= 0 or (slot.tokens and rest < WARM_MIN_TOKENS):
            w.done = True
            return False
        self._start_warm_up(w)
        if keep < len(slot.tokens):
            if not L.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
                self._clear(slot)
                slot.key, slot.born, keep = key, self._clock.now(), 0
            del slot.tokens[keep:]
            slot.stored = min(slot.stored, keep)
        self._warm_decode(w, slot, w.tokens[keep : keep + self.n_ubatch])
        return True

    def _warm_slot_from_memory(self, w: _Warm) -> _Slot | None:
        """The warm-up's state is in RAM (or queued for writing): restore it into a free slot
        and return that slot. On disk: start reading it. None when it stays where it is."""
        key = w.key
        in_memory = key in self._states or (self._disk is not None and self._disk.queued(key))
        if in_memory:
            target = self._free_slot()
            if target is None:
                w.done = True  # ready in RAM; taking a slot would cost another state's save
                return None
            saved = self._states.take(key) or (self._disk.pending(key) if self._disk is not None else None)
            if saved is None or self._clock.stale(key, saved.born):
                self._buffers.give(saved)
                return None
            self._start_warm_up(w)
            cpu = time.process_time()
            try:
                restored = self._restore_into(target, key, saved, "RAM")
            finally:
                self._buffers.give(saved)
                self._spend(w, time.process_time() - cpu)
            with self._lock:
                self.warm_stats.restored += restored
            return target  # restored, or (refused) empty and keyed: evaluated there instead
        if self._disk is not None and self._disk.has(key) and not w.unreadable:
            self._start_warm_up(w)
            try:
                future = self._disk.read(key, w.tokens)
            except RuntimeError:  # closing
                w.done = True
                return None
            w.reading = True
            future.add_done_callback(lambda f: self._warm_read_done(w, _result(f)))
        return None

    def _warm_evaluate_from_scratch(self, w: _Warm) -> bool:
        """The warm-up's state is nowhere: claim an idle slot (not another warm-up's) to evaluate it in."""
        target = self._free_slot()
        if target is None:
            warming = self._warm_slots()
            idle = [s for s in self._slots if s.request is None and s.seq not in warming]
            if not idle:
                w.done = True  # every slot is busy or warming: no room
                return False
            target = min(idle, key=lambda s: s.last_used)
        self._start_warm_up(w)
        if target.key is not None:
            cpu = time.process_time()
            self._evict(target)
            self._spend(w, time.process_time() - cpu)
        target.key, target.born, target.last_used = w.key, self._clock.now(), time.perf_counter()
        w.seq = target.seq
        return True

    def _free_slot(self) -> _Slot | None:
        """An idle slot a warm-up may take without costing a save: empty, or holding a state
        the disk has unchanged; never one another warm-up holds."""
        warming = self._warm_slots()
        idle = [s for s in self._slots if s.request is None and s.seq not in warming]
        empty = next((s for s in idle if s.key is None), None)
        if empty is not None:
            return empty
        clean = [s for s in idle if self._saved_already(s)]
        if not clean:
            return None
        target = min(clean, key=lambda s: s.last_used)
        self._evict(target)  # no save: the disk has it
        return target

    def _restore_into(self, slot: _Slot, key: str, saved: SavedState, source: str) -> bool:
        """Restore a warm-up's state into an empty slot, which it then holds."""
        slot.key, slot.born, slot.last_used = key, self._clock.now(), time.perf_counter()
        return self._restore_state(slot, key, saved, source)

    def _warm_decode(self, w: _Warm, slot: _Slot, chunk: list[int]) -> None:
        """Evaluate one micro-batch of a warm-up's tokens. A reply arriving meanwhile aborts it
        (llama.cpp drops the unfinished micro-batch; the slot keeps what was done)."""
        start = len(slot.tokens)
        self._fill_batch([(t, start + i, slot.seq, i == len(chunk) - 1) for i, t in enumerate(chunk)])
        with self._lock:
            if self._incoming or sum(self._reads.values()) or self._stopping:
                return
            self._watched = []
            self._abort_flag[0] = b"\x00"
            self._warm_decoding = w.key
        cpu = time.process_time()
        try:
            with self._turn():
                rc = L.llama_decode(self._ctx, self._batch)
        finally:
            with self._lock:
                self._warm_decoding = None
        self.steps += 1
        done = len(chunk) if rc == 0 else max(0, L.llama_memory_seq_pos_max(self._mem, slot.seq) + 1 - start)
        slot.tokens += chunk[:done]
        slot.last_used = time.perf_counter()
        self._spend(w, time.process_time() - cpu, done)
        if rc == 2:
            with self._lock:
                self.warm_stats.preempted += 1
        elif rc != 0:
            log.warning("a warm-up decode failed with code %d; dropping the warm-up of %s", rc, w.key)
            self._clear(slot)
            w.done = True
        elif len(slot.tokens) >= len(w.tokens) and slot.tokens[: len(w.tokens)] == w.tokens:
            w.done = True

    def _warm_read_done(self, w: _Warm, saved: SavedState | None) -> None:
        """A warm-up's read from disk finished (reader thread): hand the state to a reply that
        waits for it, or keep it for the engine thread to place."""
        with self._lock:
            w.reading = False
            waiters, w.waiters = w.waiters, []
            live = self._warms.get(w.key) is w and not self._stopping
            if not waiters and live:
                w.result, w.read_done = saved, True
                self._warm_due = True
                self._lock.notify()
                return
        if saved is not None and waiters:
            self._spend(w, saved.read_cpu_s)  # the read the reply then used
        if not waiters:
            self._buffers.give(saved)
            return
        for i, (request, first) in enumerate(waiters):
            self._fetched(request, first, saved if i == 0 else None)

    def _place_warm_reads(self) -> None:
        """Put the states warm-ups read from disk where the next message finds them: in a free
        slot when the engine is idle, else in the RAM cache (pushing out nothing a waiting reply needs)."""
        with self._lock:
            ready = [w for w in self._warms.values() if w.read_done]
            protect = frozenset(r.gen.key for r in self._incoming)
            busy = bool(self._incoming) or bool(self._active())
        for w in ready:
            with self._lock:
                saved, w.result, w.read_done = w.result, None, False
            if saved is None:  # unusable (damaged, gone, or the history moved on): it can be evaluated instead
                w.unreadable = True
                continue
            self._spend(w, saved.read_cpu_s)
            if self._clock.stale(w.key, saved.born) or any(s.key == w.key for s in self._slots):
                self._buffers.give(saved)
                continue
            with self._lock:
                self.warm_stats.restored += 1
            target = None if busy else self._free_slot()
            if target is not None:
                cpu = time.process_time()
                try:
                    if self._restore_into(target, w.key, saved, "disk"):
                        w.seq = target.seq
                finally:
                    self._buffers.give(saved)
                    self._spend(w, time.process_time() - cpu)
            elif not self._keep(w.key, saved, protect):
                w.done = True  # it did not fit in RAM: it stays on disk
            else:
                w.done = True  # ready in RAM

    # --- the disk tier -------------------------------------------------------------------

    def _only_on_disk(self, key: str) -> bool:
        """The state of `key` is on disk and nowhere in memory (any thread; a wrong guess only costs a read)."""
        disk = self._disk
        if disk is None or not disk.has(key) or key in self._states or disk.queued(key):
            return False
        return not any(s.key == key for s in self._slots)

    def _fetch(self, request: _Request, *, first: bool = False) -> None:
        """Read the request's state from disk on the I/O thread, then queue the request
        (`first`: at the head of the queue, where it was)."""
        request.fetched = True
        key = request.gen.key
        with self._lock:
            self._reads[key] += 1
            self._lock.notify()  # the idle engine empties a slot meanwhile (see _room_for_reads)
            w = self._warms.get(key)
            if w is not None and w.reading:  # a warm-up is reading it already: wait for that read
                w.waiters.append((request, first))
                return
            if w is not None and w.read_done:  # ... or has read it: take what it read
                saved, w.result = w.result, None
                self._fetched(request, first, saved)
                return
        try:
            future = self._disk.read(key, request.prompt)  # type: ignore[union-attr]
        except RuntimeError:  # the engine closed meanwhile
            with self._lock:
                self._reads[key] -= 1
            self._report(request, "", "cancelled")
            return
        future.add_done_callback(lambda f: self._fetched(request, first, _result(f)))

    def _fetched(self, request: _Request, first: bool, saved: SavedState | None) -> None:
        """The request's state was read (None: there was none worth using): queue it."""
        request.saved = saved
        with self._lock:
            self._reads[request.gen.key] -= 1
            if self._dead is not None:
                self._report(request, "", "error", self._dead)
            elif self._stopping or request.gen._cancel:
                self._report(request, "", "cancelled")
            else:
                if first:
                    self._incoming.appendleft(request)
                else:
                    self._incoming.append(request)
                self._preempt_warm_up(request.gen.key)
                self._lock.notify()
                return
        self._buffers.give(saved)

    def _to_disk(self, key: str, state: SavedState) -> None:
        """A state leaves memory: write it unless the disk has it already (the writer then
        recycles its buffer; otherwise it is recycled here)."""
        if self._disk is not None and not self._clock.stale(key, state.born) and not self._disk.holds(key, state):
            if self._disk.write(key, state):
                return
        self._buffers.give(state)

    def _save_slot(self, slot: _Slot, kind: str = "save", size: int | None = None) -> SavedState | None:
        """Copy a slot's KV state out of llama.cpp (None if it cannot be); `kind` names
        what the time is counted as, `size` is the state's if the caller asked already."""
        started = time.perf_counter()
        size = L.llama_state_seq_get_size(self._ctx, slot.seq) if size is None else size
        if size <= 0:
            return None
        data, mapping = self._buffers.take(size)
        state = SavedState(data, list(slot.tokens), slot.born, used_at=slot.last_used, mapping=mapping)  # its age: when its channel last spoke
        if L.llama_state_seq_get_data(self._ctx, data, size, slot.seq) != size:
            self._buffers.give(state)
            return None
        self.saves += 1
        self.spent[kind] += time.perf_counter() - started
        return state

    def _clear(self, slot: _Slot) -> None:
        L.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.tokens = []
        slot.key = None
        slot.disk_digest, slot.stored = None, 0
        slot.ahead = None

    def _admit(self, request: _Request) -> None:
        """Give a request a slot, reusing as much cached KV as possible."""
        key = request.gen.key
        with self._lock:
            w = self._warms.get(key)
            if w is not None:
                self._end_warm_up(w, used=True)
        idle = [s for s in self._slots if s.request is None]
        slot = next((s for s in idle if s.key == key), None)
        if slot is not None and self._clock.stale(key, slot.born):  # forgotten while it was busy
            self._clear(slot)
            slot = None
        if slot is not None:  # a copy saved ahead of an eviction that did not come: the slot moves on
            self._buffers.give(self._states.take(key))
        if slot is None:
            if self._disk is not None and self.options.reuse and not request.fetched and self._only_on_disk(key):
                self._fetch(request, first=True)  # it comes back with the bytes; the slots go on meanwhile
                return
            warming = self._warm_slots()  # taken last: they hold a state someone is about to use
            slot = next((s for s in idle if s.key is None and s.seq not in warming), None) or min(idle, key=lambda s: (s.seq in warming, s.last_used))
            if slot.key is not None:
                self._evict(slot)
            slot.key = key
            slot.born = self._clock.now()
            slot.request = request  # from here on, a fault fails this request and empties the slot
            self._restore(slot, key, request)
        if not self.options.reuse:
            self._clear(slot)
        slot.key = key
        slot.request = request
        slot.last_used = time.perf_counter()
        request.gen.started_at = slot.last_used
        if self._fault("admit"):
            raise RuntimeError("injected fault while admitting a request")
        prompt = request.prompt
        keep = common_prefix(slot.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # the last prompt token must be evaluated again to get its logits
        if request.images is not None:
            keep = request.images.boundary(keep)  # an image is reused whole or evaluated whole
        if keep < len(slot.tokens):
            if not L.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
                self._clear(slot)
                slot.key = key
                keep = 0
            del slot.tokens[keep:]
            slot.stored = min(slot.stored, keep)
        request.pending = prompt[keep:]
        request.gen.n_cached = keep
        request.gen.n_evaluated = len(request.pending)
        request.sampler = None if request.argmax else self._make_sampler(request.sampling, prompt, request.grammar)

    def _evict(self, slot: _Slot) -> None:
        """Save an idle slot's KV state to the RAM cache (what that pushes out, and what does
        not fit, goes to disk), then empty the slot. A state the disk holds unchanged (restored
        from there, nothing added since), or the RAM cache holds already (saved ahead), needs
        no copy."""
        key = slot.key
        assert key is not None
        if self.options.reuse and slot.tokens and (self._states.limit or self._disk is not None) and not self._clock.stale(key, slot.born):
            if self._saved_already(slot):
                self.saves_skipped += 1
            else:
                state = self._save_slot(slot)
                if state is not None:
                    self._keep(key, state)
        self._clear(slot)

    def _saved_already(self, slot: _Slot) -> bool:
        """Emptying the slot needs no save: the disk holds its state unchanged (restored from
        there, nothing added since), or the RAM cache holds exactly what it holds (saved ahead)."""
        key = slot.key or ""
        if slot.unchanged_on_disk() and self._disk is not None and self._disk.holds_digest(key, slot.disk_digest or ""):
            return True
        copy = self._states.peek(key)
        return copy is not None and copy.born == slot.born and copy.tokens == slot.tokens

    def _save_ahead_due(self) -> _Slot | None:
        """The slot admission would empty next, when its state should be copied to RAM now:
        every slot holds a conversation, none is generating, nothing waits, and that state
        has not been saved (or tried) yet. Lock held."""
        if not self.options.reuse or not self._states.limit or self._incoming or self._admitting or any(self._reads.values()):
            return None
        if any(s.key is None or s.request is not None for s in self._slots):
            return None  # an empty slot takes the next conversation; a generating one goes first
        warming = self._warm_slots()
        victim = min(self._slots, key=lambda s: (s.seq in warming, s.last_used))
        if victim.seq in warming or not victim.tokens or victim.ahead == (victim.last_used, len(victim.tokens)):
            return None
        if self._clock.stale(victim.key or "", victim.born) or self._saved_already(victim):
            return None
        return victim

    def _save_ahead(self, slot: _Slot) -> None:
        """Copy the state of the slot that will be emptied next into the RAM cache while the
        engine is idle, so the conversation that next needs a slot does not wait for that
        save (its eviction then finds the copy: `_saved_already`). One try per state; only
        when the state fits the RAM cache, so it never costs a disk write of its own. A wasted
        copy (the slot's own conversation speaks next) is dropped at its admission."""
        slot.ahead = (slot.last_used, len(slot.tokens))
        key = slot.key
        assert key is not None
        size = L.llama_state_seq_get_size(self._ctx, slot.seq)
        if size > self._states.limit:
            return
        state = self._save_slot(slot, "save_ahead", size)
        if state is None:
            return
        self.saves_ahead += 1
        self._keep(key, state)

    def _keep(self, key: str, state: SavedState, protect: frozenset[str] = frozenset()) -> bool:
        """Put a state in the RAM cache; what that pushes out (or the state itself, if it does
        not fit) goes to disk. True if the state is in RAM now."""
        self._buffers.give(self._states.take(key))  # an older state of the same conversation
        pushed = self._states.put(key, state, protect)
        for old_key, old in pushed:
            self._to_disk(old_key, old)
        return not any(old is state for _, old in pushed)

    def _restore(self, slot: _Slot, key: str, request: _Request) -> None:
        """Put the conversation's saved state into the slot: from RAM, from a write still
        queued, or as read from disk for this request."""
        saved, source = self._states.take(key), "RAM"
        if saved is None and self._disk is not None:
            saved = self._disk.pending(key)
        if saved is None and request.saved is not None:
            saved, source = request.saved, "disk"
        if request.saved is not None and request.saved is not saved:
            self._buffers.give(request.saved)  # read from disk, but a newer state was in memory
        request.saved = None
        if saved is None:
            return
        try:
            if not self._clock.stale(key, saved.born) and self.options.reuse:
                self._restore_state(slot, key, saved, source)
        finally:
            self._buffers.give(saved)  # copied into the slot (or unusable): its buffer is free

    def _restore_state(self, slot: _Slot, key: str, saved: SavedState, source: str) -> bool:
        """Copy a saved state into a slot (which must be empty); False if llama.cpp refused it."""
        if self._fault("restore"):
            raise RuntimeError("injected fault while restoring a cached state")
        started = time.perf_counter()
        if L.llama_state_seq_set_data(self._ctx, saved.data, len(saved.data), slot.seq) == len(saved.data):
            self.spent["restore"] += time.perf_counter() - started
            slot.tokens = list(saved.tokens)
            slot.born = saved.born
            if source == "disk" or (self._disk is not None and self._disk.holds(key, saved)):
                slot.disk_digest, slot.stored = saved.digest, len(saved.tokens)
            if source == "disk":
                self.disk_restores += 1
                log.debug("restored %s from disk: %d tokens", key, len(saved.tokens))
            return True
        log.warning("could not restore the saved state of %s from %s; evaluating its prompt again", key, source)
        if source == "disk" and self._disk is not None:
            self._disk.discard(key)
        self._clear(slot)
        slot.key = key
        return False

    def _make_sampler(self, s: Sampling, prompt: list[int], grammar: str | None = None) -> int:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0 and s.repeat_last_n:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(self.vocab.n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
            # the repeat penalty looks at recent prompt tokens too, as llama.cpp's server does
            # (fed before a grammar joins the chain: the prompt is not the grammar's to parse)
            for token in prompt[-s.repeat_last_n :]:
                if token >= 0:  # not an image's synthetic id
                    L.llama_sampler_accept(chain, token)
        if grammar is not None:
            constrain = L.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not constrain:
                L.llama_sampler_free(chain)
                raise ValueError("the grammar does not parse")
            L.llama_sampler_chain_add(chain, constrain)
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
        active = self._active()
        for slot in active:
            req = slot.request
            assert req is not None
            if req.next_token is not None:
                outputs.append((slot, len(entries)))
                entries.append((req.next_token, len(slot.tokens), slot.seq, True))
                grown.append((slot, [req.next_token], False))
        # While some slots generate, prompts get one micro-batch per step, so no next token waits longer.
        budget = (self.n_ubatch if entries else self.n_batch) - len(entries)
        for slot in active:
            req = slot.request
            assert req is not None
            if req.next_token is None and req.pending and budget > 0:
                run = req.images.text_run(len(slot.tokens), len(req.pending)) if req.images is not None else len(req.pending)
                if not run:
                    continue  # an image comes next: `_feed_images` decodes it
                chunk = req.pending[: min(budget, run)]
                start = len(slot.tokens)
                last = len(chunk) == len(req.pending)
                for j, token in enumerate(chunk):
                    entries.append((token, start + j, slot.seq, last and j == len(chunk) - 1))
                if last:
                    outputs.append((slot, len(entries) - 1))
                grown.append((slot, chunk, True))
                budget -= len(chunk)
        if not entries:
            return
        if self._fault("decode"):
            entries[0] = (self.vocab.n_vocab + 1, *entries[0][1:])  # an id the vocabulary does not have
        self._fill_batch(entries)
        # /stop and shutdown abort a decode midway: llama.cpp reads the flag between graph nodes.
        self._watched = [s.request.gen for s, _, _ in grown if s.request is not None]
        self._abort_flag[0] = b"\x01" if self._abort_now or any(g._cancel for g in self._watched) else b"\x00"
        with self._turn():
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
        if self._fault("sample"):
            raise RuntimeError("injected fault while sampling")
        if req.sampler is None:  # plain greedy (req.argmax)
            token = int(np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, index), shape=(self.vocab.n_vocab,)).argmax())
        else:
            token = L.llama_sampler_sample(req.sampler, self._ctx, index)
        gen = req.gen
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()
        vocab = self.vocab
        # A control token ends the reply; where control tokens are the format (gpt-oss), only an end token does.
        if vocab.is_end(token) if req.special else vocab.is_control(token):
            self._finish(slot, "stop")
            return
        req.n_generated += 1
        gen.tokens.append(token)
        gen.n_generated = req.n_generated
        piece = vocab.special_piece(token) if req.special else vocab.piece(token)
        reasoning, shown = req.out.add(req.decoder.decode(piece))
        if req.out.stopped:
            self._finish(slot, "stop")
            return
        if shown or reasoning:
            req.unsent += shown
            req.unsent_reasoning += reasoning
            now = time.perf_counter()
            if now - req.reported_at >= REPORT_EVERY_S or req.out.thinking != req.reported_thinking:
                self._report(req, req.unsent, None, reasoning=req.unsent_reasoning)
                req.unsent, req.unsent_reasoning, req.reported_at = "", "", now
        if req.n_generated >= req.max_tokens or len(slot.tokens) + 1 + (req.images.extra_cells if req.images else 0) >= self.n_ctx:
            self._finish(slot, "length")
            return
        req.next_token = token
        if gen._cancel:
            self._finish(slot, "cancelled")

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        req = slot.request
        assert req is not None
        reasoning, rest = "", ""
        if reason != "error":
            tail = req.decoder.decode(b"", final=True)  # an incomplete character at a length cut
            reasoning, rest = req.out.add(tail) if tail else ("", "")
            late_reasoning, late = req.out.finish()
            reasoning, rest = reasoning + late_reasoning, rest + late
        self._report(req, req.unsent + rest, reason, error, reasoning=req.unsent_reasoning + reasoning)
        if req.sampler is not None:
            L.llama_sampler_free(req.sampler)
            req.sampler = None
        slot.request = None
        slot.last_used = time.perf_counter()
        if req.images is not None and req.images.done:  # ended halfway through an image: drop its cells
            L.llama_memory_seq_rm(self._mem, slot.seq, len(slot.tokens), -1)
            req.images.done = 0
        self._warm_due = True  # warm-ups waiting for an idle engine may go on
        if self.options.llama_log:
            g = req.gen
            prompt_s = (g.first_token_at or time.perf_counter()) - (g.started_at or g.queued_at)
            gen_s = time.perf_counter() - (g.first_token_at or time.perf_counter())
            log.info(
                "timings %s: prompt %d tokens (%d cached) in %.3f s; generated %d tokens in %.3f s (%.1f tokens/s); %s",
                g.key, g.n_prompt, g.n_cached, prompt_s, req.n_generated, gen_s, req.n_generated / gen_s if gen_s > 0 else 0.0, reason,
            )

    def _report(self, req: _Request, text: str, reason: str | None, error: str | None = None, *, reasoning: str = "") -> None:
        thinking = req.out.thinking if reason is None else False
        req.reported_thinking = thinking
        try:
            req.gen.loop.call_soon_threadsafe(functools.partial(req.gen._deliver, text, reason, error, reasoning=reasoning, thinking=thinking))
        except RuntimeError:  # the caller's event loop is gone; nobody is listening
            req.gen._cancel = True


class LocalBackend:
    """The in-process engine as a `Backend`: one preloaded GGUF, exact tokens, KV reuse, batching.

    Rendering templates and tokenizing long histories take real time, so they run
    in a worker thread, never on the event loop."""

    applies_template = False
    can_warm = True

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_ctx = engine.n_ctx
        self.info = engine.info
        self.grammar: str | None = None  # GBNF every reply must follow (the tests use it to make a model reason)

    async def count(self, texts: Sequence[str]) -> list[int]:
        vocab = self.engine.vocab
        return await asyncio.to_thread(lambda: [len(vocab.tokenize(t, special=False)) for t in texts])

    async def prepare(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        def build() -> PreparedPrompt:
            if any(m.images for m in messages):
                return self._prepare_with_images(template, messages)
            segments = template.render(messages)
            tokens = self.engine.vocab.encode(segments)
            return PreparedPrompt(n_tokens=len(tokens), tokens=tokens, fmt=reply_format(template, segments))

        return await asyncio.to_thread(build)

    def _prepare_with_images(self, template: Template, messages: Sequence[Message]) -> PreparedPrompt:
        """A prompt with images, as llama-server builds one: each turn's text carries the media
        marker where each of its images belongs (before the text), the template renders the
        whole conversation as usual, and the prompt is cut at the markers. The text runs are
        tokenized as always (people's text never parsed for special tokens); each image
        becomes libmtmd's layout for it: its wrapper tokens and image chunks."""
        vision = self.engine.vision
        marked = [Message(m.role, _with_markers(m, MEDIA_MARKER if vision is not None else None), ()) for m in messages]
        segments = template.render(marked)
        fmt = reply_format(template, segments)
        if vision is None:
            tokens = self.engine.vocab.encode(segments)
            return PreparedPrompt(n_tokens=len(tokens), tokens=tokens, fmt=fmt)
        runs: list[list[Segment]] = [[]]
        for seg in segments:
            if seg.special or MEDIA_MARKER not in seg.text:
                runs[-1].append(seg)
                continue
            for i, piece in enumerate(seg.text.split(MEDIA_MARKER)):
                if i:
                    runs.append([])
                if piece:
                    runs[-1].append(Segment(piece, False))
        images = [image for m in messages for image in m.images]
        if len(runs) - 1 != len(images):
            raise ValueError(f"the prompt template kept {len(runs) - 1} of {len(images)} images")
        token_runs = self.engine.vocab.encode_runs(runs)
        tokens = list(token_runs[0])
        parts: list[ImagePart] = []
        for image, run in zip(images, token_runs[1:]):
            index = 0
            for piece in vision.layout(image.width, image.height):
                if isinstance(piece, ChunkSize):
                    parts.append(ImagePart(len(tokens), piece.n_pos, piece.n_tokens, image, index))
                    tokens += image_ids(image.digest, index, piece.n_pos)
                    index += 1
                else:
                    tokens += piece
            tokens += run
        cells = len(tokens) + sum(p.n_tokens - p.n_pos for p in parts)
        return PreparedPrompt(n_tokens=cells, tokens=tokens, fmt=fmt, images=tuple(parts))

    async def count_images(self, images: Sequence[Image]) -> list[int]:
        """Tokens each image takes in a prompt (its wrapper tokens and embeddings)."""
        vision = self.engine.vision
        if vision is None:
            return [0 for _ in images]

        def count() -> list[int]:
            return [
                sum(p.n_tokens if isinstance(p, ChunkSize) else len(p) for p in vision.layout(image.width, image.height))
                for image in images
            ]

        return await asyncio.to_thread(count)

    def image_support(self) -> str | None:
        """None when images reach the model; else why not (one line for a note)."""
        if self.engine.vision is not None:
            return None
        return "this model cannot see images: set MMPROJ_PATH to its vision projector (an mmproj file)"

    def generate(self, key: str, prompt: PreparedPrompt, *, max_tokens: int, sampling: Sampling) -> Generation:
        assert prompt.tokens is not None
        return self.engine.generate(
            key, prompt.tokens, max_tokens=max_tokens, sampling=sampling, fmt=prompt.fmt, grammar=self.grammar, images=prompt.images
        )

    def forget(self, key: str) -> None:
        self.engine.forget(key)

    def warm(self, key: str, prompt: PreparedPrompt) -> bool:
        assert prompt.tokens is not None
        # Only the text before the first image: a warm-up decodes tokens, never image embeddings.
        tokens = prompt.tokens[: min(p.start for p in prompt.images)] if prompt.images else prompt.tokens
        return self.engine.warm(key, tokens)

    @property
    def dead(self) -> str | None:
        """Why the engine gave up, once it has (the process should exit and be restarted)."""
        return self.engine.dead

    def stats(self) -> EngineStats:
        engine = self.engine
        return EngineStats(
            busy_slots=engine.busy_slots,
            slots=engine.options.parallel,
            cached_states=engine.cached_states,
            cache_bytes=engine.cache_bytes,
            cache_limit_bytes=engine.options.kv_cache_mb * 1024 * 1024,
            warm=replace(engine.warm_stats),
        )

    @property
    def on_fatal(self) -> Callable[[str], None] | None:
        return self.engine.on_fatal

    @on_fatal.setter
    def on_fatal(self, callback: Callable[[str], None] | None) -> None:
        self.engine.on_fatal = callback

    def describe(self) -> str:
        return f"{self.info.path.name} ({self.info.description}), in this process"

    async def close(self) -> None:
        await self.engine.close()


def _with_markers(message: Message, marker: str | None) -> str:
    """A turn's text with its images in front: the media marker for each (None: the model
    cannot see them, so each is a short placeholder)."""
    if not message.images:
        return message.content
    if marker is None:
        return " ".join([PLACEHOLDER] * len(message.images) + ([message.content] if message.content else []))
    return marker * len(message.images) + message.content
def _result(future: concurrent.futures.Future[SavedState | None]) -> SavedState | None:
    """A disk read's outcome; None if it was cancelled (shutdown) or failed."""
    try:
        return future.result()
    except BaseException:
        return None


def _flag_reader() -> L.ggml_abort_callback:
    """The abort callback: true once the first byte of its data, a 2-byte flag, is set.

    llama.cpp calls it between graph nodes, hundreds of times per decode (515 for the bundled
    model). A Python callback takes the GIL each time, fighting the event loop for it: measured
    up to 3% off reading a long prompt while the loop was busy. So this one is C, libc's strlen: 0 for b"\\0\\0" (go on),
    1 for b"\\1\\0" (abort)."""
    try:
        return ctypes.cast(ctypes.CDLL(None).strlen, L.ggml_abort_callback)
    except (OSError, AttributeError, TypeError):  # no C library to borrow it from: the same in Python
        return L.ggml_abort_callback(lambda data: ctypes.cast(data, ctypes.POINTER(ctypes.c_char))[0] != b"\0")

