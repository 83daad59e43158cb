"""Backends that need no broker: in-process, immediate, and a recording test double."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from fastapi import BackgroundTasks
from pydantic import Field, field_validator
from starlette.background import BackgroundTask

from .._backends import Backend, BackendOptions
from .._exceptions import BackendUnavailable, ConfigurationError
from .._ledger import CallIndex, Counts, Cursor, IndexPage, Watchers
from .._runner import Outcome, TaskContext, run, run_with_retries
from .._settings import env_name
from .._status import (
    CancelResult,
    KeptCall,
    MemoryIndex,
    MemoryStatusStore,
    TaskErrorInfo,
    TaskStatus,
    newest_page,
    timestamp,
    to_ms,
)
from .._task import TaskCall
from ._redis_url import check_redis_url

__all__ = [
    "ImmediateBackend",
    "InProcessBackend",
    "InProcessOptions",
    "KeyGuard",
    "MemoryReporter",
    "RecordingBackend",
    "SharedInProcessBackend",
    "StoreOptions",
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


MAX_TRACEBACK = 16 * 1024
"""Most bytes (UTF-8) of a failure's formatted traceback kept in its status: the end of it,
where the raising line is."""


def error_info(error: BaseException) -> TaskErrorInfo:
    """The travelling form of an exception: qualified type name, message and (the end of) its
    formatted traceback."""
    kind = type(error)
    return TaskErrorInfo(
        type=f"{kind.__module__}.{kind.__qualname__}",
        message=str(error),
        traceback=None if error.__traceback__ is None else _bounded_traceback(error),
    )


def _bounded_traceback(error: BaseException) -> str:
    formatted = "".join(traceback.format_exception(error))
    if len(formatted) * 4 <= MAX_TRACEBACK:  # short enough whatever its characters
        return formatted
    raw = formatted.encode(errors="replace")
    if len(raw) <= MAX_TRACEBACK:
        return formatted
    marker = "[...]\n"
    return marker + raw[len(raw) - MAX_TRACEBACK + len(marker) :].decode(errors="ignore")


class MemoryReporter:
    """Records attempts of in-process calls in the bridge's MemoryStatusStore."""

    def __init__(self, store: MemoryStatusStore) -> None:
        self.store = store

    def queued(self, call: TaskCall) -> None:
        self.store.queued(
            call.id, call.task.name, call.policy.backend, call.enqueued_at, call.retry_of
        )

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

    def keep(self, call: TaskCall) -> None:
        """Keep the arguments of a call that failed or was cancelled, to run it again."""
        self.store.keep(call.id, call.task.name, call.args, call.kwargs)


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
    if store.state(call.id) == "cancelled":  # before it started
        reporter.keep(call)
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
        if outcome.error is not None:
            reporter.keep(call)
            if on_failure is not None:
                on_failure(outcome.error)
    except asyncio.CancelledError:
        if call.id not in store.cancel_requested:
            raise
        running = asyncio.current_task()
        assert running is not None
        running.uncancel()
        reporter.keep(call)
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


class InProcessOptions(StoreOptions):
    """Options of the in-process backend: those of its status store, and a Redis that every API
    process shares its calls' status through (`status_url`; see `_shared`)."""

    status_url: str | None = None
    """`redis://`, `rediss://` or `sentinel://` URL: every API process records its in-process
    calls there and reads the others' (needs `fastapi-taskbridge[redis]`). Unset, each process
    knows only the calls it ran."""
    status_prefix: str = Field(default="taskbridge:inprocess", min_length=1)
    """Prefix of the keys and channels written there (apps sharing a Redis give each its own)."""
    status_sentinel_master: str = Field(default="mymaster", min_length=1)
    """With a `sentinel://` URL: the name of the master the Sentinels monitor."""
    status_flush_interval: float = Field(default=0.005, gt=0, le=60)
    """Seconds changes wait to be written together, in one pipeline (sooner once 1,000 wait)."""

    @field_validator("status_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        check_redis_url(value)
        return value


class _StoreBackend(Backend):
    """Calls run in this process; their status lives in a bounded in-memory store."""

    supports_status: ClassVar[bool] = True
    supports_cancel: ClassVar[bool] = True
    options_model: ClassVar[type[BackendOptions]] = StoreOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        assert isinstance(self.options, StoreOptions)
        self.reporter = MemoryReporter(self.new_store(self.options))
        self.keys = KeyGuard()
        self.memory_index = MemoryIndex(self.reporter.store)

    def new_store(self, options: StoreOptions) -> MemoryStatusStore:
        """The status store of this backend's calls."""
        return MemoryStatusStore(options.status_max_entries, options.status_ttl)

    async def status(self, task_id: str) -> TaskStatus | None:
        return self.reporter.store.get(task_id)

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        get = self.reporter.store.get
        return [get(task_id) for task_id in task_ids]

    @property
    def index(self) -> CallIndex | None:
        """The calls of the status store (a scan of it for a page), and their changes."""
        return self.memory_index

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The caller's own arguments of one of the latest 1,000 calls that failed or were
        cancelled (`KEPT_CALLS`)."""
        return self.reporter.store.kept_call(task_id)

    async def cancel(self, task_id: str) -> CancelResult:
        known = self.reporter.store.get(task_id)
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
    options_model: ClassVar[type[BackendOptions]] = InProcessOptions

    def __new__(cls, alias: str, options: Mapping[str, Any]) -> InProcessBackend:
        # With `status_url`, the backend that shares status through Redis: a class of its own,
        # so that the plain one keeps no `open` (its store then survives a change of event
        # loop, see Dispatcher.open).
        if cls is InProcessBackend and options.get("status_url"):
            return super().__new__(SharedInProcessBackend)
        return super().__new__(cls)

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
            outcome = await run_with_retries(
                call.task,
                call.args,
                call.kwargs,
                call_id=call.id,
                policy=immediate,
                reporter=reporter,
                trace=call.trace,
            )
            if outcome.error is not None:
                reporter.keep(call)


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
        self._index = _RecordingIndex(self.calls)

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
            enqueued_at=timestamp(to_ms(call.enqueued_at) / 1000),
            retry_of=call.retry_of,
        )

    @property
    def index(self) -> CallIndex | None:
        """The recorded calls, all queued."""
        return self._index

    async def cancel(self, task_id: str) -> CancelResult:
        call = self._find(task_id)
        if call is None:
            return await super().cancel(task_id)
        self.calls.remove(call)
        self._index.watchers.notify(task_id)
        return CancelResult(
            id=task_id, cancelled=True, state="cancelled", detail="removed from the recording"
        )


class _RecordingIndex:
    """A RecordingBackend's calls as a `CallIndex`: every one queued, newest first."""

    def __init__(self, calls: list[TaskCall]) -> None:
        self.calls = calls
        self.watchers = Watchers()

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        if state not in (None, "queued"):
            return IndexPage([], None)
        rows = [
            (to_ms(call.enqueued_at), call.id, "queued", call.name, call.retry_of)
            for call in self.calls
            if task is None or call.name == task
        ]
        return newest_page(rows, after, limit)

    async def counts(self) -> Counts:
        counts = Counts()
        for call in self.calls:
            per_task = counts.tasks.setdefault(call.name, {})
            per_task["queued"] = per_task.get("queued", 0) + 1
        if self.calls:
            counts.states["queued"] = len(self.calls)
        return counts

    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        return self.watchers.watch(task_id)


class SharedInProcessBackend(InProcessBackend):
    """The in-process backend with `status_url` (InProcessBackend builds this class for it):
    calls run in the API process as ever; their status is shared by every API process through
    Redis (`SharedStatus`, see `_shared`). A call that ran here is answered from this process's
    store; another, from Redis."""

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        try:
            from ._shared import SharedStatus, SharedStatusStore
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] != "redis":
                raise
            raise ConfigurationError(
                f"{env_name('backends', alias, 'status_url')} is set, but redis-py is not "
                "installed: install it with `pip install fastapi-taskbridge[redis]` (or unset "
                "it: each API process then keeps its own calls' status in memory)"
            ) from None
        super().__init__(alias, options)
        opts = self.options
        assert isinstance(opts, InProcessOptions) and opts.status_url is not None
        store = self.reporter.store
        assert isinstance(store, SharedStatusStore)
        self.shared = SharedStatus(
            store,
            self.memory_index,
            self._cancel_here,
            url=opts.status_url,
            prefix=opts.status_prefix,
            sentinel_master=opts.status_sentinel_master,
            ttl=opts.status_ttl,
            max_entries=opts.status_max_entries,
            interval=opts.status_flush_interval,
        )

    def new_store(self, options: StoreOptions) -> MemoryStatusStore:
        from ._status_writer import SharedStatusStore

        return SharedStatusStore(options.status_max_entries, options.status_ttl)

    async def open(self) -> None:
        self.shared.start()

    async def close(self) -> None:
        await super().close()  # the running calls end, and report it
        await self.shared.close()

    async def ping(self) -> str:
        try:
            return await self.shared.ping()
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"backend {self.alias!r}: {exc}", backend=self.alias) from None

    def defer_in_request(
        self,
        call: TaskCall,
        background: BackgroundTasks,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> bool:
        if self.shared.loop is None:  # no lifespan opened the bridge: start writing now
            self.shared.start()
        return super().defer_in_request(call, background, on_failure)

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        self.shared.start()
        await super().enqueue(calls)

    async def status(self, task_id: str) -> TaskStatus | None:
        found = self.reporter.store.get(task_id)
        if found is not None:
            return found
        [shared] = await self.shared.read([task_id])
        return shared

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """This process's calls from its store, the others' from Redis in one round trip."""
        found = await super().statuses(task_ids)
        pairs = list(zip(task_ids, found, strict=True))
        elsewhere = [task_id for task_id, status in pairs if status is None]
        if elsewhere:
            read = dict(zip(elsewhere, await self.shared.read(elsewhere), strict=True))
            found = [read[task_id] if status is None else status for task_id, status in pairs]
        return found

    @property
    def index(self) -> CallIndex | None:
        """Every API process's in-process calls (`SharedIndex`), once open."""
        return self.shared.index

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The caller's own arguments when the call ran here, else those written with its
        record (JSON arguments up to 64 KiB)."""
        kept = self.reporter.store.kept_call(task_id)
        return kept if kept is not None else await self.shared.kept_call(task_id)

    async def cancel(self, task_id: str) -> CancelResult:
        """A call of this process is cancelled here; another's by its own process, asked
        through Redis (the answer is that process's, see `_shared`)."""
        if self.reporter.store.get(task_id) is not None or self.shared.loop is None:
            return await super().cancel(task_id)
        return await self.shared.cancel(task_id)

    async def _cancel_here(self, task_id: str) -> CancelResult | None:
        """Another process asks to cancel `task_id`: None when it is not a call of this one."""
        if self.reporter.store.get(task_id) is None:
            return None
        return await super().cancel(task_id)
