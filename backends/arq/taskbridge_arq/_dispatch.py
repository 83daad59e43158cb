"""Enqueueing a batch of calls in one Redis round trip, as ARQ's `enqueue_job` would one by one.

`ArqRedis.enqueue_job` takes three round trips per job (WATCH, EXISTS, MULTI/EXEC). The script
below does the same per job server-side, atomically, for a whole batch in one EVALSHA: skip the
job when its job key or result key exists (ARQ's de-duplication by job id), else PSETEX the job
key with ARQ's expiry and ZADD the queue with the due time as score. A call with an idempotency
key first takes its dedup key (`taskbridge:key:<id>`, SET NX PX key_ttl) and is skipped when the
key is held, so a duplicate within key_ttl is a no-op even after the job's result expired. The
script then PUBLISHes, once per queue, the earliest due time it added, which wakes idle workers
at once (see `_wakeups`). The backend runs it composed with the call index's ADD of the jobs it
queued (see `_index`), still one EVALSHA.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from arq.constants import job_key_prefix, result_key_prefix

from taskbridge import TaskArgumentError
from taskbridge.backends import (
    GroupCommit,
    Policy,
    Signer,
    TaskCall,
    encode_json,
    execution_fields,
)

__all__ = [
    "DEDUP_KEY_PREFIX",
    "DEFAULT_EXECUTION_FIELDS",
    "DUE_FIELD",
    "ENQUEUE_SCRIPT",
    "JOB_FIELD",
    "JOB_TRY_FIELD",
    "POLICY_KWARG",
    "QUEUE_FIELD",
    "SIGNATURE_FIELD",
    "SYNC_FIELD",
    "TRACE_FIELD",
    "WAKE_CHANNEL_PREFIX",
    "Row",
    "batch_arguments",
    "group_commit",
    "index_rows",
    "job_payload",
]

JOB_FIELD = "taskbridge"
"""The job dict's own field (next to ARQ's `t f a k et`) carrying the dispatcher's execution
policy (retries, backoff, timeout), as the fields that differ from `Policy()`'s defaults, and
the call's metadata (SYNC_FIELD, QUEUE_FIELD, SIGNATURE_FIELD, ...). ARQ reads only its own
fields, so a plain ARQ worker calls the function with the call's own kwargs."""

POLICY_KWARG = "taskbridge.policy"
"""Where a taskbridge worker's deserializer hands JOB_FIELD to the job function: a reserved key
of the kwargs, which the job function removes before calling the task (jobs queued by earlier
versions carried it there on the wire too). It is not a Python identifier, so no named
parameter can collide with it, and a call passing it through `**kwargs` is refused."""

SYNC_FIELD = "sync"
"""In the carried policy: true when the task is a `def` (it runs in a thread, and a running one
cannot be aborted), absent for an `async def` task."""
QUEUE_FIELD = "queue"
"""In the carried policy: the job's queue, when it is not the backend's default queue (cancel
removes the job from it)."""
TRACE_FIELD = "trace"
"""In the carried policy: the dispatcher's OpenTelemetry context (W3C headers), if tracing."""
DUE_FIELD = "due"
"""In the carried policy of a delayed call, with a `signing_key`: when it is due (epoch ms),
its score in the queue. Signed with the rest, so a worker refuses a job moved earlier."""
SIGNATURE_FIELD = "signature"
"""In the carried policy, with a `signing_key`: the HMAC of the call (see `Signer`): id, task
name, args, kwargs, the carried policy without this field and TRACE_FIELD, and ARQ's own job
fields that change behaviour: `t` (the job's try count) and `et` (its enqueue time, ms)."""
JOB_TRY_FIELD = "_t"
"""Put into the carried policy by the worker's deserializer when a job's `t` (try count) is
set, for the signature check: ARQ starts such a job at that try. taskbridge sends `t` null."""

DEFAULT_EXECUTION_FIELDS = execution_fields(Policy())

WAKE_CHANNEL_PREFIX = "taskbridge:wake:"
"""Pub/sub channel `<prefix><queue name>` on which enqueues announce their earliest due time."""

DEDUP_KEY_PREFIX = "taskbridge:key:"
"""`<prefix><call id>`: held for key_ttl by the first dispatch of a call with an idempotency key."""

# KEYS: per job, its job key, result key, queue and dedup key. ARGV[1]: the wake channel prefix;
# then per job, its id, payload, expiry (ms), score (due time, ms), the dedup key's lifetime (ms;
# 0 when the call has no idempotency key) and its request's deadline (epoch ms by the API's
# clock; 0: none). Returns, flat, (id, reason) of each job it skipped: 'late' (it arrived after
# its request gave up and was answered 503: never enqueue it then), 'duplicate' (the dedup key
# is held) or 'exists' (the job or its result exists).
ENQUEUE_SCRIPT = """
local skipped = {}
local earliest = {}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 0, #KEYS / 4 - 1 do
  local job_key, result_key, queue = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3]
  local a = 6 * i + 1
  local id, score, dedup_ms = ARGV[a + 1], tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local deadline = tonumber(ARGV[a + 6])
  if deadline > 0 and now > deadline then
    skipped[#skipped + 1] = id
    skipped[#skipped + 1] = 'late'
  elseif dedup_ms > 0 and not redis.call('SET', KEYS[4 * i + 4], '1', 'NX', 'PX', dedup_ms) then
    skipped[#skipped + 1] = id
    skipped[#skipped + 1] = 'duplicate'
  elseif redis.call('EXISTS', job_key, result_key) == 0 then
    redis.call('PSETEX', job_key, ARGV[a + 3], ARGV[a + 2])
    redis.call('ZADD', queue, score, id)
    if earliest[queue] == nil or score < earliest[queue] then
      earliest[queue] = score
    end
  else
    skipped[#skipped + 1] = id
    skipped[#skipped + 1] = 'exists'
  end
end
for queue, score in pairs(earliest) do
  redis.call('PUBLISH', ARGV[1] .. queue, string.format('%d', score))
end
return skipped
"""
_KEYS_PER_JOB = 4


def job_payload(
    call: TaskCall,
    enqueue_time_ms: int,
    *,
    default_queue: str | None = None,
    signer: Signer | None = None,
) -> bytes:
    """The ARQ job dict for `call` as JSON: what `arq.jobs.serialize_job` builds, plus the
    execution policy and the call's metadata in JOB_FIELD, signed when `signer` is given."""
    if POLICY_KWARG in call.kwargs:
        raise TaskArgumentError(
            f"task {call.name!r}: the keyword argument {POLICY_KWARG!r} is reserved by the ARQ "
            "backend; rename it",
            task_name=call.name,
            parameter=POLICY_KWARG,
        )
    carried: dict[str, Any] = {
        name: value
        for name, value in execution_fields(call.policy).items()
        if value != DEFAULT_EXECUTION_FIELDS[name]
    }
    if not call.task.is_async:
        carried[SYNC_FIELD] = True
    queue = call.policy.queue
    if queue is not None and queue != default_queue:
        carried[QUEUE_FIELD] = queue
    if signer is not None:
        if call.policy.delay:
            carried[DUE_FIELD] = enqueue_time_ms + round(call.policy.delay * 1000)
        signature = signer.sign(
            call.id,
            call.name,
            call.args,
            call.kwargs,
            policy=carried,
            engine={"t": None, "et": enqueue_time_ms},
        )
        carried = {**carried, SIGNATURE_FIELD: signature}
    if call.trace:
        carried[TRACE_FIELD] = call.trace
    job = {
        "t": None,
        "f": call.name,
        "a": call.args,
        "k": call.kwargs,
        "et": enqueue_time_ms,
        JOB_FIELD: carried,
    }
    return encode_json(job)


def batch_arguments(
    calls: Sequence[TaskCall],
    *,
    default_queue: str,
    now_ms: int,
    expires_extra_ms: int,
    signer: Signer | None = None,
    deadline_ms: int = 0,
) -> tuple[list[str], list[Any]]:
    """KEYS and per-job ARGV of ENQUEUE_SCRIPT for `calls` (the job id is the call's id);
    ARGV[1], the wake channel prefix, is added by `group_commit`. `deadline_ms`: when the
    request gives up (epoch ms; 0: never), after which Redis refuses the jobs."""
    keys: list[str] = []
    argv: list[Any] = []
    for call in calls:
        policy = call.policy
        delay_ms = round(policy.delay * 1000) if policy.delay else 0
        keys += [
            job_key_prefix + call.id,
            result_key_prefix + call.id,
            policy.queue or default_queue,
            DEDUP_KEY_PREFIX + call.id,
        ]
        argv += [
            call.id,
            job_payload(call, now_ms, default_queue=default_queue, signer=signer),
            delay_ms + expires_extra_ms,
            now_ms + delay_ms,
            max(1, round(policy.key_ttl * 1000)) if policy.key is not None else 0,
            deadline_ms,
        ]
    return keys, argv


Row = tuple[str, int, str, str, str | None]
"""One call for the call index's ADD: id, enqueue time (epoch ms), state, task, retry_of."""


def index_rows(calls: Sequence[TaskCall], now_ms: int) -> list[Row]:
    """The index ADD's rows of `calls`, enqueued (queued) at `now_ms`, as their jobs' `et`."""
    return [(call.id, now_ms, "queued", call.name, call.retry_of) for call in calls]


Script = Callable[[list[str], list[Any], list[Row]], Awaitable[list[bytes]]]
Batch = tuple[list[str], list[Any], list[Row]]
"""One dispatch's KEYS and ARGV for ENQUEUE_SCRIPT (see `batch_arguments`), and its calls' rows
for the call index (see `index_rows`)."""
Skipped = dict[str, str]
"""Ids of the jobs a script call skipped, with the reason: 'late', 'duplicate' or 'exists'."""


def group_commit(run_script: Script) -> GroupCommit[Batch, Skipped]:
    """The core's group commit over ENQUEUE_SCRIPT: the batches of a group go in one script
    call (at most 500 jobs, so the script stays short), and each learns which jobs it skipped.
    `run_script(keys, argv, rows)` sends them, with the index rows of the group."""

    async def send(group: list[Batch]) -> list[Skipped]:
        keys = [key for batch in group for key in batch[0]]
        argv = [WAKE_CHANNEL_PREFIX, *(arg for batch in group for arg in batch[1])]
        rows = [row for batch in group for row in batch[2]]
        flat = await run_script(keys, argv, rows)
        skipped = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return [skipped] * len(group)

    return GroupCommit(
        send, size=lambda batch: len(batch[0]) // _KEYS_PER_JOB, name="taskbridge-arq:enqueue"
    )
