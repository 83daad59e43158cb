"""The AMQP frames the publisher thread writes are byte for byte those py-amqp would write."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from amqp import Message, spec  # type: ignore[import-untyped]
from amqp.method_framing import frame_writer  # type: ignore[import-untyped]
from amqp.serialization import dumps  # type: ignore[import-untyped]
from taskbridge_celery._amqp_wire import publish_frames
from taskbridge_celery._protocol import build_message

from taskbridge import TaskBridge


def py_amqp_frames(message: Any, channel: int, frame_max: int) -> bytes:
    """What py-amqp's own frame writer sends for `basic_publish(..., mandatory=True)`."""
    written: list[bytes] = []
    connection = SimpleNamespace(frame_max=frame_max, bytes_sent=0)
    write = frame_writer(
        connection, SimpleNamespace(write=lambda data: written.append(bytes(data)))
    )
    content = Message(
        message.body,
        priority=0,
        content_type="application/json",
        content_encoding="utf-8",
        application_headers=message.headers,
        **message.properties,
    )
    args = dumps("Bssbb", (0, message.exchange, message.routing_key or message.queue, True, False))
    write(1, channel, spec.Basic.Publish, args, content)
    return b"".join(written)


@pytest.fixture(scope="module")
def bridge() -> TaskBridge:
    bridge = TaskBridge({"backends": {"celery": {"broker_url": "amqp://h//"}}})

    @bridge.task(name="wire.task", backend="celery", retries=3, timeout=2.5, delay=1)
    def task(*args: Any, **kwargs: Any) -> None:
        """Only encoded."""

    @bridge.task(name="wire.atask", backend="celery")
    async def atask(*args: Any, **kwargs: Any) -> None:
        """Only encoded."""

    return bridge


ARGUMENTS = [
    ((), {}),
    ((1, "é ✓ \U0001f600", 2.5, None, True, False), {"k": [1, {"n": None}]}),
    ((2**40, -(2**31), 2**31 - 1, -(2**31) + 1, 0), {"big": -(2**63)}),
    (([[], {}, [[[]]]],), {"": ""}),
]


@pytest.mark.parametrize(("args", "kwargs"), ARGUMENTS)
@pytest.mark.parametrize("name", ["wire.task", "wire.atask"])
def test_frames_are_py_amqps(
    bridge: TaskBridge, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    call = bridge.prepare(bridge.get_task(name), args, kwargs)[1]
    message = build_message(call, "a-queue")
    assert publish_frames(message, 1, 131072) == py_amqp_frames(message, 1, 131072)


def test_a_body_larger_than_a_frame_is_split_like_py_amqp(bridge: TaskBridge) -> None:
    call = bridge.prepare(bridge.get_task("wire.task"), ("x" * 20000,), {})[1]
    message = build_message(call, "q")
    frames = publish_frames(message, 3, 4096)
    assert frames == py_amqp_frames(message, 3, 4096)
    assert frames.count(b"\xce") > 5  # method, header and several body frames


def test_values_amqp_cannot_carry_are_refused(bridge: TaskBridge) -> None:
    call = bridge.prepare(bridge.get_task("wire.task"), (), {})[1]
    message = build_message(call, "q")
    message.headers["bad"] = object()
    with pytest.raises(ValueError, match="AMQP table cannot hold"):
        publish_frames(message, 1, 131072)
    with pytest.raises(ValueError, match="255 bytes"):
        publish_frames(build_message(call, "q" * 300), 1, 131072)


def test_a_delayed_call_on_quorum_queues_is_published_to_its_exchange_like_py_amqp() -> None:
    from kombu.transport.native_delayed_delivery import (  # type: ignore[import-untyped]
        calculate_routing_key,
    )
    from taskbridge_celery._protocol import MessageBuilder

    celery = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}
    options = {"broker_url": "amqp://h//", "default_queue": "wire-q", "celery": celery}
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name="wire.later", backend="celery")
    def later() -> None:
        """Only encoded."""

    app = bridge.backend("celery").app  # type: ignore[attr-defined]
    call = bridge.prepare(later.using(delay=90), (), {})[1]
    message = MessageBuilder(app, "wire-q").build(call)
    assert message.exchange == "celery_delayed_27"
    assert message.routing_key == calculate_routing_key(90, "wire-q")
    assert publish_frames(message, 2, 131072) == py_amqp_frames(message, 2, 131072)
