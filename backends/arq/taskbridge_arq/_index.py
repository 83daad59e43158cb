"""The call index of an ARQ alias (taskbridge's `RedisIndex`), and where each of its writes sits.

The index lives in the alias's Redis under `taskbridge:index:<queue_name>` (INDEX_PREFIX and the
alias's `queue_name` option, as the wake channel is `taskbridge:wake:<queue>`): two applications
sharing a Redis with different queue names keep apart indexes. A worker serving another queue
(`--queue`) writes to its alias's index all the same.

Every write travels with the engine write it accompanies, never in a round trip of its own:

- dispatch: `ENQUEUE_INDEXED` runs the enqueue script, then the index ADD of the jobs it queued
  (a job it skipped, as a duplicate or late, is not added), in one EVALSHA;
- the worker's claim: `CLAIM_INDEXED` (in `_worker`) moves each job it claimed to running;
- the worker's outcome writes (ARQ's `finish_job` and `finish_failed_job` transactions): one
  more EVALSHA of the MOVE in the same MULTI/EXEC (retrying, succeeded, failed, cancelled);
- a progress report: one more EVALSHA of the MOVE, with no new state (it only publishes the
  change), in the progress write's pipeline;
- the API's cancellation of a job not started: `CANCEL_INDEXED` moves it to cancelled (a running
  job that is aborted is moved by its worker, with its outcome).

An index script that fails never fails the write it accompanies: in a composed script it runs
under `pcall` (the error goes to the Redis server's log); in a pipeline its error is logged.

Bounds: an alias keeps calls in its index as long as it keeps their results (`keep_result`; a
day with `keep_result_forever`), by their enqueue time, and at most `index_max_entries` of them.
An alias that keeps no results (`keep_result=0`) or has `index_max_entries=0` keeps no index.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.utils import to_ms

from taskbridge.backends import ADD_SCRIPT, MOVE_SCRIPT, add_args, compose_with_index, move_args

from ._dispatch import ENQUEUE_SCRIPT, Row
from ._options import ArqOptions
from ._status import CANCEL_SCRIPT

__all__ = [
    "CANCEL_INDEXED",
    "CLAIM_THEN",
    "DAY_MS",
    "ENQUEUE_INDEXED",
    "INDEX_PREFIX",
    "IndexSpec",
    "compose",
    "index_spec",
]

logger = logging.getLogger("taskbridge.arq")

INDEX_PREFIX = "taskbridge:index:"
"""`<prefix><queue_name>`: the prefix of an alias's index keys and events channel."""

DAY_MS = 86_400_000
"""How long the index keeps a call with `keep_result_forever` (its size bound applies too)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """Where an alias keeps its index, and its bounds."""

    prefix: str
    ttl_ms: int
    """How long the index keeps a call after its enqueue."""
    max_entries: int

    def add(self, rows: Sequence[Row]) -> list[Any]:
        """ADD_SCRIPT's ARGV for `rows`."""
        return add_args(self.prefix, _now_ms(), self.ttl_ms, self.max_entries, rows)

    def move(
        self,
        task_id: str,
        state: str | None,
        task: str | None = None,
        enqueued_ms: int | None = None,
    ) -> list[Any]:
        """MOVE_SCRIPT's ARGV: `task_id` is now in `state` (None: it only changed); `task` and
        `enqueued_ms` index it again if the index lost it."""
        return move_args(
            self.prefix,
            _now_ms(),
            self.ttl_ms,
            self.max_entries,
            task_id,
            state,
            task,
            enqueued_ms,
        )

    def bounds(self) -> list[Any]:
        """The first four ARGV of either script (prefix, now, ttl, max), for a composed script
        that builds the MOVE's ARGV of each job itself."""
        return [self.prefix, _now_ms(), self.ttl_ms, self.max_entries]


def index_spec(options: ArqOptions) -> IndexSpec | None:
    """The index of an alias with `options`; None when it keeps none."""
    if options.index_max_entries <= 0:
        return None
    if options.keep_result_forever:
        ttl_ms = DAY_MS
    elif options.keep_result > 0:
        ttl_ms = to_ms(options.keep_result)
    else:
        return None  # no result is kept: a finished call is gone at once, nothing to list
    return IndexSpec(INDEX_PREFIX + options.queue_name, ttl_ms, options.index_max_entries)


# -- composed scripts -------------------------------------------------------------------------


def compose(script: str, index: str, then: str) -> str:
    """`compose_with_index`, with `then` run only when the alias keeps an index (its index
    ARGV, `rest`, is then not empty)."""
    return compose_with_index(script, index, f"if #rest > 0 then\n{then}\nend")


# The API's cancellation took the job out of its queue ('cancelled'): MOVE it to cancelled.
CANCEL_INDEXED = compose(
    CANCEL_SCRIPT, MOVE_SCRIPT, "if result == 'cancelled' then index(rest) end"
)

# The dispatch: ADD the jobs the enqueue script queued. It returns, flat, (id, reason) of those
# it skipped; `rest` is ADD's ARGV for every job of the batch (4 bounds, then 5 per job).
_ENQUEUE_THEN = """
local skipped = {}
for i = 1, #result, 2 do skipped[result[i]] = true end
local argv = {rest[1], rest[2], rest[3], rest[4]}
for i = 5, #rest, 5 do
  if not skipped[rest[i]] then
    for j = i, i + 4 do argv[#argv + 1] = rest[j] end
  end
end
if #argv > 4 then index(argv) end
"""

# The worker's claim (see `_worker`): MOVE each job it claimed to running. The claim returns
# how many candidates it examined, then, flat, (id, score) of each job it claimed; `rest` is the
# MOVE's 4 bounds (`IndexSpec.bounds`).
CLAIM_THEN = """
for i = 2, #result, 2 do
  index({rest[1], rest[2], rest[3], rest[4], result[i], 'running', '', ''})
end
"""

ENQUEUE_INDEXED = compose(ENQUEUE_SCRIPT, ADD_SCRIPT, _ENQUEUE_THEN)
