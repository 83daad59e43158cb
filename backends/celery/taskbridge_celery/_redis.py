"""Publishing to a Redis broker: every batch waiting is sent in one command, one round trip.

kombu's Redis transport keeps a queue as a list that producers LPUSH JSON envelopes onto and
workers BRPOP from; Celery publishes to the anonymous exchange with the queue as routing key,
so nothing else is needed for delivery. The `_kombu.binding.<queue>` entry a Celery producer
declares is added too (once per queue), so the broker looks exactly as if Celery had sent.

Batches are group-committed: a request's batch is queued, and one flush task on the loop sends
everything queued so far as one LPUSH per queue (MULTI/EXEC when several), then starts over with
what arrived meanwhile. An idle broker sees each batch at once; a busy one sees few, large
commands instead of one per request, which is what makes many concurrent requests cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio
from redis.exceptions import RedisError

from ._protocol import TaskMessage, redis_binding, redis_envelope, redis_queue_key

__all__ = ["RedisPublisher"]

_Entry = tuple[str, str, bytes]  # queue, Redis key, envelope
_Batch = tuple[list[_Entry], asyncio.Future[None]]


@dataclass
class _LoopState:
    """The client and the group commit of one event loop."""

    loop: asyncio.AbstractEventLoop
    client: redis.asyncio.Redis
    pending: list[_Batch] = field(default_factory=list)
    flush: asyncio.Task[None] | None = None


class RedisPublisher:
    """Sends task messages to a Redis broker from the event loop, without blocking it."""

    errors: tuple[type[BaseException], ...] = (RedisError, OSError)
    """What a failed publish raises (mapped to BackendUnavailable by the backend)."""

    def __init__(self, url: str, transport_options: Mapping[str, Any], timeout: float) -> None:
        self._url = url
        self._transport = dict(transport_options)
        self._timeout = timeout
        self._state: _LoopState | None = None
        self._bound: set[str] = set()

    def _for_loop(self) -> _LoopState:
        # redis.asyncio connections belong to the loop that opened them; scripts may run
        # several loops one after the other (asyncio.run per call), so follow the loop.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            client = redis.asyncio.Redis.from_url(
                self._url, socket_connect_timeout=self._timeout, socket_timeout=self._timeout
            )
            self._state = _LoopState(loop, client)
        return self._state

    async def ping(self) -> None:
        """Connect if needed and make one round trip to the broker."""
        await self._for_loop().client.ping()

    async def publish(self, messages: Sequence[TaskMessage]) -> None:
        """Send `messages` (atomically, with the batches waiting alongside); return once Redis
        has them."""
        state = self._for_loop()
        entries = [
            (m.queue, redis_queue_key(m.queue, self._transport), redis_envelope(m))
            for m in messages
        ]
        batch: _Batch = (entries, state.loop.create_future())
        state.pending.append(batch)
        if state.flush is None:
            state.flush = state.loop.create_task(self._flush(state))
        try:
            await batch[1]
        except asyncio.CancelledError:
            # Given up on (dispatch timeout) before a flush took it: do not send it late.
            with contextlib.suppress(ValueError):
                state.pending.remove(batch)
            raise

    async def _flush(self, state: _LoopState) -> None:
        try:
            while state.pending:
                group, state.pending = state.pending, []
                error: BaseException | None = None
                try:
                    await self._send(state.client, [e for entries, _ in group for e in entries])
                except asyncio.CancelledError:
                    for _, future in group:
                        future.cancel()
                    raise
                except Exception as exc:
                    error = exc
                for _, future in group:
                    if not future.done():
                        if error is None:
                            future.set_result(None)
                        else:
                            future.set_exception(error)
        finally:
            state.flush = None

    async def _send(self, client: redis.asyncio.Redis, entries: list[_Entry]) -> None:
        by_key: dict[str, list[bytes]] = {}
        for _, key, envelope in entries:
            by_key.setdefault(key, []).append(envelope)
        unbound = list(dict.fromkeys(q for q, _, _ in entries if q not in self._bound))
        if len(by_key) == 1 and not unbound:
            # The common case: one LPUSH of every message, atomic by itself. LPUSH of several
            # values keeps their order: the worker BRPOPs the oldest first.
            ((key, envelopes),) = by_key.items()
            await cast("Awaitable[int]", client.lpush(key, *envelopes))  # typed sync|async
            return
        pipe = client.pipeline(transaction=True)
        for queue in unbound:
            pipe.sadd(*redis_binding(queue, self._transport))
        for key, envelopes in by_key.items():
            pipe.lpush(key, *envelopes)
        await pipe.execute()
        self._bound.update(unbound)

    async def close(self) -> None:
        """Let the last flush finish, then close the current loop's connections."""
        state, self._state = self._state, None
        if state is None or state.loop is not asyncio.get_running_loop():
            return
        if state.flush is not None:
            await asyncio.gather(state.flush, return_exceptions=True)
        await state.client.aclose()
