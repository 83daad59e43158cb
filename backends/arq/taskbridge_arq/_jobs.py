"""ARQ job functions for a bridge: one per task, each running it through the runner."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from arq.utils import timestamp_ms, to_ms
from arq.worker import Function, JobExecutionFailed, Retry, func

from taskbridge import MessageError
from taskbridge.backends import Envelope, Policy, Receiver, Task, WorkerBridge, encode_json, run

from ._dispatch import (
    DEFAULT_EXECUTION_FIELDS,
    DUE_FIELD,
    JOB_TRY_FIELD,
    POLICY_KWARG,
    SIGNATURE_FIELD,
    TRACE_FIELD,
)
from ._options import ArqOptions
from ._progress import ProgressReporter
from ._wakeups import WakeUps

if TYPE_CHECKING:
    from arq.typing import WorkerCoroutine

__all__ = ["UNLIMITED_TRIES", "job_functions"]

UNLIMITED_TRIES = 2**31 - 1
"""Given to ARQ, whose per-function max_tries cannot follow each job's own retries; the job
function applies max(retries + 1, max_tries) per job instead."""

logger = logging.getLogger("taskbridge.arq")

_GRACE = 1.0
"""Seconds ARQ's own job timeout exceeds the runner's, so the runner's fires first and the
task's retry policy applies to it."""
_RETRY_MARGIN_MS = 2
"""ARQ computes a retry's score a moment after the task decided it; wake no earlier than that."""


def job_functions(
    bridge: WorkerBridge,
    alias: str,
    options: ArqOptions,
    wakeups: WakeUps,
    *,
    reporter: ProgressReporter | None = None,
    threads: set[str] | None = None,
) -> list[Function]:
    """One ARQ function per task registered on `bridge`, named as the task.

    `reporter` stores the progress tasks report; `threads` holds the ids of the jobs running a
    `def` task at the moment.
    """
    if threads is None:
        threads = set()
    receiver = Receiver(
        bridge,
        alias,
        carried_defaults=DEFAULT_EXECUTION_FIELDS,
        adjust_policy=_cap_timeout(options),
    )
    return [
        _job_function(task, receiver, options, wakeups, reporter, threads)
        for task in bridge.tasks.values()
    ]


def _job_function(
    task: Task[..., Any],
    receiver: Receiver,
    options: ArqOptions,
    wakeups: WakeUps,
    reporter: ProgressReporter | None,
    threads: set[str],
) -> Function:
    signed = receiver.signer is not None
    in_thread = not task.is_async
    limit = _limit(task, options)

    # `ctx` is positional-only so that a task's own keyword argument `ctx` reaches the task.
    async def job(ctx: dict[str, Any], /, *args: Any, **kwargs: Any) -> Any:
        job_id: str = ctx["job_id"]
        carried = kwargs.pop(POLICY_KWARG, None)
        signature = trace = None
        engine: dict[str, Any] = {}
        if isinstance(carried, dict):
            # A copy: ARQ stores the job's own kwargs (signature included) with the result.
            carried = dict(carried)
            signature = carried.pop(SIGNATURE_FIELD, None)
            trace = carried.pop(TRACE_FIELD, None)
            job_try = carried.pop(JOB_TRY_FIELD, None)
            if signed:
                engine = {"t": job_try, "et": _epoch_ms(ctx["enqueue_time"])}
        try:
            call = receiver.receive(
                Envelope(job_id, task.name, args, kwargs, carried, engine, signature, trace)
            )
            _check_due(task.name, job_id, carried, ctx.get("score"))
        except MessageError as exc:
            # Not retried: ARQ stores the error as the job's result and carries on.
            logger.error("job %s rejected: %s", job_id, exc)
            raise
        policy = call.policy
        attempt: int = ctx["job_try"]
        most = max(policy.retries + 1, options.max_tries)
        if attempt > most:
            raise JobExecutionFailed(f"max {most} tries exceeded")
        if in_thread:
            threads.add(job_id)
        try:
            outcome = await run(
                task,
                call.args,
                call.kwargs,
                call_id=job_id,
                policy=policy,
                attempt=attempt,
                reporter=reporter,
                trace=call.trace,
            )
        finally:
            if in_thread:
                threads.discard(job_id)
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


def _epoch_ms(moment: Any) -> int | None:
    return round(moment.timestamp() * 1000) if isinstance(moment, datetime) else None


def _check_due(name: str, job_id: str, carried: Any, score: Any) -> None:
    """A delayed job must not start before the due time it carries (signed with the rest)."""
    if not isinstance(carried, dict) or DUE_FIELD not in carried:
        return
    due = carried[DUE_FIELD]
    if not isinstance(due, int) or isinstance(due, bool):
        raise MessageError(f"job {job_id} of task {name!r}: its due time {due!r} is not epoch ms")
    if isinstance(score, int | float) and score < due:
        raise MessageError(
            f"job {job_id} of task {name!r}: its queue score {score} is before its due time "
            f"{due} (the queue was altered); rejected"
        )


def _limit(task: Task[..., Any], options: ArqOptions) -> float:
    """The longest an attempt of `task` may run here: ARQ's job_timeout, or the worker's own
    policy's longer timeout."""
    return max(options.job_timeout, task.bridge.resolve(task).policy.timeout or 0.0)


def _cap_timeout(options: ArqOptions) -> Callable[[Task[..., Any], Policy], Policy]:
    def cap(task: Task[..., Any], policy: Policy) -> Policy:
        limit = _limit(task, options)
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
        return replace(policy, timeout=min(policy.timeout or limit, limit))

    return cap


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
