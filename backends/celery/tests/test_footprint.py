"""What taskbridge leaves in Redis per call, against real workers: the `queued` marker is gone
once a worker claims the call, its TTL is bounded by the visibility timeout plus the call's
delay, every key under the alias's prefix has a TTL or is a bounded structure, and the result a
call leaves takes no more of Redis than the one Celery itself stores, while Celery's own readers
(`AsyncResult`, `celery result`) read it as they read Celery's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from celery.app.task import Context  # type: ignore[import-untyped]
from kombu.utils.json import loads as kombu_loads  # type: ignore[import-untyped]
from taskbridge_celery._keys import TB_FIELD, date_done_ms, tb_fields, tb_value
from taskbridge_celery._results import TaskBridgeRedisBackend

from conftest import wait_until
from taskbridge import TaskBridge, TaskFailed

from .conftest import Stack, celery_env, load_app_module, opened, start_worker, stop


def _keys(store: redis.Redis, prefix: str) -> dict[str, int]:
    """Every key under `prefix`, with its TTL in ms (-1: none)."""
    found = [k.decode() for k in store.scan_iter(match=f"{prefix}*", count=1000)]
    return {key: store.pttl(key) for key in found}


def _taskbridge_writes(key: str) -> bool:
    """Whether taskbridge (API side or worker) writes `key`: its own keys and the results. The
    others under a prefix are the engine's bounded structures (queue lists the worker empties,
    kombu's binding set per queue, the unacked index of messages in flight) and the records of
    the test tasks. The call index (`taskbridge:index:*`) is bounded as well: each dispatch
    trims it to `index_max_entries` calls of the last `result_expires` (see test_index.py)."""
    if "taskbridge:index:" in key:
        return False
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
        tb = tb_fields(meta)
        # The final result keeps what status needs, not what only served while it ran.
        assert {"task", "attempt", "enqueued_at", "started_at"} <= set(tb)
        assert not {"hostname", "pid", "pool", "async", "finished_at"} & set(tb)
        assert len(meta[TB_FIELD]) == 6  # task, attempt, times, progress and its message
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


# -- the result a call leaves, against Celery's own -----------------------------------------


def _plain_celery(stack: Stack) -> Any:
    """Celery itself (its RedisBackend, not taskbridge's) on the stack's results."""
    app = Celery("plain", backend=stack.redis_url, set_as_current=False)
    ours = stack.bridge.backend("celery").app  # type: ignore[attr-defined]
    app.conf.result_backend_transport_options = dict(ours.conf.result_backend_transport_options)
    app.conf.accept_content = app.conf.result_accept_content = ["json"]
    return app


CELERYS_SETEX = "ignore:Call to deprecated setex:DeprecationWarning"
"""Celery 5.7's RedisBackend stores with `setex`, which redis-py 8 deprecates (Celery's call,
made here in the test process by `mark_as_done`)."""


@pytest.mark.filterwarnings(CELERYS_SETEX)
async def test_a_no_op_result_takes_no_more_of_redis_than_celerys_own(stack: Stack) -> None:
    key = f"fpnoop-{uuid.uuid4().hex[:8]}"
    async with opened(stack.bridge) as bridge:
        handle = await bridge.get_task("tb.sync_slow").enqueue(key, 0)
        assert await handle.result(timeout=20) is None
        info = await handle.info()
    plain = _plain_celery(stack)
    store = redis.Redis.from_url(stack.redis_url)
    try:
        # What Celery's worker stores for a no-op (`mark_as_done` of its request: a SUCCESS of
        # None), under a key of the same length.
        native_id = str(uuid.uuid4())
        request = Context(id=native_id, task="tb.sync_slow", retries=0)
        plain.backend.mark_as_done(native_id, None, request=request)
        ours_key = plain.backend.get_key_for_task(handle.id)
        native_key = plain.backend.get_key_for_task(native_id)
        ours, native = store.memory_usage(ours_key, 0), store.memory_usage(native_key, 0)
        assert ours is not None and native is not None
        assert ours <= native, (ours, native, store.get(ours_key), store.get(native_key))

        # Celery's own reader sees what it sees of its own result.
        mine, theirs = plain.AsyncResult(handle.id), plain.AsyncResult(native_id)
        assert mine.status == theirs.status == "SUCCESS"
        assert (mine.result, mine.traceback, mine.children) == (
            theirs.result,
            theirs.traceback,
            theirs.children,
        )
        assert theirs.children == [] and theirs.traceback is None
        assert isinstance(mine.date_done, datetime) and mine.date_done == info.finished_at
        assert mine.get(timeout=5) is None
        # ...and the same fields, but for the traceback of None left out and taskbridge's own.
        stored = kombu_loads(store.get(ours_key))
        assert set(stored) | {"traceback"} == set(kombu_loads(store.get(native_key))) | {TB_FIELD}
        assert (info.task_name, info.attempts, info.state) == ("tb.sync_slow", 1, "succeeded")
        assert info.enqueued_at and info.started_at and info.finished_at
        assert info.enqueued_at <= info.started_at <= info.finished_at
        store.delete(native_key)
    finally:
        store.close()
        plain.close()


RESULT_MODULE = """from celery import Celery

app = Celery("plain", backend={url!r}, set_as_current=False)
app.conf.result_backend_transport_options = {options!r}
"""


def _celery_result(stack: Stack, directory: Path, *args: str) -> str:
    """What `celery result` (Celery's CLI, on a plain Celery app) prints."""
    ours = stack.bridge.backend("celery").app  # type: ignore[attr-defined]
    options = dict(ours.conf.result_backend_transport_options)
    (directory / "plainresults.py").write_text(
        RESULT_MODULE.format(url=stack.redis_url, options=options)
    )
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "plainresults:app", "result", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


async def test_celerys_readers_read_a_result_and_a_failure_as_celery_stored_them(
    stack: Stack, tmp_path: Path
) -> None:
    key = f"fpread-{uuid.uuid4().hex[:8]}"
    async with opened(stack.bridge) as bridge:
        done = await bridge.get_task("tb.record").enqueue(key, 1, two=2)
        value = await done.result(timeout=20)
        failed = await bridge.get_task("tb.fail").enqueue("broken: 7")
        with pytest.raises(TaskFailed):
            await failed.result(timeout=20)
        failed_info = await failed.info()
    plain = _plain_celery(stack)
    try:
        result = plain.AsyncResult(done.id)
        assert (result.status, result.result, result.children) == ("SUCCESS", value, [])
        assert result.traceback is None and isinstance(result.date_done, datetime)
        failure = plain.AsyncResult(failed.id)
        assert failure.status == "FAILURE" and failure.children == []
        assert isinstance(failure.result, ValueError) and str(failure.result) == "broken: 7"
        assert "ValueError: broken: 7" in failure.traceback
        assert failure.date_done == failed_info.finished_at
        with pytest.raises(ValueError, match="broken: 7"):
            failure.get(timeout=5)
    finally:
        plain.close()
    assert _celery_result(stack, tmp_path, done.id) == str(value)
    assert "ValueError: broken: 7" in _celery_result(stack, tmp_path, "--traceback", failed.id)


def test_results_are_encoded_as_celery_encodes_them_compactly(redis_url: str) -> None:
    ours = Celery("ours", backend=redis_url, set_as_current=False)
    ours.backend_cls = f"{TaskBridgeRedisBackend.__module__}:TaskBridgeRedisBackend+{redis_url}"
    plain = Celery("plain", backend=redis_url, set_as_current=False)
    try:
        assert isinstance(ours.backend, TaskBridgeRedisBackend)
        meta = {
            "status": "SUCCESS",
            "result": {"at": datetime(2026, 1, 2, 3, 4, 5), "id": uuid.UUID(int=7), "n": [1.5]},
            "children": [],
            "date_done": "2026-01-02T03:04:05.123456+00:00",
            "task_id": "x",
            "é": "ü",
        }
        compact, celerys = ours.backend.encode(meta), plain.backend.encode(meta)
        assert isinstance(compact, str) and ", " not in compact and '": ' not in compact
        assert len(compact) < len(celerys)
        assert ours.backend.decode(compact) == plain.backend.decode(celerys)
        assert plain.backend.decode(compact) == plain.backend.decode(celerys)
    finally:
        ours.close()
        plain.close()


def test_the_tb_field_reads_back_the_times_it_was_given() -> None:
    fields = {
        "task": "t",
        "attempt": 2,
        "enqueued_at": 1_796_051_373.902104,
        "started_at": 1_796_051_373.9092994,
        "progress": 0.5,
    }
    running = {"status": "STARTED", "date_done": None, TB_FIELD: tb_value(fields, None)}
    read = tb_fields(running)
    assert running[TB_FIELD] == ["t", 2, 1_796_051_373_902, 1_796_051_373_909, 0.5]
    assert read == {**fields, "enqueued_at": 1_796_051_373.902, "started_at": 1_796_051_373.909}
    done: dict[str, Any] = {"status": "SUCCESS", "date_done": "2026-11-30T15:09:33.912176+00:00"}
    assert date_done_ms(done) == 1_796_051_373_912
    done[TB_FIELD] = tb_value(read, date_done_ms(done))
    assert done[TB_FIELD] == ["t", 2, 10, 3, 0.5]  # counted back from date_done
    assert tb_fields(done) == read  # the very same times, final or not
    assert tb_fields({"status": "SUCCESS", TB_FIELD: ["t", None, None, None]}) == {"task": "t"}


@pytest.mark.filterwarnings(CELERYS_SETEX)
def test_a_final_store_over_a_started_result_of_the_earlier_format(
    redis_url: str, run_id: str
) -> None:
    # A worker upgraded while the call ran: the STARTED meta was written in the earlier format.
    app = Celery("ours", backend=redis_url, set_as_current=False)
    app.backend_cls = f"{TaskBridgeRedisBackend.__module__}:TaskBridgeRedisBackend+{redis_url}"
    app.conf.result_backend_transport_options = {"global_keyprefix": f"{run_id}:fpold:"}
    store = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    key = app.backend.get_key_for_task(task_id)
    try:
        legacy: dict[str, Any] = {
            "status": "STARTED",
            "result": {"pid": 1, "hostname": "w@h"},
            "traceback": None,
            "children": [],
            "date_done": None,
            "task_id": task_id,
            "taskbridge": {
                "task": "old.task",
                "attempt": 1,
                "enqueued_at": 1_796_051_373.902104,
                "started_at": 1_796_051_373.9092994,
                "hostname": "w@h",
                "pid": 1,
                "pool": "prefork",
                "async": False,
                "progress": 0.25,
            },
        }
        store.set(key, json.dumps(legacy), ex=60)
        request = Context(id=task_id, task="old.task", retries=0, hostname="w@h")
        app.backend.mark_as_done(task_id, {"ok": 1}, request=request)
        meta = json.loads(store.get(key) or b"{}")
        assert "taskbridge" not in meta and "traceback" not in meta
        assert (meta["status"], meta["result"]) == ("SUCCESS", {"ok": 1})
        assert tb_fields(meta) == {
            "task": "old.task",
            "attempt": 1,
            "enqueued_at": 1_796_051_373.902,
            "started_at": 1_796_051_373.909,
            "progress": 0.25,
        }
        assert app.AsyncResult(task_id).result == {"ok": 1}
    finally:
        store.delete(key)
        store.close()
        app.close()
