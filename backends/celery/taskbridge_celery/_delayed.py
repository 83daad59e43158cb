"""RabbitMQ's native delayed delivery (Celery >= 5.5, quorum queues), from the API side.

Celery's `send_task` publishes a call with a countdown to the topic exchange `celery_delayed_27`
when the app knows a quorum queue and the call's queue has an exchange that is not direct (see
`MessageBuilder.delayed_route`); the message waits in RabbitMQ's delay queues, not in a worker.
At the end of its delay, the message reaches the exchange `celery_delayed_delivery`, which must
lead to the call's queue, or it is dropped. A worker declares all this for the queues it knows
at start (Celery's `DelayedDelivery` bootstep); the publisher declares it too, with kombu's own
functions and the same arguments, once per connection and queue, so that a delayed call sent
before any worker started, or to a queue no running worker consumes, is not lost.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["declare_delayed_delivery"]


class _OneChannel:
    """Stands in for a kombu Connection for kombu's declaring functions, which open a channel
    per call and leave it open: each gets this one channel, closed afterwards."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def channel(self) -> Any:
        return self._channel


def _exists(connection: Any, exchange: str) -> bool:
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, "topic", passive=True)
    except connection.channel_errors:
        return False  # (the broker closed this channel)
    with contextlib.suppress(Exception):
        channel.close()
    return True


def declare_delayed_delivery(connection: Any, queue: Any, queue_type: str) -> None:
    """Make sure RabbitMQ's delayed-delivery exchanges and queues exist (declared as Celery's
    worker declares them, `broker_native_delayed_delivery_queue_type` = `queue_type`) and that
    the delivery exchange leads to `queue` (a kombu Queue, declared already) through its
    exchange. `connection` is a connected kombu Connection."""
    from kombu.transport.native_delayed_delivery import (  # type: ignore[import-untyped]
        CELERY_DELAYED_DELIVERY_EXCHANGE,
        bind_queue_to_native_delayed_delivery_exchange,
        declare_native_delayed_delivery_exchanges_and_queues,
    )

    if not _exists(connection, CELERY_DELAYED_DELIVERY_EXCHANGE):
        # (declared last by kombu, so present means the whole topology is)
        channel = connection.channel()
        try:
            declare_native_delayed_delivery_exchanges_and_queues(_OneChannel(channel), queue_type)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    channel = connection.channel()
    try:
        bind_queue_to_native_delayed_delivery_exchange(_OneChannel(channel), queue)
    finally:
        with contextlib.suppress(Exception):
            channel.close()
