"""With a `signing_key`, calls carry an HMAC and the worker drops what is unsigned or altered."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu import Connection, Producer

from conftest import WorkerProcess
from taskbridge import MessageError

from .conftest import Stack, celery_env, load_app_module, stop

KEY = "a-signing-key-of-some-length"


def test_signed_calls_run_and_unsigned_or_altered_ones_are_rejected(
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    redis_url: str,
    run_id: str,
    unique_name: Callable[[str], str],
) -> None:
    queue = unique_name("q")
    prefix = f"{run_id}:signed:"
    options: dict[str, Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    app = load_app_module(tmp_path)
    env = {
        **celery_env(options),
        "TASKBRIDGE_SIGNING_KEY": KEY,
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_PREFIX": prefix,
    }
    cli = ["worker", "celery", "tbapp:bridge", "--queues", queue, "--pool", "solo"]
    worker = spawn_worker([*cli, "--without-mingle", "--without-gossip"], env=env)
    try:
        worker.wait_for_output(r"@\S+ ready\.", 40)
        stack = Stack("redis", options, queue, queue, queue, prefix, redis_url, app, worker)
        stack.bridge = app.build(
            {"backends": {"celery": options}, "signing_key": KEY}, routed_queue=queue
        )
        signed = stack.send("tb.record", "signed", 1)

        def raw(args: list[Any], signature: str | None) -> str:
            task_id = str(uuid.uuid4())
            headers = {"lang": "py", "task": "tb.record", "id": task_id, "root_id": task_id}
            if signature is not None:
                headers["taskbridge_signature"] = signature
            with Connection(redis_url, transport_options={"global_keyprefix": prefix}) as conn:
                Producer(conn).publish(
                    json.dumps([args, {}, {}]),
                    exchange="",
                    routing_key=queue,
                    headers=headers,
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            return task_id

        unsigned = raw(["unsigned"], None)
        signer = stack.bridge.signer
        assert signer is not None
        forged_id = str(uuid.uuid4())
        altered = raw(["altered", 2], signer.sign(forged_id, "tb.record", ["altered", 1], {}))

        assert stack.result(signed.id).state == "SUCCESS"
        assert [r["args"] for r in stack.records("signed")] == [[1]]
        for task_id, words in ((unsigned, "not signed"), (altered, "does not match")):
            result = stack.result(task_id)
            assert result.state == "FAILURE" and isinstance(result.result, MessageError)
            assert words in str(result.result)
            worker.wait_for_output(rf"rejected a message for task tb\.record \[{task_id}\]")
        assert stack.records("unsigned") == stack.records("altered") == []

        # The signature covers what changes how a call runs, not only its arguments: a captured
        # signed message replayed with its time limits, due time, retry count or policy altered
        # is refused. A retry, which changes the count and the due time, is signed again by the
        # worker, and runs.
        retried = stack.send("tb.flaky", "retried", 2)
        assert stack.result(retried.id).result == 3
        assert len(stack.records("retried")) == 3

        def tampered(change: dict[str, Any]) -> str:
            task_id = str(uuid.uuid4())
            timelimit = [None, None]
            policy = {"retries": 0, "retry_backoff": 1.0, "retry_backoff_max": 300.0}
            policy |= {"retry_jitter": True, "timeout": None}
            args = ["tampered"]
            signature = signer.sign(
                task_id,
                "tb.record",
                args,
                {},
                policy=policy,
                engine={"timelimit": timelimit, "eta": None, "expires": None, "retries": 0},
            )
            headers = {
                "lang": "py",
                "task": "tb.record",
                "id": task_id,
                "root_id": task_id,
                "timelimit": timelimit,
                "retries": 0,
                "eta": None,
                "taskbridge_policy": policy,
                "taskbridge_signature": signature,
                **change,
            }
            with Connection(redis_url, transport_options={"global_keyprefix": prefix}) as conn:
                Producer(conn).publish(
                    json.dumps([args, {}, {}]),
                    exchange="",
                    routing_key=queue,
                    headers=headers,
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            return task_id

        untouched = tampered({})
        assert stack.result(untouched).state == "SUCCESS"
        changes: list[dict[str, Any]] = [
            {"timelimit": [0.01, 0.01]},
            {"retries": 5},
            {"eta": "2030-01-01T00:00:00+00:00"},
            {"expires": "2000-01-01T00:00:00+00:00"},
            {"taskbridge_policy": {"retries": 50}},
        ]
        for change in changes:
            result = stack.result(tampered(change))
            assert result.state == "FAILURE" and "does not match" in str(result.result), change
        assert len(stack.records("tampered")) == 1
        assert worker.process.poll() is None
        stack.close()
    finally:
        stop(worker)
