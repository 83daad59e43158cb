"""The Celery worker's fast paths give what the general paths give.

`engine_fields_of` answers the headers of almost every call without parsing them; for any
headers it returns what `engine_fields_from_headers` returns, or raises the same error. The
consumer's header check leaves the carried policy to the task's strategy (the core's Receiver),
which still rejects a bad one.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from taskbridge_celery._headers import check_celery_headers, engine_fields_of
from taskbridge_celery._inbound import _problem
from taskbridge_celery._protocol import build_message, engine_fields_from_headers
from taskbridge_celery._worker import _stores_results

from taskbridge import TaskBridge
from taskbridge.backends import Receiver

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10**6),
    st.floats(allow_nan=False, min_value=-5, max_value=1e6),
    st.sampled_from(["", "x", "2026-01-02T03:04:05", "2026-01-02T03:04:05+00:00", "soon"]),
    st.lists(st.one_of(st.none(), st.integers(-1, 9), st.floats(0, 9), st.text(max_size=2))),
    st.tuples(st.none(), st.none()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

_HEADERS = st.fixed_dictionaries(
    {},
    optional={name: _VALUES for name in ("timelimit", "eta", "expires", "retries")},
)


def _outcome(function: Any, headers: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", function(headers)
    except Exception as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=500, deadline=None)
@given(_HEADERS)
def test_engine_fields_of_is_engine_fields_from_headers(headers: dict[str, Any]) -> None:
    assert _outcome(engine_fields_of, headers) == _outcome(engine_fields_from_headers, headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"timelimit": [None, None], "eta": None, "expires": None, "retries": 0},
        {"timelimit": None, "retries": None},
        {"timelimit": [None, None], "retries": 7},
    ],
)
def test_the_common_headers_take_the_fast_path_and_get_fresh_fields(
    headers: dict[str, Any],
) -> None:
    first = engine_fields_of(headers)
    assert first == engine_fields_from_headers(headers)
    first["timelimit"].append("changed")  # a caller's change does not reach the next call
    assert engine_fields_of(headers) == engine_fields_from_headers(headers)


def _bridge() -> TaskBridge:
    bridge = TaskBridge(settings={"backends": {"celery": {"broker_url": "redis://127.0.0.1:1/9"}}})

    @bridge.task(name="speed.add", backend="celery")
    def add(a: int, b: int = 0) -> int:
        return a + b

    return bridge


class _Message:
    """What the strategy reads of a kombu message: decoded payload and headers."""

    def __init__(self, headers: dict[str, Any], payload: Any) -> None:
        self.headers, self.payload = headers, payload


def test_a_bad_policy_passes_the_consumer_check_and_is_rejected_by_the_strategy() -> None:
    bridge = _bridge()
    task = bridge.get_task("speed.add")
    message = build_message(bridge.prepare(task, (1,), {})[1], "q")
    receiver = Receiver(bridge, "celery")
    payload = [[1], {}, None]
    assert check_celery_headers(message.headers) is None
    assert _problem(receiver, _Message(message.headers, payload)) is None
    for bad in ({"retries": -1}, {"timeout": "soon"}, "many", {"retries": [1]}):
        headers = {**message.headers, "taskbridge_policy": bad}
        assert check_celery_headers(headers) is None  # nothing Celery itself reads
        problem = _problem(receiver, _Message(headers, payload))
        assert problem is not None and "polic" in problem, problem
    # headers Celery reads are still refused by the consumer
    assert check_celery_headers({**message.headers, "timelimit": "ab"}) is not None
    assert check_celery_headers({**message.headers, "eta": "not a date"}) is not None


def test_whether_an_app_stores_results_is_read_from_its_settings() -> None:
    without = Celery("speed-without", set_as_current=False)
    with_backend = Celery("speed-with", set_as_current=False)
    with_backend.conf.result_backend = "redis://127.0.0.1:1/9"
    assert _stores_results(without) is False
    assert _stores_results(with_backend) is True


def test_task_names_celery_cannot_compile_as_functions_still_register() -> None:
    # Celery compiles a function named after the task (head_from_fun): a name such as
    # `reports-build` or a named lambda used to kill the worker at start with a SyntaxError.
    from celery import Celery
    from taskbridge_celery._worker import register_tasks

    from taskbridge import TaskBridge

    bridge = TaskBridge({"backends": {"celery": {"broker_url": "redis://127.0.0.1:1/9"}}})
    bridge.task(name="reports-build", backend="celery")(lambda month: month)
    bridge.task(name="billing.class", backend="celery")(lambda: None)
    bridge.task(name="shout", backend="celery")(lambda text: text.upper())
    app = Celery("names", set_as_current=False)
    register_tasks(app, bridge)
    assert {"reports-build", "billing.class", "shout"} <= set(app.tasks)
    assert app.tasks["shout"].run.__name__ == "shout"
    assert app.tasks["reports-build"].run.__name__ == "reports_build"
    assert app.tasks["billing.class"].run.__name__ == "task_class"
