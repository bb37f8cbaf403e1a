"""Several local models, loaded on demand within a memory budget (MODELS, MODELS_DIR).

The catalogue (`Settings.catalogue()`) names every model a conversation may choose; the
default one (MODEL_PATH, or the bundled model) is loaded at start and stays loaded: it is
where every conversation without a choice, and every one whose model left the catalogue,
is answered, so it never waits for a load. Another model is loaded the first time a
conversation needs it (`hold`), on a thread, as its own `Engine` (its own slots and context).

Memory: MODEL_MEMORY_MB bounds what the loaded models take together. A model's cost is
estimated from its GGUF header before it loads (file size + KV cache of its slots + its
RAM state cache, KV_CACHE_MB) and measured after (the growth of the process's resident
memory over the load), and the larger of the two is counted. When a load would not fit,
the least recently used model with no reply running, queued or being prepared is unloaded
first (its engine saves its slots' states to the disk tier as it closes, so its
conversations find them when they come back). MODEL_IDLE_UNLOAD_S unloads a model unused
that long. A model that cannot be loaded (missing or damaged file, too big, all others
busy) raises ModelUnavailable, for that conversation only.

The engines share one forget clock, one disk-tier folder (each its own view, keyed by its
identity) and a `FairGate`, so two busy models take turns decode by decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bot.config import ModelEntry
from bot.engine.backend import ModelError, ModelStatus, ModelUnavailable
from bot.engine.gate import FairGate
from bot.engine.ggufmeta import kv_bytes, kv_shape
from bot.engine.kvdisk import ForgetClock, KVDisk, StateBuffers
from bot.engine.local import Engine, EngineOptions, EngineShared, LocalBackend

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def rss_bytes() -> int:
    """The process's resident memory now (0 where /proc cannot say)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def estimate_bytes(entry: ModelEntry, options: EngineOptions) -> int:
    """What loading `entry` with `options` will take: weights (the file, mapped), the
    projector, the KV cache of its slots and its RAM state cache (KV_CACHE_MB)."""
    shape = kv_shape(entry.path)
    n_ctx = options.n_ctx or min(4096, shape.n_ctx_train)
    size = entry.path.stat().st_size + (entry.mmproj.stat().st_size if entry.mmproj else 0)
    return size + kv_bytes(shape, n_ctx, options.parallel, options.kv_type) + options.kv_cache_mb * MiB


@dataclass
class _Loaded:
    entry: ModelEntry
    backend: LocalBackend
    cost: int  # bytes counted against the budget
    estimated: int
    measured: int  # resident memory the load added (0: unknown)
    load_s: float
    last_used: float  # time.time()
    holds: int = 0  # `hold` blocks inside (a prompt being built for it)

    @property
    def busy(self) -> bool:
        return self.holds > 0 or self.backend.engine.busy


class ModelPool:
    """The catalogue's local models: the default always loaded, others on demand (see the module)."""

    def __init__(
        self,
        catalogue: tuple[ModelEntry, ...],
        options_for: Callable[[ModelEntry], EngineOptions],
        *,
        budget_bytes: int,
        idle_unload_s: float = 0.0,
        disk_dir: Path | None = None,
        disk_bytes: int = 0,
        abort: threading.Event | None = None,
    ) -> None:
        self.catalogue = {e.name: e for e in catalogue}
        self.default = catalogue[0].name
        self.options_for = options_for
        self.budget = budget_bytes
        self.idle_unload_s = idle_unload_s
        self.abort = abort
        clock, buffers = ForgetClock(), StateBuffers()
        disk = KVDisk.open(disk_dir, disk_bytes, "", clock, buffers) if disk_dir is not None and disk_bytes > 0 else None
        self.shared = EngineShared(clock=clock, buffers=buffers, disk=disk, gate=FairGate())
        self._loaded: dict[str, _Loaded] = {}
        self._failed: dict[str, str] = {}  # name -> why its last load failed
        self._estimates: dict[str, int] = {}
        self._load_lock = asyncio.Lock()  # one load (and its evictions) at a time
        self._idle_task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_fatal: Callable[[str], None] | None = None
        # counters (read by tests and the benchmark)
        self.loads = 0
        self.unloads: list[str] = []  # names, in order

    @classmethod
    async def open(cls, catalogue: tuple[ModelEntry, ...], options_for: Callable[[ModelEntry], EngineOptions], **kwargs: object) -> ModelPool:
        """A pool with its default model loaded (ModelError if that one cannot be: the bot cannot serve)."""
        pool = cls(catalogue, options_for, **kwargs)  # type: ignore[arg-type]
        try:
            await pool._load(pool.catalogue[pool.default])
        except ModelUnavailable as exc:
            await pool.close()
            raise ModelError(str(exc)) from None
        except BaseException:
            await pool.close()
            raise
        await asyncio.to_thread(pool._estimate_all)
        if pool.idle_unload_s > 0:
            pool._idle_task = asyncio.create_task(pool._unload_idle())
        return pool

    def _estimate_all(self) -> None:
        """What each model of the catalogue would take (for /model), read from the headers at
        start (a fraction of a second each); a file that cannot be read is said now, in the log."""
        for name, entry in self.catalogue.items():
            if name in self._estimates:
                continue
            try:
                self._estimates[name] = estimate_bytes(entry, self.options_for(entry))
            except (ModelError, OSError) as exc:
                log.warning("the model %s (%s) cannot be loaded as it is: %s", name, entry.path, _one_line(exc))

    # --- what the chat layer asks --------------------------------------------------------

    @property
    def on_fatal(self) -> Callable[[str], None] | None:
        return self._on_fatal

    @on_fatal.setter
    def on_fatal(self, callback: Callable[[str], None] | None) -> None:
        """Called (from any thread) when any model's engine gives up for good."""
        self._on_fatal = callback
        for model in self._loaded.values():
            model.backend.on_fatal = callback

    complete = True  # the catalogue is fixed at start

    def names(self) -> list[str]:
        return list(self.catalogue)

    async def refresh(self) -> None:
        """The catalogue changes only with a restart."""

    def sees_images(self) -> bool:
        """Some model of the catalogue has a vision projector."""
        return any(e.mmproj is not None for e in self.catalogue.values())

    @property
    def default_backend(self) -> LocalBackend:
        return self._loaded[self.default].backend

    def loaded(self, name: str) -> LocalBackend | None:
        model = self._loaded.get(name)
        return model.backend if model is not None else None

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[LocalBackend]:
        """The model's backend, loaded first if need be; not unloaded while the block runs."""
        model = self._loaded.get(name)
        if model is None:
            model = await self._load_on_demand(name)
        model.holds += 1
        model.last_used = time.time()
        try:
            yield model.backend
        finally:
            model.holds -= 1
            model.last_used = time.time()

    def forget(self, key: str) -> None:
        """Every loaded model drops its state of `key`; the disk tier deletes every model's file of it."""
        for model in list(self._loaded.values()):
            model.backend.forget(key)

    def status(self) -> list[ModelStatus]:
        out = []
        for name, entry in self.catalogue.items():
            model = self._loaded.get(name)
            if model is not None:
                out.append(ModelStatus(name, True, name == self.default, model.cost, model.last_used, model.busy, model.load_s))
            else:
                out.append(ModelStatus(name, False, name == self.default, self._estimates.get(name), None))
        return out

    def used_bytes(self) -> int:
        return sum(m.cost for m in self._loaded.values())

    async def unload(self, name: str) -> bool:
        """Unload a model now (not the default; not while busy). True if it was unloaded."""
        async with self._load_lock:
            model = self._loaded.get(name)
            if model is None or name == self.default or model.busy:
                return False
            await self._unload(model, "asked")
            return True

    async def close(self) -> None:
        self._closed = True
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        for model in list(self._loaded.values()):
            await model.backend.close()
        self._loaded.clear()
        if self.shared.disk is not None:
            await asyncio.to_thread(self.shared.disk.close)

    # --- loading and unloading -------------------------------------------------------------

    async def _load_on_demand(self, name: str) -> _Loaded:
        entry = self.catalogue.get(name)
        if entry is None:
            raise ModelUnavailable(f"there is no model named {name!r} (choose one of: {', '.join(self.catalogue)})")
        async with self._load_lock:
            model = self._loaded.get(name)  # another conversation's load may have just finished
            if model is not None:
                return model
            return await self._load(entry)

    async def _load(self, entry: ModelEntry) -> _Loaded:
        """Load `entry` (lock held, or at open), unloading idle models first to stay in budget."""
        if self._closed:
            raise ModelUnavailable("the bot is shutting down")
        options = self.options_for(entry)
        try:
            estimated = await asyncio.to_thread(estimate_bytes, entry, options)
        except (ModelError, OSError) as exc:
            self._failed[entry.name] = str(exc)
            raise ModelUnavailable(f"the model {entry.name} cannot be loaded: {_one_line(exc)}") from None
        self._estimates[entry.name] = estimated
        await self._make_room(entry.name, estimated)
        started, before = time.perf_counter(), rss_bytes()
        try:
            engine = await Engine.load(entry.path, options, abort=self.abort, shared=self.shared)
        except (ModelError, OSError, ValueError) as exc:
            self._failed[entry.name] = str(exc)
            log.error("could not load the model %s (%s): %s", entry.name, entry.path, exc)
            raise ModelUnavailable(f"the model {entry.name} could not be loaded: {_one_line(exc)}") from None
        measured = max(0, rss_bytes() - before) if before else 0
        load_s = time.perf_counter() - started
        model = _Loaded(entry, LocalBackend(engine), max(estimated, measured), estimated, measured, load_s, time.time())
        model.backend.on_fatal = self._on_fatal
        self._loaded[entry.name] = model
        self._failed.pop(entry.name, None)
        self.loads += 1
        log.info(
            "model %s loaded in %.1f s: about %.0f MiB (estimated %.0f, measured %.0f); %.0f of %.0f MiB (MODEL_MEMORY_MB) in use by %d models",
            entry.name, load_s, model.cost / MiB, estimated / MiB, measured / MiB, self.used_bytes() / MiB, self.budget / MiB, len(self._loaded),
        )
        return model

    async def _make_room(self, name: str, need: int) -> None:
        """Unload least recently used idle models until `need` more bytes fit (lock held)."""
        if not self._loaded:
            if need > self.budget:
                log.warning("the default model needs about %.0f MiB, more than MODEL_MEMORY_MB (%.0f): loading it anyway", need / MiB, self.budget / MiB)
            return
        while self.used_bytes() + need > self.budget:
            idle = [m for n, m in self._loaded.items() if n != self.default and not m.busy]
            if not idle:
                fixed = self._loaded[self.default].cost
                if need > self.budget - fixed:
                    why = f"it needs about {need / MiB:.0f} MiB and MODEL_MEMORY_MB leaves {(self.budget - fixed) / MiB:.0f} MiB beside the default model"
                else:
                    why = "the other loaded models are all answering right now; try again in a moment"
                raise ModelUnavailable(f"the model {name} does not fit in memory now: {why}")
            await self._unload(min(idle, key=lambda m: m.last_used), f"to make room for {name}")

    async def _unload(self, model: _Loaded, why: str) -> None:
        name = model.entry.name
        del self._loaded[name]
        self.unloads.append(name)
        await model.backend.close()  # its slots' states go to the disk tier first
        log.info("model %s unloaded (%s): %.0f MiB given back", name, why, model.cost / MiB)

    async def _unload_idle(self) -> None:
        """Unload models unused for MODEL_IDLE_UNLOAD_S (never the default)."""
        every = max(0.05, min(self.idle_unload_s / 2, 30.0))
        while True:
            await asyncio.sleep(every)
            now = time.time()
            for name, model in list(self._loaded.items()):
                if name != self.default and not model.busy and now - model.last_used >= self.idle_unload_s:
                    async with self._load_lock:
                        if self._loaded.get(name) is model and not model.busy:
                            await self._unload(model, f"unused for {self.idle_unload_s:g} s")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def entry_options(base: EngineOptions, entry: ModelEntry) -> EngineOptions:
    """A catalogue entry's engine options: its own slots, context and projector over the configured ones."""
    return replace(base, parallel=entry.parallel or base.parallel, n_ctx=entry.n_ctx or base.n_ctx, mmproj=entry.mmproj)
