"""The call index of a Celery alias (taskbridge's `RedisIndex`), kept in the result backend's
Redis under `<key_prefix>taskbridge:index`, and where each of its writes sits.

Every write travels with the engine write it accompanies, never in a round trip of its own:

- dispatch, broker and results in one Redis: the index ADD is one more command of the publish
  pipeline (after the LPUSH), or, for a group with idempotency keys, part of the dispatch script
  (`DISPATCH_INDEXED`: only the calls the script queued are added);
- dispatch, results in another Redis (or a RabbitMQ broker): the ADD goes to the results' Redis
  concurrently with the publish (with RabbitMQ, in the script that writes the `queued` markers
  there), one per group of concurrent batches (`BesideWriter`); a failed write is logged, never
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

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskbridge.backends import (
    ADD_SCRIPT,
    MOVE_SCRIPT,
    GroupCommit,
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
    own_prefix,
    result_expires,
    to_ms,
)
from ._options import CeleryOptions, celery_config, markers_with_results, redis_transport
from ._protocol import TaskMessage

__all__ = [
    "CLAIM_INDEXED",
    "DISPATCH_INDEXED",
    "INDEX_SETTING",
    "KEPT_LIMIT",
    "MARK_INDEXED",
    "MARK_SCRIPT",
    "PROGRESS_INDEXED",
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

# `queued` markers in the result backend's Redis (a RabbitMQ broker), written while the message
# is published: each unless its call has a result already (a worker claimed it first; the
# claim, which deletes the marker, must not be undone).
# KEYS: per call, its result key and its marker. ARGV: per call, the marker and its life in ms.
MARK_SCRIPT = """
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('SET', KEYS[i + 1], ARGV[i], 'PX', ARGV[i + 1])
  end
end
return 1
"""

MARK_INDEXED = compose_with_index(MARK_SCRIPT, ADD_SCRIPT, "index(rest)")


# -- the API side's writes --------------------------------------------------------------------


Mark = tuple[str, str, bytes, int]
"""A `queued` marker to write beside a publish: the call's result key, the marker's key, its
value and its life in ms."""


class BesideWriter:
    """Writes what a dispatch leaves in the result backend's Redis when the publish cannot carry
    it (a RabbitMQ broker, or a broker in another Redis): the calls' `queued` markers (RabbitMQ)
    and the call index's rows. The batches of concurrent requests go together, in one script
    run, while their publish is in flight; a failure is logged, not raised (the calls were
    sent, and status says unknown, or the list misses them, as without the write)."""

    def __init__(self, client: Any, spec: IndexSpec | None) -> None:
        self.spec = spec
        self._client = client
        self._scripts: dict[str, Any] = {}
        self._group: GroupCommit[tuple[list[Mark], list[Row]], None] = GroupCommit(
            self._send, size=lambda batch: max(len(batch[0]), len(batch[1])), name=_GROUP
        )

    async def write(self, marks: list[Mark], rows: list[Row]) -> None:
        """Write `marks` and index `rows`; a failure is logged, not raised."""
        if not marks and not rows:
            return
        try:
            await self._group.submit((marks, rows))
        except Exception as exc:  # whatever it is: the calls were sent
            index_lost(exc)

    def _script(self, text: str) -> Any:
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self._client.register_script(text)
        return script

    async def _send(self, group: list[tuple[list[Mark], list[Row]]]) -> list[None]:
        marks = [mark for batch in group for mark in batch[0]]
        rows = [row for batch in group for row in batch[1]]
        keys: list[str] = [key for result, marker, _, _ in marks for key in (result, marker)]
        values: list[Any] = [item for _, _, value, life in marks for item in (value, life)]
        if not rows or self.spec is None:
            await self._script(MARK_SCRIPT)(keys=keys, args=values)
        elif marks:
            args = composed_args(values, self.spec.add(rows))
            await self._script(MARK_INDEXED)(keys=keys, args=args)
        else:
            await self._script(ADD_SCRIPT)(args=self.spec.add(rows))
        return [None] * len(group)

    async def wait_idle(self) -> None:
        """Let the last group finish (at close)."""
        await self._group.wait_idle()


_GROUP = "taskbridge-celery:beside"
