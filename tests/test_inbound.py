"""The one inbound path: Receiver.receive turns an untrusted envelope into a ready call or a
typed error naming the task, the id and the problem, whatever the envelope holds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbridge import MessageError, TaskBridge, TaskBridgeError, UnknownTaskError
from taskbridge.backends import Envelope, Receiver

KEY = "inbound-test-key"
POLICY = {"retries": 2, "retry_backoff": 0.5, "retry_backoff_max": 9.0}
ENGINE = {"timelimit": [7.0, 5.0], "eta": 1700000000000, "expires": None, "retries": 1}


def _bridge(signing_key: str | None = KEY) -> TaskBridge:
    settings_: dict[str, Any] = {"default_backend": "recording"}
    if signing_key is not None:
        settings_["signing_key"] = signing_key
    bridge = TaskBridge(settings=settings_)

    @bridge.task(name="t.add", retries=1)
    def add(a: int, b: int = 0, *, scale: float = 1.0) -> float:
        return (a + b) * scale

    return bridge


def _signed(bridge: TaskBridge, **fields: Any) -> Envelope:
    values: dict[str, Any] = {
        "id": "id-1",
        "task": "t.add",
        "args": [1, 2],
        "kwargs": {"scale": 2.0},
        "policy": dict(POLICY),
        "engine": dict(ENGINE),
    }
    signer = bridge.signer
    assert signer is not None
    signature = signer.sign(
        values["id"],
        values["task"],
        values["args"],
        values["kwargs"],
        policy=values["policy"],
        engine=values["engine"],
    )
    values.update({"signature": signature, **fields})
    return Envelope(**values)


def test_a_valid_envelope_becomes_a_call_with_the_carried_policy() -> None:
    bridge = _bridge()
    call = Receiver(bridge, "celery").receive(_signed(bridge, trace={"traceparent": "00-x"}))
    assert (call.id, call.task.name, call.args, call.kwargs) == (
        "id-1",
        "t.add",
        (1, 2),
        {"scale": 2.0},
    )
    assert (call.policy.retries, call.policy.retry_backoff, call.policy.backend) == (
        2,
        0.5,
        "celery",
    )
    assert call.trace == {"traceparent": "00-x"}


@pytest.mark.parametrize(
    "change",
    [
        {"id": "id-2"},
        {"task": "t.other"},
        {"args": [1, 3]},
        {"kwargs": {"scale": 3.0}},
        {"policy": {**POLICY, "retries": 9}},
        {"policy": None},
        {"engine": {**ENGINE, "timelimit": [0.1, 0.1]}},
        {"engine": {**ENGINE, "eta": 1600000000000}},
        {"engine": {**ENGINE, "retries": 0}},
        {"engine": {**ENGINE, "expires": 1}},
        {"signature": None},
        {"signature": "00" * 32},
    ],
    ids=lambda change: next(iter(change)),
)
def test_altering_anything_that_changes_behaviour_breaks_the_signature(
    change: dict[str, Any],
) -> None:
    bridge = _bridge()

    @bridge.task(name="t.other")
    def other(a: int, b: int = 0, *, scale: float = 1.0) -> None: ...

    with pytest.raises(MessageError, match=r"not signed|does not match"):
        Receiver(bridge, "celery").receive(_signed(bridge, **change))


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"task": None}, MessageError, "no task name"),
        ({"task": "t.missing"}, UnknownTaskError, "t.missing"),
        ({"id": 42}, MessageError, "has no id"),
        ({"id": ""}, MessageError, "has no id"),
        ({"args": {"a": 1}}, MessageError, "args are a dict"),
        ({"kwargs": [1]}, MessageError, "kwargs are not a map"),
        ({"args": [1, 2, 3, 4]}, MessageError, "do not fit the task"),
        ({"args": [], "kwargs": {}}, MessageError, "do not fit the task"),
        ({"kwargs": {"nope": 1}}, MessageError, "do not fit the task"),
        ({"policy": [1]}, MessageError, "policy is a list"),
        ({"policy": {"retries": -1}}, MessageError, "policy is invalid"),
        ({"policy": {"timeout": "soon"}}, MessageError, "policy is invalid"),
    ],
)
def test_malformed_envelopes_get_a_typed_error_naming_task_and_id(
    fields: dict[str, Any], error: type[Exception], words: str
) -> None:
    bridge = _bridge(signing_key=None)
    base: dict[str, Any] = {"id": "id-9", "task": "t.add", "args": [1], "kwargs": {}}
    with pytest.raises(error, match=words) as caught:
        Receiver(bridge, "arq").receive(Envelope(**{**base, **fields}))
    if error is MessageError and "task" not in fields and "id" not in fields:
        assert "'t.add' [id-9]" in str(caught.value)


def test_without_a_carried_policy_the_workers_own_applies() -> None:
    bridge = _bridge(signing_key=None)
    receiver = Receiver(bridge, "arq")
    call = receiver.receive(Envelope("id", "t.add", [1], {}))
    assert call.policy.retries == 1  # the decorator's
    defaults = Receiver(bridge, "arq", carried_defaults={"retries": 0})
    assert defaults.receive(Envelope("id", "t.add", [1], {}, policy={})).policy.retries == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
anything = json_values | st.builds(object) | st.binary() | st.tuples(json_values)


@settings(max_examples=300, deadline=None)
@given(
    task_id=anything,
    name=st.sampled_from(["t.add", "t.missing", ""]) | anything,
    args=anything,
    kwargs=anything,
    policy=anything,
    engine=st.dictionaries(st.text(max_size=8), anything, max_size=3),
    signature=anything,
    trace=anything,
    signed=st.booleans(),
)
def test_any_envelope_is_a_call_or_a_taskbridge_error(
    task_id: Any,
    name: Any,
    args: Any,
    kwargs: Any,
    policy: Any,
    engine: dict[str, Any],
    signature: Any,
    trace: Any,
    signed: bool,
) -> None:
    bridge = _bridge(KEY if signed else None)
    envelope = Envelope(task_id, name, args, kwargs, policy, engine, signature, trace)
    try:
        call = Receiver(bridge, "celery").receive(envelope)
    except TaskBridgeError as exc:
        assert str(exc)
        return
    assert not signed  # a random signature never verifies
    call.task.signature.bind(*call.args, **call.kwargs)
    assert call.policy.retries >= 0
