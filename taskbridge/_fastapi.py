"""The `Tasks` dependency: BackgroundTasks' `add_task`, routed by policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ParamSpec

from fastapi import BackgroundTasks, Depends, Request

from ._bridge import TaskBridge
from ._handle import TaskHandle, new_task_id
from ._task import Task, TaskCall
from .backends import Backend

__all__ = ["TaskQueue", "Tasks"]

P = ParamSpec("P")


class TaskQueue:
    """What an endpoint gets for `tasks: Tasks`.

    `add_task` has BackgroundTasks' exact call shape. Plain callables join the request's
    BackgroundTasks untouched. Tasks are routed by their policy: in-process ones join the same
    list (keeping `add_task` order), queued ones are buffered and sent in one batch per backend
    after the handler returns and before the response is sent; if the handler raises, none are.
    """

    __slots__ = ("_background", "_bridge", "_pending")

    def __init__(self, bridge: TaskBridge, background: BackgroundTasks) -> None:
        self._bridge = bridge
        self._background = background
        self._pending: list[tuple[Backend, TaskCall]] = []

    def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Add a call; return its handle. Non-JSON arguments for a queue raise here."""
        if isinstance(func, Task):
            backend, call = func.bridge.prepare(func, args, kwargs)
            if not backend.defer_in_request(call, self._background):
                self._pending.append((backend, call))
            return call.handle
        self._background.add_task(func, *args, **kwargs)
        name = getattr(func, "__qualname__", None) or type(func).__qualname__
        # plain callables are BackgroundTasks' own: their status is not tracked ("unknown")
        return TaskHandle(
            new_task_id(), f"{getattr(func, '__module__', None)}.{name}", None, self._bridge
        )

    @property
    def pending(self) -> list[TaskCall]:
        """Queued calls buffered by this request and not yet sent."""
        return [call for _, call in self._pending]

    async def flush(self) -> None:
        """Send the buffered calls now (the dependency does this when the handler returns)."""
        if self._pending:
            batch, self._pending = self._pending, []
            await self._bridge.dispatch(batch, self._fallback)

    def _fallback(self, call: TaskCall) -> None:
        # the broker was down and the policy allows it: run after the response, like inprocess
        self._bridge.backend("inprocess").defer_in_request(call, self._background)

    async def _after_handler(self, exc_type: object, exc: object, tb: object) -> bool:
        # Run by FastAPI's per-endpoint exit stack after the handler returned (and its response
        # was built) and before the response is sent; on an exception nothing is dispatched.
        if exc_type is None:
            await self.flush()
        return False


async def _request_tasks(request: Request, background: BackgroundTasks) -> TaskQueue:
    queue = TaskQueue(TaskBridge.of(request.app), background)
    # The endpoint's own exit stack (what `Depends(scope="function")` uses, FastAPI >= 0.121):
    # registering on it directly costs a fraction of a generator dependency on every request.
    stack = request.scope.get("fastapi_function_astack")
    if stack is None:
        raise RuntimeError(
            "taskbridge's Tasks needs FastAPI >= 0.121 (the endpoint exit stack is missing)"
        )
    stack.push_async_exit(queue._after_handler)
    return queue


Tasks = Annotated[TaskQueue, Depends(_request_tasks)]
"""Declare `tasks: Tasks` in an endpoint to get the request's TaskQueue."""
