"""A 503 means "not sent": a batch whose request gave up is never written afterwards.

The API reaches its broker through a TCP proxy the test freezes: bytes written meanwhile are held
and delivered when the link heals, as a frozen network delivers them after a partition. Calls
are dispatched while the link is frozen; each request gives up at its dispatch_timeout and gets
BackendUnavailable (a 503 in an endpoint). After the link heals, the broker must hold none of
them, except on Celery the one batch that was already written when its request gave up (the
README's guarantee table says so). ARQ refuses even that one: its enqueue script compares each
job's dispatch deadline with the Redis server's clock (Celery's does for calls with an
idempotency key).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio

from conftest import wait_until
from taskbridge import BackendUnavailable, TaskBridge

from .proxy import FaultProxy

DISPATCH_TIMEOUT = 0.4
FROZEN_CALLS = 10


def _through(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _target(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _bridge(backend: dict[str, Any], alias: str) -> TaskBridge:
    bridge = TaskBridge(
        settings={
            "backends": {alias: backend},
            "dispatch_timeout": DISPATCH_TIMEOUT,
        }
    )

    @bridge.task(name="notsent.job", backend=alias)
    def job(label: str) -> None: ...

    return bridge


async def _dispatch_while_frozen(
    bridge: TaskBridge, proxy: FaultProxy, *, keyed: bool = False
) -> tuple[list[str], list[str], str]:
    """(ids accepted while frozen, ids refused while frozen, id of a call sent after heal)."""
    task = bridge.get_task("notsent.job")
    await bridge.open()
    await task.enqueue("warm-up")  # connections open and in use before the fault

    async def attempt(label: str) -> tuple[str, bool, float]:
        chosen = task.using(key=f"{label}-{time.time()}") if keyed else task
        backend, call = bridge.prepare(chosen, (label,), {})
        started = time.monotonic()
        try:
            await bridge.dispatch([(backend, call)])
        except BackendUnavailable:
            return call.id, False, time.monotonic() - started
        return call.id, True, time.monotonic() - started

    proxy.freeze()
    pending = [asyncio.create_task(attempt("first"))]
    for n in range(FROZEN_CALLS):  # arriving while the first batch is stuck on the link
        await asyncio.sleep(0.03)
        pending.append(asyncio.create_task(attempt(f"frozen-{n}")))
    outcomes = await asyncio.gather(*pending)
    proxy.heal()
    assert max(duration for _, _, duration in outcomes) < DISPATCH_TIMEOUT + 1.0
    deadline = time.monotonic() + 30
    while True:  # the link works again once a call goes through
        try:
            after = await task.enqueue("after")
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "the API never reached its broker again"
    # Bytes the freeze held (the batches in flight when their requests gave up) have been
    # handed to the broker: whatever of them it accepted is visible from here on.
    wait_until(lambda: proxy.held == 0, 10, "the proxy to deliver what the freeze held")
    await bridge.close()
    accepted = [i for i, ok, _ in outcomes if ok]
    refused = [i for i, ok, _ in outcomes if not ok]
    return accepted, refused, after.id


def test_arq_never_enqueues_a_call_whose_request_gave_up(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    queue = unique_name("arq")
    with FaultProxy(_target(redis_url, 6379)) as proxy:
        bridge = _bridge(
            {"redis_url": _through(redis_url, proxy), "queue_name": queue, "socket_timeout": 5},
            "arq",
        )
        accepted, refused, after = asyncio.run(_dispatch_while_frozen(bridge, proxy))
    client = redis.Redis.from_url(redis_url)
    try:
        queued = {member.decode() for member in client.zrange(queue, 0, -1)}
        assert accepted == [] and len(refused) == FROZEN_CALLS + 1
        assert after in queued
        assert queued.isdisjoint(refused), "a call answered 503 was enqueued"
        assert not any(client.exists(f"arq:job:{i}") for i in refused)
    finally:
        client.delete(queue, *(f"arq:job:{i}" for i in [*refused, after]))
        client.close()


def test_celery_on_redis_never_sends_a_batch_withdrawn_before_it_was_written(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    queue = unique_name("celery")
    with FaultProxy(_target(redis_url, 6379)) as proxy:
        bridge = _bridge(
            {"broker_url": _through(redis_url, proxy), "default_queue": queue}, "celery"
        )
        accepted, refused, after = asyncio.run(_dispatch_while_frozen(bridge, proxy))
    client = redis.Redis.from_url(redis_url)
    try:
        envelopes = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
        present = {envelope["headers"]["id"] for envelope in envelopes}
        assert accepted == [] and len(refused) == FROZEN_CALLS + 1
        assert after in present
        # Only the first batch can have left before its request gave up (keyless calls go as a
        # plain LPUSH; keyed ones would be refused late, as on ARQ).
        assert present & set(refused) <= {refused[0]}
    finally:
        client.delete(queue)
        client.close()


def test_celery_on_redis_refuses_keyed_calls_arriving_after_their_deadline(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    queue = unique_name("celery")
    with FaultProxy(_target(redis_url, 6379)) as proxy:
        options = {
            "broker_url": _through(redis_url, proxy),
            "default_queue": queue,
            "key_prefix": f"{queue}:",
        }
        bridge = _bridge(options, "celery")
        accepted, refused, _ = asyncio.run(_dispatch_while_frozen(bridge, proxy, keyed=True))
    client = redis.Redis.from_url(redis_url)
    try:
        present = {json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)}
        assert accepted == [] and len(refused) == FROZEN_CALLS + 1
        # Not even the batch that had left when its request gave up: Redis refused it late.
        assert present.isdisjoint(refused), "a call answered 503 was queued"
    finally:
        client.delete(queue, *client.scan_iter(match=f"{queue}:*"))
        client.close()


def test_celery_on_rabbitmq_never_sends_a_batch_withdrawn_before_it_was_written(
    amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    from kombu import Connection

    queue = unique_name("celery")
    with FaultProxy(_target(amqp_url, 5672)) as proxy:
        bridge = _bridge(
            {"broker_url": _through(amqp_url, proxy), "default_queue": queue}, "celery"
        )
        accepted, refused, after = asyncio.run(_dispatch_while_frozen(bridge, proxy))
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        present: set[str] = set()
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                headers = message.properties.get("application_headers") or {}
                present.add(str(headers.get("id")))
        finally:
            channel.queue_delete(queue)
    assert accepted == [] and len(refused) == FROZEN_CALLS + 1
    assert after in present
    assert present & set(refused) <= {refused[0]}


def test_celery_on_rabbitmq_gives_back_the_idempotency_keys_of_a_withdrawn_batch(
    amqp_url: str, redis_url: str, unique_name: Callable[[str], str]
) -> None:
    """Keyed calls answered 503 while the link is frozen: a withdrawn batch was never sent, so
    its keys are given back and the client's retry is sent (not answered 2xx and skipped); a
    batch already written keeps its keys, and arrives once after the heal."""
    from kombu import Connection

    queue = unique_name("keys")
    keys = [f"order-{n}" for n in range(FROZEN_CALLS // 2)]
    with FaultProxy(_target(amqp_url, 5672)) as proxy:
        bridge = _bridge(
            {
                "broker_url": _through(amqp_url, proxy),
                "default_queue": queue,
                "result_backend": redis_url,
                "key_prefix": f"{queue}:",
            },
            "celery",
        )
        task = bridge.get_task("notsent.job")
        ids = {k: bridge.prepare(task.using(key=k), (k,), {})[1].id for k in keys}

        async def keyed(key: str) -> bool:
            try:
                await task.using(key=key, key_ttl=60).enqueue(key)
            except BackendUnavailable:
                return False
            return True

        async def go() -> tuple[list[str], list[str]]:
            store = redis.asyncio.Redis.from_url(redis_url)
            await bridge.open()
            try:
                await task.enqueue("warm-up")
                proxy.freeze()
                pending = []
                for key in keys:  # the first batch is written; the next ones wait behind it
                    pending.append(asyncio.create_task(keyed(key)))
                    await asyncio.sleep(0.03)
                assert not any(await asyncio.gather(*pending))  # every request answered 503
                proxy.heal()
                deadline = time.monotonic() + 30
                while not await keyed("after-heal"):  # the link works again
                    assert time.monotonic() < deadline, "the API never reached its broker again"
                held = [k for k in keys if await store.exists(f"{queue}:taskbridge:key:{ids[k]}")]
                released = [k for k in keys if k not in held]
                for key in released:  # the clients' retries
                    assert await keyed(key)
                return held, released
            finally:
                await bridge.close()
                await store.aclose()

        held, released = asyncio.run(go())
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        present: list[str] = []
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                headers = message.properties.get("application_headers") or {}
                present.append(str(headers.get("id")))
        finally:
            channel.queue_delete(queue)
    assert released, "no withdrawn batch gave its key back"
    assert held == keys[: len(held)]  # those written: the first group the thread took
    # each call is there once: a held key's batch (written before its request gave up)
    # arrived after the heal; a released key's was never sent, and its retry was
    assert {k: present.count(ids[k]) for k in keys} == dict.fromkeys(keys, 1)
