"""Arguments for queues are checked and normalised to JSON at add_task time."""

from __future__ import annotations

import datetime
import enum
import inspect
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from taskbridge import MessageError, TaskArgumentError
from taskbridge._codec import decode_json, encode_json, normalize_arguments


def target(user_id: int, payload: Any = None, *extra: Any, flag: bool = False, **options: Any):  # type: ignore[no-untyped-def]
    ...


SIG = inspect.signature(target)


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class User(BaseModel):
    name: str


def normalize(*args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    return normalize_arguments(SIG, "app.target", args, kwargs)


def test_json_values_pass_and_tuples_become_lists() -> None:
    assert normalize(1, {"a": (1, [2.5, None])}, flag=True) == (
        [1, {"a": [1, [2.5, None]]}],
        {"flag": True},
    )


def test_enums_of_json_scalars_travel_as_their_values() -> None:
    args, kwargs = normalize(Level.HIGH, Colour.RED, mode=Colour.RED)
    assert args == [3, "red"] and kwargs == {"mode": "red"}
    assert type(args[0]) is int and type(args[1]) is str and type(kwargs["mode"]) is str


@pytest.mark.parametrize(
    ("call", "parameter", "path", "type_name", "hint"),
    [
        (
            lambda: normalize(1, datetime.datetime(2026, 1, 1)),
            "payload",
            "payload",
            "datetime",
            "isoformat",
        ),
        (
            lambda: normalize(1, {"who": User(name="x")}),
            "payload",
            "payload['who']",
            "User",
            "model_dump",
        ),
        (lambda: normalize(1, None, 2, {1, 2}), "extra", "extra[1]", "set", "list"),
        (lambda: normalize(1, when=uuid.uuid4()), "when", "when", "UUID", "str(value)"),
        (lambda: normalize(1, [b"raw"]), "payload", "payload[0]", "bytes", "base64"),
    ],
)
def test_non_json_arguments_name_task_parameter_path_and_type(
    call: Any, parameter: str, path: str, type_name: str, hint: str
) -> None:
    with pytest.raises(TaskArgumentError) as info:
        call()
    message = str(info.value)
    assert "'app.target'" in message and repr(path) in message and type_name in message
    assert hint in message
    assert info.value.task_name == "app.target" and info.value.parameter == parameter
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_floats_are_refused(bad: float) -> None:
    with pytest.raises(TaskArgumentError, match="JSON cannot carry"):
        normalize(1, bad)


def test_dict_keys_must_be_strings() -> None:
    with pytest.raises(TaskArgumentError, match=r"key 1 of type int"):
        normalize(1, {1: "a"})


def test_calls_that_do_not_fit_the_signature_fail_at_dispatch() -> None:
    with pytest.raises(TaskArgumentError, match=r"'app.target' cannot be called.*user_id"):
        normalize(payload=1)


def test_decode_json_names_what_it_was_decoding() -> None:
    with pytest.raises(MessageError, match="message body is not valid JSON"):
        decode_json(b"\x80\x03pickle", "message body")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_normalised_values_survive_a_json_round_trip(value: Any) -> None:
    args, _ = normalize(1, value)
    assert json.loads(encode_json(args)) == args


@given(st.binary())
def test_random_bytes_never_decode_to_anything_but_json_or_a_message_error(data: bytes) -> None:
    try:
        decoded = decode_json(data, "payload")
    except MessageError:
        return
    assert json.loads(data) == decoded or decoded != decoded  # NaN compares unequal
