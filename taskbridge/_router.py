"""`bridge.router()`: task status and cancellation over HTTP, with typed models for /docs."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException

from ._exceptions import BackendUnavailable
from ._handle import TaskHandle
from ._status import CancelResult, TaskStatus

__all__ = ["build_router"]

logger = logging.getLogger("taskbridge")


class HandleSource(Protocol):
    """What the router needs of the bridge: a handle for an id."""

    def handle(self, task_id: str, backend: str | None = None) -> TaskHandle:
        """A handle for the call `task_id`."""
        ...


def build_router(bridge: HandleSource, **options: Any) -> APIRouter:
    """Build the status router for `bridge` (see `TaskBridge.router`)."""
    options.setdefault("prefix", "/tasks")
    options.setdefault("tags", ["tasks"])
    router = APIRouter(**options)

    @router.get(
        "/{task_id}",
        response_model=TaskStatus,
        summary="State, progress, result or error, and timestamps of a task call",
        responses={404: {"description": "No backend knows this task id"}},
    )
    async def get_task(task_id: str) -> TaskStatus:
        try:
            status = await bridge.handle(task_id).info()
        except BackendUnavailable as exc:
            logger.warning("status of task call %s not available (answered 503): %s", task_id, exc)
            raise
        if status.state == "unknown":
            raise HTTPException(status_code=404, detail=f"no task call with id {task_id!r}")
        return status

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

    return router
