"""The runner: the one place a task call is executed, in the API process and in every worker.

It runs `async def` tasks on the event loop and `def` tasks in a worker thread (or, under a
blocking engine such as a Celery prefork child, in the calling thread), applies the timeout and
decides whether a failure is retried. Engines only move messages; they map the Outcome onto their
own retry and result features.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import anyio.to_thread

from ._handle import TaskHandle
from ._policy import Policy
from ._task import Task
from ._tracing import SCHEDULE_KEY, scheduled, span

__all__ = [
    "Outcome",
    "StatusReporter",
    "TaskContext",
    "close_thread_loop",
    "current_task",
    "report_progress",
    "run",
    "run_blocking",
    "run_with_retries",
]

logger = logging.getLogger("taskbridge")


@dataclass(slots=True)
class TaskContext:
    """What a running task can learn about its own call (see `current_task()`); read it, do
    not change it. (Not a frozen dataclass: building one of those costs six times as much, on
    every attempt.)"""

    id: str
    name: str
    attempt: int
    """1 for the first attempt, 2 for the first retry, and so on."""
    backend: str
    schedule: str | None = None
    """The name of the schedule that made this call, if a scheduler did."""
    scheduled_at: datetime | None = None
    """The time of the schedule's slot this call is for (timezone-aware)."""


def _context(
    call_id: str, name: str, attempt: int, backend: str, carried: Mapping[str, Any] | None
) -> TaskContext:
    if carried and SCHEDULE_KEY in carried:
        schedule, slot = scheduled(carried)
        return TaskContext(call_id, name, attempt, backend, schedule, slot)
    return TaskContext(call_id, name, attempt, backend)


_current: ContextVar[TaskContext | None] = ContextVar("taskbridge_current_task", default=None)


def current_task() -> TaskContext | None:
    """The call being executed in this context, or None outside a task."""
    return _current.get()


class StatusReporter(Protocol):
    """Where a backend records what the runner sees: start, progress and end of attempts."""

    def started(self, context: TaskContext) -> None:
        """An attempt started."""

    def progress(self, context: TaskContext, fraction: float, message: str | None) -> None:
        """The task reported progress."""

    def finished(self, context: TaskContext, outcome: Outcome) -> None:
        """An attempt ended (succeeded, failed for good, or to be retried)."""


_reporter: ContextVar[StatusReporter | None] = ContextVar("taskbridge_reporter", default=None)


def report_progress(fraction: float, message: str | None = None) -> None:
    """From inside a task: record how far it got (0 to 1) and what it is doing.

    The backend stores it where `handle.progress()` reads it. A no-op outside a task.
    """
    context, reporter = _current.get(), _reporter.get()
    if context is None or reporter is None:
        return
    try:
        reporter.progress(context, min(1.0, max(0.0, float(fraction))), message)
    except Exception:
        logger.exception("could not record progress of task %s [%s]", context.name, context.id)


def _report(reporter: StatusReporter | None, event: str, *args: Any) -> None:
    if reporter is None:
        return
    try:
        getattr(reporter, event)(*args)
    except Exception:
        logger.exception("status reporter %r failed on %s", reporter, event)


@dataclass(slots=True)
class Outcome:
    """The result of one attempt: succeeded, failed for good, or to be retried after `retry_in`."""

    state: Literal["succeeded", "failed", "retry"]
    value: Any = None
    error: BaseException | None = None
    retry_in: float | None = None
    attempt: int = 1
    duration: float = 0.0


def _outcome(
    context: TaskContext,
    policy: Policy,
    started: float,
    value: Any = None,
    error: Exception | None = None,
) -> Outcome:
    """Classify an attempt and log it with structured fields (task, id, backend, attempt)."""
    duration = time.perf_counter() - started
    if error is None:
        if logger.isEnabledFor(logging.DEBUG):  # the fields are built only for a record
            logger.debug(
                "task %s [%s] succeeded in %.3fs",
                context.name,
                context.id,
                duration,
                extra=_fields(context, duration),
            )
        return Outcome("succeeded", value=value, attempt=context.attempt, duration=duration)
    if policy.should_retry(error, context.attempt):
        delay = policy.retry_delay(context.attempt)
        logger.warning(
            "task %s [%s] attempt %d failed (%s: %s); retrying in %.2fs",
            context.name,
            context.id,
            context.attempt,
            type(error).__name__,
            error,
            delay,
            extra=_fields(context, duration),
        )
        return Outcome(
            "retry", error=error, retry_in=delay, attempt=context.attempt, duration=duration
        )
    logger.error(
        "task %s [%s] failed after %d attempt(s) on backend %r",
        context.name,
        context.id,
        context.attempt,
        context.backend,
        exc_info=error,
        extra=_fields(context, duration),
    )
    return Outcome("failed", error=error, attempt=context.attempt, duration=duration)


def _fields(context: TaskContext, duration: float) -> dict[str, Any]:
    """The structured fields of an attempt's log record."""
    return {
        "task_name": context.name,
        "task_id": context.id,
        "backend": context.backend,
        "attempt": context.attempt,
        "duration": duration,
    }


def _hook_calls(task: Task[..., Any], context: TaskContext, outcome: Outcome) -> list[Any]:
    """Call the task's and the bridge's hooks for `outcome`; return what they returned
    (awaitables, for async hooks, which the caller awaits). A failing hook is logged only."""
    handle = TaskHandle(context.id, context.name, context.backend)
    if outcome.state == "succeeded":
        hooks, payload = task.hooks.on_success + task.bridge.hooks.on_success, outcome.value
    elif outcome.state == "retry":
        hooks, payload = task.hooks.on_retry + task.bridge.hooks.on_retry, outcome.error
    else:
        hooks, payload = task.hooks.on_failure + task.bridge.hooks.on_failure, outcome.error
    pending = []
    for hook in hooks:
        try:
            result = hook(handle, payload)
        except Exception:
            logger.exception(
                "%s hook %r of task %s [%s] failed", outcome.state, hook, context.name, context.id
            )
            continue
        if inspect.isawaitable(result):
            pending.append(_guarded(result, hook, context))
    return pending


async def _guarded(awaitable: Awaitable[Any], hook: object, context: TaskContext) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("hook %r of task %s [%s] failed", hook, context.name, context.id)


async def _with_timeout(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    if timeout is None:
        return await awaitable
    async with asyncio.timeout(timeout):
        return await awaitable


async def run(
    task: Task[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    call_id: str,
    policy: Policy,
    attempt: int = 1,
    reporter: StatusReporter | None = None,
    trace: Mapping[str, Any] | None = None,
) -> Outcome:
    """Execute one attempt on the running event loop; never raises for the task's own errors.

    A `def` task runs in a worker thread; at its timeout the call is abandoned (a thread cannot
    be killed) and counts as failed with TimeoutError.
    """
    context = _context(call_id, task.name, attempt, policy.backend, trace)
    token = _current.set(context)
    reporter_token = _reporter.set(reporter)
    if reporter is not None:
        _report(reporter, "started", context)
    started = time.perf_counter()
    try:
        if trace:
            with span(task.name, call_id, attempt, trace):
                value = await _execute(task, args, kwargs, policy)
        else:  # not tracing: no span to open
            value = await _execute(task, args, kwargs, policy)
    except Exception as error:
        outcome = _outcome(context, policy, started, error=error)
    else:
        outcome = _outcome(context, policy, started, value=value)
    finally:
        _current.reset(token)
        _reporter.reset(reporter_token)
    if reporter is not None:
        _report(reporter, "finished", context, outcome)
    if task.hooks or task.bridge.hooks:
        for pending in _hook_calls(task, context, outcome):
            await pending
    return outcome


async def _execute(
    task: Task[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], policy: Policy
) -> Any:
    timeout = policy.timeout
    if task.is_async:
        if timeout is None:
            return await task.func(*args, **kwargs)
        async with asyncio.timeout(timeout):
            return await task.func(*args, **kwargs)
    call = functools.partial(task.func, *args, **kwargs)
    if timeout is None:
        return await anyio.to_thread.run_sync(call)
    async with asyncio.timeout(timeout):  # the thread is abandoned at the timeout
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


async def run_with_retries(
    task: Task[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    call_id: str,
    policy: Policy,
    reporter: StatusReporter | None = None,
    trace: Mapping[str, Any] | None = None,
) -> Outcome:
    """Execute a call in this process, retrying after the policy's backoff until it settles."""
    attempt = 1
    while True:
        outcome = await run(
            task,
            args,
            kwargs,
            call_id=call_id,
            policy=policy,
            attempt=attempt,
            reporter=reporter,
            trace=trace,
        )
        if outcome.state != "retry":
            return outcome
        await asyncio.sleep(outcome.retry_in or 0.0)
        attempt += 1


class _ThreadLoop:
    """Owns a thread's persistent loop; closes it when the thread's locals are dropped."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def __del__(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()


_thread_state = threading.local()

_NO_SPAN = contextlib.nullcontext()
"""What `run_blocking` enters instead of `span` for a call that carries no trace context."""


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's persistent event loop, so loop-bound clients survive between tasks."""
    holder: _ThreadLoop | None = getattr(_thread_state, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _thread_state.holder = _ThreadLoop()
    return holder.loop


def close_thread_loop() -> None:
    """Close this thread's persistent loop, if `run_blocking` made one (worker shutdown)."""
    holder: _ThreadLoop | None = getattr(_thread_state, "holder", None)
    if holder is not None:
        holder.close()
        del _thread_state.holder


def run_blocking(
    task: Task[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    call_id: str,
    policy: Policy,
    attempt: int = 1,
    reporter: StatusReporter | None = None,
    trace: Mapping[str, Any] | None = None,
) -> Outcome:
    """Execute one attempt from synchronous code (a blocking worker such as Celery's).

    A `def` task runs in the calling thread; its timeout is left to the engine (Celery's time
    limits on prefork). An `async def` task runs on this thread's persistent event loop, and at
    its timeout it is cancelled and drained before this returns.
    """
    context = _context(call_id, task.name, attempt, policy.backend, trace)
    token = _current.set(context)
    reporter_token = _reporter.set(reporter)
    if reporter is not None:
        _report(reporter, "started", context)
    started = time.perf_counter()
    try:
        # (no carried trace context: no span, and no context manager to build for it)
        with span(task.name, call_id, attempt, trace) if trace else _NO_SPAN:
            if task.is_async:
                coro: Coroutine[Any, Any, Any] = _with_timeout(
                    task.func(*args, **kwargs), policy.timeout
                )
                value = _thread_loop().run_until_complete(coro)
            else:
                value = task.func(*args, **kwargs)
    except Exception as error:
        outcome = _outcome(context, policy, started, error=error)
    else:
        outcome = _outcome(context, policy, started, value=value)
    finally:
        _current.reset(token)
        _reporter.reset(reporter_token)
    if reporter is not None:
        _report(reporter, "finished", context, outcome)
    if task.hooks or task.bridge.hooks:
        for pending in _hook_calls(task, context, outcome):
            _thread_loop().run_until_complete(pending)
    return outcome
