"""Property tests: random input to the message decoders never crashes them or runs anything.

Each decoder either returns a well-formed message or raises MessageError; an exception rebuilt
from a result never runs code (no `__init__`, classes only from modules already imported).
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbridge import MessageError
from taskbridge.backends import Signer

arq_serializer = pytest.importorskip("taskbridge_arq._serializer")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=15,
)
job_like = st.fixed_dictionaries(
    {},
    optional={
        "t": st.integers() | st.none() | st.text(),
        "f": st.text() | st.integers(),
        "a": st.lists(json_values, max_size=3) | json_values,
        "k": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
        "et": st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        "s": st.booleans(),
        "r": json_values,
    },
)


def _decode_or_reject(raw: bytes) -> dict[str, Any] | None:
    try:
        decoded = arq_serializer.deserialize(raw)
    except MessageError:
        return None
    assert isinstance(decoded, dict)
    assert isinstance(decoded["f"], str) and isinstance(decoded["a"], tuple)
    assert isinstance(decoded["k"], dict)
    return decoded


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arq_decoder_on_random_bytes(raw: bytes) -> None:
    _decode_or_reject(raw)


@settings(max_examples=300, deadline=None)
@given(job_like)
def test_arq_decoder_on_job_shaped_json(job: dict[str, Any]) -> None:
    _decode_or_reject(json.dumps(job).encode())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), json_values)
def test_a_failed_result_never_runs_code_when_rebuilt(
    type_name: str, message: str, args: Any
) -> None:
    raw = json.dumps(
        {
            "t": 1,
            "f": "x",
            "a": [],
            "k": {},
            "et": 1,
            "s": False,
            "r": {"exception": type_name, "message": message, "args": args},
        }
    ).encode()
    decoded = _decode_or_reject(raw)
    if decoded is not None:
        assert isinstance(decoded["r"], BaseException | dict)


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        raise AssertionError("never pickled in this test")


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_every_protocol_are_refused_unread(protocol: int) -> None:
    payload = pickle.dumps({"t": 1, "f": "x", "a": [], "k": {}, "et": 1}, protocol=protocol)
    with pytest.raises(MessageError, match="pickle"):
        arq_serializer.deserialize(payload)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20), st.lists(json_values, max_size=3), st.binary())
def test_signatures_reject_any_other_payload(
    task_id: str, name: str, args: list[Any], garbage: bytes
) -> None:
    signer = Signer(b"k" * 32)
    signature = signer.sign(task_id, name, args, {})
    signer.verify(signature, task_id, name, args, {})
    with pytest.raises(MessageError):
        signer.verify(garbage.hex() or "0", task_id, name, args, {})
