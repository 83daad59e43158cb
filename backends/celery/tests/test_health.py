"""`--health-file`: the file exists exactly while a real Celery worker is connected to its broker.

The worker reaches Redis through a `FaultProxy`: cutting it (every connection reset, new ones
refused) makes the file go; healing it makes the worker reconnect and the file come back; the
worker stopping removes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from conftest import wait_until
from tests.faults.proxy import FaultProxy

from .conftest import celery_env, load_app_module, start_worker, stop


def test_the_health_file_exists_exactly_while_the_worker_is_connected(
    redis_url: str, run_id: str, tmp_path: Path
) -> None:
    parts = urlsplit(redis_url)
    queue, prefix = f"{run_id}-health-q", f"{run_id}:health:"
    health = tmp_path / "health.json"
    load_app_module(tmp_path)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        options = {
            "broker_url": f"redis://127.0.0.1:{proxy.port}{parts.path}",
            "default_queue": queue,
            "key_prefix": prefix,
        }
        env = {**celery_env(options), "TBTEST_REDIS_URL": redis_url, "TBTEST_PREFIX": prefix}
        args = ["worker", "celery", "tbapp:bridge", "--pool", "solo", "--queues", queue]
        args += ["--health-file", str(health), "--hostname", f"{run_id}-health@%h"]
        worker = start_worker(tmp_path, [*args, "--without-mingle", "--without-gossip"], env)
        try:
            wait_until(health.exists, 20, "the health file of a connected worker")
            written = json.loads(health.read_text())
            assert written["connected"] is True
            assert written["pid"] == worker.process.pid

            proxy.cut()
            wait_until(lambda: not health.exists(), 20, "the health file to go")
            worker.wait_for_output(r"lost the broker \(")

            proxy.heal()
            wait_until(health.exists, 30, "the health file to come back")
            worker.wait_for_output(r"reconnected to the broker after")
            assert worker.process.poll() is None
        finally:
            code = stop(worker)
        assert code == 0, worker.output[-3000:]
        assert not health.exists()
