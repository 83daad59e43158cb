"""Poison jobs: random and mutated payloads written straight into the queue never stop the worker.

Hypothesis mutates a valid job, as taskbridge writes it, in every field (removed, replaced by
any JSON value, policy fields out of range, arguments that do not fit, unknown tasks) and adds
random bytes. Each batch goes into the queue of the session's real worker at once; every job
must end with a stored result (failed, or succeeded when the mutation left it valid), the worker
must still be running, and a valid call sent after them must run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskbridge_arq import JOB_FIELD, POLICY_KWARG, WAKE_CHANNEL_PREFIX

from .conftest import ArqApp, wait_until

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
policy_fields = st.dictionaries(
    st.sampled_from(
        [
            "retries",
            "retry_backoff",
            "retry_backoff_max",
            "retry_jitter",
            "timeout",
            "sync",
            "queue",
        ]
    ),
    json_values,
    max_size=3,
)


@st.composite
def mutated_job(draw: st.DrawFn, task_name: str, key: str) -> bytes:
    job: dict[str, Any] = {
        "t": None,
        "f": task_name,
        "a": [key],
        "k": {},
        "et": int(time.time() * 1000),
        JOB_FIELD: {"sync": True},
    }
    how = draw(
        st.sampled_from(
            [
                *("drop", "replace", "policy", "policy-any", "legacy", "kwargs", "args"),
                *("task", "bytes", "array"),
            ]
        )
    )
    if how == "drop":
        del job[draw(st.sampled_from(sorted(job)))]
    elif how == "replace":
        job[draw(st.sampled_from(sorted(job)))] = draw(json_values)
    elif how == "policy":
        job[JOB_FIELD] = draw(policy_fields)
    elif how == "policy-any":
        job[JOB_FIELD] = draw(json_values)
    elif how == "legacy":  # where earlier versions carried the policy: the kwargs
        del job[JOB_FIELD]
        job["k"][POLICY_KWARG] = draw(json_values | policy_fields)
    elif how == "kwargs":
        job["k"].update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)))
    elif how == "args":
        job["a"] = draw(st.lists(json_values, max_size=4))
    elif how == "task":
        job["f"] = draw(st.text(max_size=20))
    elif how == "bytes":
        return draw(st.binary(max_size=64))
    else:
        return json.dumps(draw(st.lists(json_values, max_size=3))).encode()
    return json.dumps(job).encode()


def _push(client: redis.Redis, queue: str, payloads: list[bytes]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in payloads]
    now_ms = int(time.time() * 1000)
    with client.pipeline(transaction=False) as pipe:
        for job_id, payload in zip(ids, payloads, strict=True):
            pipe.psetex(f"arq:job:{job_id}", 60_000, payload)
            pipe.zadd(queue, {job_id: now_ms})
        pipe.publish(WAKE_CHANNEL_PREFIX + queue, str(now_ms))
        pipe.execute()
    return ids


def test_random_and_mutated_jobs_never_stop_the_worker(
    arq_app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    app = arq_app
    client = redis.Redis.from_url(app.redis_url)
    task_name = app.module.record_sync.name
    poisoned = unique_name("poisoned")
    batches = 0

    @settings(
        max_examples=3,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(mutated_job(task_name, poisoned), min_size=40, max_size=40))
    def check(payloads: list[bytes]) -> None:
        nonlocal batches
        batches += 1
        ids = _push(client, app.queue, payloads)
        arq_jobs.extend(ids)
        wait_until(
            lambda: all(client.exists(f"arq:result:{i}") for i in ids),
            30,
            "a stored result for every poison job",
        )
        assert app.worker.process.poll() is None, app.worker.output[-3000:]

    try:
        check()
        assert batches == 3
        after = unique_name("after")
        [valid] = _push(
            client,
            app.queue,
            [
                json.dumps(
                    {
                        "t": None,
                        "f": task_name,
                        "a": [after],
                        "k": {},
                        "et": int(time.time() * 1000),
                        JOB_FIELD: {"sync": True},
                    }
                ).encode()
            ],
        )
        arq_jobs.append(valid)
        wait_until(lambda: app.records(after), 20, "the valid job after the poison")
        assert app.records(after)[0]["pid"] == app.worker.process.pid
    finally:
        client.close()
