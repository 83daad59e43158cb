"""What dispatch writes for status and idempotency keys, read back from the brokers (no worker)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from taskbridge import TaskBridge

from .conftest import delete_amqp_queues, opened
from .test_dispatch import read_back


def _bridge(options: dict[str, Any]) -> TaskBridge:
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name="keys.task", backend="celery")
    def task(n: int) -> None:
        """Only dispatched."""

    return bridge


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_a_batch_publishes_each_key_once_and_leaves_queued_markers(
    broker: str,
    redis_url: str,
    run_id: str,
    unique_name: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> None:
    url: str = redis_url if broker == "redis" else request.getfixturevalue("amqp_url")
    first, second = unique_name("q1"), unique_name("q2")
    prefix = f"{run_id}:keys:{uuid.uuid4().hex[:6]}:"
    options = {
        "broker_url": url,
        "result_backend": redis_url,
        "default_queue": first,
        "key_prefix": prefix,
    }
    bridge = _bridge(options)
    task = bridge.get_task("keys.task")
    order = f"order-{uuid.uuid4().hex[:6]}"
    store = redis.Redis.from_url(redis_url)
    try:
        async with opened(bridge):
            batch = [
                bridge.prepare(task.using(key=order, key_ttl=30), (1,), {}),
                bridge.prepare(task, (2,), {}),
                bridge.prepare(task.using(key=order, key_ttl=30), (3,), {}),  # same key, same id
                bridge.prepare(task.using(key=f"{order}-b", queue=second), (4,), {}),
            ]
            await bridge.dispatch(batch)
            await bridge.dispatch([bridge.prepare(task.using(key=order, key_ttl=30), (5,), {})])
            ids = [call.id for _, call in batch]
            assert ids[0] == ids[2] and len(set(ids)) == 3
            statuses = [await bridge.handle(i, "celery").info() for i in ids]
        app = bridge.backend("celery").app  # type: ignore[attr-defined]
        on_first = read_back(app, first, 2)
        on_second = read_back(app, second, 1)
        assert [m.decode()[0] for m in on_first] == [[1], [2]]  # in dispatch order
        assert [m.headers["id"] for m in on_second] == [ids[3]]
        if broker == "redis":
            assert store.llen(f"{prefix}{first}") == 0  # nothing more was pushed
        # (with RabbitMQ, the markers are written to the results' Redis)
        for task_id in (ids[0], ids[1], ids[3]):
            marker = json.loads(store.get(f"{prefix}taskbridge:queued:{task_id}") or b"{}")
            assert marker["task"] == "keys.task" and marker["enqueued_at"] > 0
        assert [s.state for s in statuses] == ["queued"] * 4
        assert 0 < store.pttl(f"{prefix}taskbridge:key:{ids[0]}") <= 30_000
        assert statuses[0].task_name == "keys.task" and statuses[0].enqueued_at is not None
    finally:
        store.close()
        app = bridge.backend("celery").app  # type: ignore[attr-defined]
        app.close()
        if broker == "amqp":
            delete_amqp_queues(url, [first, second])


async def test_without_queued_markers_a_call_not_started_is_unknown_and_can_be_revoked(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    prefix = f"{run_id}:nomark:"
    options = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": unique_name("q"),
        "key_prefix": prefix,
        "track_queued": False,
    }
    bridge = _bridge(options)
    async with opened(bridge):
        handle = await bridge.get_task("keys.task").enqueue(1)
        assert await handle.status() == "unknown"
        store = redis.Redis.from_url(redis_url)
        try:
            assert not store.exists(f"{prefix}taskbridge:queued:{handle.id}")
        finally:
            store.close()
        answer = await handle.cancel()
        assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
        assert await handle.status() == "cancelled"
    bridge.backend("celery").app.close()  # type: ignore[attr-defined]
