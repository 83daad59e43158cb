"""`bridge.router()`: task calls over HTTP, with typed models for /docs: one call's status,
cancellation, live events and retry, and the list of calls with their counts."""

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ._exceptions import BackendUnavailable, TaskNotRetryable
from ._handle import TaskHandle
from ._status import CancelResult, TaskPage, TaskStats, TaskStatus

__all__ = ["HandleSource", "build_router", "fingerprint"]

logger = logging.getLogger("taskbridge")

ListedState = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]

RECHECK_EVERY = 15.0
"""Seconds an events stream waits for a change before it reads the call again anyway (a change
published while the events channel was reconnecting is never missed for longer)."""


class HandleSource(Protocol):
    """What the router needs of the bridge."""

    def handle(self, task_id: str, backend: str | None = None) -> TaskHandle:
        """A handle for the call `task_id`."""
        ...

    async def list_calls(
        self,
        *,
        state: str | None = None,
        task: str | None = None,
        backend: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of calls, newest first."""
        ...

    async def stats(self) -> TaskStats:
        """Calls per state and per task."""
        ...

    async def retry(self, task_id: str) -> TaskHandle:
        """Run a failed or cancelled call again."""
        ...

    def watch(
        self, task_id: str, backend: str | None
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Event] | None:
        """An event set when the call may have changed (None: nothing to watch)."""
        ...


def fingerprint(status: TaskStatus) -> str:
    """The events stream's id of a status: the same for the same status, so a client that
    reconnects with `Last-Event-ID` is sent only what changed since."""
    return hashlib.blake2b(status.model_dump_json().encode(), digest_size=8).hexdigest()


def build_router(bridge: HandleSource, **options: Any) -> APIRouter:
    """Build the tasks router for `bridge` (see `TaskBridge.router`)."""
    options.setdefault("prefix", "/tasks")
    options.setdefault("tags", ["tasks"])
    router = APIRouter(**options)

    async def read(task_id: str) -> TaskStatus:
        try:
            return await bridge.handle(task_id).info()
        except BackendUnavailable as exc:
            logger.warning("status of task call %s not available (answered 503): %s", task_id, exc)
            raise

    async def known(task_id: str) -> TaskStatus:
        status = await read(task_id)
        if status.state == "unknown":
            raise HTTPException(status_code=404, detail=f"no task call with id {task_id!r}")
        return status

    @router.get(
        "",
        response_model=TaskPage,
        summary="Task calls, newest first, across every backend that keeps status",
        responses={400: {"description": "The cursor is not one this endpoint gave"}},
    )
    async def list_tasks(
        state: ListedState | None = None,
        task: Annotated[str | None, Query(description="A registered task name")] = None,
        backend: Annotated[str | None, Query(description="A backend alias")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(description="The `next` of the page before")] = None,
    ) -> TaskPage:
        try:
            return await bridge.list_calls(
                state=state, task=task, backend=backend, limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @router.get(
        "/stats",
        response_model=TaskStats,
        summary="How many calls are in each state, overall and per task",
    )
    async def task_stats() -> TaskStats:
        return await bridge.stats()

    @router.get(
        "/{task_id}",
        response_model=TaskStatus,
        summary="State, progress, result or error, and timestamps of a task call",
        responses={404: {"description": "No backend knows this task id"}},
    )
    async def get_task(task_id: str) -> TaskStatus:
        return await known(task_id)

    async def resumable(
        task_id: str,
        last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> TaskStatus:
        status = await known(task_id)
        if status.done and last_event_id == fingerprint(status):
            # the client saw the final state already: 204 tells EventSource not to reconnect
            raise HTTPException(status_code=204)
        return status

    @router.get(
        "/{task_id}/events",
        response_class=EventSourceResponse,
        summary="Server-Sent Events: the call's status at each change, until it settles",
        description="Each event's data is the call's TaskStatus as JSON and its id identifies "
        "that status: a client reconnecting with `Last-Event-ID` gets only newer ones. The "
        "stream ends after a final state (succeeded, failed, cancelled); a reconnect after it "
        "is answered 204.",
        responses={404: {"description": "No backend knows this task id"}},
    )
    async def task_events(
        task_id: str,
        first: Annotated[TaskStatus, Depends(resumable)],
        last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        sent = last_event_id
        watching = bridge.watch(task_id, first.backend)
        nothing: contextlib.AbstractAsyncContextManager[asyncio.Event | None]
        nothing = contextlib.nullcontext(None)
        async with watching or nothing as changed:
            status = first if changed is None else await read(task_id)  # read once subscribed
            retry: int | None = 1000
            while True:
                mark = fingerprint(status)
                if mark != sent:
                    yield ServerSentEvent(raw_data=status.model_dump_json(), id=mark, retry=retry)
                    sent, retry = mark, None
                if status.done:
                    return
                if changed is None:
                    await asyncio.sleep(0.5)  # nothing pushes changes: read twice a second
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RECHECK_EVERY):
                            await changed.wait()
                    changed.clear()
                status = await read(task_id)

    @router.delete(
        "/{task_id}",
        response_model=CancelResult,
        summary="Cancel a task call",
        responses={
            404: {"description": "No backend knows this task id"},
            409: {"description": "The call could not be cancelled (the body says why)"},
        },
    )
    async def cancel_task(task_id: str) -> CancelResult:
        try:
            result = await bridge.handle(task_id).cancel()
        except BackendUnavailable as exc:
            logger.warning("task call %s not cancelled (answered 503): %s", task_id, exc)
            raise
        if result.state == "unknown":
            raise HTTPException(status_code=404, detail=f"no task call with id {task_id!r}")
        if not result.cancelled:
            raise HTTPException(status_code=409, detail=result.detail)
        return result

    @router.post(
        "/{task_id}/retry",
        response_model=TaskStatus,
        summary="Run a failed or cancelled call again, with the arguments it was called with",
        description="The new call has its own id; its `retry_of` is the id retried.",
        responses={
            404: {"description": "No backend knows this task id"},
            409: {"description": "The call cannot be run again (the body says why)"},
        },
    )
    async def retry_task(task_id: str) -> TaskStatus:
        try:
            handle = await bridge.retry(task_id)  # reads the call's status once, to check it
        except TaskNotRetryable as exc:
            raise HTTPException(status_code=404 if exc.unknown else 409, detail=str(exc)) from None
        status = await read(handle.id)
        if status.state == "unknown":  # not visible yet where it went: it was accepted
            status = TaskStatus(
                id=handle.id, task_name=handle.task_name, backend=handle.backend, state="queued"
            )
        status.retry_of = task_id
        return status

    return router
