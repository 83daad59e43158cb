"""TaskBridge: the façade users hold. It registers tasks (the registry), sends calls (the
dispatcher), answers status and cancellation, and fits into the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar, overload

from fastapi import APIRouter, FastAPI

from ._backends import Backend
from ._calls import call_stats, list_calls, retry_call
from ._dispatch import Dispatcher
from ._exceptions import BridgeNotFoundError
from ._handle import TaskHandle
from ._periodic import Periodic, run_until
from ._policy import OnUnavailable, ResolvedPolicy
from ._registry import Registry, default_name
from ._schedule import MissedPolicy, Schedule
from ._settings import TaskBridgeSettings
from ._signing import Signer
from ._status import CancelResult, TaskPage, TaskStats, TaskStatus
from ._task import HookRegistry, Hooks, Task, TaskCall

__all__ = ["STATE_KEY", "TaskBridge"]

P = ParamSpec("P")
R = TypeVar("R")

STATE_KEY = "taskbridge"
"""Where `attach` puts the bridge on `app.state`."""
logger = logging.getLogger("taskbridge")


class TaskBridge(HookRegistry):
    """Registry of tasks and the backends that run them, configured by settings.

    Attach it to an app with `FastAPI(lifespan=bridge.lifespan)` or `bridge.init_app(app)`;
    settings are read and validated when the app starts (or on first use).
    """

    def __init__(self, settings: TaskBridgeSettings | Mapping[str, Any] | None = None) -> None:
        self.registry = Registry(settings)
        """Tasks, routes and policy resolution."""
        self.dispatcher = Dispatcher(self.registry)
        """Backends, and the sending of calls to them."""
        self.periodic = Periodic(self.registry, lambda: self.dispatcher)
        """Schedules and on-startup calls."""
        self.dispatcher.checks.append(self.periodic.problems)
        self.hooks = Hooks()

    # -- settings and routing -------------------------------------------------------------

    @property
    def settings(self) -> TaskBridgeSettings:
        """The settings, loaded and validated on first access."""
        return self.registry.settings

    @contextmanager
    def override(self, **values: Any) -> Iterator[None]:
        """Use these settings (over the current ones) inside the block, then restore.

        For tests: `with bridge.override(routes={"*": "immediate"}):`. Backends built for the
        overridden settings are dropped at the end; close them first if they were opened.
        """
        dispatcher = self.dispatcher
        self.dispatcher = Dispatcher(self.registry)
        self.dispatcher.checks = dispatcher.checks
        try:
            with self.registry.overridden(values):
                yield
        finally:
            self.dispatcher = dispatcher

    def route_for(self, task_name: str) -> tuple[str, dict[str, Any]] | None:
        """The first settings route whose glob matches `task_name`, as (pattern, fields)."""
        return self.registry.route_for(task_name)

    def resolve(self, task: Task[..., Any], *, check: bool = True) -> ResolvedPolicy:
        """The effective policy of `task`, with the origin of each field.

        Precedence, highest first: settings route > `.using()` > decorator > default_backend.
        With `check`, the backend is built and validates the policy (a ConfigurationError).
        """
        if check:
            return self.dispatcher.resolve(task)
        return self.registry.resolve(task)

    # -- tasks ----------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        backend: str | None = None,
        queue: str | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        on_unavailable: OnUnavailable | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        retry_jitter: bool | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        delay: float | None = None,
        schedule: str | float | None = None,
        on_startup: bool = False,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        backend: str | None = None,
        queue: str | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        on_unavailable: OnUnavailable | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        retry_jitter: bool | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        delay: float | None = None,
        schedule: str | float | None = None,
        on_startup: bool = False,
    ) -> Any:
        """Register a function as a task: `@bridge.task` or `@bridge.task(backend=..., ...)`.

        Policy fields: backend, queue, retries, retry_backoff, retry_backoff_max, retry_jitter,
        retry_on, timeout, delay, on_unavailable. The name defaults to `module.qualname`.
        Decorating the same definition again (inside an endpoint, say) replaces it quietly.
        `schedule` calls it periodically (a cron expression, 5 fields or 6 with seconds, or
        every N seconds; see `schedule()`); `on_startup=True` calls it once per deployment
        start.
        """
        fields = {
            "backend": backend,
            "queue": queue,
            "retries": retries,
            "timeout": timeout,
            "on_unavailable": on_unavailable,
            "retry_backoff": retry_backoff,
            "retry_backoff_max": retry_backoff_max,
            "retry_jitter": retry_jitter,
            "retry_on": retry_on,
            "delay": delay,
        }

        def register(f: Callable[..., Any]) -> Task[..., Any]:
            known = self.registry.tasks.get(name or default_name(f))
            registered = self.registry.register(self, f, name, fields)
            if known is None:  # decorating the same definition again declares nothing twice
                if schedule is not None:
                    self.schedule(registered, schedule)
                if on_startup:
                    self.on_startup(registered)
            return registered

        return register if func is None else register(func)

    def schedule(
        self,
        task: Task[..., Any],
        when: str | float,
        /,
        *args: Any,
        name: str | None = None,
        timezone: str = "UTC",
        missed: MissedPolicy = "once",
        **kwargs: Any,
    ) -> Schedule:
        """Call `task(*args, **kwargs)` on a schedule: a cron expression (5 fields, or 6 with
        seconds first) read in `timezone`, or every `when` seconds (aligned to the epoch).

        The schedule's `name` defaults to the task's. `missed` says what to do with slots that
        passed while no scheduler ran: "once" runs the latest of them, "skip" drops them.
        Queued tasks' schedules run in `taskbridge scheduler` (any number of them, with
        `scheduler_url`: each slot once); in-process tasks' run in the API processes.
        """
        return self.periodic.add(
            task, when, args, kwargs, name=name, timezone=timezone, missed=missed
        )

    def on_startup(self, task: Task[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Call `task(*args, **kwargs)` once per deployment start, from the lifespan of the
        API process that claims it first (see `deployment_id`, `startup_window`)."""
        self.periodic.add_startup(task, args, kwargs)

    @property
    def schedules(self) -> list[Schedule]:
        """Every schedule (declared in code, changed or added by settings), disabled ones
        included."""
        return self.periodic.schedules()

    @property
    def tasks(self) -> Mapping[str, Task[..., Any]]:
        """The registered tasks by name."""
        return dict(self.registry.tasks)

    def get_task(self, name: str) -> Task[..., Any]:
        """The task registered as `name`; UnknownTaskError if there is none."""
        return self.registry.get_task(name)

    # -- backends -------------------------------------------------------------------------

    def backend(self, alias: str) -> Backend:
        """The backend instance for `alias`, built from settings on first use."""
        return self.dispatcher.backend(alias)

    @property
    def signer(self) -> Signer | None:
        """Signs and verifies queued messages when `signing_key` is set; None otherwise."""
        return self.dispatcher.signer

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backends built so far (after `validate`, every one in use), by alias."""
        return dict(self.dispatcher.backends)

    def validate(self) -> None:
        """Check settings, backends and every task's route and policy; every problem found is
        reported in one ConfigurationError naming its setting or decorator and task."""
        self.dispatcher.validate()

    async def open(self) -> None:
        """Validate, then connect every backend in use. Safe to call more than once (and made
        by the first dispatch when no lifespan did)."""
        await self.dispatcher.open()

    async def close(self) -> None:
        """Close every backend (in-process ones wait for their running calls)."""
        await self.dispatcher.close()

    # -- dispatch -------------------------------------------------------------------------

    def prepare(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[Backend, TaskCall]:
        """Route a call and check its arguments; nothing is sent yet (see Dispatcher)."""
        return self.dispatcher.prepare(task, args, kwargs)

    async def dispatch(
        self,
        batch: Iterable[tuple[Backend, TaskCall]],
        fallback: Callable[[TaskCall], None] | None = None,
    ) -> None:
        """Send prepared calls, one batch per backend (see `Dispatcher.dispatch`)."""
        await self.dispatcher.dispatch(batch, fallback)

    async def enqueue(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> TaskHandle:
        """Dispatch one call now, outside a request; return its handle."""
        backend, call = self.dispatcher.prepare(task, args, kwargs)
        await self.dispatcher.dispatch([(backend, call)])
        return call.handle

    # -- handles --------------------------------------------------------------------------

    def handle(self, task_id: str, backend: str | None = None) -> TaskHandle:
        """A handle for a call dispatched earlier (by this or another process), by its id.

        Without `backend`, each backend in use that keeps status is asked, in-process first.
        """
        return TaskHandle(task_id, None, backend, self)

    def _status_backends(self, preferred: str | None) -> list[Backend]:
        """Backends that keep status: the preferred one first, then in-process ones."""
        return sorted(
            (b for b in self.dispatcher.backends.values() if b.supports_status),
            key=lambda b: (b.alias != preferred, not b.runs_in_process),
        )

    async def status(self, handle: TaskHandle, *, links: bool = True) -> TaskStatus:
        """What the backends know of the call behind `handle` ("unknown" when none does);
        with `links`, its `retry_of` too, from the call index when the engine's status lacks it
        (one more read on Celery and ARQ; `handle.status()` does without).

        The handle's own backend is asked first, then the others: a call that fell back to
        in-process execution (on_unavailable="inprocess") is found there.
        """
        await self.open()
        for backend in self._status_backends(handle.backend):
            found = await backend.status(handle.id)
            if found is not None:
                if links and found.retry_of is None:
                    found.retry_of = await _retry_of(backend, handle.id)
                return found
        return TaskStatus(id=handle.id, task_name=handle.task_name, backend=handle.backend)

    async def cancel(self, handle: TaskHandle) -> CancelResult:
        """Cancel the call behind `handle` on the backend that has it."""
        await self.open()
        for backend in self._status_backends(handle.backend):
            known = await backend.status(handle.id)
            if known is None:
                continue
            if not backend.supports_cancel:
                return CancelResult(
                    id=handle.id,
                    cancelled=False,
                    state=known.state,
                    detail=f"backend {backend.alias!r} ({type(backend).__name__}) cannot "
                    "cancel calls",
                )
            return await backend.cancel(handle.id)
        if handle.backend is not None:
            return await self.backend(handle.backend).cancel(handle.id)
        return CancelResult(
            id=handle.id, cancelled=False, state="unknown", detail="no backend knows this call"
        )

    # -- many calls -----------------------------------------------------------------------

    async def list_calls(
        self,
        *,
        state: str | None = None,
        task: str | None = None,
        backend: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Calls newest first, across every backend that keeps an index (the body of
        `GET /tasks`); pass a page's `next` as `cursor` for the page after it."""
        await self.open()
        return await list_calls(
            self.dispatcher.backends.values(),
            state=state,
            task=task,
            backend=backend,
            limit=limit,
            cursor=cursor,
        )

    async def stats(self) -> TaskStats:
        """Calls per state and per task and state (the body of `GET /tasks/stats`)."""
        await self.open()
        return await call_stats(self.dispatcher.backends.values())

    async def retry(self, task_id: str) -> TaskHandle:
        """Run a failed or cancelled call again with its kept arguments; the new call has its
        own id and `retry_of=task_id`. TaskNotRetryable says why a call cannot be retried."""
        await self.open()
        return await retry_call(self, task_id)

    def watch(
        self, task_id: str, backend: str | None
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Event] | None:
        """An event set whenever `task_id` (kept by `backend`) may have changed; None when the
        backend keeps no index to watch."""
        if backend is None:
            return None
        index = self.dispatcher.backend(backend).index
        return None if index is None else index.watch(task_id)

    def router(self, **options: Any) -> APIRouter:
        """An APIRouter with `GET /tasks/{task_id}` and `DELETE /tasks/{task_id}`.

        Keyword arguments go to APIRouter (`prefix` defaults to "/tasks", `tags` to ["tasks"]);
        protect it like any router, e.g. `dependencies=[Depends(require_admin)]`.
        """
        from ._router import build_router

        return build_router(self, **options)

    def dashboard(self, **options: Any) -> APIRouter:
        """An APIRouter serving the dashboard page and the API it uses (`prefix` defaults to
        "/taskbridge"); keyword arguments go to APIRouter, e.g. `dependencies=[...]`."""
        from ._dashboard import build_dashboard

        return build_dashboard(self, **options)

    # -- FastAPI --------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Lifespan for `FastAPI(lifespan=bridge.lifespan)`: validate and connect at start-up,
        close at shutdown. Compose it inside your own lifespan with `async with`."""
        self.attach(app)
        await self.open()
        stop = asyncio.Event()
        running: asyncio.Task[None] | None = None
        try:
            here, _ = self.periodic.split()
            if here:  # in-process tasks' schedules run in the API processes
                scheduler = self.periodic.scheduler(here, in_process=True)
                running = asyncio.get_running_loop().create_task(run_until(scheduler, stop))
            await self.periodic.run_startup()
            yield
        finally:
            stop.set()
            if running is not None:
                await running
            await self.close()

    def attach(self, app: FastAPI) -> None:
        """Make this bridge the one `Tasks` finds in `app` (the lifespan does this)."""
        setattr(app.state, STATE_KEY, self)

    def init_app(self, app: FastAPI) -> None:
        """Attach to an app that already has a lifespan, wrapping it with the bridge's."""
        self.attach(app)
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with self.lifespan(a), inner(a) as state:
                yield state

        app.router.lifespan_context = lifespan

    @staticmethod
    def of(app: Any) -> TaskBridge:
        """The bridge attached to `app`; BridgeNotFoundError if there is none."""
        bridge = getattr(app.state, STATE_KEY, None)
        if not isinstance(bridge, TaskBridge):
            raise BridgeNotFoundError(
                "this app has no TaskBridge: create it with FastAPI(lifespan=bridge.lifespan) or "
                "call bridge.init_app(app)"
            )
        return bridge


async def _retry_of(backend: Backend, task_id: str) -> str | None:
    """The call `task_id` re-runs, from the backend's call index when the engine's own status
    does not carry it (Celery, ARQ); None when unknown. A failed lookup is logged, never raised:
    the status itself was read."""
    lookup = getattr(backend.index, "retry_of", None)
    if lookup is None:
        return None
    try:
        found = await lookup(task_id)
    except Exception as exc:  # whatever the index's client raises
        logger.debug("could not read retry_of of %s from the call index: %s", task_id, exc)
        return None
    return found if isinstance(found, str) else None
