"""When a worker polls again: at once when work is announced, else after `poll_delay`.

ARQ's worker sleeps `poll_delay` (0.5 s) between polls, so a job waits 250 ms for a worker on
average. Here the pause between polls ends early when:
- an enqueue announces a due time on the queue's wake channel (it is due now, or a deferred job
  becomes due before the pause would end);
- a retry this worker scheduled becomes due;
- a job finishes while the worker was full, or a poll read as many ids as it may (more wait).
An abort announced by `ArqBackend.cancel` ends the pause even when the worker is full, so the
running job is cancelled at once. The pause still ends after `poll_delay` at the latest, so
aborts made with ARQ's own `Job.abort`, health checks and jobs from enqueuers that do not
announce (ARQ's own `enqueue_job`) are handled as in ARQ.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

from arq.utils import timestamp_ms

__all__ = ["WakeUps"]

_MAX_PENDING = 10_000


class WakeUps:
    """Work announcements and due times, and the wait between two polls."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._work = False
        self._abort = False
        self._due: list[int] = []

    def work(self) -> None:
        """There may be work to start now."""
        self._work = True
        self._event.set()

    def abort(self) -> None:
        """A running job may have to be aborted: check now, full or not."""
        self._abort = True
        self._event.set()

    def take_abort(self) -> bool:
        """Whether an abort was announced since the last call (and forget it)."""
        requested, self._abort = self._abort, False
        return requested

    def due_at(self, due_ms: int) -> None:
        """A job becomes due at `due_ms` (epoch ms, the queue's score)."""
        if due_ms <= timestamp_ms():
            self.work()
            return
        if len(self._due) >= _MAX_PENDING:
            return  # the regular poll finds it
        earliest = not self._due or due_ms < self._due[0]
        heapq.heappush(self._due, due_ms)
        if earliest:
            self._event.set()  # the waiter recomputes its timeout

    async def wait(self, longest: float, can_start: Callable[[], bool]) -> None:
        """Return when there is work and `can_start()`, when an abort is announced, or after
        `longest` seconds.

        Announcements arriving while the caller polls are kept for the next wait, so none is
        lost between a poll and the wait after it; work announced while the caller cannot start
        any is kept until it can.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + longest
        while True:
            now_ms = timestamp_ms()
            while self._due and self._due[0] <= now_ms:
                heapq.heappop(self._due)
                self._work = True
            if self._abort or (self._work and can_start()):
                break
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            if self._due:
                timeout = min(timeout, (self._due[0] - now_ms) / 1000)
            self._event.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                pass
        if can_start():
            self._work = False
