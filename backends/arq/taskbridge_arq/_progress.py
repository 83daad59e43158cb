"""The worker's StatusReporter: writes the progress tasks report, and nothing else.

ARQ's own keys already say when a job was queued, started (the in-progress key holds the start
time, see `_worker`) and finished, and with what result, so the reporter writes no key for a
task that never calls `report_progress`: a job costs the same Redis commands as in ARQ.

A report is a plain function call from the task: from an `async def` task on the worker's loop,
from a `def` task in a worker thread. It only records the latest value per job; one writer task
on the loop sends what is pending in one pipeline, so reports never wait for Redis, the last one
wins, and they are written in order. With a call index, the pipeline also runs the index's MOVE
of each reported job, with no new state: it publishes the change to those watching the call.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from taskbridge.backends import MOVE_SCRIPT, Outcome, TaskContext, run_with_index

from ._index import IndexSpec
from ._status import PROGRESS_KEY_PREFIX, progress_payload

__all__ = ["ProgressReporter"]

logger = logging.getLogger("taskbridge.arq")


class ProgressReporter:
    """Stores progress in `taskbridge:progress:<id>`, expiring `ttl_ms` after the last report
    (None: never), for `ArqBackend.status` to read next to ARQ's keys; and announces it through
    the call `index`, when the alias keeps one."""

    def __init__(self, ttl_ms: int | None, index: IndexSpec | None = None) -> None:
        self.ttl_ms = ttl_ms
        self.index = index
        self._move: AsyncScript | None = None
        self._redis: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, bytes] = {}
        self._writer: asyncio.Task[None] | None = None

    def bind(self, redis: Redis, loop: asyncio.AbstractEventLoop) -> None:
        """Write with `redis`, from tasks on `loop` (the worker's, at its start)."""
        self._redis, self._loop = redis, loop
        self._move = redis.register_script(MOVE_SCRIPT) if self.index is not None else None

    # -- StatusReporter -------------------------------------------------------------------

    def started(self, context: TaskContext) -> None:
        """Nothing to write: the in-progress key has the start time."""

    def finished(self, context: TaskContext, outcome: Outcome) -> None:
        """Nothing to write: ARQ stores the result."""

    def progress(self, context: TaskContext, fraction: float, message: str | None) -> None:
        """Record the task's progress; thread-safe, never waits for Redis."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the progress reporter is not bound to the worker's loop")
        payload = progress_payload(fraction, None if message is None else str(message))
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(context.id, payload)
        else:  # a def task, in a worker thread
            loop.call_soon_threadsafe(self._put, context.id, payload)

    # -- writing --------------------------------------------------------------------------

    def _put(self, job_id: str, payload: bytes) -> None:
        self._pending[job_id] = payload
        if self._writer is None:
            assert self._loop is not None
            self._writer = self._loop.create_task(self._write(), name="taskbridge:progress")

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    assert self._redis is not None
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for job_id, payload in batch.items():
                            pipe.set(PROGRESS_KEY_PREFIX + job_id, payload, px=self.ttl_ms)
                        if self.index is None or self._move is None:
                            await pipe.execute()
                        else:
                            moves = [self.index.move(job_id, None) for job_id in batch]
                            await run_with_index(pipe, self._move, moves)
                except Exception as exc:
                    logger.warning(
                        "could not store the progress of job(s) %s: %s: %s",
                        ", ".join(batch),
                        type(exc).__name__,
                        exc,
                    )
        finally:
            self._writer = None

    async def drain(self) -> None:
        """Wait for the reports made so far to be written (at worker shutdown)."""
        while self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
