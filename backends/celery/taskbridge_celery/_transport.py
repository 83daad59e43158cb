"""kombu's Redis transport for the worker, dropping envelopes it cannot read instead of dying.

A Redis broker holds each message as a JSON envelope, `{"body", "content-type",
"content-encoding", "headers", "properties": {"delivery_tag", "delivery_info", "body_encoding",
...}}`. kombu's Redis channel pops one (BRPOP), decodes the JSON and builds a `Message` from it
before anything of Celery or taskbridge sees it; an envelope that is not JSON, not an object,
without properties or a delivery tag, with headers that are not a map or a body that is not
valid base64 raises in there, and the exception stops the worker ("Unrecoverable error").

`GuardedRedisTransport` is kombu's Redis transport with small hooks around kombu's own methods
(no copy of kombu's code):

- the channel's `_brpop_read`, `_get` and `_receive_one` (where the popped text is decoded)
  turn a decoding error into a dropped message instead of an exception; redis-py's response
  callback for BRPOP/RPOP keeps the popped text, so the log can name its queue and quote it;
- the transport's `_deliver` (where each decoded envelope goes first) checks the envelope with
  `envelope_problem` before kombu builds the Message, and drops what still raises while it is
  handed over to the consumer (a last resort: the checks should leave nothing to it).

A dropped message was popped from its list already (that is its ack on Redis): it is logged on
"taskbridge.celery" with its queue and, when readable, its task and id, and its call is marked
failed through `on_rejected`, which the worker's consumer sets (`_consumer.GuardedConsumer`).
The worker keeps consuming. Errors of the link to Redis still propagate: Celery reconnects.

`GuardedSentinelTransport` is the same on kombu's `SentinelTransport` (a `sentinel://` broker:
the channel's connection pool asks the Sentinels for the master, again after a failover): the
hooks above come first in its Method Resolution Order, kombu's Sentinel channel next.

Only the worker's app uses them (`_consumer.worker_settings`): dispatch never goes through kombu.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from queue import Empty
from typing import Any

from kombu.transport import redis  # type: ignore[import-untyped]
from kombu.utils.encoding import bytes_to_str  # type: ignore[import-untyped]

from ._consumer import describe

__all__ = [
    "GuardedRedisChannel",
    "GuardedRedisTransport",
    "GuardedSentinelChannel",
    "GuardedSentinelTransport",
    "envelope_problem",
]

logger = logging.getLogger("taskbridge.celery")

_SHOWN = 200
"""Characters of an undecodable message quoted in the log."""


def envelope_problem(payload: object, codecs: Mapping[str, Any]) -> str | None:
    """Why kombu cannot make a Message of the decoded envelope `payload`; None if it can.

    Checks what kombu's virtual `Message` and the Redis QoS read: an object with a map of
    properties, a delivery tag (a non-empty string, as kombu makes them) and delivery info
    naming an exchange and routing key (kept with an unacked message), headers that are a map,
    a content type and encoding that are strings, and a body that is a string which its
    `body_encoding` (one of `codecs`, kombu's; none or utf-8 for plain text) can decode.
    """
    if not isinstance(payload, dict):
        return f"it is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"its properties are a {type(properties).__name__}, not a map"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return f"its delivery_tag {tag!r:.64} is not a string"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return f"its delivery_info {info!r:.64} does not name an exchange and routing key"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"its headers are a {type(headers).__name__}, not a map"
    for key in ("content-type", "content-encoding"):
        value = payload.get(key)
        if value is not None and not isinstance(value, str):
            return f"its {key} is a {type(value).__name__}, not a string"
    body, encoding = payload.get("body"), properties.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return f"its body is a {type(body).__name__}, not text"
    if encoding is not None and not isinstance(encoding, str):
        return f"its body_encoding is a {type(encoding).__name__}, not a name"
    if body and encoding and encoding.lower() != "utf-8":  # as kombu's Channel.decode_body
        codec = codecs.get(encoding)
        if codec is None:
            return f"its body_encoding {encoding!r:.64} is not one kombu knows"
        try:
            codec.decode(body)
        except Exception as exc:
            return f"its body is not valid {encoding} ({type(exc).__name__}: {exc})"
    return None


class GuardedRedisChannel(redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel; a popped message that cannot be decoded is dropped."""

    _popped: tuple[Any, Any] | None = None
    """The last (key, text) a BRPOP or RPOP of this channel's clients returned."""

    _sync_client: Any = None
    """The one synchronous client of this channel (see `_create_client`)."""

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for each ack and each write to the unacked index
        # (about 90 us each: a copy of every response callback). A redis-py client is
        # thread-safe and draws on the channel's pool, so one per channel serves them all; a
        # channel is dropped on reconnection, and its client with it.
        if not asynchronous and self._sync_client is not None:
            return self._sync_client
        client = super()._create_client(asynchronous)
        # redis-py's response callbacks (a public API) see each popped message as Redis sent
        # it: kept, so that a message kombu then fails to decode can be named in the log.
        # The asynchronous client BRPOPs (consuming); the others RPOP (`basic_get`).
        command = "BRPOP" if asynchronous else "RPOP"
        parse = client.response_callbacks.get(command)

        def remember(response: Any, **options: Any) -> Any:
            if response:
                self._popped = tuple(response) if command == "BRPOP" else (None, response)
            return parse(response, **options) if parse is not None else response

        client.set_response_callback(command, remember)
        if not asynchronous:
            self._sync_client = client
        return client

    def _link_error(self, exc: BaseException) -> bool:
        """Nothing was delivered, or the link to Redis failed (Celery reconnects)."""
        transport = self.connection
        return isinstance(exc, (Empty, *transport.connection_errors, *transport.channel_errors))

    def _brpop_read(self, **options: Any) -> Any:
        self._popped = None
        try:
            return super()._brpop_read(**options)
        except Exception as exc:
            popped = self._popped
            if popped is None or self._link_error(exc):
                raise
            self._drop_undecodable(popped, None, exc)
            raise Empty() from None  # kombu's own "nothing delivered"
        finally:
            self._popped = None

    def _get(self, queue: str) -> Any:
        self._popped = None
        try:
            return super()._get(queue)
        except Exception as exc:
            popped = self._popped
            if popped is None or self._link_error(exc):
                raise
            self._drop_undecodable(popped, queue, exc)
            raise Empty() from None
        finally:
            self._popped = None

    def _receive_one(self, c: Any) -> Any:
        # Broadcast (fanout) messages: kombu drops text that is not JSON itself, but not JSON
        # its decoder trips over (e.g. {"__type__": "bytes", "__value__": 1}).
        try:
            return super()._receive_one(c)
        except Exception as exc:
            if self._link_error(exc):
                raise
            logger.error(
                "dropped a broadcast message kombu cannot read (%s: %s)", type(exc).__name__, exc
            )
            raise Empty() from None

    def _drop_undecodable(self, popped: tuple[Any, Any], queue: str | None, exc: Exception) -> None:
        key, item = popped
        if queue is None and key is not None:
            queue = self._queue_of(bytes_to_str(key))
        text = item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")
        problem = f"it cannot be decoded ({type(exc).__name__}: {exc})"
        try:  # plain JSON that only kombu's decoder refuses: its headers may still be read
            payload = json.loads(text)
        except Exception:
            payload = None
        if isinstance(payload, dict):
            self.connection._reject(payload, queue, problem)
            return
        shown = text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
        logger.error(
            "dropped a message from queue %s that is not a JSON envelope (%s: %s): %r",
            queue or "?",
            type(exc).__name__,
            exc,
            shown,
        )

    def _queue_of(self, key: str) -> str:
        """The queue of a Redis list key (after the global key prefix, before the priority)."""
        prefix = self.global_keyprefix or ""
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        queue: str = key.rsplit(self.sep, 1)[0]
        return queue


class GuardedRedisTransport(redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport, dropping the envelopes kombu cannot read (see the module)."""

    Channel = GuardedRedisChannel

    on_rejected: Callable[[object, object, str], None] | None = None
    """Called with (headers, properties, problem) of each envelope dropped that has readable
    headers: the worker's consumer records its call as failed."""

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message, self.Channel.codecs)
        if problem is not None:
            self._reject(message, queue, problem)
            return
        try:
            super()._deliver(message, queue)
        except Exception as exc:
            if isinstance(exc, (*self.connection_errors, *self.channel_errors)):
                raise
            # Raised while kombu made the Message or handed it over: drop it.
            self._forget(message["properties"]["delivery_tag"])
            problem = f"it could not be delivered ({type(exc).__name__}: {exc})"
            self._reject(message, queue, problem, exc_info=True)

    def _reject(
        self, message: Any, queue: str | None, problem: str, exc_info: bool = False
    ) -> None:
        headers = message.get("headers") if isinstance(message, dict) else None
        properties = message.get("properties") if isinstance(message, dict) else None
        name, task_id, queue = describe(headers, queue)
        logger.error(
            "dropped a malformed message for task %s [%s] from queue %s: %s%s",
            name,
            task_id,
            queue,
            problem,
            "" if task_id == "?" or self.on_rejected is None else "; it is marked failed",
            exc_info=exc_info,
        )
        if self.on_rejected is not None and isinstance(headers, dict):
            self.on_rejected(headers, properties, problem)

    def _forget(self, tag: str) -> None:
        """Remove a dropped message from the unacked ones of the channel that took it, if
        any (else kombu would deliver it again after the visibility timeout)."""
        for channel in list(self.channels):
            try:
                channel.qos.get(tag)
            except KeyError:
                continue
            channel.basic_reject(tag, requeue=False)
            return


class GuardedSentinelChannel(GuardedRedisChannel, redis.SentinelChannel):  # type: ignore[misc]
    """kombu's Sentinel channel, dropping the popped messages it cannot decode."""


class GuardedSentinelTransport(GuardedRedisTransport, redis.SentinelTransport):  # type: ignore[misc]
    """kombu's Sentinel transport, dropping the envelopes kombu cannot read (see the module)."""

    Channel = GuardedSentinelChannel
    default_port = redis.SentinelTransport.default_port
