"""How the in-process backend with `status_url` writes its calls' status to the shared Redis:
off the request's path, batched.

Dispatch and the runner write to the process's own MemoryStatusStore as without a shared store
(a SharedStatusStore, which also notes the id of each call that changed); a background task on
the event loop, the StatusWriter, sends the noted calls in one pipeline per batch: each call's
record (`P:call:<id>`, JSON, TTL `status_ttl`), then one index ADD for the calls new since the
last batch and one script moving the others to their current state (`_ledger`'s scripts, which
publish each id on `P:events`). A batch sends each call's latest record (changes in between
are merged), at most one batch every `status_flush_interval` (5 ms): the first change after a
quiet spell is sent as soon as the loop is free, later ones wait for the interval to end (or
for 1,000 of them). So another process sees a call a moment after its dispatch (one round trip
to Redis when the process is quiet, up to the interval when it is busy), not before: a status
asked of another process in between answers unknown.

Losing Redis never fails a request or a task: the batch stays pending and is sent with the next
one (after a backoff up to 2 s), the local store keeps answering, and one warning is logged per
outage. What waits is bounded: one id per call, at most `status_max_entries` of them (the
oldest are dropped past that, as the local store drops them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from .._codec import encode_json
from .._ledger import ADD_SCRIPT, MOVE_SCRIPT, add_args
from .._status import MemoryStatusStore

__all__ = [
    "ADDED",
    "BATCH",
    "MOVES_SCRIPT",
    "Outage",
    "SharedStatusStore",
    "StatusWriter",
    "record_key",
]

logger = logging.getLogger("taskbridge")

ADDED, RESTORED = 1, 2
"""Flags of a pending call: queued since the last batch (the index ADDs it); in a batch that
Redis may or may not have taken (it is MOVEd too, in case the ADD went through)."""
BATCH = 1000
"""Most calls one pipeline sends; as many waiting send the batch at once."""

MOVES_SCRIPT = f"""
local function move(ARGV)
{MOVE_SCRIPT}
end
-- ARGV: prefix, now (ms), ttl (ms), max entries, then per call: id, state, task, enqueue ms
for i = 5, #ARGV, 4 do
  move({{ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}})
end
return 1
"""
"""The index MOVE of several calls in one script."""

_ERRORS = (RedisError, OSError, TimeoutError)


def record_key(prefix: str, task_id: str) -> str:
    """The key of a call's record."""
    return f"{prefix}:call:{task_id}"


class Outage:
    """Logs that Redis cannot be reached once per outage (and again each minute it lasts), and
    that it can again."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False
        self._logged = 0.0

    def failed(self, exc: BaseException, consequence: str) -> None:
        now = time.monotonic()
        if not self.down or now - self._logged > 60:
            logger.warning(
                "%s is unreachable (%s: %s); %s", self.what, type(exc).__name__, exc, consequence
            )
            self._logged = now
        self.down = True

    def recovered(self, news: str = "") -> None:
        if self.down:
            self.down = False
            logger.info("%s is reachable again%s", self.what, news)


class SharedStatusStore(MemoryStatusStore):
    """A MemoryStatusStore that notes each call that changed, for its StatusWriter."""

    def __init__(self, max_entries: int = 100_000, ttl: float = 3600.0) -> None:
        super().__init__(max_entries, ttl)
        self.note: Callable[[str, int], None] = _nowhere
        """Told the id of each call that changed (and `ADDED` for a new one); from any thread."""

    def queued(
        self,
        task_id: str,
        task_name: str,
        backend: str,
        enqueued_at: float | None,
        retry_of: str | None = None,
    ) -> None:
        super().queued(task_id, task_name, backend, enqueued_at, retry_of)
        self.note(task_id, ADDED)

    def change(
        self, task_id: str, task_name: str | None, backend: str | None, **fields: Any
    ) -> None:
        super().change(task_id, task_name, backend, **fields)
        self.note(task_id, 0)

    def update(self, task_id: str, **fields: Any) -> None:
        super().update(task_id, **fields)
        self.note(task_id, 0)

    def keep(
        self, task_id: str, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        super().keep(task_id, task_name, args, kwargs)
        self.note(task_id, 0)


class StatusWriter:
    """Sends the calls a SharedStatusStore noted to Redis, in batches (see the module)."""

    def __init__(
        self,
        store: MemoryStatusStore,
        prefix: str,
        *,
        ttl: float,
        max_entries: int,
        interval: float,
        where: str,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self.max_entries = max_entries
        self.interval = interval
        self.pending: dict[str, int] = {}
        """Ids of the calls to send, oldest first, with their flags."""
        self.dropped = 0
        """Calls dropped from `pending` past its bound since the last successful batch."""
        self.outage = Outage(f"the shared status store {where}")
        self._lock = threading.Lock()
        self._client: Any = None
        self._scripts: tuple[Any, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- from the store (any thread) ------------------------------------------------------

    def note(self, task_id: str, flags: int) -> None:
        """`task_id` changed; wake the writer for the first change of a batch, and hurry it
        once a batch is full."""
        with self._lock:
            pending = self.pending
            first = not pending
            pending[task_id] = pending.get(task_id, 0) | flags
            size = len(pending)
            if size > self.max_entries:
                self._trim()
        if first or size == BATCH:
            self._signal(self._wake if first else self._hurry)

    def _trim(self) -> None:
        """Drop the oldest pending calls past the bound; under the lock."""
        pending = self.pending
        while len(pending) > self.max_entries:
            del pending[next(iter(pending))]
            self.dropped += 1

    def _signal(self, event: asyncio.Event) -> None:
        loop = self._loop
        if loop is None:
            return  # not started: `start` looks at what is pending
        if threading.get_ident() == self._thread:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    # -- the background task --------------------------------------------------------------

    def start(self, client: Any) -> None:
        """Write through `client` (a redis.asyncio client) from a task on the running loop."""
        self._client = client
        self._scripts = (client.register_script(ADD_SCRIPT), client.register_script(MOVES_SCRIPT))
        self._wake, self._hurry = asyncio.Event(), asyncio.Event()
        self._closing = False
        loop = asyncio.get_running_loop()
        self._thread, self._loop = threading.get_ident(), loop
        if self.pending:
            self._wake.set()
        self._task = loop.create_task(self._run(), name=f"taskbridge status writer {self.prefix}")

    async def _run(self) -> None:
        wake, hurry, loop = self._wake, self._hurry, asyncio.get_running_loop()
        backoff, last = 0.0, -self.interval
        while True:
            await wake.wait()
            # a batch at most every `interval`: the first change after a quiet spell goes at
            # once, those that follow it gather until the interval is over (or a batch is full)
            linger = last + self.interval - loop.time()
            if linger > 0 and not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(linger):
                        await hurry.wait()
            wake.clear()
            hurry.clear()
            sent = await self.flush()
            last = loop.time()
            if self._closing and (not sent or not self.pending):
                return
            if sent:
                backoff = 0.0
                continue
            backoff = min(2.0, max(0.1, backoff * 2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await hurry.wait()  # (set by `close`)
            wake.set()

    async def flush(self) -> bool:
        """Send what is pending (up to BATCH calls, the oldest) in one pipeline. False when
        Redis did not take it: the calls stay pending, for the next batch."""
        with self._lock:
            if len(self.pending) <= BATCH:
                batch, self.pending = self.pending, {}
            else:
                batch = dict(islice(self.pending.items(), BATCH))
                for task_id in batch:
                    del self.pending[task_id]
        if not batch:
            return True
        try:
            await self._send(batch)
        except _ERRORS as exc:
            self._restore(batch)
            self.outage.failed(
                exc,
                "in-process calls' status is kept in this process, and "
                "written there once it is back",
            )
            return False
        except BaseException:
            self._restore(batch)
            raise
        if self.outage.down:
            dropped, self.dropped = self.dropped, 0
            self.outage.recovered(
                f"; the status of {dropped} call(s) could not be kept waiting" if dropped else ""
            )
        if self.pending:
            self._wake.set()
        return True

    def _restore(self, batch: dict[str, int]) -> None:
        """Put a batch that may not have been written back in front of what is pending."""
        with self._lock:
            merged = {task_id: flags | RESTORED for task_id, flags in batch.items()}
            for task_id, flags in self.pending.items():
                merged[task_id] = merged.get(task_id, 0) | flags
            self.pending = merged
            self._trim()

    async def _send(self, batch: dict[str, int]) -> None:
        assert self._scripts is not None
        prefix, ttl_ms, fields_of = self.prefix, self.ttl_ms, self.store.fields
        pipe = self._client.pipeline(transaction=False)
        added: list[tuple[str, int, str, str, str | None]] = []
        moved: list[Any] = []
        for task_id, flags in batch.items():
            fields = fields_of(task_id)
            if fields is None:
                continue  # dropped from this process's store meanwhile
            pipe.set(record_key(prefix, task_id), _encoded(fields), px=ttl_ms)
            enqueued = fields.get("enqueued_at")
            score = None if enqueued is None else round(enqueued * 1000)  # (ms / 1000)
            state, task = fields["state"], fields.get("task_name") or ""
            if flags & ADDED and score is not None:
                added.append((task_id, score, state, task, fields.get("retry_of")))
                if not flags & RESTORED:
                    continue
            moved += (task_id, state, task, "" if score is None else score)
        now_ms = time.time_ns() // 1_000_000
        add, moves = self._scripts
        scripts = []
        if added:
            scripts.append((add, add_args(prefix, now_ms, ttl_ms, self.max_entries, added)))
        if moved:
            scripts.append((moves, [prefix, now_ms, ttl_ms, self.max_entries, *moved]))
        for script, args in scripts:
            pipe.evalsha(script.sha, 0, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        split = len(replies) - len(scripts)
        for reply in replies[:split]:
            if isinstance(reply, Exception):
                raise reply
        for (script, args), reply in zip(scripts, replies[split:], strict=True):
            if isinstance(reply, NoScriptError):  # a new or restarted server: load, run again
                await script(args=args)
            elif isinstance(reply, Exception):
                raise reply

    async def close(self, timeout: float) -> None:
        """Send what is pending (within `timeout`), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        self._hurry.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled() and task.exception() is not None:
            logger.error("the status writer failed", exc_info=task.exception())
        self._loop = None
        if self.pending:
            logger.warning(
                "%d in-process call(s)' status not written to the shared status store at close",
                len(self.pending),
            )


def _nowhere(task_id: str, flags: int) -> None:
    """Where a SharedStatusStore's changes go before it has a writer."""


def _encoded(fields: dict[str, Any]) -> bytes:
    try:
        return encode_json(fields)
    except (TypeError, ValueError):  # a result JSON accepts only loosely (non-str keys)
        fields["result"] = repr(fields.get("result"))
        return encode_json(fields)
