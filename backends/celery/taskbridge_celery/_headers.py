"""The protocol-2 headers of a task message, checked before Celery's worker reads them.

Celery's consumer, its default strategy and its Request read these headers without checking
them: a task name that is not a string, a missing id on a message for an unknown task, time
limits that are not a pair, a `stamped_headers` that is not a list... raise inside the consumer,
which stops the whole worker ("Unrecoverable error") and leaves the message to be delivered
again. `check_celery_headers` says what is wrong instead, so that the message can be dropped and
marked failed. It reuses the checks of `_protocol` (time limits, eta, expires, retries) and of
the core (the carried policy), so that every place that checks a header agrees.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import Any

from celery.utils.time import maybe_iso8601  # type: ignore[import-untyped]

from taskbridge import TaskBridgeError
from taskbridge.backends import Policy, with_execution_fields

from ._protocol import POLICY_HEADER, engine_fields_from_headers

__all__ = ["check_celery_headers"]

_SHOWN = 64
"""Characters of a bad value quoted in a problem."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


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
      `ignore_result` a boolean (a truthy string would silently drop the result);
    - the `taskbridge_policy` header, when present, is a map of valid execution fields.

    Cheap enough for every message: type checks, and the policy validated once per distinct
    policy.
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
        engine_fields_from_headers(headers)
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
    carried = headers.get(POLICY_HEADER)
    if carried is not None:
        return _policy_problem(carried)
    return None


def _policy_problem(carried: object) -> str | None:
    if not isinstance(carried, Mapping):
        return f"its {POLICY_HEADER} header is a {type(carried).__name__}, not a map"
    try:
        key = frozenset(carried.items())
    except TypeError:  # a value that is a list or a map: not a valid field anyway
        return _validate_policy(carried)
    return _cached_policy_problem(key)


@functools.lru_cache(maxsize=256)
def _cached_policy_problem(items: frozenset[tuple[Hashable, Any]]) -> str | None:
    return _validate_policy(dict(items))


def _validate_policy(carried: Mapping[Any, Any]) -> str | None:
    if not all(isinstance(name, str) for name in carried):
        return f"its {POLICY_HEADER} header has a key that is not a name"
    try:
        with_execution_fields(Policy(), carried)
    except TaskBridgeError as exc:
        return f"its {POLICY_HEADER} header is invalid: {exc}"
    return None
