"""The fair queue: per-conversation order, round-robin between conversations, bounds."""

from __future__ import annotations

import asyncio

import pytest

from bot.conversations.scheduler import FairScheduler, QueueFull


async def test_round_robin_between_keys_and_fifo_within_a_key() -> None:
    scheduler = FairScheduler(parallel=1, max_queue=20)
    gate = asyncio.Event()
    order: list[str] = []

    def job(name: str):
        async def run() -> None:
            order.append(name)
            await gate.wait()

        return run

    jobs = [scheduler.submit("A", job("A1"))]  # runs at once, holds the only slot
    jobs += [scheduler.submit("A", job(f"A{i}")) for i in range(2, 5)]  # a busy channel floods
    jobs += [scheduler.submit("B", job("B1")), scheduler.submit("C", job("C1")), scheduler.submit("B", job("B2"))]
    assert [scheduler.position(j) for j in jobs] == [0, 1, 4, 6, 2, 3, 5]
    gate.set()
    await asyncio.gather(*(j.done for j in jobs))
    assert order == ["A1", "A2", "B1", "C1", "A3", "B2", "A4"]


async def test_one_job_per_key_at_a_time_and_parallel_across_keys() -> None:
    scheduler = FairScheduler(parallel=3, max_queue=10)
    running: set[str] = set()
    peak = 0
    seen_overlap = False

    def job(key: str):
        async def run() -> None:
            nonlocal peak, seen_overlap
            seen_overlap |= key in running
            running.add(key)
            peak = max(peak, len(running))
            await asyncio.sleep(0.02)
            running.discard(key)

        return run

    jobs = [scheduler.submit(k, job(k)) for k in "AABBCCD"]
    await asyncio.gather(*(j.done for j in jobs))
    assert not seen_overlap and peak == 3


async def test_queue_is_bounded_in_total_and_per_key() -> None:
    scheduler = FairScheduler(parallel=1, max_queue=4, per_key=2)
    gate = asyncio.Event()

    async def wait() -> None:
        await gate.wait()

    jobs = [scheduler.submit("A", wait), scheduler.submit("A", wait), scheduler.submit("A", wait)]
    with pytest.raises(QueueFull):
        scheduler.submit("A", wait)  # A already has 2 waiting
    jobs += [scheduler.submit("B", wait), scheduler.submit("C", wait)]
    with pytest.raises(QueueFull):
        scheduler.submit("D", wait)  # 4 waiting in total
    gate.set()
    await asyncio.gather(*(j.done for j in jobs))
    assert scheduler.waiting == 0 and scheduler.running == 0


async def test_a_failing_job_does_not_stop_the_queue() -> None:
    scheduler = FairScheduler(parallel=1, max_queue=4)
    done: list[str] = []

    async def boom() -> None:
        raise RuntimeError("decode failed")

    async def fine() -> None:
        done.append("ok")

    bad = scheduler.submit("A", boom)
    good = scheduler.submit("A", fine)
    with pytest.raises(RuntimeError):
        await bad.done
    await good.done
    assert done == ["ok"]


async def test_close_waits_then_winds_down() -> None:
    scheduler = FairScheduler(parallel=1, max_queue=4)
    stop = asyncio.Event()
    finished: list[str] = []

    async def long_job() -> None:
        await stop.wait()
        finished.append("wound down")

    running = scheduler.submit("A", long_job)
    waiting = scheduler.submit("A", long_job)
    await scheduler.close(0.05, wind_down=stop.set, settle=5)
    assert finished == ["wound down"]
    assert running.done.done() and waiting.done.cancelled()
    with pytest.raises(QueueFull):
        scheduler.submit("B", long_job)


async def test_a_job_not_started_can_be_withdrawn_and_the_others_move_up() -> None:
    scheduler = FairScheduler(parallel=1, max_queue=8)
    hold = asyncio.Event()
    ran: list[str] = []

    async def work(name: str) -> None:
        ran.append(name)
        await hold.wait()

    first = scheduler.submit("a", lambda: work("first"))
    twice = scheduler.submit("b", lambda: work("twice"))
    last = scheduler.submit("c", lambda: work("last"))
    await asyncio.sleep(0)
    assert scheduler.position(last) == 2
    assert not scheduler.withdraw(first)  # running: it cannot be taken back
    assert scheduler.withdraw(twice) and not scheduler.withdraw(twice)
    assert scheduler.waiting == 1 and scheduler.position(last) == 1 and twice.done.cancelled()
    hold.set()
    await first.done
    await last.done
    assert ran == ["first", "last"]
