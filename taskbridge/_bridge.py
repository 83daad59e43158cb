"""TaskBridge: the registry of tasks, their routing, the backends, and the app's lifespan."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar, overload

from fastapi import APIRouter, FastAPI

from ._codec import encode_json, normalize_arguments
from ._deadline import dispatch_deadline_scope
from ._exceptions import (
    BackendUnavailable,
    BridgeNotFoundError,
    ConfigurationError,
    TaskArgumentError,
    UnknownTaskError,
)
from ._handle import TaskHandle, keyed_task_id, new_task_id
from ._policy import OnUnavailable, ResolvedPolicy, check_policy_fields
from ._settings import TaskBridgeSettings, env_name, load_settings
from ._signing import Signer
from ._status import CancelResult, TaskStatus
from ._task import HookRegistry, Hooks, Task, TaskCall
from ._tracing import capture
from .backends import Backend, load_backend_class
from .backends._builtin import InProcessBackend, spawn_in_process

__all__ = ["TaskBridge"]

P = ParamSpec("P")
R = TypeVar("R")

STATE_KEY = "taskbridge"
"""Where `attach` puts the bridge on `app.state`."""
logger = logging.getLogger("taskbridge")


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether `b` is `a` or the same definition run again (a function decorated inside an
    endpoint or a factory is a new object each time, with the same code)."""
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return code_a is not None and code_a is code_b


def importable_problem(task: Task[..., Any], backend: str) -> str | None:
    """Why a worker process could not find `task` by its name, or None.

    A worker imports the bridge's module and looks tasks up by registered name, so a task must
    be registered at import time under a stable name. A lambda or a function defined inside
    another function (`<locals>` in its qualified name) gets a default name that is neither
    unique nor stable: it needs a `name=` (and its registration must run at import).
    """
    qualname = getattr(task.func, "__qualname__", "")
    if task.name != f"{getattr(task.func, '__module__', None)}.{qualname}":
        return None  # named explicitly: whoever did knows how the worker finds it
    if "<lambda>" in qualname:
        kind = "a lambda"
    elif "<locals>" in qualname:
        kind = f"defined inside a function ({qualname})"
    else:
        return None
    return (
        f"task {task.name!r} is {kind}, so a worker cannot find it: backend {backend!r} runs "
        "calls in a worker process, which imports the bridge's module and looks tasks up by "
        "name; define the function at module level, or give it a name= and register it when "
        "the module is imported (or route the task to the inprocess backend)"
    )


class TaskBridge(HookRegistry):
    """Registry of tasks and the backends that run them, configured by settings.

    Attach it to an app with `FastAPI(lifespan=bridge.lifespan)` or `bridge.init_app(app)`;
    settings are read and validated when the app starts (or on first use).
    """

    def __init__(self, settings: TaskBridgeSettings | Mapping[str, Any] | None = None) -> None:
        self._settings_source = settings
        self._settings: TaskBridgeSettings | None = None
        self._routes: list[tuple[str, dict[str, Any]]] = []
        self._tasks: dict[str, Task[..., Any]] = {}
        self._backends: dict[str, Backend] = {}
        self._resolved: dict[Hashable, ResolvedPolicy] = {}
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hooks = Hooks()
        self._signer: Signer | None = None
        self._signer_key: object = None

    # -- settings and routing -------------------------------------------------------------

    @property
    def settings(self) -> TaskBridgeSettings:
        """The settings, loaded and validated on first access."""
        if self._settings is None:
            settings = load_settings(self._settings_source)
            routes = []
            for pattern, target in settings.routes.items():
                fields = {"backend": target} if isinstance(target, str) else target
                checked = check_policy_fields(fields, f"{env_name('routes')}[{pattern!r}]")
                if "retry_on" in checked:
                    raise ConfigurationError(
                        f"{env_name('routes')}[{pattern!r}]: retry_on takes exception classes, "
                        "which settings cannot name; set it in the decorator"
                    )
                if "key" in checked:
                    raise ConfigurationError(
                        f"{env_name('routes')}[{pattern!r}]: key identifies one call; set it "
                        "per call with .using(key=...)"
                    )
                routes.append((pattern, checked))
            self._settings, self._routes = settings, routes
        return self._settings

    @contextmanager
    def override(self, **values: Any) -> Iterator[None]:
        """Use these settings (over the current ones) inside the block, then restore.

        For tests: `with bridge.override(routes={"*": "immediate"}):`. Backends built for the
        overridden settings are dropped at the end; close them first if they were opened.
        """
        saved = (
            self._settings_source,
            self._settings,
            self._routes,
            self._backends,
            self._resolved,
            self._opened,
        )
        base = self.settings.model_dump(exclude_unset=True)
        self._settings_source = {**base, **values}
        self._settings, self._routes, self._backends, self._resolved = None, [], {}, {}
        self._opened = False
        try:
            self.settings  # noqa: B018 - validates the override now, in the caller
            yield
        finally:
            (
                self._settings_source,
                self._settings,
                self._routes,
                self._backends,
                self._resolved,
                self._opened,
            ) = saved

    def route_for(self, task_name: str) -> tuple[str, dict[str, Any]] | None:
        """The first settings route whose glob matches `task_name`, as (pattern, fields)."""
        self.settings  # noqa: B018 - loads the routes
        for pattern, fields in self._routes:
            if fnmatch.fnmatchcase(task_name, pattern):
                return pattern, fields
        return None

    def resolve(self, task: Task[..., Any], *, check: bool = True) -> ResolvedPolicy:
        """The effective policy of `task`, with the origin of each field.

        Precedence, highest first: settings route > `.using()` > decorator > default_backend.
        With `check`, the backend is built and validates the policy (a ConfigurationError).
        """
        cache_key: Hashable | None = None
        if check:
            cache_key = task.name
            if task.using_policy:
                try:
                    cache_key = (task.name, frozenset(task.using_policy.items()))
                    hash(cache_key)
                except TypeError:  # an unhashable override: resolve every time
                    cache_key = None
        if cache_key is not None and (hit := self._resolved.get(cache_key)) is not None:
            return hit
        layers: list[tuple[str, Mapping[str, Any]]] = [
            ("default", {"backend": self.settings.default_backend}),
            ("decorator", task.decorator_policy),
            ("using", task.using_policy),
        ]
        route = self.route_for(task.name)
        if route is not None:
            layers.append((f"route {route[0]!r}", route[1]))
        resolved = ResolvedPolicy.from_layers(layers)
        if not check:
            return resolved
        self.backend(resolved.policy.backend).validate_policy(task.name, resolved.policy)
        if cache_key is not None and len(self._resolved) < 4096:
            self._resolved[cache_key] = resolved
        return resolved

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
    ) -> Any:
        """Register a function as a task: `@bridge.task` or `@bridge.task(backend=..., ...)`.

        Policy fields: backend, queue, retries, retry_backoff, retry_backoff_max, retry_jitter,
        retry_on, timeout, delay, on_unavailable. The name defaults to `module.qualname`.
        """

        def register(f: Callable[..., Any]) -> Task[..., Any]:
            task_name = name or f"{f.__module__}.{f.__qualname__}"
            given = {
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
            fields = {k: v for k, v in given.items() if v is not None}
            checked = check_policy_fields(fields, f"@task for {task_name!r}")
            existing = self._tasks.get(task_name)
            if existing is not None and not _same_function(existing.func, f):
                raise ConfigurationError(
                    f"two functions are registered as task {task_name!r} "
                    f"({existing.func.__module__} and {f.__module__}); give one a name="
                )
            registered = Task(self, f, task_name, checked)
            self._tasks[task_name] = registered
            self._resolved.clear()
            return registered

        return register if func is None else register(func)

    @property
    def tasks(self) -> Mapping[str, Task[..., Any]]:
        """The registered tasks by name."""
        return dict(self._tasks)

    def get_task(self, name: str) -> Task[..., Any]:
        """The task registered as `name`; UnknownTaskError if there is none."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name) from None

    # -- backends -------------------------------------------------------------------------

    def backend(self, alias: str) -> Backend:
        """The backend instance for `alias`, built from settings on first use."""
        found = self._backends.get(alias)
        if found is None:
            options = dict(self.settings.backends.get(alias, {}))
            engine = options.get("engine") or alias
            found = load_backend_class(engine)(alias, options)
            self._backends[alias] = found
        return found

    @property
    def signer(self) -> Signer | None:
        """Signs and verifies queued messages when `signing_key` is set; None otherwise."""
        key = self.settings.signing_key
        if key is None:
            return None
        if self._signer is None or self._signer_key != key:
            self._signer, self._signer_key = Signer(key.get_secret_value()), key
        return self._signer

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backends built so far (after `validate`, every one in use), by alias."""
        return dict(self._backends)

    def validate(self) -> None:
        """Check settings, backends and every task's route and policy.

        Every problem found is reported in one ConfigurationError, each naming the setting or
        decorator it comes from and the tasks concerned.
        """
        settings = self.settings
        problems: list[ConfigurationError] = []
        # Where each backend alias is named, for messages: the setting or the tasks using it.
        named: dict[str, list[str]] = {settings.default_backend: [env_name("default_backend")]}
        for alias in settings.backends:
            named.setdefault(alias, []).append(env_name("backends", alias))
        unresolved: list[Task[..., Any]] = []
        for task in self._tasks.values():
            resolved = self.resolve(task, check=False)
            alias, source = resolved.policy.backend, resolved.sources["backend"]
            named.setdefault(alias, []).append(self._origin(task, source, "backend"))
            unresolved.append(task)
        broken: set[str] = set()
        for alias, origins in named.items():
            try:
                self.backend(alias)
            except ConfigurationError as exc:
                broken.add(alias)
                named_by = f"backend {alias!r} is named by {', '.join(origins)}"
                problems.append(type(exc)(f"{exc} ({named_by})"))
        for task in unresolved:
            policy = self.resolve(task, check=False).policy
            if policy.backend in broken:
                continue
            try:
                self.resolve(task)
            except ConfigurationError as exc:
                problems.append(exc)
                continue
            if self.backend(policy.backend).supports_worker:
                problem = importable_problem(task, policy.backend)
                if problem is not None:
                    problems.append(ConfigurationError(problem))
        for pattern, _ in self._routes:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in self._tasks):
                problems.append(
                    ConfigurationError(
                        f"{env_name('routes')}: the route {pattern!r} matches no registered "
                        f"task (registered: {', '.join(sorted(self._tasks)) or 'none'})"
                    )
                )
        if len(problems) == 1:
            raise problems[0]
        if problems:
            listed = "\n".join(f"  - {problem}" for problem in problems)
            raise ConfigurationError(f"{len(problems)} configuration problems:\n{listed}")

    @staticmethod
    def _origin(task: Task[..., Any], source: str, field: str) -> str:
        """Where a policy field of `task` was set, as a user would find it."""
        if source == "decorator":
            return f"@task({field}=...) of task {task.name!r}"
        if source == "using":
            return f".using({field}=...) of task {task.name!r}"
        if source.startswith("route "):
            return f"{env_name('routes')}[{source[6:]}] for task {task.name!r}"
        return f"{env_name('default_' + field)} for task {task.name!r}"

    async def open(self) -> None:
        """Validate, then connect every backend in use. Safe to call more than once.

        Without a lifespan, the first dispatch opens the bridge. Connections belong to the event
        loop that opened them: when called on another loop (a `TestClient` used without `with`
        runs each request on a loop of its own), backends that open connections are built and
        opened again there (the old ones, bound to a loop that no longer runs, are dropped).
        """
        loop = asyncio.get_running_loop()
        if self._opened and self._loop is loop:
            return
        if self._loop is not loop:
            self._open_lock, self._opened = asyncio.Lock(), False
            if self._loop is not None:  # keep only the backends that hold no connections
                self._backends = {
                    alias: backend
                    for alias, backend in self._backends.items()
                    if type(backend).open is Backend.open
                }
                self._resolved.clear()
        assert self._open_lock is not None
        async with self._open_lock:
            if self._opened:
                return
            self.validate()
            for backend in self._backends.values():
                await backend.open()
            self._opened, self._loop = True, loop

    async def close(self) -> None:
        """Close every backend (in-process ones wait for their running calls)."""
        backends, self._opened = list(self._backends.values()), False
        for backend in backends:
            await backend.close()

    # -- dispatch -------------------------------------------------------------------------

    def prepare(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[Backend, TaskCall]:
        """Route a call and check its arguments; nothing is sent yet.

        Calls for queue backends get JSON-normalised arguments (a TaskArgumentError otherwise);
        in-process ones keep the caller's objects, checked only with `strict_arguments`.
        """
        policy = self.resolve(task).policy
        backend = self.backend(policy.backend)
        task_id = new_task_id() if policy.key is None else keyed_task_id(task.name, policy.key)
        if backend.runs_in_process:
            if self.settings.strict_arguments:
                normalize_arguments(task.signature, task.name, args, kwargs)
            return backend, TaskCall(task_id, task, args, dict(kwargs), policy, trace=capture())
        json_args, json_kwargs = normalize_arguments(task.signature, task.name, args, kwargs)
        limit = self.settings.max_argument_bytes
        if limit is not None and (size := len(encode_json([json_args, json_kwargs]))) > limit:
            raise TaskArgumentError(
                f"task {task.name!r}: the arguments take {size} bytes as JSON, over the limit of "
                f"{limit} ({env_name('max_argument_bytes')}); pass a reference (an id, a URL) "
                "instead of the data",
                task_name=task.name,
            )
        return backend, TaskCall(task_id, task, json_args, json_kwargs, policy, trace=capture())

    async def dispatch(
        self,
        batch: Iterable[tuple[Backend, TaskCall]],
        fallback: Callable[[TaskCall], None] | None = None,
    ) -> None:
        """Send prepared calls: one `enqueue` per backend, concurrently, within the timeout.

        When a backend is unavailable, its calls whose policy says `on_unavailable="inprocess"`
        are handed to `fallback` (by default, run as asyncio tasks here) with a warning; if any
        other call could not be sent, BackendUnavailable is raised.
        """
        await self.open()
        groups: dict[Backend, list[TaskCall]] = {}
        for backend, call in batch:
            # the backend prepared with, unless `open` rebuilt it for this event loop
            current = self._backends.get(backend.alias, backend)
            groups.setdefault(current, []).append(call)
        settings = self.settings
        if len(groups) == 1:  # the common case: no task hop, no gather
            [(backend, calls)] = groups.items()
            try:
                await self._send(
                    backend, calls, settings.dispatch_timeout, settings.unavailable_retry_after
                )
            except BackendUnavailable as exc:
                self._unavailable([(calls, exc)], fallback)
            return
        results = await asyncio.gather(
            *(
                self._send(b, calls, settings.dispatch_timeout, settings.unavailable_retry_after)
                for b, calls in groups.items()
            ),
            return_exceptions=True,
        )
        failures: list[tuple[list[TaskCall], BackendUnavailable]] = []
        for calls, result in zip(groups.values(), results, strict=True):
            if isinstance(result, BackendUnavailable):
                failures.append((calls, result))
            elif result is not None:
                raise result
        if failures:
            self._unavailable(failures, fallback)

    def _unavailable(
        self,
        failures: list[tuple[list[TaskCall], BackendUnavailable]],
        fallback: Callable[[TaskCall], None] | None,
    ) -> None:
        """Hand calls allowed to fall back to in-process execution over; raise for the rest."""
        unavailable: list[BackendUnavailable] = []
        for calls, error in failures:
            rescued = [c for c in calls if c.policy.on_unavailable == "inprocess"]
            for call in rescued:
                logger.warning(
                    "%s; running task %s [%s] in-process instead (on_unavailable='inprocess')",
                    error,
                    call.name,
                    call.id,
                )
                (fallback or self._run_here)(call)
            if len(rescued) < len(calls):
                unavailable.append(error)
        if unavailable:
            logger.warning("dispatch failed (a request gets 503): %s", unavailable[0])
            raise unavailable[0]

    def _run_here(self, call: TaskCall) -> None:
        backend = self.backend("inprocess")
        assert isinstance(backend, InProcessBackend)
        backend.reporter.queued(call)
        spawn_in_process(call, backend.reporter)

    @staticmethod
    async def _send(
        backend: Backend, calls: list[TaskCall], timeout: float, retry_after: int
    ) -> None:
        names = ", ".join(sorted({c.name for c in calls}))
        try:
            with dispatch_deadline_scope(timeout):
                async with asyncio.timeout(timeout):
                    await backend.enqueue(calls)
        except TimeoutError:
            raise BackendUnavailable(
                f"backend {backend.alias!r} did not accept {len(calls)} call(s) of {names} "
                f"within {timeout}s",
                backend=backend.alias,
                retry_after=retry_after,
            ) from None
        except OSError as exc:
            raise BackendUnavailable(
                f"backend {backend.alias!r} is unreachable ({type(exc).__name__}: {exc}); "
                f"{len(calls)} call(s) of {names} were not sent",
                backend=backend.alias,
                retry_after=retry_after,
            ) from exc
        except BackendUnavailable as exc:
            exc.headers = {"Retry-After": str(retry_after)}
            raise

    async def enqueue(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> TaskHandle:
        """Dispatch one call now, outside a request; return its handle."""
        backend, call = self.prepare(task, args, kwargs)
        await self.dispatch([(backend, call)])
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
            (b for b in self._backends.values() if b.supports_status),
            key=lambda b: (b.alias != preferred, not b.runs_in_process),
        )

    async def status(self, handle: TaskHandle) -> TaskStatus:
        """What the backends know of the call behind `handle` ("unknown" when none does).

        The handle's own backend is asked first, then the others: a call that fell back to
        in-process execution (on_unavailable="inprocess") is found there.
        """
        await self.open()
        for backend in self._status_backends(handle.backend):
            found = await backend.status(handle.id)
            if found is not None:
                return found
        return TaskStatus(id=handle.id, task_name=handle.task_name, backend=handle.backend)

    async def cancel(self, handle: TaskHandle) -> CancelResult:
        """Cancel the call behind `handle` on the backend that has it."""
        await self.open()
        for backend in self._status_backends(handle.backend):
            if await backend.status(handle.id) is not None:
                return await backend.cancel(handle.id)
        if handle.backend is not None:
            return await self.backend(handle.backend).cancel(handle.id)
        return CancelResult(
            id=handle.id, cancelled=False, state="unknown", detail="no backend knows this call"
        )

    def router(self, **options: Any) -> APIRouter:
        """An APIRouter with `GET /tasks/{task_id}` and `DELETE /tasks/{task_id}`.

        Keyword arguments go to APIRouter (`prefix` defaults to "/tasks", `tags` to ["tasks"]);
        protect it like any router, e.g. `dependencies=[Depends(require_admin)]`.
        """
        from ._router import build_router

        return build_router(self, **options)

    # -- FastAPI --------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Lifespan for `FastAPI(lifespan=bridge.lifespan)`: validate and connect at start-up,
        close at shutdown. Compose it inside your own lifespan with `async with`."""
        self.attach(app)
        await self.open()
        try:
            yield
        finally:
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
                "call bridge.init_app(app); in tests, enter the client as a context manager "
                "(`with TestClient(app) as client:`) so the lifespan runs"
            )
        return bridge
