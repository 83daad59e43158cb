"""The ARQ worker for a bridge: one ARQ function per task, each running it through the runner."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import anyio.to_thread
from arq.utils import timestamp_ms, to_ms
from arq.worker import Function, JobExecutionFailed, Retry, Worker, func
from redis.asyncio.client import PubSub

from taskbridge import ConfigurationError, MessageError, TaskBridge
from taskbridge.backends import Policy, Task, encode_json, run, with_execution_fields

from ._dispatch import DEFAULT_EXECUTION_FIELDS, POLICY_KWARG, WAKE_CHANNEL_PREFIX
from ._options import ArqOptions
from ._wakeups import WakeUps

if TYPE_CHECKING:
    from arq.typing import WorkerCoroutine

__all__ = ["TaskbridgeWorker", "job_functions"]

logger = logging.getLogger("taskbridge.arq")

_GRACE = 1.0
"""Seconds ARQ's own job timeout exceeds the runner's, so the runner's fires first and the
task's retry policy applies to it."""
_ABORT_CHECK_INTERVAL = 0.1
"""Seconds between checks for aborted jobs (ARQ checks on each poll, every poll_delay)."""
_REFILL_DELAY = 0.002
"""Seconds a full worker waits, after a job ended, before polling to fill the free slots."""
_MAX_CACHED_POLICIES = 64
"""Distinct execution policies remembered per task (callers rarely use more than a few)."""
_RETRY_MARGIN_MS = 2
"""ARQ computes a retry's score a moment after the task decided it; wake no earlier than that."""


def job_functions(
    bridge: TaskBridge, alias: str, options: ArqOptions, wakeups: WakeUps
) -> list[Function]:
    """One ARQ function per task registered on `bridge`, named as the task."""
    return [_job_function(task, alias, options, wakeups) for task in bridge.tasks.values()]


def _job_function(
    task: Task[..., Any], alias: str, options: ArqOptions, wakeups: WakeUps
) -> Function:
    worker_policy = task.bridge.resolve(task).policy
    limit = max(options.job_timeout, worker_policy.timeout or 0.0)
    policies: dict[Hashable, Policy] = {}

    def policy_for(carried: Any) -> Policy:
        # Validating a policy costs more than the rest of a short job's Python: reuse it.
        try:
            key: Hashable = None if carried is None else frozenset(carried.items())
            return policies[key]
        except (AttributeError, TypeError):  # not a dict of scalars: validate, which refuses
            return _execution_policy(task, alias, carried, limit)
        except KeyError:
            policy = _execution_policy(task, alias, carried, limit)
            if len(policies) < _MAX_CACHED_POLICIES:
                policies[key] = policy
            return policy

    # `ctx` is positional-only so that a task's own keyword argument `ctx` reaches the task.
    async def job(ctx: dict[str, Any], /, *args: Any, **kwargs: Any) -> Any:
        policy = policy_for(kwargs.pop(POLICY_KWARG, None))
        attempt: int = ctx["job_try"]
        most = max(policy.retries + 1, options.max_tries)
        if attempt > most:
            raise JobExecutionFailed(f"max {most} tries exceeded")
        outcome = await run(
            task, args, kwargs, call_id=ctx["job_id"], policy=policy, attempt=attempt
        )
        if outcome.state == "succeeded":
            _check_result(task, outcome.value)
            return outcome.value
        if outcome.state == "retry":
            delay = outcome.retry_in or 0.0
            wakeups.due_at(timestamp_ms() + to_ms(delay) + _RETRY_MARGIN_MS)
            raise Retry(defer=delay)
        assert outcome.error is not None
        raise outcome.error

    job.__qualname__ = job.__name__ = task.name
    # ARQ's own timeout is a backstop above the runner's. ARQ's max_tries check, fixed per
    # function, is replaced by the one in `job`, which follows each job's carried retries.
    return func(cast("WorkerCoroutine", job), name=task.name, timeout=limit + _GRACE)


def _execution_policy(task: Task[..., Any], alias: str, carried: Any, limit: float) -> Policy:
    """The worker's policy for `task` with the dispatcher's execution fields applied.

    A job without them (enqueued with ARQ's own `enqueue_job`) runs with the worker's policy.
    """
    policy = task.bridge.resolve(task).policy
    if carried is not None and not isinstance(carried, dict):
        raise MessageError(f"{POLICY_KWARG!r} of a {task.name!r} job is not an object")
    try:
        if carried is not None:
            policy = with_execution_fields(policy, {**DEFAULT_EXECUTION_FIELDS, **carried})
    except ConfigurationError as exc:
        raise MessageError(f"{POLICY_KWARG!r} of a {task.name!r} job is invalid: {exc}") from None
    if policy.timeout is not None and policy.timeout > limit:
        logger.warning(
            "task %s: timeout %ss exceeds this worker's job_timeout %ss; applying %ss",
            task.name,
            policy.timeout,
            limit,
            limit,
        )
    # A timeout always applies: ARQ's own one (job_timeout) would otherwise cut the task
    # outside the runner, bypassing its retry policy.
    timeout = min(policy.timeout or limit, limit)
    return replace(policy, backend=alias, timeout=timeout)


def _check_result(task: Task[..., Any], value: Any) -> None:
    if value is None or type(value) in (str, int, bool):
        return
    try:
        encode_json(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"task {task.name!r} returned a {type(value).__module__}.{type(value).__qualname__}, "
            "which JSON cannot carry as its ARQ result; return str, int, float, bool, None, "
            "list or dict"
        ) from None


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
        **kwargs: Any,
    ) -> None:
        super().__init__(functions, poll_delay=0, **kwargs)
        self.wakeups = wakeups
        self.wake_channel = WAKE_CHANNEL_PREFIX + self.queue_name
        self._poll_delay = poll_delay
        self._polled = False
        self._listener: asyncio.Task[None] | None = None
        self._aborts_checked = float("-inf")
        self._refill: asyncio.TimerHandle | None = None

    async def main(self) -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, self.max_jobs)
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
        if len(job_ids) >= self.queue_read_limit:
            self.wakeups.work()  # the read was capped: more jobs may be due
        # A job running here is in progress: ARQ would spend three round trips to learn it.
        running = self.tasks
        await super().start_jobs(
            [i for i in job_ids if (t := running.get(i.decode())) is None or t.done()]
        )

    async def _cancel_aborted_jobs(self) -> None:
        # Polls come much more often than ARQ's every poll_delay; aborts need not be seen faster.
        now = asyncio.get_running_loop().time()
        if now - self._aborts_checked >= _ABORT_CHECK_INTERVAL:
            self._aborts_checked = now
            await super()._cancel_aborted_jobs()

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
        # ARQ closes its pool with redis-py's deprecated close(); the warning is ARQ's to fix.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            await super().close()
