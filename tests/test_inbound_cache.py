"""What the Receiver remembers between messages (bindings per argument shape, policies per
carried policy) never changes what it decides: each cached answer is the one a fresh check
gives, keyed by everything the check depends on."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbridge import MessageError, TaskBridge
from taskbridge.backends import Envelope, Policy, Receiver


def _bridge() -> TaskBridge:
    bridge = TaskBridge(settings={"default_backend": "recording"})

    @bridge.task(name="t.add", retries=1, timeout=30)
    def add(a: int, b: int = 0, *, scale: float = 1.0) -> float:
        return (a + b) * scale

    @bridge.task(name="t.star")
    def star(first: int, *rest: int, **named: int) -> int:
        return first

    return bridge


def _receive(receiver: Receiver, task: str, args: Any, kwargs: Any, policy: Any = None) -> Any:
    return receiver.receive(Envelope("id-1", task, args, kwargs, policy))


def test_a_changed_policy_is_not_served_from_the_cache() -> None:
    receiver = Receiver(_bridge(), "celery")
    first = _receive(receiver, "t.add", [1], {}, {"retries": 3, "timeout": 5.0}).policy
    second = _receive(receiver, "t.add", [1], {}, {"retries": 4, "timeout": 5.0}).policy
    again = _receive(receiver, "t.add", [1], {}, {"retries": 3, "timeout": 5.0}).policy
    assert (first.retries, second.retries, again.retries) == (3, 4, 3)
    assert again is first  # the same carried fields: the cached policy
    assert _receive(receiver, "t.add", [1], {}).policy.retries == 1  # the worker's own


def test_an_invalid_policy_is_rejected_every_time_even_after_a_valid_one() -> None:
    receiver = Receiver(_bridge(), "celery")
    assert _receive(receiver, "t.add", [1], {}, {"retries": 2}).policy.retries == 2
    for _ in range(2):
        with pytest.raises(MessageError, match="policy is invalid"):
            _receive(receiver, "t.add", [1], {}, {"retries": -2})
    with pytest.raises(MessageError, match="policy is invalid"):
        _receive(receiver, "t.add", [1], {}, {"timeout": [1, 2]})  # unhashable: not cached


def test_the_policy_cache_is_keyed_by_task_and_by_value_types() -> None:
    receiver = Receiver(_bridge(), "celery")
    add = _receive(receiver, "t.add", [1], {}, {"retries": 2}).policy
    star = _receive(receiver, "t.star", [1], {}, {"retries": 2}).policy
    assert (add.timeout, star.timeout) == (30.0, None)  # each task's own resolution
    # equal values of other types (1, True, 1.0) are validated on their own, not looked up
    # under each other's key: each gets what validation makes of it
    for value in (1, True, 1.0):
        jitter = _receive(receiver, "t.add", [1], {}, {"retry_jitter": value}).policy
        assert jitter.retry_jitter is True
    with pytest.raises(MessageError, match="policy is invalid"):
        _receive(receiver, "t.add", [1], {}, {"retry_jitter": "1.5"})


def test_fields_other_than_execution_fields_do_not_split_the_cache() -> None:
    receiver = Receiver(_bridge(), "arq", carried_defaults={"retries": 0})
    one = _receive(receiver, "t.add", [1], {}, {"retries": 2, "due": 1}).policy
    two = _receive(receiver, "t.add", [1], {}, {"retries": 2, "due": 2}).policy
    assert one is two
    assert one.backend == "arq"
    # a field left out takes the carried default, not the worker's own value (1)
    assert _receive(receiver, "t.add", [1], {}, {"timeout": 3.0}).policy.retries == 0


def test_a_task_registered_again_under_the_same_name_is_not_served_the_old_answers() -> None:
    bridge = _bridge()
    receiver = Receiver(bridge, "celery")
    old = _receive(receiver, "t.add", [1, 2], {}, {"timeout": 4.0})
    assert old.policy.retries == 1
    # the same function registered again (a reloaded module): a new task, with its own policy
    bridge.task(name="t.add", retries=5)(old.task.func)
    new = _receive(receiver, "t.add", [1, 2], {}, {"timeout": 4.0})
    assert new.task is not old.task
    assert (new.policy.retries, new.policy.timeout) == (5, 4.0)
    with pytest.raises(MessageError, match="do not fit"):
        _receive(receiver, "t.add", [1, 2, 3], {})


_SHAPES = st.tuples(
    st.sampled_from(["t.add", "t.star"]),
    st.integers(min_value=0, max_value=4),
    st.lists(st.sampled_from(["a", "b", "scale", "first", "x"]), max_size=3, unique=True),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SHAPES, min_size=1, max_size=12))
def test_a_cached_binding_answer_is_the_one_inspect_gives(shapes: list[Any]) -> None:
    bridge = _bridge()
    receiver = Receiver(bridge, "celery")
    for name, positional, names in shapes:
        task = bridge.get_task(name)
        args, kwargs = list(range(positional)), dict.fromkeys(names, 1)
        try:
            inspect.signature(task.func).bind(*args, **kwargs)
        except TypeError as exc:
            with pytest.raises(MessageError) as caught:
                _receive(receiver, name, args, kwargs)
            assert str(exc) in str(caught.value)
        else:
            call = _receive(receiver, name, args, kwargs)
            assert (call.args, call.kwargs) == (tuple(args), kwargs)


def test_policy_is_the_validated_policy_for_a_message_sent_without_one() -> None:
    receiver = Receiver(_bridge(), "celery")
    policy = receiver.policy(receiver.bridge.get_task("t.add"), None)
    assert policy == Policy(backend="celery", retries=1, timeout=30.0)
