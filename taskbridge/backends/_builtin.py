"""Backends that need no broker: in-process, immediate, and a recording test double."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from fastapi import BackgroundTasks

from .._runner import run_with_retries
from .._task import TaskCall
from . import Backend

__all__ = [
    "ImmediateBackend",
    "InProcessBackend",
    "RecordingBackend",
    "run_in_process",
    "spawn_in_process",
]


async def run_in_process(call: TaskCall) -> None:
    """Run a call here, after its delay, retrying as its policy says; failures are logged."""
    if call.policy.delay:
        await asyncio.sleep(call.policy.delay)
    await run_with_retries(call.task, call.args, call.kwargs, call_id=call.id, policy=call.policy)


_spawned: set[asyncio.Task[None]] = set()


def spawn_in_process(call: TaskCall) -> asyncio.Task[None]:
    """Run a call as an asyncio task on the running loop (a reference is kept until it ends)."""
    task = asyncio.get_running_loop().create_task(
        run_in_process(call), name=f"taskbridge:{call.name}"
    )
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)
    return task


class InProcessBackend(Backend):
    """Runs calls in the API process, after the response, like FastAPI's BackgroundTasks.

    Inside a request the call joins the request's own BackgroundTasks, in `add_task` order with
    any plain callables: `def` tasks run in the threadpool, `async def` tasks on the loop. Unlike
    Starlette, a failing task does not stop the ones after it: the runner logs the failure with
    the task's name and id. Outside a request (`enqueue`) the call runs as an asyncio task;
    `close` waits for those still running.
    """

    runs_in_process: ClassVar[bool] = True
    supports_delay: ClassVar[bool] = True

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._running: set[asyncio.Task[None]] = set()

    def defer_in_request(self, call: TaskCall, background: BackgroundTasks) -> bool:
        background.add_task(run_in_process, call)
        return True

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        for call in calls:
            task = spawn_in_process(call)
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def close(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


class ImmediateBackend(Backend):
    """Runs each call at dispatch, before the response is sent: for tests and scripts.

    Arguments go through the same JSON check as for a queue, so what passes here would travel.
    Retries are attempted back to back, without the backoff wait. A failure is logged, not raised.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        for call in calls:
            immediate = replace(call.policy, retry_backoff=0.0, retry_jitter=False, delay=None)
            await run_with_retries(
                call.task, call.args, call.kwargs, call_id=call.id, policy=immediate
            )


class RecordingBackend(Backend):
    """Stores calls without running them, in dispatch order: a test double for any queue.

    Arguments are JSON-checked and normalised as for a real queue. Read `calls`; `clear()` it
    between tests.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self.calls: list[TaskCall] = []

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        self.calls.extend(calls)

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()
