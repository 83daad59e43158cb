"""The dispatcher: backends built from settings, calls prepared and sent, one fallback path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._backends import Backend, load_backend_class
from ._codec import encode_json, normalize_arguments
from ._deadline import dispatch_deadline_scope
from ._exceptions import BackendUnavailable, ConfigurationError, TaskArgumentError
from ._handle import keyed_task_id, new_task_id
from ._policy import ResolvedPolicy
from ._registry import Registry, importable_problem
from ._settings import env_name
from ._signing import Signer
from ._task import Task, TaskCall
from ._tracing import capture

__all__ = ["Dispatcher"]

logger = logging.getLogger("taskbridge")

FALLBACK_ALIAS = "inprocess"
"""The backend that runs calls whose policy says `on_unavailable="inprocess"` when theirs is
down."""


class Dispatcher:
    """Builds backends from the registry's settings, opens them, and sends calls to them."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._backends: dict[str, Backend] = {}
        self._checked: dict[int, ResolvedPolicy] = {}
        self._signer: Signer | None = None
        self._signer_key: object = None
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checks: list[Callable[[], list[ConfigurationError]]] = []
        """More start-up checks (the bridge's schedules), reported with the dispatcher's."""

    def reset(self) -> None:
        """Forget the backends built so far (after a change of settings)."""
        self._backends, self._checked, self._opened = {}, {}, False

    # -- backends -------------------------------------------------------------------------

    @property
    def backends(self) -> dict[str, Backend]:
        """The backends built so far, by alias (the dispatcher's own dict: do not modify)."""
        return self._backends

    def backend(self, alias: str) -> Backend:
        """The backend instance for `alias`, built from settings on first use."""
        found = self._backends.get(alias)
        if found is None:
            options = dict(self.registry.settings.backends.get(alias, {}))
            engine = options.get("engine") or alias
            found = load_backend_class(engine)(alias, options)
            found.signer = self.signer
            self._backends[alias] = found
        return found

    @property
    def signer(self) -> Signer | None:
        """Signs and verifies queued messages when `signing_key` is set; None otherwise."""
        key = self.registry.settings.signing_key
        if key is None:
            return None
        if self._signer is None or self._signer_key != key:
            self._signer, self._signer_key = Signer(key.get_secret_value()), key
        return self._signer

    def resolve(self, task: Task[..., Any]) -> ResolvedPolicy:
        """The task's resolved policy, checked once by the backend it routes to."""
        resolved = self.registry.resolve(task)
        if self._checked.get(id(resolved)) is not resolved:
            self.backend(resolved.policy.backend).validate_policy(task.name, resolved.policy)
            if len(self._checked) < 4096:
                self._checked[id(resolved)] = resolved
        return resolved

    def validate(self) -> None:
        """Check settings, backends and every task's route and policy.

        Every problem found is reported in one ConfigurationError, each naming the setting or
        decorator it comes from and the tasks concerned.
        """
        registry = self.registry
        settings = registry.settings
        problems: list[ConfigurationError] = []
        # Where each backend alias is named, for messages: the setting or the tasks using it.
        named: dict[str, list[str]] = {settings.default_backend: [env_name("default_backend")]}
        for alias in settings.backends:
            named.setdefault(alias, []).append(env_name("backends", alias))
        for task in registry.tasks.values():
            resolved = registry.resolve(task)
            origin = registry.origin(task, resolved.sources["backend"], "backend")
            named.setdefault(resolved.policy.backend, []).append(origin)
        broken: set[str] = set()
        for alias, origins in named.items():
            try:
                self.backend(alias)
            except ConfigurationError as exc:
                broken.add(alias)
                named_by = f"backend {alias!r} is named by {', '.join(origins)}"
                problems.append(type(exc)(f"{exc} ({named_by})"))
        for task in registry.tasks.values():
            alias = registry.resolve(task).policy.backend
            if alias in broken:
                continue
            try:
                self.resolve(task)
            except ConfigurationError as exc:
                problems.append(exc)
                continue
            if self.backend(alias).supports_worker:
                problem = importable_problem(task, alias)
                if problem is not None:
                    problems.append(ConfigurationError(problem))
        for check in self.checks:
            problems += check()
        registered = ", ".join(sorted(registry.tasks)) or "none"
        for pattern in registry.unmatched_routes():
            problems.append(
                ConfigurationError(
                    f"{env_name('routes')}: the route {pattern!r} matches no registered task "
                    f"(registered: {registered})"
                )
            )
        if len(problems) == 1:
            raise problems[0]
        if problems:
            listed = "\n".join(f"  - {problem}" for problem in problems)
            raise ConfigurationError(f"{len(problems)} configuration problems:\n{listed}")

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
                self._checked.clear()
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
        backend = self._backends.get(policy.backend) or self.backend(policy.backend)
        compact = backend.compact_ids
        if policy.key is None:
            task_id = new_task_id(compact=compact)
        else:
            task_id = keyed_task_id(task.name, policy.key, compact=compact)
        settings = self.registry.settings
        if backend.runs_in_process:
            if settings.strict_arguments:
                normalize_arguments(task.signature, task.name, args, kwargs)
            return backend, TaskCall(task_id, task, args, dict(kwargs), policy, trace=capture())
        json_args, json_kwargs = normalize_arguments(task.signature, task.name, args, kwargs)
        limit = settings.max_argument_bytes
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
        go to the in-process backend with a warning: `fallback` (in a request, the request's
        own background tasks) or else its `enqueue`. If any other call could not be sent,
        BackendUnavailable is raised.
        """
        await self.open()
        groups: dict[Backend, list[TaskCall]] = {}
        for backend, call in batch:
            # the backend prepared with, unless `open` rebuilt it for this event loop
            current = self._backends.get(backend.alias, backend)
            groups.setdefault(current, []).append(call)
        settings = self.registry.settings
        timeout, retry_after = settings.dispatch_timeout, settings.unavailable_retry_after
        if len(groups) == 1:  # the common case: no task hop, no gather
            [(backend, calls)] = groups.items()
            try:
                await _send(backend, calls, timeout, retry_after)
            except BackendUnavailable as exc:
                await self._unavailable([(calls, exc)], fallback)
            return
        results = await asyncio.gather(
            *(_send(b, calls, timeout, retry_after) for b, calls in groups.items()),
            return_exceptions=True,
        )
        failures: list[tuple[list[TaskCall], BackendUnavailable]] = []
        for calls, result in zip(groups.values(), results, strict=True):
            if isinstance(result, BackendUnavailable):
                failures.append((calls, result))
            elif result is not None:
                raise result
        if failures:
            await self._unavailable(failures, fallback)

    async def _unavailable(
        self,
        failures: list[tuple[list[TaskCall], BackendUnavailable]],
        fallback: Callable[[TaskCall], None] | None,
    ) -> None:
        """Hand calls allowed to fall back to the in-process backend; raise for the rest."""
        unavailable: list[BackendUnavailable] = []
        rescued: list[TaskCall] = []
        for calls, error in failures:
            allowed = [c for c in calls if c.policy.on_unavailable == "inprocess"]
            for call in allowed:
                logger.warning(
                    "%s; running task %s [%s] in-process instead (on_unavailable='inprocess')",
                    error,
                    call.name,
                    call.id,
                )
            rescued += allowed
            if len(allowed) < len(calls):
                unavailable.append(error)
        if rescued:
            if fallback is not None:
                for call in rescued:
                    fallback(call)
            else:
                await self.backend(FALLBACK_ALIAS).enqueue(rescued)
        if unavailable:
            logger.warning("dispatch failed (a request gets 503): %s", unavailable[0])
            raise unavailable[0]


async def _send(backend: Backend, calls: list[TaskCall], timeout: float, retry_after: int) -> None:
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
