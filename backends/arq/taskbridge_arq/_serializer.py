"""JSON in ARQ's own job and result format, for the enqueueing side and the worker alike.

ARQ's default serializer is pickle, so anyone who can write to Redis could run code on every
worker. These functions replace it on both sides (`job_serializer` / `job_deserializer`); a
pickled payload is refused without being loaded. The dicts keep ARQ's keys (`t f a k et`, and
for results `s r st ft q id`), so ARQ's `Job`, `queued_jobs()` and health checks still read them.

A failed job's result is an exception object, which JSON cannot carry as such: it travels as
`{"exception": "module.Qualname", "message": ..., "args": [...], "traceback": ...}` and comes
back as an exception of the same class when that class is already imported here (never imported
on a payload's say-so), else as a `RemoteTaskError` carrying the type name and message.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from taskbridge import MessageError, TaskBridgeError
from taskbridge.backends import decode_json, encode_json

from ._dispatch import JOB_FIELD, JOB_TRY_FIELD, POLICY_KWARG

__all__ = [
    "MAX_TRACEBACK",
    "RemoteTaskError",
    "deserialize",
    "deserialize_for_worker",
    "exception_from_json",
    "exception_to_json",
    "serialize",
]

_PICKLE_PROTOCOL_2_PLUS = b"\x80"
MAX_TRACEBACK = 16 * 1024
"""Most bytes (UTF-8) of a failure's formatted traceback kept in its result: the end of it, where
the raising line is."""


class RemoteTaskError(TaskBridgeError):
    """A task failed in a worker with an exception that cannot be rebuilt in this process.

    Raised by `Job.result()` in place of the original when its class is not importable here or
    cannot be rebuilt from its arguments.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str | None = None) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        """Qualified name of the exception's class in the worker, e.g. `myapp.errors.Quota`."""
        self.message = message
        """`str()` of the original exception."""
        self.remote_traceback = remote_traceback
        """The traceback formatted in the worker, if it was sent."""


def exception_to_json(error: BaseException) -> dict[str, Any]:
    """The JSON form of an exception: qualified type, message, JSON args if any, and for a
    failure (not a cancellation) the end of its formatted traceback, at most MAX_TRACEBACK
    bytes (`TaskStatus.error.traceback` shows it)."""
    kind = type(error)
    data: dict[str, Any] = {
        "exception": f"{kind.__module__}.{kind.__qualname__}",
        "message": _safe_str(error),
    }
    try:
        encode_json(list(error.args))
    except (TypeError, ValueError):
        pass  # rebuilt from the message instead
    else:
        data["args"] = list(error.args)
    if error.__traceback__ is not None and not isinstance(error, asyncio.CancelledError):
        data["traceback"] = _bounded_traceback(error)
    return data


def _bounded_traceback(error: BaseException) -> str:
    formatted = "".join(traceback.format_exception(error))
    if len(formatted) * 4 <= MAX_TRACEBACK:  # short enough whatever its characters
        return formatted
    raw = formatted.encode(errors="replace")
    if len(raw) <= MAX_TRACEBACK:
        return formatted
    marker = "[...]\n"
    kept = raw[len(raw) - MAX_TRACEBACK + len(marker) :]
    return marker + kept.decode(errors="ignore")


def exception_from_json(data: Mapping[str, Any]) -> BaseException:
    """Rebuild an exception sent by `exception_to_json`.

    The original class is used only when its module is already imported and it is an Exception
    (or asyncio.CancelledError, how ARQ reports an aborted job); it is built without calling its
    `__init__`, from the sent args. Anything else becomes a RemoteTaskError.
    """
    type_name = str(data.get("exception", "Exception"))
    message = str(data.get("message", ""))
    remote_tb = data.get("traceback")
    remote_tb = remote_tb if isinstance(remote_tb, str) else None
    args = data.get("args")
    rebuilt: BaseException | None = None
    cls = _loaded_exception_class(type_name)
    if cls is not None:
        rebuilt = _rebuild(cls, tuple(args) if isinstance(args, list) else (message,))
    if rebuilt is None:
        return RemoteTaskError(type_name, message, remote_tb)
    if remote_tb:
        rebuilt.add_note(f"Raised in an ARQ worker. Remote traceback:\n{remote_tb.rstrip()}")
    return rebuilt


_STARTED_AFTER = "sa"
"""A stored result's start time, in ms after its enqueue time (ARQ's `st` - `et`)."""
_FINISHED_AFTER = "fa"
"""A stored result's finish time, in ms after its start time (ARQ's `ft` - `st`)."""


def serialize(data: dict[str, Any]) -> bytes:
    """ARQ `job_serializer`: a job or result dict as JSON bytes.

    Raises TypeError/ValueError for values JSON cannot carry (ARQ reports those).
    """
    if data.get("s") is False and isinstance(data.get("r"), BaseException):
        data = {**data, "r": exception_to_json(data["r"])}
    kwargs = data.get("k")
    if isinstance(kwargs, dict) and POLICY_KWARG in kwargs:
        # A result of a job run by a taskbridge worker: the carried policy goes back to its
        # own field, as in the job, and the kwargs stored are the call's own.
        kwargs = dict(kwargs)
        carried = kwargs.pop(POLICY_KWARG)
        if isinstance(carried, dict):
            carried = {k: v for k, v in carried.items() if k != JOB_TRY_FIELD}
        data = {**data, "k": kwargs}
        if carried:  # nothing stored for the default policy: a result as small as ARQ's own
            data[JOB_FIELD] = carried
    if "s" in data and all(type(data.get(k)) is int for k in ("et", "st", "ft")):
        # A result: its start and finish times as offsets (ms) from the enqueue and the start
        # time, a few digits instead of thirteen each, so that it is as small as ARQ's own
        # pickled result; `deserialize` gives them back as ARQ's `st` and `ft`.
        started, finished = data["st"], data["ft"]
        data = {k: v for k, v in data.items() if k not in ("st", "ft")}
        data[_STARTED_AFTER] = started - data["et"]
        data[_FINISHED_AFTER] = finished - started
    return encode_json(data)


def restore_times(data: dict[str, Any]) -> None:
    """Give a stored result back its `st` and `ft` (ms), which `serialize` keeps as offsets."""
    if _STARTED_AFTER in data and type(data.get("et")) is int:
        started = data["et"] + data.pop(_STARTED_AFTER)
        data["st"], data["ft"] = started, started + data.pop(_FINISHED_AFTER, 0)


def deserialize(raw: bytes | str) -> dict[str, Any]:
    """ARQ `job_deserializer`: JSON bytes back to a job or result dict; never unpickles.

    Raises MessageError for a pickle, for anything that is not JSON, and for JSON that is not
    an ARQ job (missing or mistyped keys).
    """
    if isinstance(raw, bytes) and raw[:1] == _PICKLE_PROTOCOL_2_PLUS:
        raise MessageError(
            "the payload is a pickle (ARQ's default serializer), which taskbridge never loads: "
            "enqueue through taskbridge, or give ARQ job_serializer=taskbridge_arq.serialize"
        )
    data = decode_json(raw, "the ARQ job payload")
    if not isinstance(data, dict):
        raise MessageError(
            f"the ARQ job payload is a JSON {type(data).__name__}, not an object (a job dict)"
        )
    restore_times(data)
    _check_job_shape(data)
    data["a"] = tuple(data["a"])
    result = data.get("r")
    if data.get("s") is False and isinstance(result, dict) and "exception" in result:
        data["r"] = exception_from_json(result)
    return data


def deserialize_for_worker(raw: bytes | str) -> dict[str, Any]:
    """A taskbridge worker's `job_deserializer`: `deserialize`, then the job's JOB_FIELD handed
    to the job function as the reserved kwarg POLICY_KWARG (with the job's `t`, when set, for
    the signature check: ARQ starts such a job at that try)."""
    data = deserialize(raw)
    if "r" in data:
        return data
    carried = data.pop(JOB_FIELD, None)
    kwargs = data["k"]
    if carried is None:
        carried = kwargs.get(POLICY_KWARG)  # queued by an earlier version: in the kwargs
    if isinstance(carried, dict) and data.get("t") is not None:
        carried = {**carried, JOB_TRY_FIELD: data["t"]}
    if carried is not None:
        data["k"] = {**kwargs, POLICY_KWARG: carried}
    return data


def _check_job_shape(data: Mapping[str, Any]) -> None:
    problems = []
    if not isinstance(data.get("f"), str):
        problems.append("'f' (function name) must be a string")
    if not isinstance(data.get("a"), list):
        problems.append("'a' (args) must be a list")
    kwargs = data.get("k")
    if not isinstance(kwargs, dict):
        problems.append("'k' (kwargs) must be an object")
    if data.get("t") is not None and type(data.get("t")) is not int:
        problems.append("'t' (try) must be an integer or null")
    if type(data.get("et")) not in (int, float):
        problems.append("'et' (enqueue time, ms) must be a number")
    if problems:
        raise MessageError(f"the ARQ job payload is not a job: {'; '.join(problems)}")


def _safe_str(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:
        return f"<unprintable {type(error).__name__}>"


def _loaded_exception_class(type_name: str) -> type[BaseException] | None:
    """The class named `module.Qualname`, if its module is imported; no import is attempted."""
    parts = type_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        # Plain dict lookups: a module-level __getattr__ (lazy imports) must not run here.
        found: object = vars(module).get(parts[split])
        for attr in parts[split + 1 :]:
            found = vars(found).get(attr) if isinstance(found, type) else None
        if isinstance(found, type) and (
            issubclass(found, Exception) or issubclass(found, asyncio.CancelledError)
        ):
            return found
        return None
    return None


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException | None:
    try:
        error = cls.__new__(cls, *args)
        if not isinstance(error, cls):
            return None
        error.args = args
        str(error)  # a __str__ that needs attributes set by __init__ fails here, not later
    except Exception:
        return None
    return error
