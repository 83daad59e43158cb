"""The ARQ backend on the dispatching side: options, policies, one round trip, ARQ's format."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from arq.jobs import JobStatus
from taskbridge_arq import (
    JOB_FIELD,
    POLICY_KWARG,
    QUEUE_FIELD,
    SYNC_FIELD,
    WAKE_CHANNEL_PREFIX,
    ArqBackend,
)

from taskbridge import BackendUnavailable, ConfigurationError, TaskArgumentError, TaskBridge

from .conftest import monitor


def _bridge(redis_url: str, queue: str, **options: Any) -> TaskBridge:
    bridge = TaskBridge(
        settings={"backends": {"arq": {"redis_url": redis_url, "queue_name": queue, **options}}}
    )

    @bridge.task(backend="arq", name="arqtest.echo")
    def echo(*args: Any, **kwargs: Any) -> None: ...

    @bridge.task(backend="arq", name="arqtest.later", retries=2, delay=30)
    async def later(n: int) -> None: ...

    return bridge


@pytest.fixture
async def bridge(redis_url: str, unique_name: Callable[[str], str]) -> AsyncIterator[TaskBridge]:
    bridge = _bridge(redis_url, unique_name("q"))
    await bridge.open()
    yield bridge
    await bridge.close()


def _arq(bridge: TaskBridge) -> ArqBackend:
    backend = bridge.backend("arq")
    assert isinstance(backend, ArqBackend)
    return backend


def test_the_redis_url_is_required() -> None:
    bridge = TaskBridge(settings={"backends": {"arq": {"queue_name": "q"}}})
    with pytest.raises(ConfigurationError, match="TASKBRIDGE_BACKENDS__ARQ__REDIS_URL"):
        bridge.validate()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://user:secret@localhost:6379/1", "not a Redis URL"),
        ("redis://user:secret@localhost:6379/one", "database number"),
        ("redis:///1", "names no host"),
    ],
)
def test_a_bad_redis_url_fails_at_start_up_without_showing_its_password(
    url: str, problem: str
) -> None:
    bridge = TaskBridge(settings={"backends": {"arq": {"redis_url": url}}})
    with pytest.raises(ConfigurationError, match=problem) as raised:
        bridge.validate()
    assert "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_rediss_and_unix_urls_are_accepted() -> None:
    for url in ("rediss://:pw@redis.example:6380/2", "unix:///run/redis.sock?db=3"):
        TaskBridge(settings={"backends": {"arq": {"redis_url": url}}}).validate()


def test_a_timeout_above_job_timeout_fails_at_start_up(redis_url: str) -> None:
    bridge = TaskBridge(settings={"backends": {"arq": {"redis_url": redis_url, "job_timeout": 60}}})

    @bridge.task(backend="arq", name="arqtest.long", timeout=120)
    def long() -> None: ...

    with pytest.raises(ConfigurationError, match=r"'arqtest.long'.*JOB_TIMEOUT"):
        bridge.validate()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_down_raises_backend_unavailable_quickly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bridge = _bridge(f"redis://:secret@127.0.0.1:{_closed_port()}/9", "q")
    with caplog.at_level(logging.WARNING, logger="taskbridge.arq"):
        await bridge.open()  # the application still starts ...
    assert "cannot reach Redis" in caplog.text
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable) as raised:  # ... but no call is lost silently
            await bridge.tasks["arqtest.echo"].enqueue(1)
        concurrent = await asyncio.gather(
            *(bridge.tasks["arqtest.echo"].enqueue(i) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(error, BackendUnavailable) for error in concurrent), concurrent
        with pytest.raises(BackendUnavailable):
            await _arq(bridge).ping()
    finally:
        await bridge.close()
    assert time.monotonic() - started < 3
    assert raised.value.backend == "arq"
    assert "'arq'" in str(raised.value) and "secret" not in str(raised.value)
    assert raised.value.status_code == 503


async def test_a_batch_is_one_round_trip_in_arqs_own_format(
    bridge: TaskBridge, redis_url: str, unique_name: Callable[[str], str], arq_jobs: list[str]
) -> None:
    echo, later = bridge.tasks["arqtest.echo"], bridge.tasks["arqtest.later"]
    other = unique_name("other")
    calls = [
        bridge.prepare(echo, (1, "two"), {"_job_id": "mine", "_queue_name": "x", "_defer_by": 9}),
        bridge.prepare(echo, ([3.5, None],), {"ctx": {"a": True}}),
        bridge.prepare(later, (7,), {}),
        bridge.prepare(echo.using(queue=other, retries=4), (), {}),
    ]
    arq_jobs.extend(call.id for _, call in calls)
    before_ms = time.time() * 1000

    with monitor(redis_url) as commands:
        await bridge.dispatch(calls)

    ids = [call.id for _, call in calls]
    [script] = [c for c in commands if c.is_enqueue and ids[0] in c.command]
    assert all(job_id in script.command for job_id in ids)
    # Nothing else was sent about these jobs on the connection that sent the script (the
    # worker, which is quick, picks them up on its own connections meanwhile).
    sent = [c for c in commands if c.port == script.port and any(i in c.command for i in ids)]
    assert sent == [script]
    published = [c.command for c in commands if c.client == "lua" and "PUBLISH" in c.command]
    queue = _arq(bridge).options.queue_name
    assert any(WAKE_CHANNEL_PREFIX + queue in c for c in published)
    assert any(WAKE_CHANNEL_PREFIX + other in c for c in published)

    # ARQ's own tooling reads the jobs: function, args, kwargs, enqueue time, score.
    arq_redis = _arq(bridge).redis
    jobs = {job.job_id: job for job in await arq_redis.queued_jobs(queue_name=queue)}
    first, second, delayed = (jobs[i] for i in ids[:3])
    assert (first.function, first.args) == ("arqtest.echo", (1, "two"))
    # The kwargs are the call's own (a plain ARQ worker calls the function with them); the
    # policy rides in the job's own field. echo is a def task (marked, so that cancel knows
    # it cannot be interrupted); later async
    assert first.kwargs == {"_job_id": "mine", "_queue_name": "x", "_defer_by": 9}
    assert second.args == ([3.5, None],)
    assert second.kwargs == {"ctx": {"a": True}}
    assert (delayed.args, delayed.kwargs) == ((7,), {})
    raw = {i: json.loads(await arq_redis.get(f"arq:job:{i}")) for i in ids[:3]}
    assert [raw[i][JOB_FIELD] for i in ids[:3]] == [
        {SYNC_FIELD: True},
        {SYNC_FIELD: True},
        {"retries": 2},
    ]
    assert delayed.score is not None and first.score is not None
    assert before_ms <= first.score < before_ms + 5000
    assert delayed.score - first.score == pytest.approx(30_000, abs=50)
    assert await _arq(bridge).job(ids[0]).status() == JobStatus.queued
    assert await _arq(bridge).job(ids[2]).status() == JobStatus.deferred
    [routed] = await arq_redis.queued_jobs(queue_name=other)
    assert routed.job_id == ids[3]
    assert routed.kwargs == {}
    routed_raw = json.loads(await arq_redis.get(f"arq:job:{ids[3]}"))
    assert routed_raw[JOB_FIELD] == {"retries": 4, SYNC_FIELD: True, QUEUE_FIELD: other}

    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.pttl(f"arq:job:{ids[2]}")
        assert 86_400_000 + 29_000 < ttl <= 86_400_000 + 30_000  # ARQ's expiry: due + 1 day
        raw = json.loads(client.get(f"arq:job:{ids[0]}") or b"")
        assert set(raw) == {"t", "f", "a", "k", "et", JOB_FIELD}
    finally:
        client.close()


async def test_concurrent_dispatches_share_round_trips(
    bridge: TaskBridge, redis_url: str, arq_jobs: list[str]
) -> None:
    echo = bridge.tasks["arqtest.echo"]
    with monitor(redis_url) as commands:
        handles = await asyncio.gather(*(echo.enqueue(i) for i in range(20)))
    arq_jobs.extend(h.id for h in handles)

    scripts = [c for c in commands if c.is_enqueue and any(h.id in c.command for h in handles)]
    # The first goes at once, alone; the 19 that arrive while it is in flight go together.
    assert [sum(h.id in c.command for h in handles) for c in scripts] == [1, 19]
    jobs = await _arq(bridge).redis.queued_jobs()
    assert sorted(job.args[0] for job in jobs) == list(range(20))


async def test_a_job_id_that_exists_is_not_enqueued_again(
    bridge: TaskBridge, redis_url: str, arq_jobs: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    backend, call = bridge.prepare(bridge.tasks["arqtest.echo"], ("first",), {})
    arq_jobs.append(call.id)
    await backend.enqueue([call])
    call.args = ["second"]
    with caplog.at_level(logging.WARNING, logger="taskbridge.arq"):
        await backend.enqueue([call, call])
    assert caplog.text.count(f"ARQ job {call.id} exists") == 2
    [job] = await _arq(bridge).redis.queued_jobs()
    assert job.args == ("first",)


async def test_the_policy_kwarg_is_reserved(bridge: TaskBridge) -> None:
    with pytest.raises(TaskArgumentError, match="reserved"):
        await bridge.tasks["arqtest.echo"].enqueue(**{POLICY_KWARG: {"retries": 9}})


async def test_ping_describes_redis_and_the_queue(bridge: TaskBridge) -> None:
    description = await _arq(bridge).ping()
    assert description.startswith("Redis ")
    assert "0 job(s)" in description
    assert "no worker health check" in description
