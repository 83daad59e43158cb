"""`delay=` on RabbitMQ: Celery's native delayed delivery with quorum queues, the eta otherwise.

With quorum queues (Celery's `task_default_queue_type="quorum"`) and a topic exchange, a delayed
call is published as Celery's own `send_task` publishes it: to `celery_delayed_27`, with kombu's
`calculate_routing_key`; RabbitMQ holds it in its delay queues and the worker gets it when it is
due. A classic-queue setup keeps sending the eta, held by the worker.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.transport.native_delayed_delivery import (  # type: ignore[import-untyped]
    CELERY_DELAYED_DELIVERY_EXCHANGE,
    MAX_LEVEL,
    calculate_routing_key,
    level_name,
)
from taskbridge_celery._protocol import MessageBuilder

from conftest import wait_until
from taskbridge import TaskBridge

from .conftest import (
    Stack,
    celery_env,
    delete_amqp_queues,
    load_app_module,
    run,
    start_worker,
    stop,
)

QUORUM = {"task_default_queue_type": "quorum", "task_default_exchange_type": "topic"}
MISSING_QUORUM = {
    "task_create_missing_queue_type": "quorum",
    "task_create_missing_queue_exchange_type": "topic",
}


class _Capture:
    """A producer for Celery's own `send_task`, keeping where it publishes."""

    def __init__(self) -> None:
        self.connection = self
        self.sent: dict[str, Any] = {}

    def _reraise_as_library_errors(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def publish(self, body: Any, **options: Any) -> None:
        self.sent = options


def _bridge(celery: dict[str, Any], queue: str = "dd-q") -> TaskBridge:
    bridge = TaskBridge(
        {
            "backends": {
                "celery": {"broker_url": "amqp://h//", "default_queue": queue, "celery": celery}
            }
        }
    )

    @bridge.task(name="dd.task", backend="celery")
    def task(n: int) -> None:
        """Only built."""

    return bridge


def _route(bridge: TaskBridge, delay: float, queue: str | None = None) -> tuple[str, str]:
    app = bridge.backend("celery").app  # type: ignore[attr-defined]
    builder = MessageBuilder(app, app.conf.task_default_queue)
    using = {"delay": delay, **({"queue": queue} if queue else {})}
    call = bridge.prepare(bridge.get_task("dd.task").using(**using), (1,), {})[1]
    message = builder.build(call)
    return message.exchange, message.routing_key or message.queue


def _celerys_route(bridge: TaskBridge, countdown: float, queue: str) -> tuple[str, str]:
    app = bridge.backend("celery").app  # type: ignore[attr-defined]
    capture = _Capture()
    app.send_task("dd.task", args=(1,), countdown=countdown, producer=capture, queue=queue)
    exchange = capture.sent["exchange"]
    return getattr(exchange, "name", exchange) or "", capture.sent["routing_key"]


@pytest.mark.parametrize("delay", [1, 2.5, 61, 86400 * 3])
def test_on_quorum_queues_a_delayed_call_goes_where_celerys_send_task_sends_it(
    delay: float,
) -> None:
    bridge = _bridge(QUORUM)
    exchange, routing_key = _route(bridge, delay)
    assert exchange == level_name(MAX_LEVEL) == "celery_delayed_27"
    assert routing_key == calculate_routing_key(int(delay), "dd-q")
    assert (exchange, routing_key) == _celerys_route(bridge, delay, "dd-q")
    # A queue named by the call is created as Celery creates missing queues: classic, with a
    # direct exchange, so Celery sends the eta to it (and warns) ...
    assert _route(bridge, delay, "other-q") == _celerys_route(bridge, delay, "other-q")
    assert _route(bridge, delay, "other-q") == ("", "other-q")
    # ... unless its settings for missing queues say otherwise
    everywhere = _bridge({**QUORUM, **MISSING_QUORUM})
    assert _route(everywhere, delay, "other-q") == _celerys_route(everywhere, delay, "other-q")
    assert _route(everywhere, delay, "other-q") == (
        "celery_delayed_27",
        calculate_routing_key(int(delay), "other-q"),
    )


@pytest.mark.parametrize(
    ("celery", "delay"),
    [
        ({}, 5),  # classic queues: the eta, through the default exchange
        ({"task_default_queue_type": "quorum"}, 5),  # a direct exchange: Celery sends the eta
        (QUORUM, 0.5),  # under a second: Celery's int(countdown) would be 0
        (QUORUM, 0),
    ],
)
def test_otherwise_a_delayed_call_goes_to_its_queue_with_its_eta(
    celery: dict[str, Any], delay: float
) -> None:
    assert _route(_bridge(celery), delay) == ("", "dd-q")


def _exchange_exists(url: str, name: str) -> bool:
    from kombu import Connection

    with Connection(url) as connection:
        try:
            connection.channel().exchange_declare(name, "topic", passive=True)
        except connection.channel_errors:
            return False
        return True


@pytest.fixture
def delayed_topology(amqp_url: str) -> Iterator[None]:
    """RabbitMQ's shared delayed-delivery exchanges and queues (Celery's fixed names): removed
    afterwards when this test made them."""
    existed = _exchange_exists(amqp_url, CELERY_DELAYED_DELIVERY_EXCHANGE)
    yield
    if existed:
        return
    from kombu import Connection

    with Connection(amqp_url) as connection:
        channel = connection.channel()
        for level in range(MAX_LEVEL + 1):
            channel.queue_delete(level_name(level))
            channel.exchange_delete(level_name(level))
        channel.exchange_delete(CELERY_DELAYED_DELIVERY_EXCHANGE)


def _scheduled(app: Any, hostname: str) -> list[Any]:
    """The calls a worker holds until their eta (Celery's `inspect scheduled`)."""
    replies = app.control.inspect(timeout=3, destination=[hostname]).scheduled()
    assert replies and hostname in replies, f"{hostname} did not answer"
    return list(replies[hostname])


def _waiting_in(amqp_url: str, queue: str) -> int:
    from kombu import Connection

    with Connection(amqp_url) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).message_count)


def test_a_quorum_queue_worker_gets_a_delayed_call_from_rabbitmq_when_it_is_due(
    amqp_url: str,
    redis_url: str,
    amqp_stack: Stack,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    delayed_topology: None,
) -> None:
    queue = unique_name("quorum")
    prefix, key = f"{queue}:", "delayed"
    options = {
        "broker_url": amqp_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
        "celery": QUORUM,
    }
    app_module = load_app_module(tmp_path)
    env = {
        **celery_env({k: v for k, v in options.items() if k != "celery"}),
        **{f"TASKBRIDGE_BACKENDS__CELERY__CELERY__{k.upper()}": v for k, v in QUORUM.items()},
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_PREFIX": prefix,
    }
    hostname = f"{queue}@{socket.gethostname()}"
    args = ["worker", "celery", "tbapp:bridge", "--pool", "solo", "--hostname", f"{queue}@%h"]
    worker = start_worker(tmp_path, [*args, "--without-mingle", "--without-gossip"], env)
    bridge = app_module.build({"backends": {"celery": options}})
    control = bridge.backend("celery").app  # type: ignore[attr-defined]
    store = redis.Redis.from_url(redis_url)
    try:
        task = bridge.get_task("tb.record")

        async def send() -> tuple[float, str, str]:
            await bridge.open()
            try:
                sent = time.time()
                later = await task.using(delay=2).enqueue(key, "later")
                now = await task.enqueue(key, "now")
                # a retry goes through the delayed delivery too (its 0.05 s backoff made
                # Celery's send_task refuse it: a countdown under a second)
                await bridge.get_task("tb.flaky").enqueue("flaky", 1)
                return sent, later.id, now.id
            finally:
                await bridge.close()

        classic_key = unique_name("classic")
        classic_sent = time.time()
        classic = amqp_stack.send("tb.record", classic_key, "later", delay=2)
        sent, later, now = run(send)

        def ran() -> list[dict[str, Any]]:
            return [json.loads(r) for r in store.lrange(prefix + key, 0, -1)]

        wait_until(lambda: len(ran()) >= 1, 10, "the call sent without a delay")
        assert [e["id"] for e in ran()] == [now]  # the worker consumes, and has not the other
        # RabbitMQ holds the delayed one (2 s = 0b10: the level-1 delay queue), not the worker
        assert _waiting_in(amqp_url, level_name(1)) >= 1
        assert _scheduled(control, hostname) == []
        # the classic-queue worker holds its delayed call until its eta, as before
        held = _scheduled(control, amqp_stack.hostname)
        assert classic.id in [h["request"]["id"] for h in held]

        wait_until(lambda: len(ran()) >= 2, 10, "the delayed call")
        entry = ran()[1]
        assert entry["id"] == later and entry["args"] == ["later"]
        assert entry["at"] - sent >= 2.0, "it ran before its delay"
        (classic_entry,) = amqp_stack.wait_records(classic_key, 1)
        assert classic_entry["id"] == classic.id and classic_entry["at"] - classic_sent >= 2.0

        def attempts() -> list[dict[str, Any]]:
            return [json.loads(r) for r in store.lrange(prefix + "flaky", 0, -1)]

        wait_until(lambda: len(attempts()) >= 2, 10, "the retry of the failed call")
        first, second = attempts()
        assert (first["attempt"], second["attempt"]) == (1, 2)
        assert second["at"] - first["at"] >= 1.0  # whole seconds through the delay queues
    finally:
        control.close()
        store.close()
        stop(worker)
        delete_amqp_queues(amqp_url, [queue])
