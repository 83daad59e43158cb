"""Backends that need no broker: in-process, immediate, and a recording test double."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from fastapi import BackgroundTasks
from pydantic import Field
from starlette.background import BackgroundTask

from .._backends import Backend, BackendOptions
from .._runner import Outcome, TaskContext, run, run_with_retries
from .._status import (
    CancelResult,
    MemoryStatusStore,
    TaskErrorInfo,
    TaskStatus,
    timestamp,
)
from .._task import TaskCall

__all__ = [
    "ImmediateBackend",
    "InProcessBackend",
    "KeyGuard",
    "MemoryReporter",
    "RecordingBackend",
    "run_in_process",
    "spawn_in_process",
]


_PLAIN = (type(None), str, int, bool)


def _json_or_repr(value: Any) -> Any:
    """Results of in-process tasks are kept as JSON when they are JSON, else as their repr."""
    if type(value) in _PLAIN:
        return value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def error_info(error: BaseException) -> TaskErrorInfo:
    """The travelling form of an exception: qualified type name and message."""
    kind = type(error)
    return TaskErrorInfo(type=f"{kind.__module__}.{kind.__qualname__}", message=str(error))


class MemoryReporter:
    """Records attempts of in-process calls in the bridge's MemoryStatusStore."""

    def __init__(self, store: MemoryStatusStore) -> None:
        self.store = store

    def queued(self, call: TaskCall) -> None:
        self.store.queued(call.id, call.task.name, call.policy.backend, call.enqueued_at)

    def started(self, context: TaskContext) -> None:
        self.store.change(
            context.id,
            context.name,
            context.backend,
            state="running",
            attempts=context.attempt,
            started_at=time.time(),
        )

    def progress(self, context: TaskContext, fraction: float, message: str | None) -> None:
        self.store.change(
            context.id, context.name, context.backend, progress=fraction, progress_message=message
        )

    def finished(self, context: TaskContext, outcome: Outcome) -> None:
        store = self.store
        if outcome.state == "succeeded":
            store.change(
                context.id,
                context.name,
                context.backend,
                state="succeeded",
                result=_json_or_repr(outcome.value),
                error=None,
                finished_at=time.time(),
            )
        elif outcome.state == "retry":
            assert outcome.error is not None
            store.change(
                context.id,
                context.name,
                context.backend,
                state="retrying",
                error=error_info(outcome.error),
            )
        else:
            assert outcome.error is not None
            store.change(
                context.id,
                context.name,
                context.backend,
                state="failed",
                error=error_info(outcome.error),
                finished_at=time.time(),
            )

    def cancelled(self, task_id: str) -> None:
        self.store.update(task_id, state="cancelled", finished_at=time.time())


class KeyGuard:
    """Remembers idempotency-keyed call ids for their key_ttl, in this process."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def admit(self, call: TaskCall) -> bool:
        """False when a call with the same key (hence id) was admitted within its TTL."""
        if call.policy.key is None:
            return True
        now = time.monotonic()
        if self._until.get(call.id, 0.0) > now:
            return False
        if len(self._until) > 10_000:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[call.id] = now + call.policy.key_ttl
        return True


async def run_in_process(
    call: TaskCall,
    reporter: MemoryReporter,
    on_failure: Callable[[BaseException], None] | None = None,
) -> None:
    """Run a call here, after its delay, retrying as its policy says; failures are logged,
    and `on_failure` is called with the error of a call that failed for good.

    A call cancelled before it starts does not run; a running `async def` call (or one waiting
    for its delay) is cancelled through the asyncio task its record names.
    """
    store = reporter.store
    if store.state(call.id) == "cancelled":
        return
    cancellable = call.task.is_async or bool(call.policy.delay)
    if cancellable:
        current = asyncio.current_task()
        assert current is not None
        store.runners[call.id] = current
    try:
        if call.policy.delay:
            await asyncio.sleep(call.policy.delay)
            if not call.task.is_async:
                store.runners.pop(call.id, None)  # a def task cannot be interrupted once it runs
        # one attempt, as most calls are: no retry loop around it
        execute = run if not call.policy.retries else run_with_retries
        outcome = await execute(
            call.task,
            call.args,
            call.kwargs,
            call_id=call.id,
            policy=call.policy,
            reporter=reporter,
            trace=call.trace,
        )
        if on_failure is not None and outcome.error is not None:
            on_failure(outcome.error)
    except asyncio.CancelledError:
        if call.id not in store.cancel_requested:
            raise
        running = asyncio.current_task()
        assert running is not None
        running.uncancel()
        reporter.cancelled(call.id)
    finally:
        if cancellable:
            store.runners.pop(call.id, None)
            store.cancel_requested.discard(call.id)


class _InRequest(BackgroundTask):
    """A request's background task that runs one in-process call: what
    `BackgroundTasks.add_task(run_in_process, ...)` would add, built without inspecting
    `run_in_process` again for every call."""

    def __init__(
        self,
        call: TaskCall,
        reporter: MemoryReporter,
        on_failure: Callable[[BaseException], None] | None,
    ) -> None:
        self._run: tuple[TaskCall, MemoryReporter, Callable[[BaseException], None] | None] | None
        self._run = (call, reporter, on_failure)
        # BackgroundTask's own attributes, for code that looks at a request's tasks
        vars(self).update(func=run_in_process, args=self._run, kwargs={}, is_async=True)

    async def __call__(self) -> None:
        # Let go of the call (and of the request's TaskQueue, through `on_failure`) before
        # running it: the request's objects are then freed by reference counting, not left in
        # a cycle for the garbage collector, which would run far more often.
        run, self._run = self._run, None
        vars(self)["args"] = ()
        assert run is not None, "a request's background task runs once"
        await run_in_process(*run)


_spawned: set[asyncio.Task[None]] = set()


def spawn_in_process(call: TaskCall, reporter: MemoryReporter) -> asyncio.Task[None]:
    """Run a call as an asyncio task on the running loop (a reference is kept until it ends)."""
    task = asyncio.get_running_loop().create_task(
        run_in_process(call, reporter), name=f"taskbridge:{call.name}"
    )
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)
    return task


class StoreOptions(BackendOptions):
    """Options of the in-process backends: how long they keep each call's status, and how many
    at most (a memory cap: past it the oldest go first, before their `status_ttl`)."""

    status_ttl: float = Field(default=3600.0, gt=0)
    """Seconds a call's status is kept after its last change (it finished, usually)."""
    status_max_entries: int = Field(default=100_000, ge=1)
    """Most calls whose status is kept (about 800 bytes each): 100,000 keeps an hour of calls
    up to ~28 calls/s; above that rate, the last `status_max_entries / rate` seconds."""


class _StoreBackend(Backend):
    """Calls run in this process; their status lives in a bounded in-memory store."""

    supports_status: ClassVar[bool] = True
    supports_cancel: ClassVar[bool] = True
    options_model: ClassVar[type[BackendOptions]] = StoreOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        assert isinstance(self.options, StoreOptions)
        self.reporter = MemoryReporter(
            MemoryStatusStore(self.options.status_max_entries, self.options.status_ttl)
        )
        self.keys = KeyGuard()

    async def status(self, task_id: str) -> TaskStatus | None:
        return self.reporter.store.get(task_id)

    async def cancel(self, task_id: str) -> CancelResult:
        known = await self.status(task_id)
        if known is None:
            return CancelResult(
                id=task_id, cancelled=False, state="unknown", detail="no such call in this process"
            )
        if known.done:
            return CancelResult(
                id=task_id, cancelled=False, state=known.state, detail=f"already {known.state}"
            )
        store = self.reporter.store
        running = store.runners.get(task_id)
        if known.state == "queued" and running is None:
            self.reporter.cancelled(task_id)
            return CancelResult(
                id=task_id, cancelled=True, state="cancelled", detail="cancelled before it started"
            )
        if running is not None:
            store.cancel_requested.add(task_id)
            running.cancel()
            return CancelResult(
                id=task_id, cancelled=True, state="cancelled", detail="cancelled while running"
            )
        return CancelResult(
            id=task_id,
            cancelled=False,
            state=known.state,
            detail="a running def task in the API process cannot be interrupted; it will finish",
        )


class InProcessBackend(_StoreBackend):
    """Runs calls in the API process, after the response, like FastAPI's BackgroundTasks.

    Inside a request the call joins the request's own BackgroundTasks, in `add_task` order with
    any plain callables: `def` tasks run in the threadpool, `async def` tasks on the loop. Unlike
    Starlette, a failing task does not stop the ones after it: the runner logs the failure with
    the task's name and id. Outside a request (`enqueue`) the call runs as an asyncio task;
    `close` waits for those still running.
    """

    runs_in_process: ClassVar[bool] = True
    supports_delay: ClassVar[bool] = True

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._running: set[asyncio.Task[None]] = set()

    def defer_in_request(
        self,
        call: TaskCall,
        background: BackgroundTasks,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> bool:
        if self.keys.admit(call):
            self.reporter.queued(call)
            background.tasks.append(_InRequest(call, self.reporter, on_failure))
        return True

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        for call in filter(self.keys.admit, calls):
            self.reporter.queued(call)
            task = spawn_in_process(call, self.reporter)
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def close(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


class ImmediateBackend(_StoreBackend):
    """Runs each call at dispatch, before the response is sent: for tests and scripts.

    Arguments go through the same JSON check as for a queue, so what passes here would travel.
    Retries are attempted back to back, without the backoff wait. A failure is logged, not raised.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        reporter = self.reporter
        for call in filter(self.keys.admit, calls):
            reporter.queued(call)
            immediate = replace(call.policy, retry_backoff=0.0, retry_jitter=False, delay=None)
            await run_with_retries(
                call.task,
                call.args,
                call.kwargs,
                call_id=call.id,
                policy=immediate,
                reporter=reporter,
                trace=call.trace,
            )


class RecordingBackend(Backend):
    """Stores calls without running them, in dispatch order: a test double for any queue.

    Arguments are JSON-checked and normalised as for a real queue. Read `calls`; `clear()` it
    between tests. Recorded calls report `queued`; cancelling one removes it.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True
    supports_status: ClassVar[bool] = True
    supports_cancel: ClassVar[bool] = True

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.calls: list[TaskCall] = []
        self.keys = KeyGuard()

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        self.calls.extend(filter(self.keys.admit, calls))

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    def _find(self, task_id: str) -> TaskCall | None:
        return next((call for call in self.calls if call.id == task_id), None)

    async def status(self, task_id: str) -> TaskStatus | None:
        call = self._find(task_id)
        if call is None:
            return None
        return TaskStatus(
            id=call.id,
            task_name=call.name,
            backend=self.alias,
            state="queued",
            enqueued_at=timestamp(call.enqueued_at),
        )

    async def cancel(self, task_id: str) -> CancelResult:
        call = self._find(task_id)
        if call is None:
            return await super().cancel(task_id)
        self.calls.remove(call)
        return CancelResult(
            id=task_id, cancelled=True, state="cancelled", detail="removed from the recording"
        )
