"""The fair gate the engines of several loaded models decode through (bot/engine/gate.py): one
decode at a time, the next going to the waiting engine that decoded least so far."""

from __future__ import annotations

import threading
import time

from bot.engine.gate import FairGate


def test_one_decode_at_a_time_and_shares_by_time_not_by_turns() -> None:
    """A "big model" whose steps take 40 ms and a "small" one whose steps take 2 ms, both always
    waiting: taking plain turns would give them as many steps each; by time, the small one gets many more."""
    gate = FairGate()
    inside = 0
    overlaps = 0
    counts = {"big": 0, "small": 0}
    stop = threading.Event()
    lock = threading.Lock()

    def engine(name: str, step_s: float) -> None:
        nonlocal inside, overlaps
        while not stop.is_set():
            with gate.turn(id(name)):
                with lock:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(step_s)
                with lock:
                    inside -= 1
                counts[name] += 1

    threads = [threading.Thread(target=engine, args=("big", 0.04)), threading.Thread(target=engine, args=("small", 0.002))]
    for t in threads:
        t.start()
    while counts["big"] < 10:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert overlaps == 0
    assert counts["small"] > 3 * counts["big"]  # about 20x by time; 1x by turns
    assert gate.turns == counts["big"] + counts["small"]

