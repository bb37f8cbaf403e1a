"""Taking turns on the CPU: the engines of several loaded models decode one step at a time.

Each model's `Engine` has its own thread (a llama.cpp context belongs to one thread), and
each decode already uses every core (N_THREADS). Two models decoding at once would run
2 x N_THREADS threads on N_THREADS cores, and llama.cpp's threads, which wait for each other
at every graph node, stall whenever one is descheduled. So the engines of a pool
(bot.engine.pool) pass every decode through one `FairGate`: one decode at a time.

Who goes next is fair by CPU time, not by turns: the waiting engine that has decoded for the
least time so far. Taking plain turns would hold a small model to a big one's pace (one
step each, and the big one's steps take twice as long: measured, the small model then ran at
35% of its speed alone); by time, each busy model gets an equal share of the CPU. An engine
that was idle starts level with the least-served busy one, so it neither jumps the queue
with time it did not use nor waits for the others to catch up.

A single engine without a pool gets no gate at all.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


SLACK_S = 0.05
"""An engine back from idle starts this far behind the least-served busy one (an engine that
stays busy is never more than about one step behind the others, so it keeps its place)."""


class FairGate:
    """One decode at a time; next is the waiting engine with the least decode time so far."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._busy = False
        self._holder: int | None = None
        self._used: dict[int, float] = {}  # engine id -> seconds it decoded (relative; see `turn`)
        self._waiting: dict[int, float] = {}  # engine id -> when it started waiting (ties: first come)
        # counters (read by tests and the benchmark)
        self.turns = 0
        self.waited = 0  # turns that had to wait for another engine
        self.enabled = True  # False: every engine decodes when it likes (the benchmark's comparison)

    @contextlib.contextmanager
    def turn(self, owner: int) -> Iterator[None]:
        """Hold the CPU for one decode of engine `owner`."""
        if not self.enabled:
            yield
            return
        with self._cond:
            others = [self._used[o] for o in self._waiting] + ([self._used[self._holder]] if self._holder is not None else [])
            own = self._used.get(owner)
            if others:  # back from idle (or new): level with the least-served busy engine
                floor = min(others) - SLACK_S
                own = floor if own is None else max(own, floor)
            self._used[owner] = own or 0.0
            if self._busy:
                self.waited += 1
            self._waiting[owner] = time.perf_counter()
            while self._busy or self._next() != owner:
                self._cond.wait()
            del self._waiting[owner]
            self._busy, self._holder = True, owner
            self.turns += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._cond:
                self._used[owner] += time.perf_counter() - started
                self._busy, self._holder = False, None
                self._cond.notify_all()

    def forget(self, owner: int) -> None:
        """An engine is gone (unloaded)."""
        with self._cond:
            self._used.pop(owner, None)

    def _next(self) -> int:
        return min(self._waiting, key=lambda o: (self._used[o], self._waiting[o]))
