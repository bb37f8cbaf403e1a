"""The disk tier of the KV state cache: every channel stays warm, even across restarts.

A conversation's KV state (what `llama_state_seq_get_data` gives for its
sequence) is megabytes. The engine keeps the recently used ones in RAM; this
module keeps many more in a folder (KV_DISK_DIR), bounded in bytes (KV_DISK_MB)
with least-recently-used eviction, so a follow-up in any channel restores its
history instead of reading it all again, and so does the first one after a
restart.

File work runs on two threads of its own, never on the event loop or the engine
thread: a reader (the engine asks for a state as soon as a reply is requested,
and only hands the request to its thread once the bytes are in memory) and a
writer (write-behind). The writer also does every delete, in order, so a delete
is never overtaken by an older write of the same conversation.

A file is only used with what it was made with: the same model file (size,
modification time, a hash of its first MiB), context size, KV type,
flash-attention setting and llama.cpp version (the *identity*), and for a prompt
that still shares at least half of its tokens. A file's name hashes both the
conversation and the identity, so several models (bot.engine.pool) keep their
states of the same conversation side by side in one folder, under one byte
budget and one LRU (`KVDisk.view`); the start-up scan keeps every well-formed
file, whichever model made it, and the budget decides what goes. Each file ends with an XXH3-64 hash of everything before it
(checked at several GB/s, faster than the file is read), so a truncated or damaged
file is noticed, deleted and the prompt evaluated again. Files of the first format
(a CRC-32, three times slower to check than the read) are deleted at start.
When the folder cannot be written (full disk, read-only), the tier turns itself
off with one warning and replies go on from RAM.

The folder is created 0700, files 0600, and a file's name is a hash of the
conversation key and of the identity: other users of the machine learn nothing of which channels
exist.

State buffers come from `StateBuffers`, which recycles them: touching fresh memory
costs a page fault per 4 KiB, which on this VM made a 24 MiB buffer cost 20-30 ms
before the 2-3 ms copy into it.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

MAGIC = b"LLBOTKV2"
OLD_MAGICS = (b"LLBOTKV1",)  # earlier formats: deleted at start, never read
SUFFIX = ".kv"
TMP_SUFFIX = ".kv.tmp"
HEAD_BYTES = 1 << 20  # the part of the model file hashed for its identity
MIN_SHARED = 0.5  # a saved state is read only if the prompt shares at least this share of its tokens
MAX_QUEUED_BYTES = 256 << 20  # states waiting to be written; past this a write is skipped, not queued
OTHER = "made for another model file or settings"
OLDER = "written by an older version of the bot"
WRITER_NICE = 10  # the write-behind thread yields the CPU to decoding (2 cores: a 24 MiB write took time from it)
_PREFIX = struct.Struct("<8sI")  # magic, header length
_CHECK = struct.Struct("<Q")  # XXH3-64 of everything before it

GRAIN = 1 << 20  # buffers are mapped in whole MiB, so a spare one fits states of nearby sizes
SPARES = 2  # spare buffers kept for reuse
SPARE_IDLE_S = 30.0  # a spare unused this long goes back to the system


class StateBuffers:
    """Memory for saved KV states, recycled. Thread-safe.

    Each buffer is an anonymous memory mapping of its own: states are megabytes each
    and come and go all day, and from malloc glibc soon serves blocks that size from
    its heap, where freed ones leave holes the process keeps (seen in the soak: RSS
    swinging 80 MiB above the live cache). But fresh memory costs a page fault per
    4 KiB on first touch (20-30 ms for 24 MiB on this VM, where the copy itself takes
    2-3 ms). So a buffer whose state is done with (`give`: restored into a slot, or
    dropped) is kept as a spare, and the next save or read takes it: at most SPARES
    of them, each for at most SPARE_IDLE_S, so resident memory stays within a couple
    of states of what the caches hold, and drops back when the bot is quiet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spares: list[tuple[float, mmap.mmap]] = []  # (when given back, mapping)
        # counters (read by tests and the benchmark)
        self.made = 0
        self.reused = 0

    def take(self, size: int) -> tuple[ctypes.Array[ctypes.c_uint8], mmap.mmap]:
        """A buffer of exactly `size` bytes (a view of a spare mapping when one fits) and its mapping."""
        fit = -(-size // GRAIN) * GRAIN
        with self._lock:
            self._trim(time.monotonic())
            usable = [i for i, (_, m) in enumerate(self._spares) if size <= len(m) <= fit + GRAIN]
            mapping = self._spares.pop(min(usable, key=lambda i: len(self._spares[i][1])))[1] if usable else None
            if mapping is None:
                self.made += 1
            else:
                self.reused += 1
        if mapping is None:
            mapping = mmap.mmap(-1, fit)
        return (ctypes.c_uint8 * size).from_buffer(mapping), mapping

    def give(self, state: SavedState | None) -> None:
        """`state` is done with: nothing reads its bytes any more. Its mapping becomes a spare
        (unless it is shared, or not from here)."""
        mapping = state.mapping if state is not None else None
        if state is None or mapping is None or state.shared:
            return
        state.mapping = None
        with self._lock:
            now = time.monotonic()
            self._spares.append((now, mapping))
            del self._spares[:-SPARES]
            self._trim(now)

    def trim(self) -> None:
        """Give spares unused for SPARE_IDLE_S back to the system."""
        with self._lock:
            self._trim(time.monotonic())

    @property
    def spare(self) -> int:
        return len(self._spares)

    def _trim(self, now: float) -> None:
        self._spares = [(t, m) for t, m in self._spares if now - t < SPARE_IDLE_S]


def _int32(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian int32, the form they take in a file."""
    packed = array.array("i", tokens)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def tokens_digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(_int32(tokens)).hexdigest()[:32]


def key_name(key: str) -> str:
    """The first part of a conversation's file names: a hash, so the name says nothing of the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def identity_name(identity: str) -> str:
    """The second part of a file name: which model and settings the state was made with."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def file_stem(key: str, identity: str) -> str:
    """The file name (without SUFFIX) of a conversation's state made with `identity`."""
    return f"{key_name(key)}-{identity_name(identity)}"


STEM_LENGTH = 32 + 1 + 16
OLD_STEM_LENGTH = 32  # files named by the conversation alone (one model per folder): deleted at start


def model_identity(model: Path, **settings: object) -> str:
    """What a saved state is valid for: this exact model file, with these context settings."""
    st = model.stat()
    with model.open("rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    fields = {"format": 2, "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns, "model_head": head, **settings}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class ForgetClock:
    """Tells state made before a conversation was forgotten from state made after.

    Every saved state carries `born`, the clock when its content began. `forget`
    moves the clock on; a state of that conversation born earlier is stale, wherever
    it is (a slot, RAM, a write queued, a read on its way), and is never used or
    written again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self._forgotten: dict[str, int] = {}

    def now(self) -> int:
        return self._now

    def forget(self, key: str) -> None:
        with self._lock:
            self._now += 1
            self._forgotten[key] = self._now

    def stale(self, key: str, born: int) -> bool:
        return self._forgotten.get(key, -1) > born


@dataclass
class SavedState:
    """One conversation's KV state in memory: llama.cpp's bytes and the tokens they hold."""

    data: ctypes.Array[ctypes.c_uint8]
    tokens: list[int]
    born: int  # ForgetClock time when this content began
    used_at: float = field(default_factory=time.perf_counter)
    _digest: str | None = None
    mapping: mmap.mmap | None = None  # where `data` lives, when it came from StateBuffers
    shared: bool = False  # another holder may still read it: never recycled
    read_cpu_s: float = 0.0  # CPU time its read from disk took (0 when not read)

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = tokens_digest(self.tokens)
        return self._digest


@dataclass
class _Entry:
    """A state file the tier holds (the index lives in memory, rebuilt from the folder at start)."""

    size: int  # bytes on disk
    digest: str  # of its tokens: a state already on disk is not written again


class _Tier:
    """What every view of one folder shares: the index, the budget, the queue and the threads."""

    def __init__(self, folder: Path, limit_bytes: int, buffers: StateBuffers) -> None:
        self.folder = folder
        self.limit = limit_bytes
        self.buffers = buffers
        self.enabled = True
        self.lock = threading.Lock()
        self.index: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # file stem -> entry, oldest first
        self.pending: dict[str, SavedState] = {}  # file stem -> the newest state queued for writing
        self.queued_bytes = 0
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-read")
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-write", initializer=_lower_priority)
        self.used = 0
        self.writes = 0
        self.reads = 0
        self.spent: collections.Counter[str] = collections.Counter()


def _shared(name: str, doc: str) -> property:
    """An attribute of the folder's `_Tier`, seen (and set) through any of its views."""
    return property(lambda self: getattr(self._t, name), lambda self, value: setattr(self._t, name, value), doc=doc)


class KVDisk:
    """Saved KV states in a folder: LRU by bytes, write-behind, read ahead. Thread-safe.

    Open it with `KVDisk.open`; `close()` waits for the writes still queued. One KVDisk reads and
    writes the states of one identity (a model with its settings); `view(identity)` gives another
    identity's KVDisk over the same folder, index, budget and threads (bot.engine.pool)."""

    folder = _shared("folder", "the folder")
    limit = _shared("limit", "the byte budget (KV_DISK_MB)")
    buffers = _shared("buffers", "where state buffers come from")
    enabled = _shared("enabled", "False once the folder could not be written")
    _lock = _shared("lock", "guards the index and the queue")
    _index = _shared("index", "file stem -> entry, oldest first")
    _pending = _shared("pending", "file stem -> the newest state queued for writing")
    _queued_bytes = _shared("queued_bytes", "bytes of the states queued")
    _reader = _shared("reader", "the reader thread")
    _writer = _shared("writer", "the writer thread")
    # counters (read by tests and the benchmark), for the whole folder
    used = _shared("used", "bytes on disk")
    writes = _shared("writes", "states written")
    reads = _shared("reads", "states read whole")
    spent = _shared("spent", 'reader seconds: "read" (into the buffer), "check" (the hash)')

    def __init__(
        self, folder: Path, limit_bytes: int, identity: str, clock: ForgetClock, buffers: StateBuffers | None = None, *, tier: _Tier | None = None
    ) -> None:
        self._t = tier or _Tier(folder, limit_bytes, buffers or StateBuffers())
        self.identity = identity
        self._id = identity_name(identity)
        self.clock = clock

    def view(self, identity: str, clock: ForgetClock | None = None) -> KVDisk:
        """The states of another identity in the same folder (sharing its budget, LRU and threads)."""
        return KVDisk(self.folder, self.limit, identity, clock or self.clock, tier=self._t)

    def _stem(self, key: str) -> str:
        return f"{key_name(key)}-{self._id}"

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, limit_bytes: int, identity: str, clock: ForgetClock, buffers: StateBuffers | None = None) -> KVDisk | None:
        """Open (creating it 0700) and index the folder; None, with a warning, if it cannot be used."""
        try:
            created = not folder.is_dir()
            if created:
                folder.mkdir(mode=0o700, parents=True)
                os.chmod(folder, 0o700)
            probe = folder / f"probe-{os.getpid()}{TMP_SUFFIX}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            probe.unlink()
        except OSError as exc:
            log.warning("KV_DISK_DIR %s cannot be used (%s); saved KV states stay in RAM only", folder, exc.strerror or exc)
            return None
        if not created and folder.stat().st_mode & 0o077:
            log.warning("KV_DISK_DIR %s can be opened by other users; its files are private (0600), but chmod 700 it to hide them", folder)
        disk = cls(folder, limit_bytes, identity, clock, buffers)
        try:
            disk._scan()
        except OSError as exc:
            log.warning("KV_DISK_DIR %s cannot be used (%s); saved KV states stay in RAM only", folder, exc.strerror or exc)
            disk.close()
            return None
        return disk

    def _scan(self) -> None:
        """Index the state files, whichever model and settings made them (the budget decides
        what goes); delete damaged ones, those of an older version, and leftovers of a crash."""
        found: list[tuple[float, str, _Entry]] = []
        dropped: collections.Counter[str] = collections.Counter()
        for path in self.folder.iterdir():
            name = path.name
            if name.endswith(TMP_SUFFIX):
                _unlink(path)
                continue
            if not name.endswith(SUFFIX) or len(name) not in (STEM_LENGTH + len(SUFFIX), OLD_STEM_LENGTH + len(SUFFIX)):
                continue  # not ours: leave it alone
            if len(name) == OLD_STEM_LENGTH + len(SUFFIX):  # named before several models shared the folder
                _unlink(path)
                dropped[OLDER] += 1
                continue
            try:
                entry, mtime = self._check_header(path)
            except (OSError, ValueError) as exc:
                log.debug("deleting saved KV state %s: %s", name, exc)
                _unlink(path)
                dropped[str(exc) if str(exc) in (OTHER, OLDER) else "damaged"] += 1
                continue
            found.append((mtime, name[: -len(SUFFIX)], entry))
        for _, stem, entry in sorted(found):  # oldest first, as the LRU wants
            self._index[stem] = entry
            self.used += entry.size
        for why, n in dropped.items():
            log.info("deleted %d saved KV states: %s", n, why)
        self._make_room(0)
        log.info("KV disk cache %s: %d saved states, %.0f of %.0f MiB", self.folder, len(self._index), self.used / 2**20, self.limit / 2**20)

    def _check_header(self, path: Path) -> tuple[_Entry, float]:
        with path.open("rb") as f:
            header = self._read_header(f, path.name[: -len(SUFFIX)], any_identity=True)
            st = os.fstat(f.fileno())
        return _Entry(st.st_size, header["tokens"]), st.st_mtime

    def _read_header(self, f, stem: str, *, any_identity: bool = False) -> dict:  # noqa: ANN001 (a binary file)
        """The header of a state file, checked against this identity (`any_identity`: against
        the identity its name says; ValueError if it does not belong)."""
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError("truncated")
        magic, length = _PREFIX.unpack(prefix)
        if magic in OLD_MAGICS:
            raise ValueError(OLDER)
        if magic != MAGIC or length > 4096:
            raise ValueError("not a saved KV state")
        raw = f.read(length)
        header = json.loads(raw)  # a JSONDecodeError is a ValueError
        if not isinstance(header, dict) or not isinstance(header.get("identity"), str):
            raise ValueError("bad header")
        if header["identity"] != self.identity and not (any_identity and stem.endswith("-" + identity_name(header["identity"]))):
            raise ValueError(OTHER)
        if header.get("key") != stem:
            raise ValueError("its name does not match its content")
        n, size = header.get("n_tokens"), header.get("state_bytes")
        if not isinstance(n, int) or not isinstance(size, int) or n <= 0 or size <= 0 or not isinstance(header.get("tokens"), str):
            raise ValueError("bad header")
        expected = _PREFIX.size + length + 4 * n + size + _CHECK.size
        if os.fstat(f.fileno()).st_size != expected:
            raise ValueError("truncated or padded")
        header["_raw"] = prefix + raw
        return header

    # --- what the engine asks -------------------------------------------------------------

    def has(self, key: str) -> bool:
        """A file holds this conversation's state (not counting one still being written)."""
        return self.enabled and self._stem(key) in self._index

    def holds(self, key: str, state: SavedState) -> bool:
        """The file of this conversation already holds exactly these tokens."""
        entry = self._index.get(self._stem(key))
        return entry is not None and entry.digest == state.digest

    def holds_digest(self, key: str, digest: str) -> bool:
        """The file of this conversation holds the tokens with this digest (see `SavedState.digest`)."""
        entry = self._index.get(self._stem(key))
        return self.enabled and entry is not None and entry.digest == digest

    def queued(self, key: str) -> bool:
        """A state of this conversation waits to be written (see `pending`)."""
        with self._lock:
            return self._stem(key) in self._pending

    def pending(self, key: str) -> SavedState | None:
        """A state queued for writing: it is still in memory and can be used as it is
        (marked shared: the writer no longer recycles its buffer)."""
        with self._lock:
            state = self._pending.get(self._stem(key))
            if state is not None:
                state.shared = True
        if state is None or self.clock.stale(key, state.born):
            return None
        return state

    def read(self, key: str, prompt: Sequence[int] | None) -> concurrent.futures.Future[SavedState | None]:
        """Read a conversation's state on the reader thread; the future gives None if there is
        none worth using (missing, damaged, made for another prompt)."""
        born = self.clock.now()
        with self._lock:  # used now: the most recent in the LRU from this moment (a write making room meanwhile spares it)
            stem = self._stem(key)
            if stem in self._index:
                self._index.move_to_end(stem)
        return self._reader.submit(self._read_safely, key, prompt, born)

    def write(self, key: str, state: SavedState) -> bool:
        """Queue a state for writing (write-behind); its buffer is the writer's from here
        on (recycled once written). False if the tier is off or the queue full: the
        caller keeps the state."""
        if not self.enabled or self.clock.stale(key, state.born):
            return False
        size = len(state.data)
        with self._lock:
            if self._queued_bytes and self._queued_bytes + size > MAX_QUEUED_BYTES:
                return False
            self._pending[self._stem(key)] = state
            self._queued_bytes += size
        self._writer.submit(self._write_safely, key, state)
        return True

    def forget(self, key: str) -> None:
        """Delete a conversation's files, those of every model (on the writer thread, after any
        write already queued): its history changed, so none of them matches it any more.

        Call `clock.forget(key)` first (the clock of every model's engine): a write or read
        of the old state still on its way then sees it is stale."""
        prefix = key_name(key) + "-"
        with self._lock:
            for stem in [s for s in self._pending if s.startswith(prefix)]:
                del self._pending[stem]
            stems = [s for s in self._index if s.startswith(prefix)]
            for stem in stems:
                self.used -= self._index.pop(stem).size
        for stem in stems or [self._stem(key)]:
            self._submit_unlink(stem)

    def discard(self, key: str) -> None:
        """A file's state proved unusable (llama.cpp refused it): delete it."""
        self._discard(self._stem(key), None)

    def drain(self) -> None:
        """Wait until every write and delete queued so far is done."""
        with contextlib.suppress(RuntimeError):  # closed: nothing is queued
            self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Finish the queued writes and stop the threads."""
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    # --- the reader thread ------------------------------------------------------------------

    def _read_safely(self, key: str, prompt: Sequence[int] | None, born: int) -> SavedState | None:
        try:
            return self._read(key, prompt, born)
        except Exception:  # whatever it was, this reply just evaluates its prompt
            log.exception("could not read the saved KV state of %s", key)
            self._discard(self._stem(key), None)
            return None

    def _read(self, key: str, prompt: Sequence[int] | None, born: int) -> SavedState | None:
        started = time.thread_time()
        stem = self._stem(key)
        with self._lock:
            entry = self._index.get(stem) if self.enabled else None
        if entry is None or self.clock.stale(key, born):
            return None
        path = self.folder / (stem + SUFFIX)
        state: SavedState | None = None
        try:
            with path.open("rb", buffering=0) as f:
                header = self._read_header(f, stem)
                check = xxhash.xxh3_64(header["_raw"])
                raw_tokens = _read_exactly(f, 4 * header["n_tokens"])
                check.update(raw_tokens)
                tokens = array.array("i")
                tokens.frombytes(raw_tokens)
                if sys.byteorder == "big":
                    tokens.byteswap()
                if prompt is not None and common_prefix(tokens, prompt) < len(tokens) * MIN_SHARED:
                    log.debug("saved KV state of %s no longer matches its prompt (the history window moved); deleted", key)
                    self._discard(stem, entry)
                    return None
                data, mapping = self.buffers.take(header["state_bytes"])
                state = SavedState(data, tokens.tolist(), born, _digest=header["tokens"], mapping=mapping)
                view = memoryview(data).cast("B")
                t0 = time.perf_counter()
                _read_into(f, view)  # straight into the buffer llama.cpp reads: no second copy
                t1 = time.perf_counter()
                check.update(view)
                self.spent["read"] += t1 - t0
                self.spent["check"] += time.perf_counter() - t1
                self.reads += 1
                (stored,) = _CHECK.unpack(_read_exactly(f, _CHECK.size))
                del view
        except FileNotFoundError:  # deleted meanwhile (forgotten, or evicted for room)
            self._recycle(state)
            return None
        except (OSError, ValueError) as exc:
            log.warning("saved KV state of %s is unreadable (%s); deleted, its prompt is evaluated again", key, exc)
            self._recycle(state)
            self._discard(stem, entry)
            return None
        if check.intdigest() != stored:
            log.warning("saved KV state of %s is corrupt (checksum mismatch); deleted, its prompt is evaluated again", key)
            self._recycle(state)
            self._discard(stem, entry)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU order survives a restart
        with self._lock:
            if stem in self._index:
                self._index.move_to_end(stem)
        # (if a newer state replaced the file while we opened it, we read that one: still whole and checked)
        state.read_cpu_s = time.thread_time() - started
        return state

    def _recycle(self, state: SavedState | None) -> None:
        self.buffers.give(state)

    def _discard(self, stem: str, entry: _Entry | None) -> None:
        """Drop a file from the index (if `entry` is still the one indexed, or any) and delete it."""
        with self._lock:
            current = self._index.get(stem)
            if current is not None and (entry is None or current is entry):
                del self._index[stem]
                self.used -= current.size
        self._submit_unlink(stem)

    # --- the writer thread ------------------------------------------------------------------

    def _submit_unlink(self, stem: str) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nothing more is deleted
            self._writer.submit(self._unlink_unindexed, stem)

    def _unlink_unindexed(self, stem: str) -> None:
        """Delete a file unless a newer state of the same conversation took its place."""
        with self._lock:
            if stem in self._index:
                return
        try:
            (self.folder / (stem + SUFFIX)).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._turn_off(exc)

    def _write_safely(self, key: str, state: SavedState) -> None:
        try:
            self._write(key, state)
        except OSError as exc:
            self._turn_off(exc)
        except Exception:
            log.exception("could not write the KV state of %s", key)
        finally:
            with self._lock:
                self._queued_bytes -= len(state.data)
                if self._pending.get(self._stem(key)) is state:
                    del self._pending[self._stem(key)]
            self.buffers.give(state)  # written or skipped: its buffer is free, unless a reader borrowed it (shared)

    def _write(self, key: str, state: SavedState) -> None:
        with self._lock:
            if not self.enabled or self._pending.get(self._stem(key)) is not state:
                return  # off, forgotten, or a newer state of this conversation is queued
        if self.clock.stale(key, state.born):
            return
        stem = self._stem(key)
        tokens = _int32(state.tokens)
        raw = json.dumps(
            {"identity": self.identity, "key": stem, "n_tokens": len(state.tokens), "state_bytes": len(state.data), "tokens": state.digest}
        ).encode()
        head = _PREFIX.pack(MAGIC, len(raw)) + raw
        size = len(head) + len(tokens) + len(state.data) + _CHECK.size
        if size > self.limit:
            return
        self._make_room(size, replacing=stem)
        tmp = self.folder / (stem + TMP_SUFFIX)
        final = self.folder / (stem + SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
            with open(fd, "wb", buffering=0) as f:
                os.fchmod(fd, 0o600)  # in case an old temporary file was left with other modes
                check = xxhash.xxh3_64()
                for part in (head, tokens, memoryview(state.data).cast("B")):
                    _write_all(f, part)
                    check.update(part)
                _write_all(f, _CHECK.pack(check.intdigest()))
            os.replace(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        with self._lock:
            old = self._index.pop(stem, None)
            if old is not None:
                self.used -= old.size
            if self.clock.stale(key, state.born):
                return  # forgotten while we wrote: the delete queued behind us removes the file
            self._index[stem] = _Entry(size, state.digest)
            self.used += size
            self.writes += 1

    def _make_room(self, size: int, replacing: str | None = None) -> None:
        """Delete the least recently used files until `size` more bytes fit the budget
        (`replacing`: the file this write takes the place of, which does not count)."""
        doomed = []
        with self._lock:
            held = self._index[replacing].size if replacing in self._index else 0
            for stem in list(self._index):
                if self.used - held + size <= self.limit:
                    break
                if stem != replacing:
                    self.used -= self._index.pop(stem).size
                    doomed.append(stem)
        for stem in doomed:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / (stem + SUFFIX)).unlink()

    def _turn_off(self, exc: OSError) -> None:
        """The folder cannot be written (full, read-only, gone): off until restart, said once."""
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
            self._pending.clear()
        log.warning(
            "KV disk cache turned off: %s (%s). Conversations' KV states stay in RAM only until the bot restarts.",
            exc.strerror or type(exc).__name__,
            exc.filename or self.folder,
        )


def _lower_priority() -> None:
    """Run this thread at WRITER_NICE (Linux: a thread has its own nice value)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


def _read_exactly(f, n: int) -> bytes:  # noqa: ANN001
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


def _read_into(f, view: memoryview) -> None:  # noqa: ANN001
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError("truncated")
        done += got


def _write_all(f, data: bytes | memoryview) -> None:  # noqa: ANN001
    view = memoryview(data)
    while view:
        written = f.write(view)
        view = view[written:]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
