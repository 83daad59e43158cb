"""What taskbridge leaves in Redis per call, against real workers: the `queued` marker is gone
once a worker claims the call, its TTL is bounded by the visibility timeout plus the call's
delay, and every key under the alias's prefix has a TTL or is a bounded structure."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from conftest import wait_until
from taskbridge import TaskBridge

from .conftest import Stack, celery_env, load_app_module, opened, start_worker, stop


def _keys(store: redis.Redis, prefix: str) -> dict[str, int]:
    """Every key under `prefix`, with its TTL in ms (-1: none)."""
    found = [k.decode() for k in store.scan_iter(match=f"{prefix}*", count=1000)]
    return {key: store.pttl(key) for key in found}


def _taskbridge_writes(key: str) -> bool:
    """Whether taskbridge (API side or worker) writes `key`: its own keys and the results. The
    others under a prefix are the engine's bounded structures (queue lists the worker empties,
    kombu's binding set per queue, the unacked index of messages in flight) and the records of
    the test tasks."""
    return "taskbridge:" in key or "celery-task-meta-" in key


async def test_the_marker_is_gone_once_a_worker_claims_the_call(stack: Stack) -> None:
    store = redis.Redis.from_url(stack.redis_url)
    key, gate = f"fp-{uuid.uuid4().hex[:8]}", f"gate-{uuid.uuid4().hex[:8]}"
    try:
        async with opened(stack.bridge) as bridge:
            handle = await bridge.get_task("tb.gated").enqueue(key, gate)
            marker = f"{stack.prefix}taskbridge:queued:{handle.id}"
            wait_until(lambda: stack.records(key), 20, "the call to start")
            assert (await handle.info()).state == "running"
            assert not store.exists(marker)  # deleted by the claim, while the call runs
            stack.open_gate(gate)
            await handle.result(timeout=15)
            assert (await handle.info()).state == "succeeded"
        assert not store.exists(marker)
        meta = json.loads(store.get(f"{stack.prefix}celery-task-meta-{handle.id}") or b"{}")
        tb = meta["taskbridge"]
        # The final result keeps what status needs, not what only served while it ran.
        assert {"task", "attempt", "enqueued_at", "started_at"} <= set(tb)
        assert not {"hostname", "pid", "pool", "async", "finished_at"} & set(tb)
    finally:
        store.close()


async def test_every_key_of_a_run_has_a_ttl_or_is_bounded(stack: Stack) -> None:
    store = redis.Redis.from_url(stack.redis_url)
    name = f"fp-{uuid.uuid4().hex[:8]}"
    try:
        async with opened(stack.bridge) as bridge:
            record = bridge.get_task("tb.record")
            handles = [await record.enqueue(name, i) for i in range(5)]
            handles.append(await record.using(key=name, key_ttl=60).enqueue(name, "keyed"))
            for handle in handles:
                await handle.result(timeout=20)
        keys = _keys(store, stack.prefix)
        for handle in handles:
            assert f"{stack.prefix}taskbridge:queued:{handle.id}" not in keys
            assert 0 < keys[f"{stack.prefix}celery-task-meta-{handle.id}"] <= 86_400_000
        assert 0 < keys[f"{stack.prefix}taskbridge:key:{handles[-1].id}"] <= 60_000
        lasting = [k for k, ttl in keys.items() if ttl < 0 and _taskbridge_writes(k)]
        assert lasting == [], f"keys written without a TTL: {lasting}"
    finally:
        store.close()


def _queued_only_bridge(redis_url: str, prefix: str, queue: str, **extra: Any) -> TaskBridge:
    bridge = TaskBridge(
        {
            "backends": {
                "celery": {
                    "broker_url": redis_url,
                    "result_backend": redis_url,
                    "default_queue": queue,
                    "key_prefix": prefix,
                    **extra,
                }
            }
        }
    )

    @bridge.task(name="fp.never", backend="celery")
    def never(n: int) -> None:
        """Dispatched to a queue no worker consumes."""

    return bridge


async def test_a_marker_lives_the_visibility_timeout_plus_the_delay(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    prefix = f"{run_id}:fpttl:{uuid.uuid4().hex[:6]}:"
    bridge = _queued_only_bridge(redis_url, prefix, unique_name("q"), visibility_timeout=120)
    store = redis.Redis.from_url(redis_url)
    try:
        async with opened(bridge):
            task = bridge.get_task("fp.never")
            now = await task.enqueue(1)
            later = await task.using(delay=300).enqueue(2)
            assert (await now.info()).state == (await later.info()).state == "queued"
        now_ttl = store.pttl(f"{prefix}taskbridge:queued:{now.id}")
        later_ttl = store.pttl(f"{prefix}taskbridge:queued:{later.id}")
        assert 110_000 < now_ttl <= 120_000
        assert 410_000 < later_ttl <= 420_000
    finally:
        keys = list(store.scan_iter(match=f"{prefix}*"))
        if keys:
            store.delete(*keys)
        store.close()
        bridge.backend("celery").app.close()  # type: ignore[attr-defined]


async def test_the_marker_of_a_call_never_claimed_expires_within_its_bound(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    prefix = f"{run_id}:fpexp:{uuid.uuid4().hex[:6]}:"
    bridge = _queued_only_bridge(redis_url, prefix, unique_name("q"), visibility_timeout=1)
    store = redis.Redis.from_url(redis_url)
    try:
        async with opened(bridge):
            handle = await bridge.get_task("fp.never").enqueue(1)
            assert await handle.status() == "queued"
            marker = f"{prefix}taskbridge:queued:{handle.id}"
            wait_until(lambda: not store.exists(marker), 5, "the marker to expire")
            assert await handle.status() == "unknown"
    finally:
        keys = list(store.scan_iter(match=f"{prefix}*"))
        if keys:
            store.delete(*keys)
        store.close()
        bridge.backend("celery").app.close()  # type: ignore[attr-defined]


def test_a_worker_deletes_markers_in_a_broker_redis_apart_from_the_results(
    redis_url: str, run_id: str, tmp_path: Path
) -> None:
    # Broker and results in two databases of one server: two Redis for taskbridge.
    broker_url = redis_url.rsplit("/", 1)[0] + "/" + str(int(redis_url.rsplit("/", 1)[1]) + 1)
    prefix = f"{run_id}:fpsplit:{uuid.uuid4().hex[:6]}:"
    queue = f"{run_id}-fpsplit"
    options = {
        "broker_url": broker_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    app = load_app_module(tmp_path)
    env = {
        **celery_env(options),
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_PREFIX": prefix,
        "TBTEST_ROUTED_QUEUE": f"{queue}-routed",
    }
    args = ["worker", "celery", "tbapp:bridge", "--pool", "solo", "--queues", queue]
    args += ["--without-mingle", "--without-gossip", "--hostname", f"{queue}@%h"]
    worker = start_worker(tmp_path, args, env)
    broker = redis.Redis.from_url(broker_url)
    results = redis.Redis.from_url(redis_url)
    bridge = app.build({"backends": {"celery": options}}, routed_queue=f"{queue}-routed")
    try:

        async def go() -> list[str]:
            async with opened(bridge):
                record = bridge.get_task("tb.record")
                handles = [await record.enqueue("split", i) for i in range(3)]
                for handle in handles:
                    await handle.result(timeout=20)
                return [h.id for h in handles]

        ids = asyncio.run(go())
        for task_id in ids:
            assert not broker.exists(f"{prefix}taskbridge:queued:{task_id}")
            assert results.exists(f"{prefix}celery-task-meta-{task_id}")
    finally:
        stop(worker)
        for client in (broker, results):
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
            client.close()
        bridge.backend("celery").app.close()
