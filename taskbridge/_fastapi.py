"""The `Tasks` dependency: BackgroundTasks' `add_task`, routed by policy."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Annotated, Any, ParamSpec

from fastapi import BackgroundTasks, Depends, Request

from ._backends import Backend
from ._bridge import STATE_KEY, TaskBridge
from ._dispatch import FALLBACK_ALIAS
from ._handle import TaskHandle, new_task_id
from ._task import Task, TaskCall

__all__ = ["TaskQueue", "Tasks"]

P = ParamSpec("P")


class TaskQueue:
    """What an endpoint gets for `tasks: Tasks`.

    `add_task` has BackgroundTasks' exact call shape. Plain callables join the request's
    BackgroundTasks untouched. Tasks are routed by their policy: in-process ones join the same
    list (keeping `add_task` order), queued ones are buffered and sent in one batch per backend
    after the handler returns and before the response is sent; if the handler raises, none are.

    A registered in-process task that fails does not stop the tasks after it (the runner logs
    it); once the request's background tasks have all run, the first such error is raised out
    of the app, as BackgroundTasks would raise it, for exception handlers, error trackers and
    TestClient. No lifespan is needed: plain callables need no bridge, and a task carries its
    own (opened on first dispatch).
    """

    __slots__ = ("_background", "_failure", "_handler_done", "_pending", "_scope", "_watching")

    def __init__(self, background: BackgroundTasks, scope: MutableMapping[str, Any]) -> None:
        self._background = background
        self._scope = scope
        self._pending: list[tuple[Backend, TaskCall]] = []
        self._failure: BaseException | None = None
        self._handler_done = False
        self._watching = False

    def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
        """Add a call; return its handle. Non-JSON arguments for a queue raise here."""
        if isinstance(func, Task):
            owner = func.bridge
            assert isinstance(owner, TaskBridge), "a task registered on a TaskBridge"
            backend, call = owner.dispatcher.prepare(func, args, kwargs)
            self._defer(backend, call)
            return TaskHandle(call.id, func.name, call.policy.backend, owner)
        self._background.add_task(func, *args, **kwargs)
        name = getattr(func, "__qualname__", None) or type(func).__qualname__
        # plain callables are BackgroundTasks' own: their status is not tracked ("unknown")
        bridge = getattr(self._scope["app"].state, STATE_KEY, None)
        return TaskHandle(
            new_task_id(), f"{getattr(func, '__module__', None)}.{name}", None, bridge
        )

    def _defer(self, backend: Backend, call: TaskCall) -> None:
        if not backend.defer_in_request(call, self._background, self._failed):
            if self._handler_done and not self._pending:
                self._watch_response()  # added while a streaming response is sent: sent after
            self._pending.append((backend, call))

    def _failed(self, error: BaseException) -> None:
        # A registered in-process task failed for good (the runner logged it): the first error
        # is raised once the request's background tasks have all run.
        if self._failure is None:
            self._failure = error
            self._watch_response()

    def _watch_response(self) -> None:
        # Once per request: have `_after_response` run when the response and its background
        # tasks are done (FastAPI's request exit stack closes then).
        stack = self._scope.get("fastapi_inner_astack")
        if stack is not None and not self._watching:
            self._watching = True
            stack.push_async_exit(self._after_response)

    @property
    def pending(self) -> list[TaskCall]:
        """Queued calls buffered by this request and not yet sent."""
        return [call for _, call in self._pending]

    async def flush(self) -> None:
        """Send the buffered calls now (done when the handler returns)."""
        if self._pending:
            batch, self._pending = self._pending, []
            owners: dict[int, tuple[TaskBridge, list[tuple[Backend, TaskCall]]]] = {}
            for item in batch:  # one bridge, nearly always
                owner = item[1].task.bridge
                assert isinstance(owner, TaskBridge)
                owners.setdefault(id(owner), (owner, []))[1].append(item)
            for owner, calls in owners.values():
                await owner.dispatcher.dispatch(calls, self._fallback)

    def _fallback(self, call: TaskCall) -> None:
        # the broker was down and the policy allows it: run after the response, like inprocess
        owner = call.task.bridge
        assert isinstance(owner, TaskBridge)
        self._defer(owner.dispatcher.backend(FALLBACK_ALIAS), call)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        # Run by FastAPI's per-endpoint exit stack after the handler returned (and its response
        # was built) and before the response is sent; on an exception nothing is dispatched.
        # (An `__aexit__`, so that `push_async_exit` takes it without a failed lookup.)
        if exc_type is None:
            await self.flush()
        self._handler_done = True
        return False

    async def _after_response(self, exc_type: object, exc: object, tb: object) -> bool:
        # Run once the response was sent and its background tasks ran: calls added while a
        # streaming response was being sent go now, then the first error of a registered
        # in-process task leaves the app, as a failing BackgroundTasks task would.
        if exc_type is None:
            await self.flush()
            if self._failure is not None:
                raise self._failure
        return False


async def _request_tasks(request: Request, background: BackgroundTasks) -> TaskQueue:
    queue = TaskQueue(background, request.scope)
    # The endpoint's own exit stack (what `Depends(scope="function")` uses, FastAPI >= 0.121):
    # registering on it directly costs a fraction of a generator dependency on every request.
    stack = request.scope.get("fastapi_function_astack")
    if stack is None:
        raise RuntimeError(
            "taskbridge's Tasks needs FastAPI >= 0.121 (the endpoint exit stack is missing)"
        )
    stack.push_async_exit(queue)
    return queue


Tasks = Annotated[TaskQueue, Depends(_request_tasks)]
"""Declare `tasks: Tasks` in an endpoint to get the request's TaskQueue."""
