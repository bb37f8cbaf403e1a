"""The fair queue in front of the engine.

At most `parallel` replies are generated at once (the engine's slots). Within
one conversation, messages are answered one at a time and in order, because
each reply must see the previous one. Between conversations, waiting work is
served round-robin, so a busy channel cannot starve a quiet one. The queue is
bounded in total and per conversation; past that, `submit` raises `QueueFull`
and the caller tells the user to try again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room to wait: the caller should say "busy, try again"."""


@dataclass
class Job:
    """One unit of work for a conversation (`key`), run when its turn comes."""

    key: str
    run: Callable[[], Awaitable[None]]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self.task is not None


class FairScheduler:
    """Runs jobs: `parallel` at once, one per key at a time, waiting keys served round-robin."""

    def __init__(self, parallel: int, max_queue: int, *, per_key: int | None = None) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.per_key = per_key if per_key is not None else max(2, max_queue // 4)
        self._waiting: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._running: dict[str, Job] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def running(self) -> int:
        return len(self._running)

    def has_room(self, key: str) -> bool:
        """Whether a job for `key` would be taken now (it starts at once, or fits in the queue)."""
        if self._closed:
            return False
        if key not in self._running and len(self._running) < self.parallel and not self._waiting.get(key):
            return True
        return self.waiting < self.max_queue and len(self._waiting.get(key, ())) < self.per_key

    def submit(self, key: str, run: Callable[[], Awaitable[None]], *, force: bool = False) -> Job:
        """Queue `run` for `key`; it starts at once if there is room. Raises QueueFull.

        `force` takes it past the bounds (work accepted earlier, e.g. before a restart)."""
        if self._closed:
            raise QueueFull("shutting down")
        if not force and not self.has_room(key):
            raise QueueFull(f"{self.waiting} waiting")
        job = Job(key, run)
        self._waiting.setdefault(key, collections.deque()).append(job)
        self._dispatch()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take back a job that has not started (its work turned out to be done already);
        False when it is running or gone."""
        queue = self._waiting.get(job.key)
        if job.started or queue is None or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del self._waiting[job.key]
        if not job.done.done():
            job.done.cancel()
        return True

    def position(self, job: Job) -> int:
        """0 when running, else how many jobs will start before this one (1 = next)."""
        if job.started:
            return 0
        for n, queued in enumerate(self._service_order(), start=1):
            if queued is job:
                return n
        return 0

    def _service_order(self) -> list[Job]:
        """The order waiting jobs would start in: round-robin over keys, FIFO within a key."""
        queues = [list(q) for q in self._waiting.values()]
        order: list[Job] = []
        depth = 0
        while any(depth < len(q) for q in queues):
            order += [q[depth] for q in queues if depth < len(q)]
            depth += 1
        return order

    def _dispatch(self) -> None:
        """Start waiting jobs while there is room, taking keys in round-robin order."""
        while len(self._running) < self.parallel:
            key = next((k for k, q in self._waiting.items() if q and k not in self._running), None)
            if key is None:
                return
            queue = self._waiting.pop(key)
            job = queue.popleft()
            if queue:  # the key goes to the back of the line: round-robin
                self._waiting[key] = queue
            self._running[key] = job
            job.task = asyncio.ensure_future(self._run(job))

    async def _run(self, job: Job) -> None:
        try:
            await job.run()
        except asyncio.CancelledError:
            if not job.done.done():
                job.done.cancel()
            raise
        except Exception as exc:
            log.exception("job for %s failed", job.key)
            if not job.done.done():
                job.done.set_exception(exc)
                job.done.exception()  # retrieved: the job logged it already
        finally:
            self._running.pop(job.key, None)
            if not job.done.done():
                job.done.set_result(None)
            if not self._closed:
                self._dispatch()

    async def close(self, grace: float, *, wind_down: Callable[[], None] | None = None, settle: float = 5.0) -> None:
        """Stop taking work and drop what waits. Running jobs get `grace` seconds; then
        `wind_down()` asks them to finish early (e.g. stop generating), and after
        `settle` more seconds whatever still runs is cancelled."""
        self._closed = True
        for queue in self._waiting.values():
            for job in queue:
                job.done.cancel()
        self._waiting.clear()
        tasks = [job.task for job in self._running.values() if job.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending and wind_down is not None:
            wind_down()
            _, pending = await asyncio.wait(pending, timeout=settle)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
