"""Messages are made by the installed Celery: its own headers, and reprs equal to its saferepr."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from taskbridge_celery._protocol import celery_repr

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(json_values, max_size=6) | st.dictionaries(st.text(max_size=8), json_values))
def test_argsrepr_is_exactly_celerys_saferepr(value: Any) -> None:
    assert celery_repr(value) == saferepr(value, 1024)
    assert celery_repr(value, 40) == saferepr(value, 40)


def test_long_and_nested_values_fall_back_to_saferepr() -> None:
    for value in (["x" * 2000], [[[[[1]]]]], ["é\n'\""], [list(range(500))]):
        assert celery_repr(value) == saferepr(value, 1024)
