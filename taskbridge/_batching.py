"""Group commit: batches that arrive while a send is in flight wait, then go together.

Used by every publisher that sends from the event loop (ARQ's enqueue script, Celery's Redis
LPUSH/script; Celery's RabbitMQ publisher groups the same way on its own thread, because py-amqp
blocks). Under load this saves the API process a send and a receive per request, when it is
busiest; alone, a batch goes at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

B = TypeVar("B")
R = TypeVar("R")

Send = Callable[[list[B]], Awaitable[Sequence[R | BaseException]]]
"""Sends a group of batches in one round trip; returns, per batch, its result or its error
(raising fails every batch of the group with that error)."""


class GroupCommit(Generic[B, R]):
    """Sends concurrent batches together.

    With `inline` (the default), a batch that finds nothing in flight is sent at once by its
    caller (no task hop); otherwise every group is sent by a task of its own, so a caller that
    gives up never interrupts a send. Either way, batches arriving during a send wait and go
    in the next one, at most `most` (by `size`) per send. A batch whose caller gave up (its
    dispatch timed out) before its group was taken is withdrawn: it is never sent late.
    """

    def __init__(
        self,
        send: Send[B, R],
        *,
        inline: bool = True,
        most: int = 500,
        size: Callable[[B], int] = lambda _: 1,
        name: str = "taskbridge:group-commit",
    ) -> None:
        self._send = send
        self._inline = inline
        self._most = most
        self._size = size
        self._name = name
        self._waiting: deque[tuple[B, asyncio.Future[R]]] = deque()
        self._busy = False
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, batch: B) -> R:
        """Have `batch` sent; return its result (or raise its error)."""
        if self._inline and not self._busy:
            self._busy = True
            try:
                [result] = await self._send([batch])
            finally:
                self._busy = False
                if self._waiting:
                    self._start()
            if isinstance(result, BaseException):
                raise result
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = (batch, future)
        self._waiting.append(entry)
        if not self._busy:
            self._start()
        try:
            return await future
        except asyncio.CancelledError:
            # Given up on before a group took it: withdrawn, never sent late.
            for i, waiting in enumerate(self._waiting):
                if waiting is entry:
                    del self._waiting[i]
                    break
            raise

    def _start(self) -> None:
        self._busy = True
        self._sender = asyncio.get_running_loop().create_task(self._send_waiting(), name=self._name)

    async def wait_idle(self) -> None:
        """Wait for the groups in flight (at close)."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    def _take(self) -> list[tuple[B, asyncio.Future[R]]]:
        group: list[tuple[B, asyncio.Future[R]]] = []
        total = 0
        while self._waiting:
            batch, future = self._waiting[0]
            if future.done():  # its caller gave up: not sent
                self._waiting.popleft()
                continue
            size = self._size(batch)
            if group and total + size > self._most:
                break  # keep each send short (a Redis script blocks the server while it runs)
            group.append(self._waiting.popleft())
            total += size
        return group

    async def _send_waiting(self) -> None:
        try:
            while group := self._take():
                try:
                    results = await self._send([batch for batch, _ in group])
                except asyncio.CancelledError:
                    for _, future in group:
                        future.cancel()
                    raise
                except Exception as exc:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._busy, self._sender = False, None
            while self._waiting:  # only when cancelled: nobody will send these
                self._waiting.popleft()[1].cancel()
