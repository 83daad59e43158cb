"""The call index of a Celery alias (taskbridge's `RedisIndex`), kept in the result backend's
Redis under `<key_prefix>taskbridge:index`, and where each of its writes sits.

Every write travels with the engine write it accompanies, never in a round trip of its own:

- dispatch, broker and results in one Redis: the index ADD is one more command of the publish
  pipeline (after the LPUSH), or, for a group with idempotency keys, part of the dispatch script
  (`DISPATCH_INDEXED`: only the calls the script queued are added);
- dispatch, results in another Redis (or a RabbitMQ broker): the ADD goes to the results' Redis
  once the broker took the calls, without the request waiting for it (with RabbitMQ, in the
  script that writes the `queued` markers there), one per group of concurrent batches
  (`BesideWriter`); a read in the same process waits for it; a failed write is logged, never
  raised (the calls were sent);
- the worker: its claim (running), each progress report (a change, no new state) and each result
  store (retrying, succeeded, failed, cancelled) run the index MOVE in the same script as the
  result write (`CLAIM_INDEXED`, `PROGRESS_INDEXED`, `STORE_INDEXED`);
- the API's cancellation of a call not started: in the revoke script (`REVOKE_INDEXED`).

A composed script runs the engine's script as it is, then the index script under `pcall`: an
index that fails (logged in the Redis server's log) never fails the write it accompanies.

The worker learns the index's place from its Celery configuration (`INDEX_SETTING`, set by
`build_app`), as the API side does from the alias's options.

Kept arguments: a call that failed for good, or was cancelled, keeps its `args` and `kwargs` in
its result meta (the field names of Celery's `result_extended`, so Flower shows them), unless
their JSON is over `KEPT_LIMIT` bytes; `POST /tasks/{id}/retry` runs it again with them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskbridge.backends import (
    ADD_SCRIPT,
    MOVE_SCRIPT,
    add_args,
    compose_with_index,
    composed_args,
    index_lost,
    move_args,
)

from ._keys import (
    CLAIM_SCRIPT,
    DISPATCH_SCRIPT,
    KEPT_LIMIT,
    PROGRESS_SCRIPT,
    REVOKE_SCRIPT,
    STATES,
    own_prefix,
    result_expires,
    to_ms,
)
from ._options import CeleryOptions, celery_config, markers_with_results, redis_transport
from ._protocol import TaskMessage

__all__ = [
    "ADD_CHECKED",
    "BESIDE_BOUND",
    "CLAIM_INDEXED",
    "DISPATCH_INDEXED",
    "INDEX_SETTING",
    "KEPT_LIMIT",
    "MARK_INDEXED",
    "MARK_SCRIPT",
    "PROGRESS_INDEXED",
    "RESULTS_SCRIPT",
    "REVOKE_INDEXED",
    "STORE_INDEXED",
    "BesideWriter",
    "IndexSpec",
    "Mark",
    "Row",
    "index_spec",
    "index_with_broker",
    "kept_arguments",
    "row",
]

logger = logging.getLogger("taskbridge.celery")

INDEX_SETTING = "taskbridge_index"
"""A setting of taskbridge's own in the Celery configuration, present when the alias keeps an
index: `{"prefix", "ttl_ms", "max_entries"}` (see `IndexSpec`)."""

NEVER_MS = 100 * 365 * 86_400_000
"""The index's life of a call when results never expire (`result_expires` of 0 or None): its
size bound alone applies."""

Row = tuple[str, int, str, str, str | None]
"""One call for the index ADD: id, enqueue time (epoch ms), state, task, retry_of."""


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """Where an alias keeps its index, and its bounds."""

    prefix: str
    ttl_ms: int
    """How long the index keeps a call after its enqueue (Celery's `result_expires`)."""
    max_entries: int

    def setting(self) -> dict[str, Any]:
        """This spec as the value of `INDEX_SETTING`."""
        return {"prefix": self.prefix, "ttl_ms": self.ttl_ms, "max_entries": self.max_entries}

    @classmethod
    def from_setting(cls, value: object) -> IndexSpec | None:
        """The spec a Celery configuration carries (None when it keeps no index)."""
        if not isinstance(value, Mapping):
            return None
        try:
            spec = cls(str(value["prefix"]), int(value["ttl_ms"]), int(value["max_entries"]))
        except (KeyError, TypeError, ValueError):
            return None
        return spec if spec.max_entries > 0 else None

    def add(self, rows: Sequence[Row]) -> list[Any]:
        """The ADD script's ARGV for `rows`."""
        return add_args(self.prefix, _now_ms(), self.ttl_ms, self.max_entries, rows)

    def move(
        self, task_id: str, state: str | None, task: object = None, enqueued_at: object = None
    ) -> list[Any]:
        """The MOVE script's ARGV: `task_id` is now in `state` (None: it only changed); `task`
        and `enqueued_at` (epoch seconds) index it again if the index lost it."""
        enqueued = None
        if isinstance(enqueued_at, int | float) and not isinstance(enqueued_at, bool):
            enqueued = to_ms(enqueued_at)
        return move_args(
            self.prefix,
            _now_ms(),
            self.ttl_ms,
            self.max_entries,
            task_id,
            state,
            task if isinstance(task, str) else None,
            enqueued,
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def row(message: TaskMessage) -> Row:
    """The index ADD's row of a dispatched message: queued, as of its enqueue time."""
    return (message.id, to_ms(message.enqueued_at), "queued", message.task, message.retry_of)


def index_spec(options: CeleryOptions) -> IndexSpec | None:
    """The index of an alias: None without a result backend or with `index_max_entries=0`."""
    if options.result_backend is None or options.index_max_entries <= 0:
        return None
    expires = result_expires(options)
    return IndexSpec(
        f"{own_prefix(options)}taskbridge:index",
        expires * 1000 if expires > 0 else NEVER_MS,
        options.index_max_entries,
    )


def index_with_broker(options: CeleryOptions) -> bool:
    """Whether the broker is the result backend's Redis, where the call index is (so that the
    publish carries the index's writes)."""
    if not redis_transport(options):
        return False
    config = celery_config(options)
    return markers_with_results(
        options, config["broker_transport_options"], config["result_backend_transport_options"]
    )


def kept_arguments(args: object, kwargs: object) -> dict[str, Any] | None:
    """`{"args": [...], "kwargs": {...}}` to keep in a result meta; None when they are not
    JSON, or their JSON is over `KEPT_LIMIT` bytes."""
    if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping | None):
        return None
    kept = {"args": list(args), "kwargs": dict(kwargs or {})}
    try:
        size = len(json.dumps(kept, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        return None
    return kept if size <= KEPT_LIMIT else None


# -- composed scripts -------------------------------------------------------------------------


# Dispatch (keyed groups): ADD only the calls the script queued (its result lists the positions
# it skipped, negated for those refused for their deadline).
DISPATCH_INDEXED = compose_with_index(
    DISPATCH_SCRIPT,
    ADD_SCRIPT,
    """
local skipped = {}
for _, position in ipairs(result) do skipped[math.abs(position)] = true end
local argv = {rest[1], rest[2], rest[3], rest[4]}
for i = 5, #rest, 5 do
  if not skipped[(i - 5) / 5 + 1] then
    for j = i, i + 4 do argv[#argv + 1] = rest[j] end
  end
end
if #argv > 4 then index(argv) end
""",
)

# The claim stored STARTED (it returns false): running. Else it found the call revoked or
# succeeded (a message delivered again), which the index says too.
CLAIM_INDEXED = compose_with_index(
    CLAIM_SCRIPT,
    MOVE_SCRIPT,
    """
if result then
  local found = cjson.decode(result).status
  rest[6] = (found == 'SUCCESS' and 'succeeded') or (found == 'REVOKED' and 'cancelled') or ''
end
index(rest)
""",
)

# A progress report stored (1): the call changed.
PROGRESS_INDEXED = compose_with_index(
    PROGRESS_SCRIPT, MOVE_SCRIPT, "if result == 1 then index(rest) end"
)

# The API's revoke stored REVOKED (false): cancelled.
REVOKE_INDEXED = compose_with_index(
    REVOKE_SCRIPT, MOVE_SCRIPT, "if not result then index(rest) end"
)

# Celery's result write (`RedisBackend._set`: SET, with EX when results expire, and PUBLISH on
# the key's channel for `AsyncResult.get`), atomic as Celery's MULTI/EXEC is.
# KEYS[1]: result key. ARGV[1]: meta; ARGV[2]: expiry in s (0: none).
STORE_SCRIPT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

STORE_INDEXED = compose_with_index(STORE_SCRIPT, MOVE_SCRIPT, "index(rest)")

# What a dispatch writes beside its publish, once the broker took the calls (see `BesideWriter`),
# runs after the worker may have claimed a call or stored its result, or after another API
# process cancelled it: such a call gets no `queued` marker (the claim, which deletes it, must
# not be undone), and its index row, if the worker's or the revoke's MOVE did not write one
# (the revoke knows no task without the marker), is added in the state of its result, never as
# queued. The scripts return the positions (from 1) of the calls that have a result.

# `queued` markers in the result backend's Redis (a RabbitMQ broker), each unless its call has
# a result already. KEYS: per call, its result key and its marker. ARGV: per call, the marker
# and its life in ms.
MARK_SCRIPT = """
local found = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('SET', KEYS[i + 1], ARGV[i], 'PX', ARGV[i + 1])
  else
    found[#found + 1] = (i + 1) / 2
  end
end
return found
"""

# No markers (only index rows): which calls have a result. KEYS: their result keys.
RESULTS_SCRIPT = """
local found = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then found[#found + 1] = i end
end
return found
"""


def _add_in_result_state(stride: int) -> str:
    """The Lua that ADDs the rows in `rest`, the state of each call with a result (`result`:
    their positions; the n-th's result key is `KEYS[stride * n - stride + 1]`) taken from it."""
    states = ", ".join(f"{celery} = '{state}'" for celery, state in STATES.items())
    return f"""
local STATES = {{{states}}}
local function restate()
  for _, n in ipairs(result) do
    local ok, meta = pcall(cjson.decode, redis.call('GET', KEYS[{stride} * n - {stride - 1}]) or '')
    local status = ok and type(meta) == 'table' and meta.status
    if type(status) == 'string' and status ~= 'PENDING' then
      rest[5 * n + 2] = STATES[status] or 'running'
    end
  end
end
local ok, err = pcall(restate)
if not ok then redis.log(redis.LOG_WARNING, 'taskbridge index: ' .. tostring(err)) end
index(rest)
"""


MARK_INDEXED = compose_with_index(MARK_SCRIPT, ADD_SCRIPT, _add_in_result_state(2))

ADD_CHECKED = compose_with_index(RESULTS_SCRIPT, ADD_SCRIPT, _add_in_result_state(1))


# -- the API side's writes --------------------------------------------------------------------


Mark = tuple[str, bytes, int]
"""A `queued` marker to write beside a publish: its key, its value and its life in ms."""

BESIDE_BOUND = 1000
"""How many dispatches' beside writes a loop keeps unfinished before a dispatch waits for them:
a results' Redis that is slow or down slows dispatch down, never grows memory without end."""


@dataclass(slots=True)
class _Write:
    ids: list[str]
    results: list[str]
    """The calls' result keys."""
    marks: list[Mark]
    """One per call, or none."""
    rows: list[Row]
    """One per call, or none."""
    done: asyncio.Future[None]


class BesideWriter:
    """Writes what a dispatch leaves in the result backend's Redis when the publish cannot carry
    it (a RabbitMQ broker, or a broker in another Redis): the calls' `queued` markers (RabbitMQ)
    and the call index's rows.

    `add` queues a write once the broker took the calls: the request does not wait for it (and
    a call the broker refused leaves nothing). The writes queued meanwhile go together, in one
    script run, sent by a task of the writer's own. A read of a call whose write is unfinished
    waits for it first (`settled`), so that this process never sees a call it dispatched as
    unknown. A failure is logged, not raised (the calls were sent, and status says unknown, or
    the list misses them, as without the write). Unfinished writes are bounded
    (`BESIDE_BOUND`): a dispatch waits for `room` before it publishes.
    """

    def __init__(
        self, client: Any, spec: IndexSpec | None, *, bound: int = BESIDE_BOUND, most: int = 500
    ) -> None:
        self.spec = spec
        self.pending: dict[str, asyncio.Future[None]] = {}
        """The calls whose write is unfinished: id -> done when its write is (written or not)."""
        self._client = client
        self._bound = bound
        self._most = most
        self._scripts: dict[str, Any] = {}
        self._queue: deque[_Write] = deque()
        self._unfinished = 0
        self._sender: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None

    def add(self, ids: list[str], results: list[str], marks: list[Mark], rows: list[Row]) -> None:
        """Queue the write of the calls `ids` (their result keys, `marks` and index `rows`), to
        be sent by the writer's task with the writes queued meanwhile; `settled` waits for it.
        Called on the event loop, after `room`."""
        if not marks and not rows:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.append(_Write(ids, results, marks, rows, done))
        for task_id in ids:
            self.pending[task_id] = done
        self._unfinished += 1
        if self._sender is None:
            self._sender = loop.create_task(self._send_queued(), name=_GROUP)

    async def room(self) -> None:
        """Return once fewer than `bound` writes are unfinished (at once, nearly always)."""
        while self._unfinished >= self._bound:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._room,))  # not cancelled with the caller: shared

    async def settled(self, ids: Iterable[str]) -> None:
        """Wait for the unfinished writes of `ids` (none: at once)."""
        pending = self.pending
        waits = {pending[task_id] for task_id in ids if task_id in pending}
        if waits:
            await asyncio.wait(waits)  # not cancelled with the caller: shared by other readers

    async def all_settled(self) -> None:
        """Wait for every write unfinished now (before reading the index)."""
        if self.pending:
            await asyncio.wait(set(self.pending.values()))

    async def wait_idle(self) -> None:
        """Wait until every queued write is done (at close)."""
        while self._sender is not None:
            await asyncio.wait((self._sender,))

    def _script(self, text: str) -> Any:
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self._client.register_script(text)
        return script

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                group = self._take()
                try:
                    await self._send(group)
                except Exception as exc:  # whatever it is: the calls were sent
                    index_lost(exc)
                finally:
                    self._finish(group)
        finally:
            self._sender = None
            if self._queue:  # cancelled (its loop is closing): never written
                self._finish(list(self._queue))
                self._queue.clear()

    def _take(self) -> list[_Write]:
        group: list[_Write] = []
        total = 0
        while self._queue:
            size = len(self._queue[0].ids)
            if group and total + size > self._most:
                break  # keep each run short (a Redis script blocks the server while it runs)
            group.append(self._queue.popleft())
            total += size
        return group

    def _finish(self, group: list[_Write]) -> None:
        pending = self.pending
        for write in group:
            for task_id in write.ids:
                if pending.get(task_id) is write.done:
                    del pending[task_id]
            if not write.done.done():
                write.done.set_result(None)
        self._unfinished -= len(group)
        room = self._room
        if room is not None and not room.done() and self._unfinished < self._bound:
            room.set_result(None)

    async def _send(self, group: list[_Write]) -> None:
        marks = [mark for write in group for mark in write.marks]
        rows = [row for write in group for row in write.rows]
        if marks:
            keys = [
                key
                for write in group
                for result, (marker, _, _) in zip(write.results, write.marks, strict=True)
                for key in (result, marker)
            ]
            values: list[Any] = [item for _, value, life in marks for item in (value, life)]
            if not rows or self.spec is None:
                await self._script(MARK_SCRIPT)(keys=keys, args=values)
            else:
                assert len(rows) == len(marks)  # the n-th row is the n-th marker's call
                args = composed_args(values, self.spec.add(rows))
                await self._script(MARK_INDEXED)(keys=keys, args=args)
        elif rows and self.spec is not None:
            keys = [result for write in group for result in write.results]
            await self._script(ADD_CHECKED)(keys=keys, args=composed_args([], self.spec.add(rows)))


_GROUP = "taskbridge-celery:beside"
