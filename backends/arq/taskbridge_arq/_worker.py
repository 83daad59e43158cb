"""The ARQ worker for a bridge (its job functions are in `_jobs`).

Compared with ARQ's Worker, a taskbridge worker also: polls as soon as work is announced
(`_wakeups`); claims the due jobs of a poll in one Lua script, which records each attempt's start
time as the value of ARQ's in-progress key; verifies signatures (with a `signing_key`); stores
progress the tasks report (`_progress`); and never aborts a running `def` task, whose thread
could not be stopped (the job would read "cancelled" while the task runs on).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
from arq.constants import abort_job_max_age, abort_jobs_ss, in_progress_key_prefix
from arq.constants import result_key_prefix as result_prefix
from arq.utils import timestamp_ms
from arq.worker import Function, Worker
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript

from ._dispatch import WAKE_CHANNEL_PREFIX
from ._jobs import job_functions
from ._progress import ProgressReporter
from ._wakeups import WakeUps

__all__ = ["ABORT_MESSAGE", "CLAIM_SCRIPT", "TaskbridgeWorker", "job_functions"]

logger = logging.getLogger("taskbridge.arq")

_ABORT_CHECK_INTERVAL = 0.1
"""Seconds between checks for aborted jobs (ARQ checks on each poll, every poll_delay)."""
_REFILL_DELAY = 0.002
"""Seconds a full worker waits, after a job ended, before polling to fill the free slots."""

ABORT_MESSAGE = "abort"
"""Published on a queue's wake channel by `ArqBackend.cancel` after it asked for an abort."""

# KEYS[1]: the queue; then per candidate, its in-progress key and result key. ARGV: now (ms),
# the lock's lifetime (ms), how many jobs to claim at most, then the candidates' ids. Claims, in
# order, each candidate that is due, not locked and has no result: its in-progress key is set to
# now, the attempt's start time. A candidate that has a result (cancelled while queued) leaves
# the queue. Returns how many candidates it examined, then, flat, (id, score) of each claimed.
CLAIM_SCRIPT = """
local now, most = tonumber(ARGV[1]), tonumber(ARGV[3])
local claimed = {0}
local count = 0
for i = 1, #ARGV - 3 do
  if count >= most then
    break
  end
  claimed[1] = i
  local id = ARGV[i + 3]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now and redis.call('EXISTS', KEYS[2 * i]) == 0 then
    if redis.call('EXISTS', KEYS[2 * i + 1]) == 1 then
      redis.call('ZREM', KEYS[1], id)
    else
      redis.call('PSETEX', KEYS[2 * i], ARGV[2], ARGV[1])
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = score
      count = count + 1
    end
  end
end
return claimed
"""


class TaskbridgeWorker(Worker):
    """ARQ's Worker, polling again as soon as work is announced instead of sleeping.

    Everything else is ARQ's: job locking, retries with `Retry`, aborts, results, health
    checks, signal handling. The pause between polls is taken out of ARQ's loop (which is given
    `poll_delay=0`) and done in `_poll_iteration` by `WakeUps.wait`, ended early by messages on
    the queue's wake channel, which a reader task listens to.
    """

    def __init__(
        self,
        functions: Sequence[Function],
        *,
        wakeups: WakeUps,
        poll_delay: float,
        reporter: ProgressReporter | None = None,
        threads: set[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(functions, poll_delay=0, **kwargs)
        self.wakeups = wakeups
        self.reporter = reporter
        self.threads = threads if threads is not None else set()
        """Ids of the jobs running a `def` task here (shared with the job functions)."""
        self.wake_channel = WAKE_CHANNEL_PREFIX + self.queue_name
        self._poll_delay = poll_delay
        self._polled = False
        self._listener: asyncio.Task[None] | None = None
        self._aborts_checked = float("-inf")
        self._refill: asyncio.TimerHandle | None = None
        self._claim: AsyncScript | None = None

    async def main(self) -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, self.max_jobs)
        if self.reporter is not None:
            self.reporter.bind(self.pool, asyncio.get_running_loop())
        pubsub = self.pool.pubsub()
        try:
            await self._subscribe(pubsub)
            self._listener = asyncio.create_task(self._listen(pubsub), name="taskbridge:wakeups")
            logger.info(
                "taskbridge ARQ worker ready: queue %r, %d task(s), wake-ups on %r",
                self.queue_name,
                len(self.functions),
                self.wake_channel,
            )
            await super().main()
        finally:
            if self._listener is not None:
                self._listener.cancel()
                await asyncio.gather(self._listener, return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe(self, pubsub: PubSub) -> None:
        """Subscribe, and wait for the confirmation: from then on no announcement is missed."""
        await pubsub.subscribe(self.wake_channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while loop.time() < deadline:
            message = await pubsub.get_message(timeout=max(0.0, deadline - loop.time()))
            if message is not None and message["type"] == "subscribe":
                return
        logger.warning("no confirmation of the subscription to %r; polling", self.wake_channel)

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except Exception as exc:
                # redis-py reconnects and re-subscribes on the next read; poll meanwhile.
                logger.warning("wake-up channel %r: %s; retrying", self.wake_channel, exc)
                await asyncio.sleep(self._poll_delay)
                continue
            if message is None:
                continue
            if message["data"] == ABORT_MESSAGE.encode():
                self.wakeups.abort()
                continue
            try:
                self.wakeups.due_at(int(message["data"]))
            except (TypeError, ValueError):
                self.wakeups.work()

    def _can_start(self) -> bool:
        return self.allow_pick_jobs and self.job_counter < self.max_jobs

    async def _poll_iteration(self) -> None:
        if self._polled:
            await self.wakeups.wait(self._poll_delay, self._can_start)
        self._polled = True
        await super()._poll_iteration()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the due jobs among `job_ids` while there are free slots.

        ARQ locks each job in four round trips (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC); here
        one CLAIM_SCRIPT call locks as many as there are free slots, with the same checks,
        atomically. Slots freed meanwhile (short jobs end within a round trip or two) are filled
        from the same ids at once, as ARQ's loop over them does, rather than at the next poll.
        The lock's value is the start time, which `ArqBackend.status` reports as `started_at`.
        """
        if len(job_ids) >= self.queue_read_limit:
            self.wakeups.work()  # the read was capped: more jobs may be due
        running = self.tasks
        candidates = [
            job_id
            for job_id in (raw.decode() for raw in job_ids)
            if (t := running.get(job_id)) is None or t.done()  # running here: locked
        ]
        if self._claim is None:
            self._claim = self.pool.register_script(CLAIM_SCRIPT)
        lock_ms = int(self.in_progress_timeout_s * 1000)
        while candidates and self.allow_pick_jobs:  # a shutdown signal stops picking
            free = self.max_jobs - self.job_counter
            if free <= 0:
                return
            window = candidates[: 2 * free]  # most are claimable; the rest wait for a loop
            keys = [self.queue_name]
            for job_id in window:
                keys += [in_progress_key_prefix + job_id, result_prefix + job_id]
            reply: list[Any] = await self._claim(
                keys=keys, args=[timestamp_ms(), lock_ms, free, *window], client=self.pool
            )
            del candidates[: int(reply[0])]
            for i in range(1, len(reply), 2):
                job_id, score = reply[i].decode(), int(float(reply[i + 1]))
                await self.sem.acquire()  # never waits: a slot is free
                self.job_counter += 1
                task = self.loop.create_task(self.run_job(job_id, score))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task

    async def _cancel_aborted_jobs(self) -> None:
        """Cancel the running jobs in ARQ's abort set, except `def` tasks, which are left to
        finish (their abort request is dropped, with a warning)."""
        # Polls come much more often than ARQ's every poll_delay; aborts need not be seen faster
        # unless one was announced.
        now = asyncio.get_running_loop().time()
        if not self.wakeups.take_abort() and now - self._aborts_checked < _ABORT_CHECK_INTERVAL:
            return
        self._aborts_checked = now
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zrange(abort_jobs_ss, start=0, end=-1)
            # ARQ's own clean-up of the set, kept as it is
            pipe.zremrangebyscore(
                abort_jobs_ss, min=timestamp_ms() + abort_job_max_age, max=float("inf")
            )
            requested, _ = await pipe.execute()
        handled: list[str] = []
        for job_id in (raw.decode() for raw in requested):
            task = self.job_tasks.get(job_id)
            if task is None:
                continue  # not running here (yet): ARQ's run_job sees it before starting
            handled.append(job_id)
            if job_id in self.threads:
                logger.warning(
                    "job %s runs a def task in a thread, which cannot be interrupted; "
                    "abort ignored, it will finish",
                    job_id,
                )
                continue
            self.aborting_tasks.add(job_id)
            task.cancel()
        if handled:
            await self.pool.zrem(abort_jobs_ss, *handled)

    def _release_sem_dec_counter_on_complete(self) -> None:
        was_full = self.job_counter >= self.max_jobs
        super()._release_sem_dec_counter_on_complete()
        if was_full and self._refill is None:
            # Due jobs may have waited for this slot. Poll a moment later, so that the slots
            # freed meanwhile are filled by one poll rather than one poll each.
            self._refill = self.loop.call_later(_REFILL_DELAY, self._refill_slots)

    def _refill_slots(self) -> None:
        self._refill = None
        self.wakeups.work()

    async def close(self) -> None:
        # ARQ's close() gathers the job tasks and re-raises the first error: a job cancelled by
        # SIGTERM while ARQ recorded its outcome would end the worker with a traceback and a
        # non-zero exit code. Wait for them here, and hand ARQ none.
        outcomes = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for job_id, outcome in zip(list(self.tasks), outcomes, strict=True):
            if isinstance(outcome, Exception):
                logger.error("job %s ended with an error", job_id, exc_info=outcome)
        self.tasks.clear()
        if self.reporter is not None:
            await self.reporter.drain()
        # ARQ closes its pool with redis-py's deprecated close(); the warning is ARQ's to fix.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            await super().close()
