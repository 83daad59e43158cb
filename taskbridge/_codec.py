"""Arguments as JSON: checked and normalised in the caller, so workers never meet a bad payload."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._exceptions import MessageError, TaskArgumentError

__all__ = [
    "bind_arguments",
    "decode_json",
    "encode_json",
    "json_arguments",
    "normalize_arguments",
]

_HINTS: dict[str, str] = {
    "datetime": "pass value.isoformat()",
    "date": "pass value.isoformat()",
    "time": "pass value.isoformat()",
    "UUID": "pass str(value)",
    "Decimal": "pass str(value)",
    "bytes": "pass base64.b64encode(value).decode()",
    "bytearray": "pass base64.b64encode(value).decode()",
    "set": "pass sorted(value) or list(value)",
    "frozenset": "pass sorted(value) or list(value)",
    "Path": "pass str(value)",
    "PosixPath": "pass str(value)",
}


def _hint(value: object) -> str:
    if hasattr(value, "model_dump"):
        return "pass value.model_dump(mode='json') and rebuild the model in the task"
    return _HINTS.get(
        type(value).__name__, "pass JSON types only: str, int, float, bool, None, list, dict"
    )


MAX_DEPTH = 100
"""Deepest nesting of lists and dicts accepted in a queued call's arguments."""


def _normalize(value: Any, path: str, task_name: str, parameter: str, depth: int = 0) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if depth >= MAX_DEPTH and (kind is list or kind is tuple or kind is dict):
        raise TaskArgumentError(
            f"task {task_name!r}: argument {parameter!r} is nested more than {MAX_DEPTH} levels "
            f"deep (at {path[:80]}...); flatten it or pass a reference (an id, a URL) instead",
            task_name=task_name,
            parameter=parameter,
        )
    if kind is float:
        if math.isfinite(value):
            return value
        raise TaskArgumentError(
            f"task {task_name!r}: argument {path!r} is {value!r}, which JSON cannot carry",
            task_name=task_name,
            parameter=parameter,
        )
    if kind is list or kind is tuple:
        return [
            _normalize(v, f"{path}[{i}]", task_name, parameter, depth + 1)
            for i, v in enumerate(value)
        ]
    if kind is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TaskArgumentError(
                    f"task {task_name!r}: argument {path!r} has the key {key!r} of type "
                    f"{type(key).__name__}; JSON objects take str keys only",
                    task_name=task_name,
                    parameter=parameter,
                )
            out[key] = _normalize(item, f"{path}[{key!r}]", task_name, parameter, depth + 1)
        return out
    # Subclasses of JSON scalars (StrEnum, IntEnum, ...) travel as their plain value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _normalize(float(value), path, task_name, parameter)
    raise TaskArgumentError(
        f"task {task_name!r}: argument {path!r} is a {kind.__module__}.{kind.__qualname__}, "
        f"which is not JSON; {_hint(value)}",
        task_name=task_name,
        parameter=parameter,
    )


def bind_arguments(
    signature: inspect.Signature, task_name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    """Bind a call to the task's signature; a mismatch is a TaskArgumentError naming the task."""
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TaskArgumentError(
            f"task {task_name!r} cannot be called with these arguments: {exc}", task_name=task_name
        ) from None


def normalize_arguments(
    signature: inspect.Signature, task_name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Check a call against the task's signature and return its arguments as JSON values.

    Tuples become lists and str/int enums their values, as a JSON round trip would make them.
    Anything else that JSON cannot carry raises TaskArgumentError naming the task, the parameter
    (with the path inside it) and the type.
    """
    bound = bind_arguments(signature, task_name, args, kwargs)
    params = signature.parameters
    for name, value in bound.arguments.items():
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = {k: _normalize(v, k, task_name, k) for k, v in value.items()}
        else:
            bound.arguments[name] = _normalize(value, name, task_name, name)
    return list(bound.args), dict(bound.kwargs)


def json_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], limit: int
) -> tuple[list[Any], dict[str, Any]] | None:
    """A call's arguments as JSON values (normalised as `normalize_arguments` does), when they
    are JSON and take at most `limit` bytes encoded; None otherwise. (What a backend keeps of a
    failed call's arguments to show and run again: the caller's objects need not be JSON.)"""
    try:
        json_args = _normalize(list(args), "args", "", "args")
        json_kwargs = _normalize(dict(kwargs), "kwargs", "", "kwargs")
    except TaskArgumentError:
        return None
    if len(encode_json([json_args, json_kwargs])) > limit:
        return None
    return json_args, json_kwargs


def encode_json(value: Any) -> bytes:
    """Compact JSON bytes; NaN and infinities are refused, not written as invalid JSON."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def decode_json(data: bytes | str, what: str) -> Any:
    """Decode JSON from the wire; anything else is a MessageError naming `what` it was."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MessageError(f"{what} is nested too deeply to decode") from None
