"""Publishing to a Redis broker: every batch waiting is sent in one command, one round trip.

kombu's Redis transport keeps a queue as a list that producers LPUSH JSON envelopes onto and
workers BRPOP from; Celery publishes to the anonymous exchange with the queue as routing key,
so nothing else is needed for delivery. The `_kombu.binding.<queue>` entry a Celery producer
declares is added too (once per queue), so the broker looks exactly as if Celery had sent.

Batches are group-committed (the core's `GroupCommit`, one per event loop): a request's batch is
queued, and a task on the loop sends everything queued so far in one round trip, then starts over
with what arrived meanwhile. An idle broker sees each batch at once; a busy one sees few, large
commands instead of one per request, which is what makes many concurrent requests cheap.

A group is one LPUSH per queue (MULTI/EXEC when several), with each message's
`taskbridge:queued:<id>` marker (so that status can tell a queued call from an unknown one) SET
in the same pipeline after the push when there is a result backend. The worker's claim deletes
the marker; its TTL (the visibility timeout plus the call's delay) only bounds the marker of a
call no worker claims. A group holding a call with an idempotency key is sent as one Lua script
instead (`_keys.DISPATCH_SCRIPT`), atomically: per message, unless Redis's clock says it arrived
after its request's dispatch deadline (the request gave up and was answered 503: a link that
froze mid-write must not deliver it later), SET NX PX of its dedup key (skipping the push when
the key is held), its marker, and the LPUSH. Keyless calls are not sent that way: the script
costs the broker more than a plain LPUSH (measured: 1.71x instead of 1.79x `delay()`'s
requests/s), and a keyless batch can only arrive late if its bytes were on the wire when its
request gave up; such a batch runs once (see the README).

When the broker is the result backend's Redis, the call index (`_index`) is written in the same
round trip: its ADD is one more command of the pipeline, an EVALSHA after the push (the plain
LPUSH becomes a two-command pipeline), or, for a group with idempotency keys, part of the
dispatch script itself, for the calls it queued.

A `sentinel://` broker is reached through redis.asyncio's Sentinel client (`_sentinel`), with
the transport options kombu's workers read (`master_name`, `sentinel_kwargs`): each connection
goes to the master the Sentinels name, so dispatch follows a failover.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio
from redis.exceptions import RedisError

from taskbridge.backends import (
    ADD_SCRIPT,
    GroupCommit,
    composed_args,
    dispatch_deadline,
    run_with_index,
)

from ._index import DISPATCH_INDEXED, IndexSpec, Row, row
from ._keys import DISPATCH_SCRIPT, dedup_key, marker_value, queued_key, with_call
from ._protocol import TaskMessage, redis_binding, redis_envelope, redis_queue_key
from ._sentinel import async_redis, close_async_redis

__all__ = ["LateBatch", "RedisPublisher"]


class LateBatch(RedisError):
    """Redis refused a batch that reached it after its request's dispatch deadline."""

    def __init__(self, count: int) -> None:
        super().__init__(
            f"Redis received {count} call(s) after the dispatch deadline and refused them; "
            "none was queued"
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    queue: str
    key: str
    """The Redis list of the queue."""
    envelope: bytes
    id: str
    marker: bytes
    key_ttl_ms: int
    """0 for a call without an idempotency key."""
    deadline_ms: int = 0
    """When the request sending it gives up (epoch ms); 0: never."""
    marker_ttl_ms: int = 0
    """Life of its `queued` marker; 0: none is written."""
    row: Row | None = None
    """Its row of the call index's ADD; None: not indexed here."""
    queued: bytes = b""
    """Its `queued` marker's value (with the call, see `_keys.with_call`); b"": none."""


@dataclass
class _LoopState:
    """The client and the group commit of one event loop."""

    loop: asyncio.AbstractEventLoop
    client: redis.asyncio.Redis
    group: GroupCommit[list[_Entry], list[str]]


class RedisPublisher:
    """Sends task messages to a Redis broker from the event loop, without blocking it."""

    errors: tuple[type[BaseException], ...] = (RedisError, OSError)
    """What a failed publish raises (mapped to BackendUnavailable by the backend)."""

    def __init__(
        self,
        url: str,
        transport_options: Mapping[str, Any],
        timeout: float,
        *,
        key_prefix: str = "",
        marker_ttl: float = 0,
        index: IndexSpec | None = None,
    ) -> None:
        """`key_prefix` prefixes the marker and dedup keys; `marker_ttl` is how long a `queued`
        marker outlives its call's delay, in seconds, if no worker claims the call (0: write
        none, and push with plain LPUSH); `index`, the call index to add the calls to in the
        same round trip (the broker's Redis is the result backend's)."""
        self._url = url
        self._transport = dict(transport_options)
        self._timeout = timeout
        self._prefix = key_prefix
        self._marker_ttl_ms = round(marker_ttl * 1000)
        self._state: _LoopState | None = None
        self._bound: set[str] = set()
        self._script: Any = None
        self._index = index
        self._add: Any = None

    def _for_loop(self) -> _LoopState:
        # redis.asyncio connections belong to the loop that opened them; scripts may run
        # several loops one after the other (asyncio.run per call), so follow the loop.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            client = async_redis(self._url, self._transport, self._timeout)

            async def send(group: list[list[_Entry]]) -> list[list[str] | BaseException]:
                return await self._send_group(client, group)

            # Every group goes from a task of its own (not inline): a request that gives up
            # never interrupts a send that carries other requests' messages.
            commit = GroupCommit(send, inline=False, size=len, name="taskbridge-celery:publish")
            self._state = _LoopState(loop, client, commit)
        return self._state

    async def ping(self) -> None:
        """Connect if needed and make one round trip to the broker."""
        await self._for_loop().client.ping()

    async def publish(self, messages: Sequence[TaskMessage]) -> list[str]:
        """Send `messages` (atomically, with the batches waiting alongside); return once Redis
        has them, with the ids of the keyed calls skipped because their key was held."""
        state = self._for_loop()
        marker_ms = self._marker_ttl_ms
        indexed = self._index is not None
        deadline = dispatch_deadline()
        deadline_ms = 0 if deadline is None else int(deadline * 1000)
        entries = []
        for m in messages:
            keyed = m.key_ttl is not None
            marker = marker_value(m.task, m.enqueued_at) if marker_ms or keyed else b""
            entries.append(
                _Entry(
                    m.queue,
                    redis_queue_key(m.queue, self._transport),
                    redis_envelope(m),
                    m.id,
                    marker,
                    0 if m.key_ttl is None else max(1, round(m.key_ttl * 1000)),
                    deadline_ms,
                    marker_ms + m.delay_ms if marker_ms else 0,
                    row(m) if indexed else None,
                    with_call(marker, m.body) if marker_ms else b"",
                )
            )
        return await state.group.submit(entries)

    async def _send_group(
        self, client: redis.asyncio.Redis, group: list[list[_Entry]]
    ) -> list[list[str] | BaseException]:
        """Send a group of batches in one round trip; per batch, the ids of its keyed calls
        skipped (key held), or LateBatch when Redis refused some for their deadline."""
        skipped, late = await self._send(client, [e for entries in group for e in entries])
        results: list[list[str] | BaseException] = []
        start = 0
        for entries in group:
            refused = sum(start <= i < start + len(entries) for i in late)
            if refused:
                results.append(LateBatch(refused))
            else:
                results.append([e.id for i, e in enumerate(entries, start) if i in skipped])
            start += len(entries)
        return results

    async def _send(
        self, client: redis.asyncio.Redis, entries: list[_Entry]
    ) -> tuple[set[int], set[int]]:
        """Send `entries`; return the positions of those skipped (dedup key held) and of those
        Redis refused because they arrived after their dispatch deadline."""
        unbound = list(dict.fromkeys(e.queue for e in entries if e.queue not in self._bound))
        if any(e.key_ttl_ms for e in entries):
            skipped, late = await self._send_script(client, entries, unbound)
            self._bound.update(unbound)
            return skipped, late
        by_key: dict[str, list[bytes]] = {}
        for entry in entries:
            by_key.setdefault(entry.key, []).append(entry.envelope)
        marker_ttl, index = self._marker_ttl_ms, self._index
        if len(by_key) == 1 and not unbound and not marker_ttl and index is None:
            # The common case: one LPUSH of every message, atomic by itself. LPUSH of several
            # values keeps their order: the worker BRPOPs the oldest first.
            ((key, envelopes),) = by_key.items()
            await cast("Awaitable[int]", client.lpush(key, *envelopes))  # typed sync|async
            return set(), set()
        # Several queues (or a queue's first use) go in MULTI/EXEC, so the batch stays atomic;
        # a single queue's LPUSH is atomic by itself, and its markers need not be (a marker
        # only makes status say "queued" until a worker stores STARTED).
        pipe = client.pipeline(transaction=len(by_key) > 1 or bool(unbound))
        for queue in unbound:
            pipe.sadd(*redis_binding(queue, self._transport))
        for key, envelopes in by_key.items():
            pipe.lpush(key, *envelopes)
        if marker_ttl:
            prefix = self._prefix
            for entry in entries:  # after the push: a marker never names a call not queued
                pipe.set(queued_key(prefix, entry.id), entry.queued, px=entry.marker_ttl_ms)
        if index is None:
            await pipe.execute()
        else:  # last, after the push (the index names calls queued), in the same round trip
            if self._add is None:
                self._add = client.register_script(ADD_SCRIPT)
            rows = [entry.row for entry in entries if entry.row is not None]
            await run_with_index(pipe, self._add, [index.add(rows)], client=client)
        self._bound.update(unbound)
        return set(), set()

    async def _send_script(
        self, client: redis.asyncio.Redis, entries: list[_Entry], unbound: list[str]
    ) -> tuple[set[int], set[int]]:
        index = self._index
        if self._script is None:
            script = DISPATCH_SCRIPT if index is None else DISPATCH_INDEXED
            self._script = client.register_script(script)
        bindings = [redis_binding(queue, self._transport) for queue in unbound]
        keys: list[str] = [key for key, _ in bindings]
        args: list[Any] = [len(bindings), *(member for _, member in bindings)]
        prefix = self._prefix
        for entry in entries:
            keys += (entry.key, queued_key(prefix, entry.id), dedup_key(prefix, entry.id))
            args += (
                entry.envelope,
                entry.marker,
                entry.key_ttl_ms,
                entry.deadline_ms,
                entry.marker_ttl_ms,
                entry.queued,
            )
        if index is not None:  # the calls the script queues are indexed by the same script
            rows = [entry.row for entry in entries if entry.row is not None]
            args = composed_args(args, index.add(rows))
        positions = [int(p) for p in await self._script(keys=keys, args=args, client=client)]
        return {p - 1 for p in positions if p > 0}, {-p - 1 for p in positions if p < 0}

    async def close(self) -> None:
        """Let the last flush finish, then close the current loop's connections."""
        state, self._state = self._state, None
        if state is None or state.loop is not asyncio.get_running_loop():
            return
        await state.group.wait_idle()
        await close_async_redis(state.client)
