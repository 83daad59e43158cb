"""The pause between two polls: ends at once on work, at a due time, or after the longest wait."""

from __future__ import annotations

import asyncio
import time

from arq.utils import timestamp_ms
from taskbridge_arq._wakeups import WakeUps


def _always() -> bool:
    return True


async def _timed(wait: asyncio.Future[None] | asyncio.Task[None]) -> float:
    started = time.monotonic()
    await wait
    return time.monotonic() - started


async def test_without_work_the_wait_lasts_the_poll_delay() -> None:
    elapsed = await _timed(asyncio.ensure_future(WakeUps().wait(0.2, _always)))
    assert 0.19 <= elapsed < 1.0


async def test_work_announced_before_the_wait_is_not_lost() -> None:
    wakeups = WakeUps()
    wakeups.work()  # e.g. a message read while the worker was polling
    assert await _timed(asyncio.ensure_future(wakeups.wait(5, _always))) < 0.5
    # ... and it is consumed: the next wait lasts
    assert await _timed(asyncio.ensure_future(wakeups.wait(0.1, _always))) >= 0.09


async def test_work_announced_during_the_wait_ends_it() -> None:
    wakeups = WakeUps()
    waiting = asyncio.ensure_future(wakeups.wait(5, _always))
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.05, wakeups.work)
    assert await _timed(waiting) < 1.0


async def test_a_due_time_ends_the_wait_when_it_comes() -> None:
    wakeups = WakeUps()
    waiting = asyncio.ensure_future(wakeups.wait(5, _always))
    await asyncio.sleep(0)
    wakeups.due_at(timestamp_ms() + 150)
    elapsed = await _timed(waiting)
    assert 0.12 <= elapsed < 1.0


async def test_a_due_time_already_past_is_work_now() -> None:
    wakeups = WakeUps()
    wakeups.due_at(timestamp_ms() - 1000)
    assert await _timed(asyncio.ensure_future(wakeups.wait(5, _always))) < 0.5


async def test_a_full_worker_waits_for_a_free_slot_despite_work() -> None:
    wakeups = WakeUps()
    free = False
    wakeups.work()
    waiting = asyncio.ensure_future(wakeups.wait(5, lambda: free))
    done, _ = await asyncio.wait({waiting}, timeout=0.1)
    assert not done, "a full worker must not poll for more jobs"

    free = True
    wakeups.work()  # what a finishing job does when the worker was full
    assert await _timed(waiting) < 1.0


async def test_an_announced_abort_ends_the_wait_of_a_full_worker() -> None:
    wakeups = WakeUps()
    waiting = asyncio.ensure_future(wakeups.wait(5, lambda: False))
    await asyncio.sleep(0)
    wakeups.abort()
    assert await _timed(waiting) < 1.0
    assert wakeups.take_abort() is True
    assert wakeups.take_abort() is False  # taken once


async def test_work_announced_while_full_is_kept_until_a_slot_frees() -> None:
    wakeups = WakeUps()
    wakeups.work()
    wakeups.abort()  # ends the wait, but the worker is still full: the work must not be lost
    await wakeups.wait(5, lambda: False)
    wakeups.take_abort()
    assert await _timed(asyncio.ensure_future(wakeups.wait(5, _always))) < 0.5
