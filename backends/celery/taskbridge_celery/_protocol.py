"""Celery's task message protocol v2, with JSON bodies, made by the installed Celery.

A worker cannot tell these messages from ones sent by `send_task`: the headers and the body's
embedded options are the ones Celery's own `send_task` builds (a template per task and time
limits, made once by calling it with a producer that only captures what it is handed, see
`MessageBuilder`); per call only the id, the arguments and their reprs (with Celery's `saferepr`
where a plain `repr` could differ), the eta and taskbridge's headers are filled in. Whatever a
Celery release changes in its headers (5.7's `ignore_result: None`) is taken over as it is.
Building a call this way skips Celery's per-call routing, signals and producer machinery, which
is most of `send_task`'s cost.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from taskbridge import MessageError
from taskbridge.backends import Policy, Signer, TaskCall, execution_fields

__all__ = [
    "ENQUEUED_HEADER",
    "POLICY_HEADER",
    "SIGNATURE_HEADER",
    "TRACE_HEADER",
    "MessageBuilder",
    "TaskMessage",
    "build_message",
    "engine_fields",
    "engine_fields_from_headers",
    "redis_binding",
    "redis_envelope",
    "redis_queue_key",
    "time_limits",
]

POLICY_HEADER = "taskbridge_policy"
"""Header carrying the dispatcher's execution policy (retries, backoff, timeout)."""

SIGNATURE_HEADER = "taskbridge_signature"
"""Header carrying the call's HMAC when the bridge has a `signing_key`."""

ENQUEUED_HEADER = "taskbridge_enqueued_at"
TRACE_HEADER = "taskbridge_trace"
"""The dispatcher's OpenTelemetry context (W3C headers), when it was tracing."""
"""Header carrying when the call was dispatched (epoch seconds): the `enqueued_at` of its status,
and what tells a dispatch of a keyed call from an earlier one with the same id. Celery's retries
keep it, like every header."""

HARD_LIMIT_GRACE = 2.0
"""Seconds between a call's timeout and Celery's hard time limit, which kills the process."""

_REPR_MAX = 1024  # Celery's default argsrepr/kwargsrepr size
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_REDIS_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One task message, ready for any transport."""

    queue: str
    headers: dict[str, Any]
    body: bytes
    """UTF-8 JSON of `[args, kwargs, embed]`."""
    properties: dict[str, Any]
    """AMQP basic properties besides content type, encoding and priority (always 0)."""
    key_ttl: float | None = None
    """Seconds the call's idempotency key is held (None: the call has no key)."""
    exchange: str = ""
    """The AMQP exchange it is published to: the default exchange (""), straight to `queue`,
    or Celery's native delayed-delivery exchange for a delayed call on quorum queues."""
    routing_key: str = ""
    """Its AMQP routing key ("": the queue's name, through the default exchange)."""
    retry_of: str | None = None
    """The call this one runs again (`POST /tasks/{id}/retry`): not sent, only indexed."""

    @property
    def id(self) -> str:
        """The task id."""
        return str(self.headers["id"])

    @property
    def task(self) -> str:
        """The task name."""
        return str(self.headers["task"])

    @property
    def enqueued_at(self) -> float:
        """When the call was dispatched (epoch seconds)."""
        return float(self.headers[ENQUEUED_HEADER])

    @property
    def delay_ms(self) -> int:
        """How long from now until a delayed call is due (its `eta` header); 0 for the others."""
        eta = self.headers.get("eta")
        if not eta:
            return 0
        due = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
        return max(0, round((due.timestamp() - time.time()) * 1000))


def time_limits(policy: Policy, is_async: bool) -> list[float | None]:
    """Celery's `timelimit` header, `[hard, soft]`, for a call under `policy`.

    The soft limit raises inside a `def` task (prefork pool only); an `async def` task's
    timeout is enforced by the runner instead. The hard limit, a little later, kills a stuck
    process for both.
    """
    if policy.timeout is None:
        return [None, None]
    return [policy.timeout + HARD_LIMIT_GRACE, None if is_async else policy.timeout]


def _epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:  # Celery reads a naive date as UTC (enable_utc, its default)
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def engine_fields(
    timelimit: Any, eta: datetime | None, expires: datetime | None, retries: int
) -> dict[str, Any]:
    """The Celery fields that change how a call runs, in the canonical form the signature
    covers: the time limits, when it may start (eta, ms), when it expires (ms), its retry count.
    """
    hard, soft = timelimit if timelimit is not None else (None, None)
    return {
        "timelimit": [None if hard is None else float(hard), None if soft is None else float(soft)],
        "eta": None if eta is None else _epoch_ms(eta),
        "expires": None if expires is None else _epoch_ms(expires),
        "retries": retries,
    }


def _date_header(headers: Mapping[str, Any], name: str) -> datetime | None:
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise MessageError(f"its {name!r} header is a {type(value).__name__}, not an ISO date")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise MessageError(f"its {name!r} header {value[:64]!r} is not an ISO date") from None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def engine_fields_from_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """`engine_fields` of a received message; MessageError when a header Celery's worker reads
    (timelimit, eta, expires, retries) is malformed, before Celery's strategy trips over it."""
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        isinstance(timelimit, list | tuple)
        and len(timelimit) == 2
        and all(limit is None or _number(limit) for limit in timelimit)
    ):
        raise MessageError(
            f"its 'timelimit' header {timelimit!r:.64} is not a pair of seconds or nulls"
        )
    retries = headers.get("retries", 0)
    if retries is None:
        retries = 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise MessageError(f"its 'retries' header {retries!r:.64} is not a count")
    return engine_fields(
        timelimit, _date_header(headers, "eta"), _date_header(headers, "expires"), retries
    )


_SIMPLE = (int, bool, type(None))


def _plain_str(value: str) -> bool:
    return value.isascii() and value.isprintable() and "'" not in value and "\\" not in value


def _flat(value: Any) -> bool:
    """Values whose `repr` is exactly what Celery's saferepr writes (proved by a test)."""
    kind = type(value)
    if kind in _SIMPLE or (kind is str and _plain_str(value)):
        return True
    if kind is list:
        return all(type(v) in _SIMPLE or (type(v) is str and _plain_str(v)) for v in value)
    if kind is dict:
        return all(
            type(k) is str
            and _plain_str(k)
            and (type(v) in _SIMPLE or (type(v) is str and _plain_str(v)))
            for k, v in value.items()
        )
    return False


def celery_repr(value: Any, maxsize: int = _REPR_MAX) -> str:
    """`argsrepr`/`kwargsrepr` as Celery writes them (its `saferepr`), with `repr` as a fast
    path for flat values of ints, bools, None and plain strings, which it writes alike."""
    if _flat(value):
        text = repr(value)
        if len(text) < maxsize:
            return text
    from celery.utils.saferepr import saferepr  # type: ignore[import-untyped]

    return str(saferepr(value, maxsize))


_origin: tuple[int, str] | None = None


def _origin_name() -> str:
    """Celery's `anon_nodename()`: gen<pid>@<host>, recomputed after a fork."""
    global _origin
    pid = os.getpid()
    if _origin is None or _origin[0] != pid:
        _origin = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin[1]


_PLACEHOLDER = "taskbridge-template-0000-0000-000000000000"


class _Capture:
    """Stands in for kombu's Producer: Celery's send_task hands it the message it built."""

    def __init__(self) -> None:
        self.connection = self
        self.body: Any = None
        self.headers: dict[str, Any] = {}
        self.exchange: Any = None
        self.routing_key: Any = None

    def _reraise_as_library_errors(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def publish(
        self,
        body: Any,
        *,
        headers: dict[str, Any],
        exchange: Any = None,
        routing_key: Any = None,
        **_: Any,
    ) -> None:
        self.body, self.headers = body, headers
        self.exchange, self.routing_key = exchange, routing_key


@dataclass(frozen=True, slots=True)
class _Template:
    headers: dict[str, Any]
    embed: Any
    ids: tuple[str, ...]
    """The headers holding the task id (id, and root_id when Celery sets it)."""


class MessageBuilder:
    """Builds each call's message from a template the installed Celery made.

    `app` is a Celery app configured like the API's (`build_app(options)`); the templates are
    made with a copy that has no result backend, so making one never touches the network.
    """

    def __init__(self, app: Any, default_queue: str) -> None:
        from celery import Celery  # type: ignore[import-untyped]

        self._app = Celery("taskbridge-templates", set_as_current=False)
        self._app.conf.update({**dict(app.conf.changes), "result_backend": None})
        self._default_queue = default_queue
        self._templates: dict[tuple[str, float | None, float | None], _Template] = {}
        self._delayed_routes: dict[str, tuple[str, str] | None] = {}
        amqp = self._app.amqp
        self._argsrepr_max = int(getattr(amqp, "argsrepr_maxsize", _REPR_MAX) or _REPR_MAX)
        self._kwargsrepr_max = int(getattr(amqp, "kwargsrepr_maxsize", _REPR_MAX) or _REPR_MAX)

    def _template(self, name: str, hard: float | None, soft: float | None) -> _Template:
        key = (name, hard, soft)
        found = self._templates.get(key)
        if found is None:
            capture = _Capture()
            self._app.send_task(
                name,
                args=(),
                kwargs={},
                task_id=_PLACEHOLDER,
                time_limit=hard,
                soft_time_limit=soft,
                producer=capture,
                queue=self._default_queue,
            )
            headers = dict(capture.headers)
            ids = tuple(k for k, v in headers.items() if v == _PLACEHOLDER)
            found = _Template(headers, capture.body[2], ids)
            if len(self._templates) < 4096:
                self._templates[key] = found
        return found

    def delayed_route(self, name: str, queue: str) -> tuple[str, str] | None:
        """(exchange, routing key) Celery's `send_task` publishes a delayed call to `queue`
        through, when it uses RabbitMQ's native delayed delivery (Celery >= 5.5: quorum queues
        and an exchange that is not direct); None when it would send it to the queue itself,
        with its eta. The routing key is the queue's; a call's own is kombu's
        `calculate_routing_key(seconds, routing_key)`, as in `send_task`.

        Found once per queue by calling `send_task` with a countdown of one second and the
        capturing producer, so the decision (`detect_quorum_queues`, the exchange type) is
        Celery's own.
        """
        if queue in self._delayed_routes:
            return self._delayed_routes[queue]
        from kombu.transport.native_delayed_delivery import (  # type: ignore[import-untyped]
            calculate_routing_key,
        )

        capture = _Capture()
        self._app.send_task(
            name,
            args=(),
            kwargs={},
            task_id=_PLACEHOLDER,
            countdown=1,
            producer=capture,
            queue=queue,
        )
        exchange = getattr(capture.exchange, "name", capture.exchange)
        routing_key = capture.routing_key
        prefix = str(calculate_routing_key(1, "-"))[:-1]  # the 28 bits of the countdown, dotted
        route = None
        if (
            isinstance(exchange, str)
            and exchange
            and isinstance(routing_key, str)
            and routing_key.startswith(prefix)
        ):
            route = (exchange, routing_key[len(prefix) :])
        if len(self._delayed_routes) < 4096:
            self._delayed_routes[queue] = route
        return route

    def build(self, call: TaskCall, signer: Signer | None = None) -> TaskMessage:
        """The protocol-v2 message for `call` (arguments are already JSON values), signed by
        `signer` when given."""
        policy = call.policy
        eta_at = None
        if policy.delay:
            eta_at = datetime.now(UTC) + timedelta(seconds=policy.delay)
        hard, soft = time_limits(policy, call.task.is_async)
        template = self._template(call.name, hard, soft)
        carried = execution_fields(policy)
        args = list(call.args)
        body = _encode([args, call.kwargs, template.embed]).encode()
        headers = dict(template.headers)
        for name in template.ids:
            headers[name] = call.id
        headers["eta"] = None if eta_at is None else eta_at.isoformat()
        headers["argsrepr"] = celery_repr(args, self._argsrepr_max)
        headers["kwargsrepr"] = celery_repr(call.kwargs, self._kwargsrepr_max)
        headers["origin"] = _origin_name()
        headers[POLICY_HEADER] = carried
        headers[ENQUEUED_HEADER] = call.enqueued_at
        if call.trace:
            headers[TRACE_HEADER] = call.trace
        if signer is not None:
            headers[SIGNATURE_HEADER] = signer.sign(
                call.id,
                call.name,
                args,
                call.kwargs,
                policy=carried,
                engine=engine_fields(headers["timelimit"], eta_at, None, 0),
            )
        properties = {"correlation_id": call.id, "reply_to": "", "delivery_mode": 2}
        key_ttl = policy.key_ttl if policy.key is not None else None
        queue = policy.queue or self._default_queue
        if policy.delay and policy.delay >= 1:  # Celery's int(countdown) must be positive
            route = self.delayed_route(call.name, queue)
            if route is not None:
                from kombu.transport.native_delayed_delivery import calculate_routing_key

                exchange, routing_key = route
                return TaskMessage(
                    queue,
                    headers,
                    body,
                    properties,
                    key_ttl,
                    exchange,
                    calculate_routing_key(int(policy.delay), routing_key),
                    call.retry_of,
                )
        return TaskMessage(queue, headers, body, properties, key_ttl, retry_of=call.retry_of)


_builders: dict[str, MessageBuilder] = {}


def build_message(call: TaskCall, default_queue: str, signer: Signer | None = None) -> TaskMessage:
    """The message for `call` with a Celery app of default settings (for tests and tools; the
    backend uses its own MessageBuilder, configured like its app)."""
    builder = _builders.get(default_queue)
    if builder is None:
        from celery import Celery

        builder = _builders[default_queue] = MessageBuilder(
            Celery("taskbridge", set_as_current=False), default_queue
        )
    return builder.build(call, signer)


def redis_queue_key(queue: str, transport_options: Mapping[str, Any], priority: int = 0) -> str:
    """The Redis list kombu's Redis transport keeps `queue` in (its `_q_for_pri`), prefixed."""
    steps = sorted(transport_options.get("priority_steps") or _REDIS_PRIORITY_STEPS)
    sep = transport_options.get("sep") or _REDIS_SEP
    step = max((s for s in steps if s <= priority), default=steps[-1])
    key = f"{queue}{sep}{step}" if step else queue
    return f"{transport_options.get('global_keyprefix') or ''}{key}"


def redis_binding(queue: str, transport_options: Mapping[str, Any]) -> tuple[str, str]:
    """The `_kombu.binding.<exchange>` set member a Celery producer declares for `queue`."""
    sep = transport_options.get("sep") or _REDIS_SEP
    prefix = transport_options.get("global_keyprefix") or ""
    return f"{prefix}_kombu.binding.{queue}", f"{queue}{sep}{sep}{queue}"


def redis_envelope(message: TaskMessage) -> bytes:
    """The JSON kombu's Redis transport LPUSHes for `message` (body base64, like kombu)."""
    envelope = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": message.headers,
        "properties": {
            **message.properties,
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": message.queue},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return _encode(envelope).encode()
