"""The call index: which calls exist, newest first, by state and task, with counts, and a
channel that says "this call changed" (for `GET /tasks`, `/tasks/stats` and `/tasks/{id}/events`).

Backends that keep status in a Redis keep the index there (`RedisIndex`), written by the same
pipeline or script as the call itself: the dispatch adds a call (`add_args`), the worker moves
it from state to state (`move_args`) and publishes the change, and the API side reads pages and
counts and listens for changes. The in-process backend without a shared store keeps it in
memory (`MemoryIndex`, over its status store).

Keys, under a prefix P (one per backend alias's Redis):

- `P:calls`: sorted set of every indexed call id, scored by its enqueue time (epoch ms);
- `P:state:<state>`, `P:task:<name>`: the same, per state and per task;
- `P:meta`: hash, id -> `state<TAB>task<TAB>retry_of`;
- `P:counts`: hash, `<task><TAB><state>` -> how many indexed calls are there (the totals per
  state are their sums);
- channel `P:events`: each change of a call publishes its id.

Bounds: every add drops (up to 100 per add) the calls enqueued more than `ttl` ago and the
oldest beyond `max_entries`, so the index never outgrows its bounds and nothing is ever scanned
but the calls being dropped. The scripts name keys built from the prefix, so the index needs a
standalone or Sentinel-managed Redis (not Redis Cluster), like Celery's and ARQ's own keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ADD_SCRIPT",
    "LIST_SCRIPT",
    "MOVE_SCRIPT",
    "CallIndex",
    "Counts",
    "Cursor",
    "EventHub",
    "IndexEntry",
    "IndexPage",
    "RedisIndex",
    "Watchers",
    "add_args",
    "compose_with_index",
    "composed_args",
    "index_lost",
    "merge_pages",
    "move_args",
    "run_with_index",
]

logger = logging.getLogger("taskbridge")

_COMMON = """
local P = ARGV[1]
local CALLS, META, COUNTS = P .. ':calls', P .. ':meta', P .. ':counts'
local function count(name, by)
  if redis.call('HINCRBY', COUNTS, name, by) <= 0 then redis.call('HDEL', COUNTS, name) end
end
local function split(meta)
  local state, task, rest = string.match(meta, '^([^\\t]*)\\t([^\\t]*)\\t?(.*)$')
  return state, task, rest
end
local function drop(id)
  redis.call('ZREM', CALLS, id)
  local meta = redis.call('HGET', META, id)
  if meta then
    local state, task = split(meta)
    redis.call('ZREM', P .. ':state:' .. state, id)
    redis.call('ZREM', P .. ':task:' .. task, id)
    count(task .. '\\t' .. state, -1)
    redis.call('HDEL', META, id)
  end
end
local function trim(now, ttl, max)
  local old = redis.call('ZRANGEBYSCORE', CALLS, '-inf', '(' .. (now - ttl), 'LIMIT', 0, 100)
  for _, id in ipairs(old) do drop(id) end
  local extra = redis.call('ZCARD', CALLS) - max
  if extra > 0 then
    for _, id in ipairs(redis.call('ZRANGE', CALLS, 0, math.min(extra, 100) - 1)) do drop(id) end
  end
end
local function enter(id, score, state, task, retry_of)
  -- the call is in CALLS already
  redis.call('ZADD', P .. ':state:' .. state, score, id)
  redis.call('ZADD', P .. ':task:' .. task, score, id)
  redis.call('HSET', META, id, state .. '\\t' .. task .. '\\t' .. retry_of)
  redis.call('HINCRBY', COUNTS, task .. '\\t' .. state, 1)
end
"""

ADD_SCRIPT = (
    _COMMON
    + """
-- ARGV: prefix, now (ms), ttl (ms), max entries, then per call: id, score (ms), state, task,
-- retry_of ('' for none). A call already indexed is left as it is (a duplicate dispatch).
local now, ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 5, #ARGV, 5 do
  local id = ARGV[i]
  if redis.call('ZADD', CALLS, 'NX', ARGV[i + 1], id) == 1 then
    enter(id, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
  elseif ARGV[i + 4] ~= '' then
    -- indexed first by its worker (the add ran beside the publish): keep the retry's link
    local meta = redis.call('HGET', META, id)
    if meta then
      local state, task, retry_of = split(meta)
      if retry_of == '' then
        redis.call('HSET', META, id, state .. '\\t' .. task .. '\\t' .. ARGV[i + 4])
      end
    end
  end
  redis.call('PUBLISH', P .. ':events', id)
end
trim(now, ttl, max)
return 1
"""
)

MOVE_SCRIPT = (
    _COMMON
    + """
-- ARGV: prefix, now (ms), ttl (ms), max entries, id, new state ('' = no change, only
-- publish), task (to index a call the index lost), its enqueue time (ms, '' for now).
local id, state, task = ARGV[5], ARGV[6], ARGV[7]
if state ~= '' then
  local meta = redis.call('HGET', META, id)
  if meta then
    local old, name, retry_of = split(meta)
    if old ~= state then
      local score = redis.call('ZSCORE', CALLS, id) or ARGV[2]
      redis.call('ZREM', P .. ':state:' .. old, id)
      redis.call('ZADD', P .. ':state:' .. state, score, id)
      redis.call('HSET', META, id, state .. '\\t' .. name .. '\\t' .. retry_of)
      count(name .. '\\t' .. old, -1)
      redis.call('HINCRBY', COUNTS, name .. '\\t' .. state, 1)
    end
  elseif task ~= '' then
    local score = ARGV[8]
    if score == '' then score = ARGV[2] end
    if tonumber(score) >= tonumber(ARGV[2]) - tonumber(ARGV[3]) then
      redis.call('ZADD', CALLS, score, id)
      enter(id, score, state, task, '')
    end
  end
end
redis.call('PUBLISH', P .. ':events', id)
return 1
"""
)

LIST_SCRIPT = """
-- ARGV: prefix, state ('' any), task ('' any), cursor score ('' from the newest), cursor id,
-- limit, most entries to look at. Returns {stop score or '', stop id, id1, score1, meta1, ...}:
-- the page, newest first, and the last entry looked at when the walk stopped before the end.
local P, state, task = ARGV[1], ARGV[2], ARGV[3]
local limit, budget = tonumber(ARGV[6]), tonumber(ARGV[7])
local source = P .. ':calls'
local check_state = false
if task ~= '' then
  source = P .. ':task:' .. task
  check_state = state ~= ''
elseif state ~= '' then
  source = P .. ':state:' .. state
end
local META = P .. ':meta'
local out = {'', ''}
local found, seen = 0, 0
local last_id, last_score = nil, nil
local function full()
  if found >= limit or seen >= budget then
    if last_id then out[1], out[2] = last_score, last_id end
    return true
  end
  return false
end
local function take(id, score)
  seen = seen + 1
  last_id, last_score = id, score
  local meta = redis.call('HGET', META, id)
  if not meta then return end
  if check_state and string.sub(meta, 1, #state + 1) ~= state .. '\\t' then return end
  out[#out + 1] = id
  out[#out + 1] = score
  out[#out + 1] = meta
  found = found + 1
end
local top = ARGV[4]
if top ~= '' then
  -- the rest of the cursor's own millisecond: ids below the cursor id, highest first
  local same = redis.call('ZRANGEBYSCORE', source, top, top)
  for i = #same, 1, -1 do
    if same[i] < ARGV[5] then
      if full() then return out end
      take(same[i], top)
    end
  end
  top = '(' .. top
else
  top = '+inf'
end
local offset = 0
while true do
  local chunk = redis.call(
    'ZREVRANGEBYSCORE', source, top, '-inf', 'WITHSCORES', 'LIMIT', offset, 200)
  if #chunk == 0 then return out end
  for i = 1, #chunk, 2 do
    if full() then return out end
    take(chunk[i], chunk[i + 1])
  end
  offset = offset + 200
end
"""


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A place in the newest-first order: entries strictly after it are older (a lower
    score), or as old with a lower id."""

    score: int
    id: str

    def encode(self) -> str:
        return f"{self.score}:{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor `encode` gave (ValueError for anything else)."""
        score, sep, task_id = text.partition(":")
        if not sep or not task_id or not score.isdigit():
            raise ValueError(f"not a cursor: {text!r}")
        return cls(int(score), task_id)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One indexed call: its id, enqueue time (epoch ms), indexed state and task."""

    id: str
    score: int
    state: str
    task: str
    retry_of: str | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.score, self.id)


@dataclass(frozen=True, slots=True)
class IndexPage:
    """Entries newest first; `stopped` is where the walk stopped before the end (a cursor to
    go on from), None when the index has nothing older."""

    entries: list[IndexEntry]
    stopped: Cursor | None


@dataclass(slots=True)
class Counts:
    """How many indexed calls are in each state, overall and per task."""

    states: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        for state, n in other.states.items():
            self.states[state] = self.states.get(state, 0) + n
        for task, states in other.tasks.items():
            mine = self.tasks.setdefault(task, {})
            for state, n in states.items():
                mine[state] = mine.get(state, 0) + n


class CallIndex(Protocol):
    """What a backend offers for listing its calls and watching one change."""

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        """Up to `limit` entries after `after` (from the newest without it), newest first."""
        ...

    async def counts(self) -> Counts:
        """Calls per state and per task and state."""
        ...

    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """An event set whenever `task_id` may have changed (clear it before reading)."""
        ...


def merge_pages(pages: Iterable[IndexPage], limit: int) -> tuple[list[IndexEntry], Cursor | None]:
    """One page, newest first, from the pages of several indexes; and the cursor to go on from.

    An index that stopped early (its `stopped`, the last entry it looked at) has shown all it
    has down to there, and nothing older, so the merged page ends there too: nothing older than
    the highest such stop is returned, and the next page starts from it.
    """
    entries: list[IndexEntry] = []
    seen: set[str] = set()  # two aliases of one Redis share an index
    boundary: Cursor | None = None
    for page in pages:
        for entry in page.entries:
            if entry.id not in seen:
                seen.add(entry.id)
                entries.append(entry)
        if page.stopped is not None and (boundary is None or page.stopped > boundary):
            boundary = page.stopped
    entries.sort(key=lambda e: (e.score, e.id), reverse=True)
    if boundary is not None:
        entries = [e for e in entries if e.cursor >= boundary]
    if len(entries) > limit:
        return entries[:limit], entries[limit - 1].cursor
    return entries, boundary


def add_args(
    prefix: str,
    now_ms: int,
    ttl_ms: int,
    max_entries: int,
    calls: Iterable[tuple[str, int, str, str, str | None]],
) -> list[Any]:
    """ADD_SCRIPT's ARGV for `calls` as (id, enqueue ms, state, task, retry_of)."""
    argv: list[Any] = [prefix, now_ms, ttl_ms, max_entries]
    for task_id, score, state, task, retry_of in calls:
        argv += (task_id, score, state, task, retry_of or "")
    return argv


def move_args(
    prefix: str,
    now_ms: int,
    ttl_ms: int,
    max_entries: int,
    task_id: str,
    state: str | None,
    task: str | None = None,
    enqueued_ms: int | None = None,
) -> list[Any]:
    """MOVE_SCRIPT's ARGV: `task_id` is now in `state` (None: it only changed, e.g. progress)."""
    return [
        prefix,
        now_ms,
        ttl_ms,
        max_entries,
        task_id,
        state or "",
        task or "",
        "" if enqueued_ms is None else enqueued_ms,
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Watchers:
    """Who waits for which call to change, across threads and event loops: `notify(id)` may be
    called from any thread; waiters are asyncio events, each set on its own loop."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self.active: Mapping[str, object] = self._waiting
        """Truthy exactly while someone watches. A plain dict, so a hot path (the in-process
        status store, on every change) tests it for the price of a dict's truth test, where
        `bool(watchers)` calls `__bool__` (five times that, measured)."""

    def __bool__(self) -> bool:
        return bool(self._waiting)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(task_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiting = self._waiting.get(task_id)
                if waiting is not None:
                    waiting.discard(entry)
                    if not waiting:
                        del self._waiting[task_id]

    def notify(self, task_id: str) -> None:
        waiting = self._waiting.get(task_id)
        if not waiting:
            return
        with self._lock:
            entries = list(waiting)
        for loop, event in entries:
            _set_on(loop, event)

    def notify_all(self) -> None:
        with self._lock:
            entries = [entry for waiting in self._waiting.values() for entry in waiting]
        for loop, event in entries:
            _set_on(loop, event)


def _set_on(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        event.set()
    else:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(event.set)


class EventHub:
    """One Redis subscription per process to an index's `events` channel, fanned out to the
    local watchers of each id. Started by the first watcher; it resubscribes after a lost
    connection, and then wakes every watcher (a change may have been missed meanwhile)."""

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.watchers = Watchers()
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        async with self.watchers.watch(task_id) as event:
            await self._started()
            yield event

    async def _started(self) -> None:
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._listen(self._ready), name=f"taskbridge events {self.channel}"
            )
        assert self._ready is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):  # subscribed, so no change is missed from now on
                await self._ready.wait()

    async def _listen(self, ready: asyncio.Event) -> None:
        delay = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    if message.get("type") == "message":
                        self.watchers.notify(_text(message["data"]))
                    elif message.get("type") == "subscribe":
                        # Subscribed (again: by this loop, or by redis-py reconnecting inside
                        # get_message): from now on no change is missed, but one published
                        # while the link was down was, so every watcher reads again.
                        if ready.is_set():
                            self.watchers.notify_all()
                        ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("events channel %s lost (%s); resubscribing", self.channel, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class RedisIndex:
    """A `CallIndex` kept in Redis by the scripts above; `client` is a redis.asyncio client
    (plain or Sentinel-managed) of the Redis the backend keeps its calls in."""

    def __init__(
        self, client: Any, prefix: str, *, ttl: float, max_entries: int, budget: int = 5000
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self.max_entries = max_entries
        self.budget = budget
        """Most entries one page looks at (a rare state within a task stops early)."""
        self.hub = EventHub(client, f"{prefix}:events")
        self.identity = f"{client.connection_pool!r} {prefix}"
        """The same for two indexes over one Redis database and prefix (they are one index)."""
        self._list = client.register_script(LIST_SCRIPT)

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        reply: Sequence[bytes | str] = await self._list(
            args=[
                self.prefix,
                state or "",
                task or "",
                "" if after is None else after.score,
                "" if after is None else after.id,
                limit,
                self.budget,
            ]
        )
        entries = []
        for i in range(2, len(reply), 3):
            meta = _text(reply[i + 2]).split("\t")
            entries.append(
                IndexEntry(
                    _text(reply[i]),
                    int(float(_text(reply[i + 1]))),
                    meta[0],
                    meta[1] if len(meta) > 1 else "",
                    meta[2] if len(meta) > 2 and meta[2] else None,
                )
            )
        top = _text(reply[0])
        stopped = Cursor(int(float(top)), _text(reply[1])) if top else None
        return IndexPage(entries, stopped)

    async def counts(self) -> Counts:
        raw: dict[Any, Any] = await self.client.hgetall(f"{self.prefix}:counts")
        counts = Counts()
        for key, value in raw.items():
            task, tab, state = _text(key).partition("\t")
            n = int(value)
            if tab and n > 0:
                counts.tasks.setdefault(task, {})[state] = n
                counts.states[state] = counts.states.get(state, 0) + n
        return counts

    async def retry_of(self, task_id: str) -> str | None:
        """The call `task_id` re-runs, when it was dispatched by a retry."""
        meta = await self.client.hget(f"{self.prefix}:meta", task_id)
        if meta is None:
            return None
        parts = _text(meta).split("\t")
        return parts[2] if len(parts) > 2 and parts[2] else None

    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        return self.hub.watch(task_id)

    async def close(self) -> None:
        await self.hub.close()


# -- writing the index with an engine's own writes (for plugins) -----------------------------


def compose_with_index(script: str, index: str, then: str) -> str:
    """A script running `script` as it is (with every KEYS and its own ARGV), then `then`: Lua
    that may call `index(argv)` (the index script, ADD_SCRIPT or MOVE_SCRIPT, under pcall: an
    index error never fails the engine's write; it goes to the server's log) with `rest`, the
    ARGV that follow; `result` is what `script` returned, and is returned.

    ARGV: how many belong to `script`, then those, then the index script's (`composed_args`).
    """
    return f"""
local function engine(KEYS, ARGV)
{script}
end
local function index_script(ARGV)
{index}
end
local function index(argv)
  local ok, err = pcall(index_script, argv)
  if not ok then redis.log(redis.LOG_WARNING, 'taskbridge index: ' .. tostring(err)) end
end
local own, rest = {{}}, {{}}
local count = tonumber(ARGV[1])
for i = 2, count + 1 do own[#own + 1] = ARGV[i] end
for i = count + 2, #ARGV do rest[#rest + 1] = ARGV[i] end
local result = engine(KEYS, own)
{then}
return result
"""


def composed_args(own: Sequence[Any], index: Sequence[Any] | None = None) -> list[Any]:
    """The ARGV of a `compose_with_index` script: `own` for the engine's script, `index` (None:
    no index) for the index script."""
    return [len(own), *own, *(index or ())]


async def run_with_index(
    pipe: Any, script: Any, calls: Sequence[Sequence[Any]], *, client: Any = None
) -> list[Any]:
    """Execute `pipe` (a redis.asyncio pipeline holding an engine's commands, MULTI/EXEC or not)
    with an EVALSHA of `script` (a registered Script of the index) for each ARGV of `calls`
    added last: one round trip. Returns the engine's replies, raising the first engine error as
    `execute` would; an index failure is logged. Unknown to the server (restarted, failed over,
    flushed), the script is loaded and run again (on `client`, else the script's own), after
    the engine's commands went through.

    Not `script(client=pipe)`: a redis-py pipeline holding a Script asks the server whether it
    knows it (SCRIPT EXISTS) before every execution, a round trip of its own.
    """
    from redis.exceptions import NoScriptError, RedisError

    for args in calls:
        pipe.evalsha(script.sha, 0, *args)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    split = len(replies) - len(calls)
    engine, indexed = replies[:split], replies[split:]
    for reply in engine:
        if isinstance(reply, Exception):
            raise reply
    for args, reply in zip(calls, indexed, strict=True):
        if isinstance(reply, NoScriptError):
            try:
                await (script(args=args) if client is None else script(args=args, client=client))
            except (RedisError, OSError) as exc:
                index_lost(exc)
        elif isinstance(reply, Exception):
            index_lost(reply)
    return engine


def index_lost(exc: BaseException) -> None:
    """Log an index write that failed (the engine's own write went through)."""
    logger.warning(
        "the task index was not updated (%s: %s); the calls were sent, and listing them may "
        "miss them or show them in an earlier state",
        type(exc).__name__,
        exc,
    )
