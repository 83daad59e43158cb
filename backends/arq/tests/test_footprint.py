"""What taskbridge leaves in Redis per ARQ call, against a real worker on a Redis of the test's
own (so every key in it is the run's): each key has a TTL or is a bounded structure."""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import conftest as root
from taskbridge import TaskFailed
from tests.faults.servers import OwnRedis

from .conftest import APP_SOURCE, retire, wait_until

RESULT_TIMEOUT = 20


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _bounded(key: str, queue: str) -> bool:
    """Keys kept without a TTL that stay bounded: ARQ's queue (emptied by the worker) and abort
    set (trimmed by the workers), and the call index's keys, which each dispatch trims to
    `index_max_entries` calls of the last `keep_result` seconds (see test_index.py)."""
    return key in (queue, "arq:abort") or key.startswith(f"taskbridge:index:{queue}:")


async def test_every_key_of_a_run_has_a_ttl_or_is_bounded(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    url = own_redis.url(1)
    module_name = f"tbarqfootprint_{uuid.uuid4().hex[:8]}"
    prefix = "fp"
    (tmp_path / f"{module_name}.py").write_text(APP_SOURCE.format(prefix=prefix, redis_url=url))
    queue = "fp:queue"
    env = {
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": queue,
        "TASKBRIDGE_BACKENDS__ARQ__POLL_DELAY": "0.5",
    }
    sys.path.insert(0, str(tmp_path))
    worker = None
    client = own_redis.client(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            module = importlib.import_module(module_name)
            module.bridge.settings  # noqa: B018 - read once, while the environment is set
        worker = root.WorkerProcess(
            [sys.executable, "-m", "taskbridge.cli", "worker", "arq", f"{module_name}:bridge"],
            tmp_path,
            {**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        worker.wait_for_output("taskbridge ARQ worker ready")
        bridge = module.bridge
        await bridge.open()
        try:
            plain = [await module.record_async.enqueue("plain", i) for i in range(5)]
            keyed = await module.record_sync.using(key="order-1", key_ttl=60).enqueue("keyed", 1)
            flaky = await module.flaky.enqueue("flaky", 1)  # fails once, then succeeds
            failed = await module.fail.enqueue("ValueError", "no")
            progress = await module.steps_sync.enqueue("steps")
            wait_until(lambda: _records(client, prefix, "steps"), 15, "steps to start")
            client.rpush(f"{prefix}:steps:gate", "go")
            for handle in (*plain, keyed, flaky, progress):
                await handle.result(timeout=RESULT_TIMEOUT)
            with pytest.raises(TaskFailed):
                await failed.result(timeout=RESULT_TIMEOUT)
        finally:
            await bridge.close()
        keys = {k.decode(): client.pttl(k) for k in client.scan_iter(count=1000)}
        ours = [k for k in keys if not k.startswith(f"{prefix}:")]  # not the tasks' records
        lasting = [k for k in ours if keys[k] < 0 and not _bounded(k, queue)]
        assert lasting == [], f"keys without a TTL: {lasting}"
        assert 0 < keys[f"taskbridge:key:{keyed.id}"] <= 60_000
        assert 0 < keys[f"taskbridge:progress:{progress.id}"]
        for handle in (*plain, keyed, flaky, failed, progress):
            assert 0 < keys[f"arq:result:{handle.id}"] <= 3_600_000
            assert f"arq:job:{handle.id}" not in keys
            assert f"arq:retry:{handle.id}" not in keys
            assert f"arq:in-progress:{handle.id}" not in keys
        receipts = [k for k in ours if k.startswith("taskbridge:claim:")]
        assert len(receipts) <= 1  # one per worker, kept as long as its locks
    finally:
        if worker is not None:
            retire(worker)
        client.close()
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module_name, None)


def _records(client: redis.Redis, prefix: str, key: str) -> int:
    """How many records the tasks wrote under `key`."""
    return int(client.llen(f"{prefix}:{key}"))
