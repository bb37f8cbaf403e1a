"""Taking turns on the CPU: the engines of several loaded models decode one step at a time.

Each model's `Engine` has its own thread (a llama.cpp context belongs to one thread), and
each decode already uses every core (N_THREADS). Two models decoding at once would run
2 x N_THREADS threads on N_THREADS cores: both slow down, and llama.cpp's threads, which
wait for each other at every graph node, stall whenever one is descheduled. So the engines
of a pool (bot.engine.pool) pass every decode through one `FairGate`: one decode at a time,
in the order they asked (tickets), so two busy models alternate steps and neither starves.
A single engine without a pool gets no gate at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class FairGate:
    """A FIFO lock: whoever asked first decodes next (a plain lock lets one thread take it
    again and again while another waits)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose turn it is
        # counters (read by tests and the benchmark)
        self.turns = 0
        self.waited = 0  # turns that had to wait for another engine

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the CPU for one decode."""
        with self._cond:
            ticket = self._next
            self._next += 1
            if ticket != self._serving:
                self.waited += 1
            while ticket != self._serving:
                self._cond.wait()
            self.turns += 1
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()
