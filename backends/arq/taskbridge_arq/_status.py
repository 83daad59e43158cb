"""A job's state read from ARQ's own keys, and cancelling a job.

ARQ keeps, per job id:

- `arq:job:<id>`: the job (function, args, kwargs, enqueue time) while it is queued or running;
- `arq:in-progress:<id>`: the lock a worker holds while the job runs. A taskbridge worker writes
  the attempt's start time (epoch ms) as its value, where ARQ writes `1`;
- `arq:retry:<id>`: how many tries have started, until the job finishes;
- `arq:result:<id>`: the outcome (success, value or exception, try, start and finish times),
  kept `keep_result` seconds.

taskbridge adds `taskbridge:progress:<id>` (the last progress a task reported, written only when
it reports) and `taskbridge:key:<id>` (an idempotency key's dedup marker). One MGET reads the
first five, atomically (and one MGET those of a whole page of calls).

The job and the result both hold the call's arguments (ARQ's `a` and `k`), which a status shows
and a retry runs again with; what taskbridge carries with a job (its policy, signature and trace)
rides in the job's own field, or in the kwargs of jobs queued by earlier versions, and is never
shown as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from taskbridge import MessageError
from taskbridge.backends import (
    KeptCall,
    TaskErrorInfo,
    TaskStatus,
    decode_json,
    encode_json,
    timestamp,
)

from ._dispatch import JOB_FIELD, POLICY_KWARG
from ._serializer import restore_times

__all__ = [
    "CANCELLED_BEFORE_RETRY",
    "CANCELLED_BEFORE_START",
    "CANCEL_SCRIPT",
    "PROGRESS_KEY_PREFIX",
    "Snapshot",
    "cancelled_result",
    "progress_payload",
    "read_keys",
    "result_state",
]

PROGRESS_KEY_PREFIX = "taskbridge:progress:"
"""`<prefix><job id>`: `{"p": fraction, "m": message}`, the last progress the task reported."""

CANCELLED_BEFORE_START = "cancelled before it started"
"""The message of the CancelledError stored as the result of a job cancelled while queued."""
CANCELLED_BEFORE_RETRY = "cancelled while waiting to be tried again"
"""... and of one cancelled between two tries."""
_NOT_RUNNING = frozenset({CANCELLED_BEFORE_START, CANCELLED_BEFORE_RETRY})

_CANCELLED_TYPES = frozenset({"asyncio.exceptions.CancelledError", "asyncio.CancelledError"})
"""How an aborted job's result names its exception (ARQ stores the CancelledError)."""

_UNSERIALIZABLE = "arq.jobs.SerializationError"
"""The error type of a failed result that holds no exception (ARQ could not serialize it)."""

_REJECTED = frozenset(
    {f"{MessageError.__module__}.{MessageError.__qualname__}", "taskbridge.MessageError"}
)
"""How a result names the error of a message a worker refused (a bad signature, a tampered due
time, not a job): such a call is never run again from its stored arguments."""

# KEYS: job key, in-progress key, result key, retry key, queue, ARQ's abort set.
# ARGV: id, now (ms), '1' to abort a running job (else '0'), the cancelled result to store,
# its lifetime (ms; -1 forever, 0 none kept), the queue's wake channel.
# Returns 'finished', 'running' (left alone), 'aborting', 'cancelled' or 'gone'.
CANCEL_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 'finished'
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[3] ~= '1' then
    return 'running'
  end
  redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
  redis.call('PUBLISH', ARGV[6], 'abort')
  return 'aborting'
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'gone'
end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
local ttl = tonumber(ARGV[5])
if ttl < 0 then
  redis.call('SET', KEYS[3], ARGV[4])
elseif ttl > 0 then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ttl)
end
return 'cancelled'
"""


def read_keys(job_id: str) -> list[str]:
    """The keys a status read MGETs, in Snapshot.parse's order."""
    return [
        job_key_prefix + job_id,
        in_progress_key_prefix + job_id,
        retry_key_prefix + job_id,
        result_key_prefix + job_id,
        PROGRESS_KEY_PREFIX + job_id,
    ]


def progress_payload(fraction: float, message: str | None) -> bytes:
    """The value of a progress key."""
    return encode_json({"p": fraction, "m": message})


def _int(raw: bytes | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


def _ms(value: object) -> Any:
    """A datetime from epoch milliseconds, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return timestamp(value / 1000)


def _decoded(raw: bytes | None, what: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    data = decode_json(raw, what)
    if not isinstance(data, dict):
        raise MessageError(f"{what} is a JSON {type(data).__name__}, not an object")
    return data


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The keys of one job, read at one instant."""

    job_id: str
    job: dict[str, Any] | None
    """The decoded job, while it is queued or running (None if absent or not JSON)."""
    queued: bool
    """Whether the job key exists."""
    lock: bytes | None
    """The in-progress key's value: the attempt's start time (ms), or ARQ's `1`."""
    tries: int
    """Tries started so far (ARQ's retry counter)."""
    result: bytes | None
    progress: bytes | None

    @classmethod
    def parse(cls, job_id: str, values: Sequence[bytes | None]) -> Snapshot:
        job_raw, lock, tries, result, progress = values
        try:
            job = _decoded(job_raw, "the ARQ job")
        except MessageError:
            job = None  # e.g. pickled by a foreign client: the state is still known
        return cls(job_id, job, job_raw is not None, lock, _int(tries) or 0, result, progress)

    @property
    def exists(self) -> bool:
        return self.queued or self.lock is not None or self.result is not None

    @property
    def dispatched(self) -> bool:
        """Whether taskbridge queued the job (it carries a policy, and so its task's kind)."""
        return self._carried() is not None

    @property
    def carried(self) -> Mapping[str, Any]:
        """The carried policy and metadata of the queued job (empty when there are none)."""
        return self._carried() or {}

    def _carried(self) -> dict[str, Any] | None:
        job = self.job or {}
        carried = job.get(JOB_FIELD)
        if carried is None:  # queued by an earlier version: in the kwargs
            kwargs = job.get("k")
            carried = kwargs.get(POLICY_KWARG) if isinstance(kwargs, dict) else None
        return carried if isinstance(carried, dict) else None

    def status(self, alias: str) -> TaskStatus | None:
        """The TaskStatus these keys describe; None when Redis holds nothing of the job."""
        if not self.exists:
            return None
        fields: dict[str, Any] = {"id": self.job_id, "backend": alias}
        fields.update(self._progress())
        if self.result is not None:
            fields.update(_finished(self.result))
            return TaskStatus(**fields)
        job = self.job or {}
        name = job.get("f")
        fields.update(
            task_name=name if isinstance(name, str) else None,
            enqueued_at=_ms(job.get("et")),
            **_arguments(job),
        )
        if self.lock is not None:
            started = _int(self.lock)
            fields.update(
                state="running",
                attempts=max(self.tries, 1),
                started_at=_ms(started) if started is not None and started > 1 else None,
            )
        elif self.tries:
            fields.update(state="retrying", attempts=self.tries)
        else:
            fields.update(state="queued", attempts=0)
        return TaskStatus(**fields)

    def kept(self) -> KeptCall | None:
        """The task and arguments of a failed or cancelled job, from its result (which ARQ
        stores with them); None for a job in any other state, or refused as a message."""
        if self.result is None:
            return None
        try:
            result = _decoded(self.result, "the ARQ result")
        except MessageError:
            return None
        assert result is not None
        state, error = _outcome(result)
        if state not in ("failed", "cancelled") or (error is not None and error.type in _REJECTED):
            return None
        name, arguments = result.get("f"), _arguments(result)
        args, kwargs = arguments.get("args"), arguments.get("kwargs")
        if not isinstance(name, str) or args is None or kwargs is None:
            return None
        return KeptCall(task_name=name, args=tuple(args), kwargs=kwargs)

    def _progress(self) -> dict[str, Any]:
        try:
            data = _decoded(self.progress, "the progress")
        except MessageError:
            return {}
        if data is None:
            return {}
        fraction, message = data.get("p"), data.get("m")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            return {}
        if not 0 <= fraction <= 1:
            return {}
        return {
            "progress": float(fraction),
            "progress_message": message if isinstance(message, str) else None,
        }


def _arguments(data: Mapping[str, Any]) -> dict[str, Any]:
    """`args` and `kwargs` of a job or result dict (ARQ's `a` and `k`), without what taskbridge
    carries in the kwargs of jobs queued by earlier versions; none that are malformed."""
    fields: dict[str, Any] = {}
    args, kwargs = data.get("a"), data.get("k")
    if isinstance(args, list | tuple):
        fields["args"] = list(args)
    if isinstance(kwargs, dict):
        fields["kwargs"] = {k: v for k, v in kwargs.items() if k != POLICY_KWARG}
    return fields


def _outcome(result: Mapping[str, Any]) -> tuple[str, TaskErrorInfo | None]:
    """The state an ARQ result dict records, and its error when it failed."""
    value = result.get("r")
    if result.get("s") is True:
        return "succeeded", None
    if isinstance(value, dict) and "exception" in value:
        error_type = str(value["exception"])
        if error_type in _CANCELLED_TYPES:
            return "cancelled", None
        message, trace = value.get("message"), value.get("traceback")
        return "failed", TaskErrorInfo(
            type=error_type,
            message=str(message or ""),
            traceback=trace if isinstance(trace, str) and trace else None,
        )
    return "failed", TaskErrorInfo(type=_UNSERIALIZABLE, message=str(value))


def result_state(raw: bytes) -> tuple[str, str | None, int | None]:
    """The state a stored result records (`succeeded`, `failed` or `cancelled`), with its task
    name and enqueue time (ms), for the worker's index move; `failed` when it is not readable."""
    try:
        result = _decoded(raw, "the ARQ result")
    except MessageError:
        return "failed", None, None
    assert result is not None
    name, enqueued = result.get("f"), result.get("et")
    return (
        _outcome(result)[0],
        name if isinstance(name, str) else None,
        enqueued if type(enqueued) is int else None,
    )


def _finished(raw: bytes) -> dict[str, Any]:
    """TaskStatus fields from ARQ's result dict (JSON, see `_serializer`)."""
    try:
        result = _decoded(raw, "the ARQ result")
    except MessageError as exc:
        return {
            "state": "failed",
            "error": TaskErrorInfo(type="taskbridge.MessageError", message=str(exc)),
        }
    assert result is not None
    restore_times(result)
    name, tries = result.get("f"), result.get("t")
    attempts = tries if type(tries) is int else 0
    state, error = _outcome(result)
    fields: dict[str, Any] = {
        "task_name": name if isinstance(name, str) else None,
        "attempts": attempts,
        "enqueued_at": _ms(result.get("et")),
        "started_at": _ms(result.get("st")),
        "finished_at": _ms(result.get("ft")),
        "state": state,
        "error": error,
        **_arguments(result),
    }
    if state == "succeeded":
        fields["result"] = result.get("r")
    elif state == "cancelled":
        value = result.get("r")
        if isinstance(value, dict) and value.get("message") in _NOT_RUNNING:
            fields["started_at"] = None  # written by cancel, not by a try
    return fields


def cancelled_result(snapshot: Snapshot, queue: str, now_ms: int) -> bytes:
    """ARQ's result dict for a job cancelled before its next try: a CancelledError, as ARQ
    stores for an aborted job, with the tries made so far (0 for a job that never started)."""
    job = snapshot.job or {}
    data = {
        "t": snapshot.tries,
        "f": job.get("f", "<unknown>"),
        "a": job.get("a", []),
        "k": job.get("k", {}),
        "et": job.get("et", now_ms),
        "s": False,
        "r": {
            "exception": "asyncio.exceptions.CancelledError",
            "message": CANCELLED_BEFORE_RETRY if snapshot.tries else CANCELLED_BEFORE_START,
        },
        "st": now_ms,
        "ft": now_ms,
        "q": queue,
        "id": snapshot.job_id,
    }
    if JOB_FIELD in job:
        data[JOB_FIELD] = job[JOB_FIELD]
    return encode_json(data)
