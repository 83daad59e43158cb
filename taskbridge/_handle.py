"""The handle a dispatch returns: the call's id, and questions about the call."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, Protocol

from ._exceptions import TaskCancelled, TaskFailed
from ._status import CancelResult, TaskState, TaskStatus

__all__ = ["CallTracker", "TaskHandle", "keyed_task_id", "new_task_id"]


class CallTracker(Protocol):
    """What a handle asks about its call (the bridge answers)."""

    async def status(self, handle: TaskHandle, *, links: bool = True) -> TaskStatus:
        """What the backends know of the call behind `handle` (`links`: with `retry_of`, which
        may cost one more read)."""
        ...

    async def cancel(self, handle: TaskHandle) -> CancelResult:
        """Cancel the call behind `handle`."""
        ...


def new_task_id(*, compact: bool = False) -> str:
    """A fresh task id: a random UUID4 string, the form Celery and ARQ tooling expect
    (`compact`: its 32 hex digits without dashes, ARQ's own form).

    Built like `str(uuid.uuid4())` from 16 random bytes, without the UUID object (a third of
    the cost, on every dispatch).
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    if compact:
        return h
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_KEY_NAMESPACE = uuid.UUID("6f1f6d2e-63c1-4f0e-9b0a-7d1c5a7e2b10")


def keyed_task_id(task_name: str, key: str, *, compact: bool = False) -> str:
    """The id of the call of `task_name` with idempotency key `key`: the same for every
    dispatch with that key, so a duplicate dispatch returns the first call's handle."""
    keyed = uuid.uuid5(_KEY_NAMESPACE, f"{task_name}\x00{key}")
    return keyed.hex if compact else str(keyed)


class TaskHandle:
    """Refers to one dispatched task call, wherever it runs.

    `id` is generated at `add_task` time and is the id the engine uses (Celery task id, ARQ job
    id), so it can be logged, returned to a client and looked up later with `bridge.handle(id)`.
    """

    __slots__ = ("_bridge", "backend", "id", "task_name")

    def __init__(
        self,
        id: str,
        task_name: str | None,
        backend: str | None,
        bridge: CallTracker | None = None,
    ) -> None:
        self.id = id
        """The call's id, also the engine's task/job id."""
        self.task_name = task_name
        """The registered name of the task (None when looked up by id and not yet known)."""
        self.backend = backend
        """The alias of the backend that took the call (None when not yet known)."""
        self._bridge = bridge

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskHandle):
            return NotImplemented
        return (self.id, self.task_name, self.backend) == (other.id, other.task_name, other.backend)

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"TaskHandle(id={self.id!r}, task_name={self.task_name!r}, backend={self.backend!r})"

    def _require_bridge(self) -> CallTracker:
        if self._bridge is None:
            raise RuntimeError("this handle is not bound to a bridge; use bridge.handle(id)")
        return self._bridge

    async def info(self) -> TaskStatus:
        """Everything known about the call: state, attempts, progress, timestamps, result."""
        return await self._info(links=True)

    async def _info(self, *, links: bool) -> TaskStatus:
        status = await self._require_bridge().status(self, links=links)
        if status.task_name and self.task_name is None:
            self.task_name = status.task_name
        if status.backend and self.backend is None:
            self.backend = status.backend
        return status

    async def status(self) -> TaskState:
        """queued, running, retrying, succeeded, failed, cancelled or unknown."""
        return (await self._info(links=False)).state

    async def progress(self) -> tuple[float | None, str | None]:
        """The last progress the task reported: (fraction 0..1, message), or (None, None)."""
        info = await self.info()
        return info.progress, info.progress_message

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the call to settle and return its value.

        Raises TaskFailed (with the task's error type and message) or TaskCancelled, and
        TimeoutError when it has not settled within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            info = await self.info()
            if info.state == "succeeded":
                return info.result
            if info.state == "failed":
                error = info.error
                raise TaskFailed(
                    self.id,
                    info.task_name or self.task_name,
                    error.type if error else "unknown",
                    error.message if error else "",
                )
            if info.state == "cancelled":
                raise TaskCancelled(self.id, info.task_name or self.task_name)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.task_name or '?'} [{self.id}] is {info.state}")
            pause = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
            delay = min(delay * 2, 0.25)

    async def cancel(self) -> CancelResult:
        """Ask for the call to be cancelled; the answer says whether it could be."""
        return await self._require_bridge().cancel(self)
