"""Malformed messages never stop a real worker: each is dropped, logged, and marked failed.

For each broker (Redis with the threads pool, RabbitMQ with the solo pool), with and without a
signing key, one real `taskbridge worker celery` is sent, in bulk, a fixed list of malformed
messages and a batch that Hypothesis makes by breaking envelopes the real dispatcher built
(`build_message`, `redis_envelope`) in ways that each make them malformed; then a valid call.
The valid call runs, the worker is still running, every malformed message whose id can be read
is FAILURE (a MessageError) in the result backend and named in the log, and once the worker has
stopped nothing is left in its queue (kombu and RabbitMQ put back what was never acked).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import amqp
import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from dateutil.parser import isoparse
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from taskbridge_celery._consumer import worker_settings
from taskbridge_celery._keys import result_key_prefix
from taskbridge_celery._options import CeleryOptions, celery_config
from taskbridge_celery._protocol import (
    SIGNATURE_HEADER,
    build_message,
    redis_envelope,
    redis_queue_key,
)
from taskbridge_celery._transport import GuardedRedisTransport
from taskbridge_celery._worker import build_app

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge
from taskbridge.backends import TaskCall

from .conftest import celery_env, delete_amqp_queues, load_app_module, start_worker, stop

KEY = "a-signing-key-for-the-poison-tests"
TASK = "tb.record"


@dataclass
class Target:
    """A real worker on one broker, and what the test sends it with."""

    broker: str
    signed: bool
    broker_url: str
    queue: str
    prefix: str
    options: dict[str, Any]
    app: ModuleType
    bridge: TaskBridge
    worker: WorkerProcess
    store: redis.Redis

    def dispatched(self) -> Any:
        """A valid message for `tb.record`, as the dispatcher builds it (signed if `signed`)."""
        task = self.bridge.get_task(TASK)
        call = TaskCall(
            str(uuid.uuid4()), task, ["poison", 1], {}, self.bridge.resolve(task).policy
        )
        return build_message(call, self.queue, self.bridge.signer)

    def metas(self, ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """The Celery result meta of each id (None when there is none)."""
        prefix = result_key_prefix(CeleryOptions(**self.options))
        raw = self.store.mget([prefix + task_id for task_id in ids]) if ids else []
        return {i: None if r is None else json.loads(r) for i, r in zip(ids, raw, strict=True)}


@pytest.fixture(
    params=[("redis", False), ("redis", True), ("amqp", False), ("amqp", True)],
    ids=["redis", "redis-signed", "amqp", "amqp-signed"],
)
def target(
    request: pytest.FixtureRequest, redis_url: str, run_id: str, tmp_path: Path
) -> Iterator[Target]:
    broker, signed = request.param
    broker_url = redis_url if broker == "redis" else request.getfixturevalue("amqp_url")
    base = f"{run_id}-poison-{broker}{'-signed' if signed else ''}"
    queue, prefix = f"{base}-q", f"{base}:"
    options = {
        "broker_url": broker_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    env = {**celery_env(options), "TBTEST_REDIS_URL": redis_url, "TBTEST_PREFIX": prefix}
    settings: dict[str, Any] = {"backends": {"celery": options}}
    if signed:
        env["TASKBRIDGE_SIGNING_KEY"] = settings["signing_key"] = KEY
    app = load_app_module(tmp_path)
    pool = ["--pool", "threads", "-c", "2"] if broker == "redis" else ["--pool", "solo"]
    args = ["worker", "celery", "tbapp:bridge", *pool, "--queues", queue]
    args += ["--hostname", f"{base}@%h", "--without-mingle", "--without-gossip"]
    worker = start_worker(tmp_path, args, env)
    bridge = app.build(settings, routed_queue=queue)
    store = redis.Redis.from_url(redis_url)
    try:
        yield Target(broker, signed, broker_url, queue, prefix, options, app, bridge, worker, store)
    finally:
        stop(worker)
        bridge.backend("celery").app.close()  # type: ignore[attr-defined]
        store.close()
        if broker == "amqp":
            delete_amqp_queues(broker_url, [queue])


# -- what is sent -----------------------------------------------------------------------------


@dataclass
class Sent:
    """One malformed message: how it was made, what goes on the wire, the id it should fail."""

    kind: str
    wire: Any
    """Redis: the bytes pushed. RabbitMQ: headers, body, content_type, content_encoding."""
    failed_id: str | None
    """The id whose call must end FAILURE (None when the id cannot be read)."""


def _redis_message(target: Target) -> tuple[dict[str, Any], str]:
    message = target.dispatched()
    return json.loads(redis_envelope(message)), message.id


def _amqp_message(target: Target) -> tuple[dict[str, Any], str]:
    message = target.dispatched()
    wire = {
        "headers": copy.deepcopy(message.headers),
        "body": message.body,
        "content_type": "application/json",
        "content_encoding": "utf-8",
    }
    return wire, message.id


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _triple(args: Any) -> bytes:
    return json.dumps([args, {}, None]).encode()


Fix = Callable[[dict[str, Any]], None]
"""Breaks an envelope (Redis) or a message (RabbitMQ) in place."""


def _headers(**changes: Any) -> Fix:
    def fix(wire: dict[str, Any]) -> None:
        for name, value in changes.items():
            if value is _DROP:
                wire["headers"].pop(name, None)
            else:
                wire["headers"][name] = value

    return fix


_DROP = object()

HEADER_CASES: dict[str, tuple[Fix, bool]] = {
    # name: (how the headers are broken, whether the id can still be read)
    "task_list": (_headers(task=[1]), True),
    "task_map": (_headers(task={"a": 1}), True),
    "task_missing": (_headers(task=_DROP), True),
    "unknown_task_no_id": (_headers(task="tb.no_such_task", id=_DROP), False),
    "unknown_task_id_map": (_headers(task="tb.no_such_task", id={"a": 1}), False),
    "timelimit_triple": (_headers(timelimit=[1, 2, 3]), True),
    "timelimit_text": (_headers(timelimit="ab"), True),
    "eta_text": (_headers(eta="not a date"), True),
    "expires_number": (_headers(expires=5), True),
    "retries_text": (_headers(retries="x"), True),
    "policy_text": (_headers(taskbridge_policy="many"), True),
    "policy_bad_retries": (_headers(taskbridge_policy={"retries": "many"}), True),
    "stamps": (_headers(stamped_headers=5, stamps=5), True),
    "ignore_result_text": (_headers(ignore_result="yes"), True),
    "compression": (_headers(compression="zzz"), True),
}


def _redis_fixed(target: Target) -> list[Sent]:
    sent = [
        Sent("not_json", b"{not json", None),
        Sent("not_utf8", b"\xff\xfe\x00", None),
        Sent("json_array", b"[1, 2]", None),
        Sent("json_text", b'"text"', None),
    ]

    def envelope(kind: str, fix: Fix, readable: bool = True) -> None:
        wire, task_id = _redis_message(target)
        fix(wire)
        sent.append(Sent(kind, json.dumps(wire).encode(), task_id if readable else None))

    envelope("no_properties", lambda e: e.pop("properties"))
    envelope("properties_list", lambda e: e.update(properties=[1]))
    envelope("no_delivery_tag", lambda e: e["properties"].pop("delivery_tag"))
    envelope("delivery_tag_list", lambda e: e["properties"].update(delivery_tag=[1]))
    envelope("no_delivery_info", lambda e: e["properties"].pop("delivery_info"))
    envelope("headers_list", lambda e: e.update(headers=[1, 2]), readable=False)
    envelope("headers_text", lambda e: e.update(headers="abc"), readable=False)
    envelope("body_not_base64", lambda e: e.update(body="!!!not base64%%%"))
    envelope("body_number", lambda e: e.update(body=5))
    envelope("unknown_body_encoding", lambda e: e["properties"].update(body_encoding="rot13"))
    envelope("unknown_content_type", lambda e: e.update({"content-type": "application/x-nope"}))
    envelope(
        "pickle",
        lambda e: e.update(
            {"content-type": "application/x-python-serialize", "body": _b64(b"\x80\x04N.")}
        ),
    )
    envelope(  # JSON that kombu's own decoder refuses
        "kombu_json_hook",
        lambda e: e["headers"].update(extra={"__type__": "datetime", "__value__": "garbage"}),
    )
    envelope("body_not_a_triple", lambda e: e.update(body=_b64(b'{"args": 1}')))
    envelope("arguments_missing", lambda e: e.update(body=_b64(_triple([]))))
    for kind, (fix, readable) in HEADER_CASES.items():
        envelope(kind, fix, readable)
    return sent


def _amqp_fixed(target: Target) -> list[Sent]:
    sent: list[Sent] = []

    def message(kind: str, fix: Fix, readable: bool = True) -> None:
        wire, task_id = _amqp_message(target)
        fix(wire)
        sent.append(Sent(kind, wire, task_id if readable else None))

    message("no_headers", lambda m: m.update(headers=None), readable=False)
    message("not_json", lambda m: m.update(body=b"{not json"))
    message("not_utf8", lambda m: m.update(body=b"\xff\xfe\x00"))
    message("unknown_content_type", lambda m: m.update(content_type="application/x-nope"))
    message("no_content_type", lambda m: m.update(content_type=None, content_encoding=None))
    message(
        "pickle",
        lambda m: m.update(
            content_type="application/x-python-serialize",
            content_encoding="binary",
            body=b"\x80\x04N.",
        ),
    )
    message("body_not_a_triple", lambda m: m.update(body=b'{"args": 1}'))
    message("arguments_missing", lambda m: m.update(body=_triple([])))
    for kind, (fix, readable) in HEADER_CASES.items():
        message(kind, fix, readable)
    return sent


# -- what Hypothesis breaks -------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _iso_date(value: str) -> bool:
    """Whether both Python and Celery (dateutil) read `value` as a date."""
    try:
        datetime.fromisoformat(value)
        isoparse(value)
    except Exception:
        return False
    return True


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _time_limits(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v >= 0)
            for v in value
        )
    )


def _celery_triple(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], list)
        and isinstance(value[1], dict)
        and (value[2] is None or isinstance(value[2], dict))
    )


# Each header's values that make a message malformed (None means "leave it out").
BAD_HEADERS: dict[str, st.SearchStrategy[Any]] = {
    "task": _values.filter(lambda v: not (isinstance(v, str) and v)),
    "id": _values.filter(lambda v: not (isinstance(v, str) and v)),
    "timelimit": _values.filter(lambda v: v is not None and not _time_limits(v)),
    "retries": _values.filter(lambda v: v is not None and not _count(v)),
    "eta": _values.filter(lambda v: v is not None and not (isinstance(v, str) and _iso_date(v))),
    "expires": _values.filter(
        lambda v: v is not None and not (isinstance(v, str) and _iso_date(v))
    ),
    "taskbridge_policy": _values.filter(lambda v: v is not None and not isinstance(v, dict))
    | st.fixed_dictionaries({"retries": st.integers(max_value=-1) | st.text("xyz", min_size=1)})
    | st.fixed_dictionaries({"timeout": st.floats(max_value=0) | st.lists(st.integers())}),
    "stamped_headers": _values.filter(
        lambda v: v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v))
    ),
    "stamps": _values.filter(lambda v: v is not None and not isinstance(v, dict)),
    "ignore_result": _values.filter(lambda v: v is not None and not isinstance(v, bool)),
}

_bad_body = (
    _values.filter(lambda v: not _celery_triple(v)).map(lambda v: json.dumps(v).encode())
    | st.just(_triple([]))
    | st.binary(max_size=30).filter(lambda b: not b.strip().startswith(b"["))
)
"""Bodies that are not a call of tb.record: not Celery's triple, no arguments, or not JSON."""


@dataclass(frozen=True)
class Break:
    """One way of breaking a message: set `path` to `value` (or drop it)."""

    path: tuple[str, ...]
    value: Any
    drop: bool = False

    @property
    def hides_id(self) -> bool:
        """Whether the message's id can no longer be read afterwards."""
        return self.path in (("headers",), ("headers", "id"))

    def apply(self, wire: dict[str, Any]) -> None:
        *parents, last = self.path
        node: Any = wire
        for key in parents:
            if not isinstance(node, dict):
                return  # an earlier break replaced what held it: malformed already
            node = node.get(key)
        if not isinstance(node, dict):
            return
        if self.drop:
            node.pop(last, None)
        else:
            node[last] = self.value


def _sets(path: tuple[str, ...], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Break]:
    return values.map(lambda value: Break(path, value))


def _drops(*paths: tuple[str, ...]) -> st.SearchStrategy[Break]:
    return st.sampled_from([Break(path, None, drop=True) for path in paths])


_header_breaks = st.one_of(
    *(_sets(("headers", name), values) for name, values in BAD_HEADERS.items()),
    _drops(("headers", "task"), ("headers", "id")),
)

REDIS_BREAKS = st.one_of(
    _header_breaks,
    _drops(
        ("properties",),
        ("properties", "delivery_tag"),
        ("properties", "delivery_info"),
        ("properties", "delivery_info", "exchange"),
        ("properties", "delivery_info", "routing_key"),
        ("headers",),
        ("body",),
        ("content-type",),
    ),
    _sets(("properties",), _values.filter(lambda v: not isinstance(v, dict))),
    _sets(("properties", "delivery_tag"), _values.filter(lambda v: not (isinstance(v, str) and v))),
    _sets(("properties", "delivery_info"), _values.filter(lambda v: not isinstance(v, dict))),
    _sets(("properties", "body_encoding"), _values.filter(lambda v: v != "base64")),
    _sets(("headers",), _values.filter(lambda v: not isinstance(v, dict))),
    _sets(("body",), _values.filter(lambda v: not isinstance(v, str)) | st.text(max_size=40)),
    _sets(("body",), _bad_body.map(_b64)),
    _sets(("content-type",), _values.filter(lambda v: v != "application/json")),
)


AMQP_BREAKS = st.one_of(
    _header_breaks,
    _sets(("headers",), st.none()),
    _sets(("body",), _bad_body),
    _sets(
        ("content_type",),
        st.none() | st.text(max_size=20).filter(lambda v: v != "application/json"),
    ),
)
"""(Not the content encoding: kombu reads a JSON body whatever it says.)"""

SIGNATURE_BREAKS = st.sampled_from(
    [Break(("headers", SIGNATURE_HEADER), None, drop=True)]
    + [Break(("headers", SIGNATURE_HEADER), value) for value in ("forged", 5, None)]
)
"""With a signing key: the signature left out or not the right one."""


def _generated(target: Target, batch: list[list[Break]]) -> list[Sent]:
    sent = []
    for breaks in batch:
        if target.broker == "redis":
            wire, task_id = _redis_message(target)
        else:
            wire, task_id = _amqp_message(target)
        for one in breaks:
            one.apply(wire)
        readable = not any(one.hides_id for one in breaks)
        kind = "+".join("/".join(one.path) + ("(dropped)" if one.drop else "") for one in breaks)
        payload = json.dumps(wire).encode() if target.broker == "redis" else wire
        sent.append(Sent(f"generated {kind}", payload, task_id if readable else None))
    return sent


# -- sending ----------------------------------------------------------------------------------


def _push_redis(target: Target, sent: list[Sent]) -> None:
    key = redis_queue_key(target.queue, {"global_keyprefix": target.prefix})
    target.store.lpush(key, *[one.wire for one in sent])  # popped from the right: in order


def _publish_amqp(target: Target, sent: list[Sent]) -> None:
    """Publish with py-amqp itself (no kombu serialization), confirmed by RabbitMQ."""
    from urllib.parse import unquote, urlsplit

    url = urlsplit(target.broker_url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    connection = amqp.Connection(
        host=f"{url.hostname}:{url.port or 5672}",
        userid=unquote(url.username or "guest"),
        password=unquote(url.password or "guest"),
        virtual_host=vhost,
        confirm_publish=True,
    )
    connection.connect()
    try:
        channel = connection.channel()
        for one in sent:
            wire = one.wire
            properties: dict[str, Any] = {"delivery_mode": 2}
            if wire["headers"] is not None:
                properties["application_headers"] = wire["headers"]
            if wire["content_type"] is not None:
                properties["content_type"] = wire["content_type"]
            if wire["content_encoding"] is not None:
                properties["content_encoding"] = wire["content_encoding"]
            channel.basic_publish(amqp.Message(wire["body"], **properties), "", target.queue)
    finally:
        connection.close()


def _left_in_queue(target: Target) -> int:
    """Messages in the worker's queue, acked or not (call once the worker has stopped)."""
    if target.broker == "redis":
        key = redis_queue_key(target.queue, {"global_keyprefix": target.prefix})
        return int(target.store.llen(key)) + int(target.store.hlen(target.prefix + "unacked"))
    from kombu import Connection

    with Connection(target.broker_url) as connection:
        declared = connection.channel().queue_declare(target.queue, passive=True)
        return int(declared.message_count)


# -- the test ---------------------------------------------------------------------------------


@settings(
    max_examples=1,  # one batch per worker: the examples are the batch's messages
    phases=[Phase.generate],
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_malformed_messages_are_dropped_and_the_worker_keeps_going(
    target: Target, data: st.DataObject
) -> None:
    breaks = REDIS_BREAKS if target.broker == "redis" else AMQP_BREAKS
    if target.signed:
        breaks = breaks | SIGNATURE_BREAKS
    batch = data.draw(st.lists(st.lists(breaks, min_size=1, max_size=2), min_size=50, max_size=70))
    fixed = _redis_fixed(target) if target.broker == "redis" else _amqp_fixed(target)
    sent = fixed + _generated(target, batch)
    if target.broker == "redis":
        _push_redis(target, sent)
    else:
        _publish_amqp(target, sent)

    # A valid call sent after all of them runs: the worker took every one before it.
    valid = _enqueue(target)
    wait_until(
        lambda: (
            target.worker.process.poll() is not None
            or (target.metas([valid])[valid] or {}).get("status") == "SUCCESS"
        ),
        30,
        f"the valid call {valid} after {len(sent)} malformed messages",
    )
    assert target.worker.process.poll() is None, target.worker.output[-3000:]

    expected = {one.failed_id: one.kind for one in sent if one.failed_id is not None}
    assert len(expected) > len(sent) // 2  # most keep a readable id
    metas = target.metas(list(expected))
    wrong = {
        f"{kind} [{task_id}]": metas[task_id]
        for task_id, kind in expected.items()
        if (metas[task_id] or {}).get("status") != "FAILURE"
        or (metas[task_id] or {}).get("result", {}).get("exc_type") != "MessageError"
    }
    assert not wrong, f"not marked failed with a MessageError: {wrong}"
    output = target.worker.output
    unnamed = [kind for task_id, kind in expected.items() if task_id not in output]
    assert not unnamed, f"not logged with their id: {unnamed}"
    if target.broker == "redis":
        assert f"dropped a message from queue {target.queue} that is not a JSON envelope" in output
    assert "Unrecoverable error" not in output
    # Every message was refused by a check that says what is wrong, not by the last resort.
    assert "could not take it" not in output, output[-3000:]  # the consumer's last resort
    assert "could not be delivered" not in output, output[-3000:]  # the transport's

    assert stop(target.worker) == 0, target.worker.output[-3000:]
    assert _left_in_queue(target) == 0


def _enqueue(target: Target) -> str:
    """Dispatch a valid call of tb.record through the bridge; its id."""

    async def go() -> str:
        await target.bridge.open()
        try:
            handle = await target.bridge.get_task(TASK).enqueue("after-poison", 1)
            return str(handle.id)
        finally:
            await target.bridge.close()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("url", "ssl_options"),
    [
        ("redis://user:secret@127.0.0.1:6390/5", None),
        ("rediss://user:secret@127.0.0.1:6390/5", {"ssl_cert_reqs": ssl.CERT_NONE}),
        (
            "rediss://user:secret@127.0.0.1:6390/5?ssl_cert_reqs=required",
            {"ssl_cert_reqs": ssl.CERT_REQUIRED},
        ),
    ],
    ids=["redis", "rediss", "rediss-verified"],
)
def test_the_worker_app_has_the_guards_and_keeps_the_broker_url(
    url: str, ssl_options: dict[str, Any] | None
) -> None:
    """The guarded transport is named next to the URL: kombu still reads host, port, database,
    credentials and TLS from it (for rediss://, what kombu does for the `rediss` transport)."""
    options = CeleryOptions(broker_url=url)
    app = Celery("worker-app-test", set_as_current=False)  # build_app(worker=True), not current
    app.conf.update(celery_config(options))
    app.conf.update(worker_settings(options))
    assert app.conf.worker_consumer == "taskbridge_celery._consumer:GuardedConsumer"
    connection = app.connection_for_read()
    assert connection.get_transport_cls() is GuardedRedisTransport
    assert (connection.hostname, connection.port, connection.virtual_host) == (
        "127.0.0.1",
        6390,
        "5",
    )
    assert (connection.userid, connection.password) == ("user", "secret")
    assert (connection.ssl or None) == ssl_options
    connection.release()

    api = build_app(options)  # the API side's app: kombu's own transport and consumer
    assert api.conf.broker_transport is None
    assert api.conf.worker_consumer == "celery.worker.consumer:Consumer"


def test_settings_of_the_alias_win_and_rabbitmq_keeps_its_transport() -> None:
    assert worker_settings(CeleryOptions(broker_url="amqp://guest:guest@127.0.0.1:5672//")) == {
        "worker_consumer": "taskbridge_celery._consumer:GuardedConsumer"
    }
    own = CeleryOptions(
        broker_url="redis://127.0.0.1:6379/9",
        celery={"worker_consumer": "my.consumer:Consumer", "broker_transport": "redis"},
    )
    assert worker_settings(own) == {}
