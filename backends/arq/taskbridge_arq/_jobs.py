"""ARQ job functions for a bridge: one per task, each running it through the runner."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from arq.utils import timestamp_ms, to_ms
from arq.worker import Function, JobExecutionFailed, Retry, func

from taskbridge import ConfigurationError, MessageError, TaskBridge
from taskbridge.backends import Policy, Task, encode_json, run, with_execution_fields

from ._dispatch import (
    DEFAULT_EXECUTION_FIELDS,
    POLICY_KWARG,
    SIGNATURE_FIELD,
    TRACE_FIELD,
)
from ._options import ArqOptions
from ._progress import ProgressReporter
from ._wakeups import WakeUps

if TYPE_CHECKING:
    from arq.typing import WorkerCoroutine

__all__ = ["job_functions"]

logger = logging.getLogger("taskbridge.arq")

_GRACE = 1.0
"""Seconds ARQ's own job timeout exceeds the runner's, so the runner's fires first and the
task's retry policy applies to it."""
_MAX_CACHED_POLICIES = 64
"""Distinct execution policies remembered per task (callers rarely use more than a few)."""
_RETRY_MARGIN_MS = 2
"""ARQ computes a retry's score a moment after the task decided it; wake no earlier than that."""


def job_functions(
    bridge: TaskBridge,
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
    return [
        _job_function(task, alias, options, wakeups, reporter, threads)
        for task in bridge.tasks.values()
    ]


def _job_function(
    task: Task[..., Any],
    alias: str,
    options: ArqOptions,
    wakeups: WakeUps,
    reporter: ProgressReporter | None,
    threads: set[str],
) -> Function:
    worker_policy = task.bridge.resolve(task).policy
    signer = task.bridge.signer
    in_thread = not task.is_async
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
        job_id: str = ctx["job_id"]
        carried = kwargs.pop(POLICY_KWARG, None)
        signature = None
        if isinstance(carried, dict) and SIGNATURE_FIELD in carried:
            # A copy: ARQ stores the job's own kwargs (signature included) with the result.
            carried = dict(carried)
            signature = carried.pop(SIGNATURE_FIELD)
        if signer is not None:
            signed = kwargs if carried is None else {**kwargs, POLICY_KWARG: carried}
            try:
                signer.verify(signature, job_id, task.name, args, signed)
            except MessageError as exc:
                # Not retried: ARQ stores the error as the job's result and carries on.
                logger.error("job %s rejected: %s", job_id, exc)
                raise
        trace = None
        if isinstance(carried, dict) and TRACE_FIELD in carried:
            carried = dict(carried)
            trace = carried.pop(TRACE_FIELD)
        policy = policy_for(carried)
        attempt: int = ctx["job_try"]
        most = max(policy.retries + 1, options.max_tries)
        if attempt > most:
            raise JobExecutionFailed(f"max {most} tries exceeded")
        if in_thread:
            threads.add(job_id)
        try:
            outcome = await run(
                task,
                args,
                kwargs,
                call_id=job_id,
                policy=policy,
                attempt=attempt,
                reporter=reporter,
                trace=trace if isinstance(trace, dict) else None,
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
