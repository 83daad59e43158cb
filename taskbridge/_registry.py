"""The registry: tasks by name, the settings' routes, and how a task's policy is resolved.

Pure data: nothing here opens a connection or builds a backend, so routing can be tested with
tables (`tests/test_routing.py`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ._exceptions import ConfigurationError, UnknownTaskError
from ._policy import ResolvedPolicy, check_policy_fields
from ._settings import TaskBridgeSettings, env_name, load_settings
from ._task import Task, TaskOwner

__all__ = ["Registry", "default_name", "importable_problem"]

_CACHE_LIMIT = 4096


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether `b` is `a` or the same definition run again (a function decorated inside an
    endpoint or a factory is a new object each time, with the same code)."""
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return code_a is not None and code_a is code_b


def _qualname(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or type(func).__qualname__


def default_name(func: Callable[..., Any]) -> str:
    """The name a task gets without `name=`: `module.qualname` (of the class, for a callable
    object)."""
    return f"{getattr(func, '__module__', None) or type(func).__module__}.{_qualname(func)}"


def importable_problem(task: Task[..., Any], backend: str) -> str | None:
    """Why a worker process could not find `task` by its name, or None.

    A worker imports the bridge's module and looks tasks up by registered name, so a task must
    be registered at import time under a stable name. A lambda or a function defined inside
    another function (`<locals>` in its qualified name) gets a default name that is neither
    unique nor stable: it needs a `name=` (and its registration must run at import).
    """
    if task.name != default_name(task.func):
        return None  # named explicitly: whoever did knows how the worker finds it
    qualname = _qualname(task.func)
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


class Registry:
    """Registered tasks, the settings they are routed by, and their resolved policies."""

    def __init__(self, settings: TaskBridgeSettings | Mapping[str, Any] | None = None) -> None:
        self.settings_source = settings
        self._settings: TaskBridgeSettings | None = None
        self._routes: list[tuple[str, dict[str, Any]]] = []
        self._tasks: dict[str, Task[..., Any]] = {}
        self._resolved: dict[Hashable, ResolvedPolicy] = {}

    # -- settings and routes --------------------------------------------------------------

    @property
    def settings(self) -> TaskBridgeSettings:
        """The settings, loaded and validated on first access."""
        if self._settings is None:
            settings = load_settings(self.settings_source)
            self._routes = [
                (pattern, _route_fields(pattern, target))
                for pattern, target in settings.routes.items()
            ]
            self._settings = settings
        return self._settings

    def reset(self, settings: TaskBridgeSettings | Mapping[str, Any] | None) -> None:
        """Use other settings from now on (read again on next access)."""
        self.settings_source, self._settings, self._routes = settings, None, []
        self._resolved.clear()

    @contextmanager
    def overridden(self, values: Mapping[str, Any]) -> Iterator[None]:
        """Use these settings over the current ones inside the block; then the settings as they
        were (the same loaded object: not read again from the environment)."""
        saved = (self.settings_source, self._settings, self._routes)
        base = self.settings.model_dump(exclude_unset=True)
        self.reset({**base, **values})
        try:
            self.settings  # noqa: B018 - validates the override now, in the caller
            yield
        finally:
            self.settings_source, self._settings, self._routes = saved
            self._resolved.clear()

    @property
    def routes(self) -> list[tuple[str, dict[str, Any]]]:
        """The settings' routes in order, as (glob pattern, policy fields)."""
        self.settings  # noqa: B018 - loads the routes
        return self._routes

    def route_for(self, task_name: str) -> tuple[str, dict[str, Any]] | None:
        """The first route whose glob matches `task_name`, as (pattern, fields)."""
        for pattern, fields in self.routes:
            if fnmatch.fnmatchcase(task_name, pattern):
                return pattern, fields
        return None

    def unmatched_routes(self) -> list[str]:
        """Route patterns that match no registered task (most likely a typo)."""
        return [
            pattern
            for pattern, _ in self.routes
            if not any(fnmatch.fnmatchcase(name, pattern) for name in self._tasks)
        ]

    # -- resolution -----------------------------------------------------------------------

    def resolve(self, task: Task[..., Any]) -> ResolvedPolicy:
        """The effective policy of `task`, with the origin of each field (cached).

        Precedence, highest first: settings route > `.using()` > decorator > default_backend.
        """
        key = _cache_key(task)
        if key is not None and (hit := self._resolved.get(key)) is not None:
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
        if key is not None and len(self._resolved) < _CACHE_LIMIT:
            self._resolved[key] = resolved
        return resolved

    @staticmethod
    def origin(task: Task[..., Any], source: str, field: str) -> str:
        """Where a policy field of `task` was set, as a user would find it."""
        if source == "decorator":
            return f"@task({field}=...) of task {task.name!r}"
        if source == "using":
            return f".using({field}=...) of task {task.name!r}"
        if source.startswith("route "):
            return f"{env_name('routes')}[{source[6:]}] for task {task.name!r}"
        return f"{env_name('default_' + field)} for task {task.name!r}"

    # -- tasks ----------------------------------------------------------------------------

    def register(
        self,
        owner: TaskOwner,
        func: Callable[..., Any],
        name: str | None,
        fields: Mapping[str, Any],
    ) -> Task[..., Any]:
        """Register `func` as a task with decorator policy `fields` (not yet checked)."""
        task_name = name or default_name(func)
        checked = check_policy_fields(
            {k: v for k, v in fields.items() if v is not None}, f"@task for {task_name!r}"
        )
        existing = self._tasks.get(task_name)
        if existing is not None and not _same_function(existing.func, func):
            raise ConfigurationError(
                f"two functions are registered as task {task_name!r} "
                f"({existing.func.__module__} and {func.__module__}); give one a name="
            )
        registered = Task(owner, func, task_name, checked)
        self._tasks[task_name] = registered
        self._resolved.clear()
        return registered

    @property
    def tasks(self) -> dict[str, Task[..., Any]]:
        """The registered tasks by name (the registry's own dict: do not modify)."""
        return self._tasks

    def get_task(self, name: str) -> Task[..., Any]:
        """The task registered as `name`; UnknownTaskError if there is none."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name) from None


def _route_fields(pattern: str, target: str | dict[str, Any]) -> dict[str, Any]:
    fields = {"backend": target} if isinstance(target, str) else target
    checked = check_policy_fields(fields, f"{env_name('routes')}[{pattern!r}]")
    if "retry_on" in checked:
        raise ConfigurationError(
            f"{env_name('routes')}[{pattern!r}]: retry_on takes exception classes, which "
            "settings cannot name; set it in the decorator"
        )
    if "key" in checked:
        raise ConfigurationError(
            f"{env_name('routes')}[{pattern!r}]: key identifies one call; set it per call with "
            ".using(key=...)"
        )
    return checked


def _cache_key(task: Task[..., Any]) -> Hashable | None:
    if not task.using_policy:
        return task.name
    key = (task.name, frozenset(task.using_policy.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable override: resolve every time
        return None
    return key
