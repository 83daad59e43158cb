"""The protocol-2 headers of a task message, checked before Celery's worker reads them.

Celery's consumer, its default strategy and its Request read these headers without checking
them: a task name that is not a string, a missing id on a message for an unknown task, time
limits that are not a pair, a `stamped_headers` that is not a list... raise inside the consumer,
which stops the whole worker ("Unrecoverable error") and leaves the message to be delivered
again. `check_celery_headers` says what is wrong instead, so that the message can be dropped and
marked failed. It reuses the checks of `_protocol` (time limits, eta, expires, retries), through
`engine_fields_of`, which the task's strategy uses too, so that every place that checks a header
agrees. What only taskbridge reads (the carried policy, the signature, the arguments) is checked
once, by the core's `Receiver` in the strategy of each taskbridge task (`_inbound`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery.utils.time import maybe_iso8601  # type: ignore[import-untyped]

from taskbridge import TaskBridgeError

from ._protocol import engine_fields_from_headers

__all__ = ["check_celery_headers", "engine_fields_of"]

_SHOWN = 64
"""Characters of a bad value quoted in a problem."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def engine_fields_of(headers: Mapping[str, Any]) -> dict[str, Any]:
    """`engine_fields_from_headers(headers)`: the same fields, or the same MessageError.

    The headers of almost every call (no time limits, no eta, no expiry) take a fast path that
    gives what `engine_fields_from_headers` gives for them.
    """
    get = headers.get
    if get("eta") is None and get("expires") is None:
        limits = get("timelimit")
        retries = get("retries")
        if retries is None:
            retries = 0
        if (
            type(retries) is int
            and retries >= 0
            and (
                limits is None
                or (
                    type(limits) is list
                    and len(limits) == 2
                    and limits[0] is None
                    and limits[1] is None
                )
            )
        ):
            return {"timelimit": [None, None], "eta": None, "expires": None, "retries": retries}
    return engine_fields_from_headers(headers)


def check_celery_headers(headers: object) -> str | None:
    """Why Celery's worker cannot take a task message with these headers; None if it can.

    Checked, as Celery's worker reads them:

    - the headers are a map;
    - `task` and `id` are non-empty strings (Celery looks the task up by name, and files the
      failure of an unknown task under its id);
    - `timelimit`, `eta`, `expires` and `retries` are what Celery's strategy and Request parse
      (a pair of seconds or nulls, ISO dates, a count), as `_protocol` checks them, and the
      dates also as Celery parses them;
    - `stamped_headers` is a list of names and `stamps` a map (Celery iterates them), and
      `ignore_result` a boolean (a truthy string would silently drop the result).

    Cheap enough for every message: type checks, and dates parsed only when present.
    """
    if not isinstance(headers, Mapping):
        return f"its headers are a {type(headers).__name__}, not a map"
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        return f"its 'task' header {_shown(task)} is not a task name"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"its 'id' header {_shown(task_id)} is not a task id"
    try:
        engine_fields_of(headers)
    except TaskBridgeError as exc:
        return str(exc)
    except Exception as exc:  # a date Python cannot place on the clock, and the like
        return f"its eta, expires or timelimit header cannot be read ({type(exc).__name__}: {exc})"
    for name in ("eta", "expires"):  # also as Celery's Request parses them (dateutil)
        value = headers.get(name)
        if isinstance(value, str):
            try:
                maybe_iso8601(value)
            except Exception:
                return f"its {name!r} header {_shown(value)} is not an ISO date"
    stamped = headers.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, list | tuple) and all(isinstance(name, str) for name in stamped)
    ):
        return f"its 'stamped_headers' header {_shown(stamped)} is not a list of names"
    stamps = headers.get("stamps")
    if stamps is not None and not isinstance(stamps, Mapping):
        return f"its 'stamps' header {_shown(stamps)} is not a map"
    ignore_result = headers.get("ignore_result")
    if ignore_result is not None and not isinstance(ignore_result, bool):
        return f"its 'ignore_result' header {_shown(ignore_result)} is not a boolean"
    return None
