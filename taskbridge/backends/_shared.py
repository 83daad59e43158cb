"""What the in-process backend does with `status_url` (`SharedStatus`): every API process
records its in-process calls in one Redis and answers for all of them (status, list, counts,
events, retry, cancel). The backend (`_builtin.SharedInProcessBackend`) runs calls as ever.

- **Writes** go through the process's own store, then a batch writer (`_status_writer`): off
  the request's path, and never a cause of failure for a request or a task.
- **Reads**: a call that ran here is answered from this process's store (the freshest), any
  other from its record in Redis (`statuses`: one MGET for all of them). The list, the counts
  and the events come from the index every process writes there (`RedisIndex`); its events
  channel wakes the watchers of this process's calls as soon as they change here too.
- **Retry** from any process: a failed or cancelled call's arguments, when they are JSON (at
  most 64 KiB), are written with its record. Others are kept in the process that ran it only.
- **Cancel** from any process: a process asked to cancel a call it does not have publishes the
  request on `P:cancel`; the process running the call cancels it as it cancels its own calls,
  and answers on a reply list the asker waits on for a second. The asker answers what the owner
  did; without an answer in time (its process stopped, or Redis is down) it answers
  `cancelled=False` and says so.

While Redis cannot be reached, status reads of other processes' calls answer "unknown" (logged),
and the list and counts show this process's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .._backends import redact_url
from .._codec import encode_json
from .._exceptions import BackendUnavailable
from .._ledger import Counts, Cursor, IndexPage, RedisIndex
from .._status import (
    RETRYABLE_STATES,
    CancelResult,
    KeptCall,
    MemoryIndex,
    TaskStatus,
    timestamp,
)
from ._redis_url import sentinel_address
from ._status_writer import Outage, SharedStatusStore, StatusWriter, record_key

__all__ = [
    "SharedIndex",
    "SharedStatus",
    "SharedStatusStore",
    "decode_record",
    "redis_client",
]

logger = logging.getLogger("taskbridge")

TIMEOUT = 2.0
"""Seconds to connect to Redis, and for each command."""
CANCEL_WAIT = 1
"""Seconds a cancellation of another process's call waits for that process's answer."""
_ERRORS = (RedisError, OSError, TimeoutError)


def redis_client(url: str, sentinel_master: str) -> redis.asyncio.Redis:
    """A redis.asyncio client of `url`; for a `sentinel://` URL, of the master named
    `sentinel_master`, found through the Sentinels (again after a failover). A lost connection
    is retried once, at once; nothing else is (callers handle a failure, they never wait on it).
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": TIMEOUT,
        "socket_timeout": TIMEOUT,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "retry_on_error": [RedisConnectionError],
    }
    address = sentinel_address(url)
    if address is None:
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(url, **options)
        return client
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        address.sentinels,
        sentinel_kwargs={"socket_connect_timeout": TIMEOUT, "socket_timeout": TIMEOUT},
    )
    master: redis.asyncio.Redis = sentinel.master_for(
        sentinel_master,
        db=address.db,
        username=address.username,
        password=address.password,
        **options,
    )
    return master


async def close_client(client: redis.asyncio.Redis) -> None:
    """Close a client of `redis_client`, and its connections to the Sentinels."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def decode_record(task_id: str, raw: bytes | str | None) -> TaskStatus | None:
    """The status in a call's record (None for none, or one that does not read)."""
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        for name in ("enqueued_at", "started_at", "finished_at"):
            if name in fields:
                fields[name] = timestamp(fields[name])
        return TaskStatus(id=task_id, **fields)
    except (ValueError, TypeError, ValidationError) as exc:
        logger.warning("the shared status record of %s does not read (%s); ignored", task_id, exc)
        return None


class SharedIndex:
    """Every API process's in-process calls, from their index in Redis; while Redis cannot be
    reached, this process's own (from its store)."""

    def __init__(self, shared: RedisIndex, local: MemoryIndex, outage: Outage) -> None:
        self.shared = shared
        self.local = local
        self.outage = outage

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        try:
            found = await self.shared.page(state=state, task=task, after=after, limit=limit)
        except _ERRORS as exc:
            self.outage.failed(exc, "listing this process's in-process calls only")
            return await self.local.page(state=state, task=task, after=after, limit=limit)
        self.outage.recovered()
        return found

    async def counts(self) -> Counts:
        try:
            found = await self.shared.counts()
        except _ERRORS as exc:
            self.outage.failed(exc, "counting this process's in-process calls only")
            return await self.local.counts()
        self.outage.recovered()
        return found

    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        return self.shared.watch(task_id)

    async def close(self) -> None:
        await self.shared.close()


class CancelRelay:
    """Cancellation across API processes: requests on the `P:cancel` channel, answered by the
    process that runs the call on the reply list each request names."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str,
        answer: Callable[[str], Awaitable[CancelResult | None]],
        outage: Outage,
    ) -> None:
        self.client: Any = client  # (redis-py's types of blocking commands vary by version)
        self.prefix = prefix
        self.channel = f"{prefix}:cancel"
        self.answer = answer
        """This process's cancellation of a call, or None when it does not have it."""
        self.outage = outage
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._listen(), name=f"taskbridge cancellations {self.channel}"
        )

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        await self._answer(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.outage.failed(exc, "cancellations from other API processes wait for it")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _answer(self, data: bytes | str) -> None:
        try:
            request = json.loads(data)
            task_id, reply = str(request["id"]), str(request["reply"])
        except (ValueError, TypeError, KeyError):
            return
        result = await self.answer(task_id)
        if result is None:
            return  # not a call of this process
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, result.model_dump_json())
            pipe.pexpire(reply, 10_000)
            await pipe.execute()

    async def request(self, known: TaskStatus) -> CancelResult:
        """Ask the process running `known`'s call to cancel it, and answer what it did."""
        reply = f"{self.prefix}:cancel-reply:{uuid.uuid4().hex}"
        try:
            await self.client.publish(self.channel, encode_json({"id": known.id, "reply": reply}))
            answer = await self.client.blpop([reply], timeout=CANCEL_WAIT)
        except _ERRORS as exc:
            return CancelResult(
                id=known.id,
                cancelled=False,
                state=known.state,
                detail="the call runs in another API process, and the shared status store "
                f"cannot be reached to ask it ({type(exc).__name__}: {exc})",
            )
        if answer is not None:
            with contextlib.suppress(ValidationError):
                return CancelResult.model_validate_json(answer[1])
        return CancelResult(
            id=known.id,
            cancelled=False,
            state=known.state,
            detail="the call runs in another API process, which was asked to cancel it and did "
            f"not answer within {CANCEL_WAIT:g}s (it may have stopped); if it still runs the "
            "call, it cancels it",
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class SharedStatus:
    """What `status_url` adds to the in-process backend (see this module): the Redis client,
    the writer, the shared index, the reads of other processes' calls and the cancellation
    relay. Built with the backend; started on the running loop by its `open` (or by its first
    dispatch, when no lifespan opened the bridge)."""

    def __init__(
        self,
        store: SharedStatusStore,
        local: MemoryIndex,
        cancel_here: Callable[[str], Awaitable[CancelResult | None]],
        *,
        url: str,
        prefix: str,
        sentinel_master: str,
        ttl: float,
        max_entries: int,
        interval: float,
    ) -> None:
        self.store, self.local, self.cancel_here = store, local, cancel_here
        self.url, self.prefix, self.sentinel_master = url, prefix, sentinel_master
        self.ttl, self.max_entries = ttl, max_entries
        self.where = f"{redact_url(url)} ({prefix})"
        self.writer = StatusWriter(
            store, prefix, ttl=ttl, max_entries=max_entries, interval=interval, where=self.where
        )
        store.note = self.writer.note
        self.outage = Outage(f"the shared status store {self.where}")
        self.client: redis.asyncio.Redis | None = None
        self.index: SharedIndex | None = None
        self._relay: CancelRelay | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop it runs on (None before `start` and after `close`)."""

    def start(self) -> None:
        """Connect (lazily: no I/O here) and start the writer and the cancellation listener
        on the running loop, unless they run there already."""
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        # (a loop that changed left the old connections to it: they are not used again)
        client = redis_client(self.url, self.sentinel_master)
        shared = RedisIndex(client, self.prefix, ttl=self.ttl, max_entries=self.max_entries)
        # one set of watchers, for the changes made here and those the others publish
        self.store.watchers = shared.hub.watchers
        self.index = SharedIndex(shared, self.local, self.outage)
        self._relay = CancelRelay(client, self.prefix, self.cancel_here, self.outage)
        self._relay.start()
        self.writer.start(client)
        self.client, self.loop = client, loop

    async def close(self) -> None:
        """Write what waits (a few seconds at most), then disconnect."""
        client, self.client, self.loop = self.client, None, None
        if client is None:
            return
        await self.writer.close(timeout=2 * TIMEOUT)
        relay, index, self._relay, self.index = self._relay, self.index, None, None
        for part in (relay, index):
            if part is not None:
                await part.close()
        with contextlib.suppress(*_ERRORS):
            await close_client(client)

    async def ping(self) -> str:
        self.start()
        assert self.client is not None
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.client.ping()
        except _ERRORS as exc:
            raise BackendUnavailable(
                f"the shared status store {self.where} does not answer "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return f"in the API processes; status shared in {self.where}"

    async def read(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """The records of `task_ids` in Redis, in one MGET (None each while it is down)."""
        client = self.client
        if client is None:
            return [None] * len(task_ids)
        try:
            raw = await client.mget([record_key(self.prefix, task_id) for task_id in task_ids])
        except _ERRORS as exc:
            self.outage.failed(exc, "other API processes' in-process calls read as unknown")
            return [None] * len(task_ids)
        self.outage.recovered()
        return [decode_record(task_id, data) for task_id, data in zip(task_ids, raw, strict=True)]

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The JSON arguments written with a failed or cancelled call's record."""
        [status] = await self.read([task_id])
        if status is None or status.state not in RETRYABLE_STATES or status.args is None:
            return None
        return KeptCall(status.task_name or "", tuple(status.args), dict(status.kwargs or {}))

    async def cancel(self, task_id: str) -> CancelResult:
        """Cancel a call of another process, through the process that runs it."""
        [known] = await self.read([task_id])
        if known is None:
            return CancelResult(
                id=task_id, cancelled=False, state="unknown", detail="no API process has this call"
            )
        if known.done:
            return CancelResult(
                id=task_id, cancelled=False, state=known.state, detail=f"already {known.state}"
            )
        assert self._relay is not None
        return await self._relay.request(known)
