"""Redis keys and Lua scripts shared by the API side and the worker.

Celery keeps a call's state in the result backend under `celery-task-meta-<id>` (after kombu's
`global_keyprefix`), as JSON: `{"status", "result", "traceback", "children", "date_done",
"task_id"}`. taskbridge adds one field, `"tb"`, with what Celery does not keep, as a short list
by position (`TB_POSITIONS`): the task name, the attempt, when the call was enqueued and started,
the last progress it reported and, while it runs, where (hostname, pid, pool, async). Times are
integer milliseconds: since the epoch while the call has no `date_done`, and counted back from
its `date_done` once it has one (a final state), which gives the finish time. Trailing unknowns
are left out. Celery's tools ignore the field.

Results stored before this format carry `"taskbridge"` instead: an object with the same names,
times in epoch seconds (and `finished_at`); `tb_fields` reads both.

Two keys of taskbridge's own, under the alias's `key_prefix`:

- `taskbridge:queued:<id>`: written with the message, in the same round trip, when the broker is
  Redis and there is a result backend (with RabbitMQ, in the result backend's Redis while the
  message is published, unless a worker stored a result first), so that a call no worker took
  yet reads as "queued" rather than Celery's PENDING ("unknown"). It serves only until a worker
  claims the call (the result says STARTED from then on), so the claim deletes it: in the
  claim's own script when the markers and the results share a Redis, else with one DEL on the
  broker's. Its TTL, the broker's visibility timeout (with RabbitMQ, `result_expires`) plus the
  call's delay, removes the marker of a call never claimed.
- `taskbridge:key:<id>`: held for `key_ttl` by the first dispatch of a call with an idempotency
  key; a dispatch that finds it held publishes nothing.

Both hold the same small JSON: `{"task": name, "enqueued_at": epoch seconds}`; the `queued`
marker also holds the call's message body, `"call": [args, kwargs, embed]` (up to `KEPT_LIMIT`
bytes), which a cancellation before the call starts keeps in the REVOKED result (`with_call`).

The call index lives under `taskbridge:index` in the result backend's Redis (see `_index`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ._options import CeleryOptions, celery_config, redis_transport

__all__ = [
    "CLAIM_SCRIPT",
    "DISPATCH_SCRIPT",
    "KEPT_LIMIT",
    "LEGACY_FIELD",
    "PROGRESS_SCRIPT",
    "REVOKE_SCRIPT",
    "RUNNING_ONLY",
    "STATES",
    "TB_FIELD",
    "TB_POSITIONS",
    "date_done_ms",
    "dedup_key",
    "marker_life",
    "marker_value",
    "queued_key",
    "result_expires",
    "result_key",
    "result_key_prefix",
    "tb_fields",
    "tb_value",
    "with_call",
]

TB_FIELD = "tb"
"""The field taskbridge adds to Celery's result meta (a list, see `TB_POSITIONS`)."""

LEGACY_FIELD = "taskbridge"
"""The field results stored by earlier versions carry instead (an object), still read."""

TB_POSITIONS = (
    "task",
    "attempt",
    "enqueued_at",
    "started_at",
    "progress",
    "progress_message",
    "hostname",
    "pid",
    "pool",
    "async",
)
"""What each position of the `tb` list holds. New fields go at the end: a reader ignores the
positions it does not know, and a writer leaves out the trailing ones it does not have."""

TIMES = frozenset({"enqueued_at", "started_at"})
"""The fields held as integer milliseconds (seconds in `tb_fields`' answer)."""

DEFAULT_EXPIRES = 86400
"""Celery's default `result_expires` (one day)."""

DEFAULT_VISIBILITY = 3600.0
"""kombu's default `visibility_timeout` of a Redis broker (one hour)."""

RUNNING_ONLY = ("hostname", "pid", "pool", "async")
"""`tb` fields that only serve while the call runs (to cancel it): not kept in the final
result, where each stored call is worth its bytes (they are the list's last positions)."""

STATES: dict[str, str] = {
    "RECEIVED": "running",
    "STARTED": "running",
    "PROGRESS": "running",
    "RETRY": "retrying",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REJECTED": "failed",
    "REVOKED": "cancelled",
}
"""Celery states (and taskbridge's PROGRESS) as taskbridge states; PENDING is "no result yet"
and any other custom state a task sets with `update_state` counts as running."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def result_key_prefix(options: CeleryOptions) -> str:
    """The prefix of Celery's result keys, as its Redis backend computes it
    (`KeyValueStoreBackend._add_global_keyprefix`: a separator is added when missing)."""
    config = celery_config(options)
    prefix = (config.get("result_backend_transport_options") or {}).get("global_keyprefix")
    if prefix:
        if prefix[-1] not in ":_-.":
            prefix += "_"
        return f"{prefix}celery-task-meta-"
    return "celery-task-meta-"


def result_key(prefix: str, task_id: str) -> str:
    return f"{prefix}{task_id}"


def own_prefix(options: CeleryOptions) -> str:
    """The prefix of taskbridge's own keys: the alias's `key_prefix`, as kombu uses it."""
    return options.key_prefix or ""


def queued_key(prefix: str, task_id: str) -> str:
    return f"{prefix}taskbridge:queued:{task_id}"


def dedup_key(prefix: str, task_id: str) -> str:
    return f"{prefix}taskbridge:key:{task_id}"


_names: dict[str, bytes] = {}


def marker_value(task_name: str, enqueued_at: float) -> bytes:
    """`{"task": task_name, "enqueued_at": enqueued_at}` as JSON (built cheaply: once per call
    on the dispatch path)."""
    name = _names.get(task_name)
    if name is None:
        name = _names[task_name] = json.dumps(task_name).encode()
    return b'{"task":%b,"enqueued_at":%b}' % (name, repr(float(enqueued_at)).encode())


KEPT_LIMIT = 64 * 1024
"""Most bytes of JSON a call's kept arguments may take; larger ones are not kept."""


def with_call(marker: bytes, body: bytes) -> bytes:
    """A `queued` marker (`marker_value`) that also holds the call's message body, `[args,
    kwargs, embed]` (JSON already), so that cancelling the call before it starts keeps its
    arguments for a retry; the marker alone when the body is over `KEPT_LIMIT` bytes."""
    if len(body) > KEPT_LIMIT:
        return marker
    return b'%b,"call":%b}' % (marker[:-1], body)


def marker_life(options: CeleryOptions) -> float:
    """Seconds a `queued` marker outlives its call's delay if no worker claims the call: the
    broker's visibility timeout (a Redis broker delivers an unacknowledged message again after
    it, so a call claimed later than that is one whose worker is gone); with RabbitMQ, which
    keeps a message until a worker takes it, as long as results are kept."""
    if not redis_transport(options):
        return float(result_expires(options) or DEFAULT_EXPIRES)
    transport = celery_config(options)["broker_transport_options"]
    return float(transport.get("visibility_timeout") or DEFAULT_VISIBILITY)


def result_expires(options: CeleryOptions) -> int:
    """Seconds Celery keeps results (`result_expires`); 0 when they never expire."""
    value: Any = options.celery.get("result_expires", DEFAULT_EXPIRES)
    if value is None:
        return 0
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    return int(float(value))


def decode_json(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object from Redis, or None when absent or not an object."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def to_ms(seconds: float) -> int:
    """Epoch seconds as whole milliseconds, rounded down (through microseconds, so that a time
    read back from milliseconds gives the same milliseconds again)."""
    return round(seconds * 1_000_000) // 1000


def date_done_ms(meta: Mapping[str, Any]) -> int | None:
    """The meta's `date_done` (Celery's ISO 8601, naive read as UTC) in epoch milliseconds,
    rounded down; None when it has none."""
    done = meta.get("date_done")
    if not isinstance(done, str):
        return None
    try:
        parsed = datetime.fromisoformat(done)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _MS


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def tb_value(fields: Mapping[str, Any], done_ms: int | None) -> list[Any]:
    """The `tb` list of `fields` (names of `TB_POSITIONS`, times in epoch seconds) for a meta
    whose `date_done` is `done_ms` (None: it has none)."""
    values: list[Any] = []
    for name in TB_POSITIONS:
        value = fields.get(name)
        if name in TIMES:
            seconds = _number(value)
            if seconds is None:
                value = None
            elif done_ms is None:
                value = to_ms(seconds)
            else:
                value = done_ms - to_ms(seconds)
        values.append(value)
    while values and values[-1] is None:
        values.pop()
    return values


def tb_fields(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """What taskbridge stored in a result meta, by name (times in epoch seconds); empty when
    nothing. Reads the `tb` list and, from results stored by earlier versions, the
    `taskbridge` object."""
    if meta is None:
        return {}
    found = meta.get(TB_FIELD)
    if isinstance(found, list):
        done = date_done_ms(meta)
        fields: dict[str, Any] = {}
        for name, value in zip(TB_POSITIONS, found, strict=False):
            if name in TIMES:
                ms = _number(value)
                if ms is None:
                    continue
                value = (ms if done is None else done - ms) / 1000
            if value is not None:
                fields[name] = value
        return fields
    legacy = meta.get(LEGACY_FIELD)
    return dict(legacy) if isinstance(legacy, Mapping) else {}


# Dispatch on a Redis broker, in one round trip.
# ARGV[1]: number of binding keys B; ARGV[2..1+B]: binding members. KEYS[1..B]: binding keys.
# Then per message, 3 keys (queue list, queued marker, dedup key) and 6 arguments (envelope,
# dedup key value, key life in ms, 0 for a call without an idempotency key, its request's
# dispatch deadline in epoch ms by the API's clock, 0 for none, the marker's life in ms, 0 to
# write no marker, and the marker's value).
# Returns the 1-based positions of the messages skipped because their dedup key was held, and
# the negated positions of those refused because they arrived after their deadline (their
# request gave up and was answered 503: they must never be queued then).
DISPATCH_SCRIPT = """
local bindings = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 1, bindings do
  redis.call('SADD', KEYS[i], ARGV[1 + i])
end
local skipped = {}
local k, a, position = bindings, 1 + bindings, 0
while k < #KEYS do
  position = position + 1
  local key_ttl = tonumber(ARGV[a + 3])
  local deadline = tonumber(ARGV[a + 4])
  local marker_ttl = tonumber(ARGV[a + 5])
  local push = true
  if deadline > 0 and now > deadline then
    push = false
    skipped[#skipped + 1] = -position
  elseif key_ttl > 0 then
    push = redis.call('SET', KEYS[k + 3], ARGV[a + 2], 'NX', 'PX', key_ttl) ~= false
    if not push then
      skipped[#skipped + 1] = position
    end
  end
  if push then
    if marker_ttl > 0 then
      redis.call('SET', KEYS[k + 2], ARGV[a + 6], 'PX', marker_ttl)
    end
    redis.call('LPUSH', KEYS[k + 1], ARGV[a + 1])
  end
  k, a = k + 3, a + 6
end
return skipped
"""

# The worker's claim of a call, before it runs: store STARTED unless the result says the call
# was revoked or already succeeded (then return that result: the worker decides whether it is
# this dispatch's, which the `tb` field's times say, and calls again with it as ARGV[3] when it
# is not: a call keyed again after its key_ttl reuses the id, and must run).
# The call's `queued` marker, which serves until now, is deleted either way.
# KEYS[1]: result key; KEYS[2], when given: the queued marker. ARGV[1]: STARTED meta;
# ARGV[2]: expiry in s (0: none); ARGV[3]: a final result to replace all the same ('': none).
CLAIM_SCRIPT = """
if #KEYS > 1 then
  redis.call('DEL', KEYS[2])
end
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[3] then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and (meta.status == 'REVOKED' or meta.status == 'SUCCESS') then
    return current
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""

# A progress report: replace the running attempt's meta, never a final or revoked one.
# KEYS[1]: result key. ARGV[1]: PROGRESS meta; ARGV[2]: expiry in s (0: none).
PROGRESS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if not ok or type(meta) ~= 'table' then return 0 end
  if meta.status ~= 'STARTED' and meta.status ~= 'PROGRESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

# Cancel a call that has not started: store REVOKED unless a worker claimed it meanwhile (or it
# ended); the worker's claim then refuses to run it. Returns false when revoked, else the
# current result (the caller goes on with what it says).
# KEYS[1]: result key. ARGV[1]: REVOKED meta; ARGV[2]: expiry in s (0: none).
REVOKE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if not ok or type(meta) ~= 'table' then return current end
  if meta.status ~= 'PENDING' and meta.status ~= 'RETRY' then return current end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""
