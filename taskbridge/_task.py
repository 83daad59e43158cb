"""Decorated task functions and the calls made of them."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from ._handle import CallTracker, TaskHandle
from ._policy import Policy, ResolvedPolicy, check_policy_fields

__all__ = ["Hook", "HookRegistry", "Hooks", "Task", "TaskCall", "TaskOwner", "is_async_callable"]

P = ParamSpec("P")
R = TypeVar("R")


Hook = Callable[[TaskHandle, Any], Any]
"""`hook(handle, value_or_error)`; may be `async def`. Failures in hooks are logged only."""
H = TypeVar("H", bound=Hook)


@dataclass
class Hooks:
    """Callbacks run by the runner after an attempt, wherever the task ran."""

    on_success: list[Hook] = field(default_factory=list)
    """`hook(handle, value)` after a successful attempt."""
    on_failure: list[Hook] = field(default_factory=list)
    """`hook(handle, error)` after the last attempt failed."""
    on_retry: list[Hook] = field(default_factory=list)
    """`hook(handle, error)` after an attempt failed that will be retried."""

    def __bool__(self) -> bool:
        return bool(self.on_success or self.on_failure or self.on_retry)


class HookRegistry:
    """Decorators that register hooks: `@thing.on_failure`, `@thing.on_success`, ..."""

    hooks: Hooks

    def on_success(self, hook: H) -> H:
        """Register `hook(handle, value)`, run after a successful attempt."""
        self.hooks.on_success.append(hook)
        return hook

    def on_failure(self, hook: H) -> H:
        """Register `hook(handle, error)`, run once the last attempt failed."""
        self.hooks.on_failure.append(hook)
        return hook

    def on_retry(self, hook: H) -> H:
        """Register `hook(handle, error)`, run after a failed attempt that will be retried."""
        self.hooks.on_retry.append(hook)
        return hook


class TaskOwner(CallTracker, Protocol):
    """What a task needs of the bridge it is registered on."""

    hooks: Hooks

    def resolve(self, task: Task[..., Any], *, check: bool = True) -> ResolvedPolicy:
        """The task's effective policy."""
        ...

    async def enqueue(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> TaskHandle:
        """Dispatch one call now."""
        ...


def is_async_callable(func: object) -> bool:
    """Whether calling `func` returns a coroutine: an `async def` function, a partial of one, or
    an object whose `__call__` is `async def`."""
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - the method itself is inspected
    return not inspect.isroutine(func) and call is not None and inspect.iscoroutinefunction(call)


class Task(HookRegistry, Generic[P, R]):
    """A function registered on a bridge, with its policy.

    Calling it runs the function here and now; `add_task`, `enqueue` and the workers run it
    according to its effective policy (settings route > `.using()` > decorator > default).
    """

    def __init__(
        self,
        bridge: TaskOwner,
        func: Callable[P, R],
        name: str,
        decorator_policy: Mapping[str, Any],
        using: Mapping[str, Any] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        functools.update_wrapper(self, func)  # first: the task's own attributes below win
        self.bridge = bridge
        self.func = func
        self.name = name
        self.decorator_policy: Mapping[str, Any] = dict(decorator_policy)
        self.using_policy: Mapping[str, Any] = dict(using or {})
        self.hooks = hooks if hooks is not None else Hooks()
        self.is_async = is_async_callable(func)
        self.signature = inspect.signature(func)

    @property
    def policy(self) -> Policy:
        """The effective policy this task is dispatched with now."""
        return self.bridge.resolve(self).policy

    def using(self, **overrides: Any) -> Task[P, R]:
        """A variant of this task whose dispatches apply `overrides` (policy fields).

        Settings routes still win over these, so a deployment can override code.
        """
        merged = {**self.using_policy, **check_policy_fields(overrides, f"{self.name}.using()")}
        return Task(self.bridge, self.func, self.name, self.decorator_policy, merged, self.hooks)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Dispatch one call outside a request (scripts, other tasks, startup code)."""
        return await self.bridge.enqueue(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


@dataclass(slots=True)
class TaskCall:
    """One call of a task, as a backend receives it.

    For backends that run out of process, `args` and `kwargs` are already JSON values (checked
    and normalised in the caller); for in-process backends they are the caller's own objects.
    """

    id: str
    task: Task[..., Any]
    args: list[Any] | tuple[Any, ...]
    kwargs: dict[str, Any]
    policy: Policy
    enqueued_at: float = field(default_factory=time.time)
    trace: dict[str, str] | None = None
    """The dispatcher's OpenTelemetry context (W3C headers) when it was tracing; backends carry
    it with the message and give it back to the runner."""
    retry_of: str | None = None
    """The id of the failed or cancelled call this one re-runs (`POST /tasks/{id}/retry`)."""

    @property
    def name(self) -> str:
        """The task's registered name."""
        return self.task.name

    @property
    def handle(self) -> TaskHandle:
        """The handle returned to the caller for this call."""
        return TaskHandle(self.id, self.task.name, self.policy.backend, self.task.bridge)
