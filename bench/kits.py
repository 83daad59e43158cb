"""Worker kits: how one engine's native and taskbridge workers are started, fed and watched.

A kit is the `workers` entry of an engine in the table (bench/engines.py). The workers and
latency sections (bench/workers.py) drive every kit the same way: start a worker per side,
probe it, then per round `fill` a backlog off-queue, `release` it into the worker's queue at
once, and poll `remaining` until it is drained; for latency, `dispatch_started` one task at a
time and read its start time from Redis.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .infra import PYTHON

if TYPE_CHECKING:
    from .context import Run

CELERY_WORKER_FLAGS = ["--without-mingle", "--without-gossip", "--without-heartbeat"]
TB_CLI = [PYTHON, "-m", "taskbridge.cli", "--log-level", "WARNING"]
TB_WORKER = [*TB_CLI, "worker"]


@dataclass(frozen=True)
class Side:
    """One worker of a comparison: a native variant, or taskbridge's ("tb")."""

    name: str
    what: str = ""
    """For a native variant: how it is configured (in the row labels)."""
    env: dict[str, str] = field(default_factory=dict)
    like_for_like: bool = False

    @property
    def native(self) -> bool:
        return self.name != "tb"


class WorkerKit(ABC):
    """How one engine's workers are measured. Subclasses fill in the engine-specific parts."""

    engine: ClassVar[str]
    """The engine's name in the table ("celery-redis", "arq")."""
    key: ClassVar[str]
    """Row-key stem ("celery", "arq")."""
    title: ClassVar[str]
    """The engine in latency rows ("Celery/Redis")."""
    native_label: ClassVar[str]
    tb_label: ClassVar[str]

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sides = self.make_sides()
        self.queues = {side.name: self.queue_for(side.name) for side in self.sides}
        self.client: Any = None
        self.sync: Any = None

    # -- what each engine says ------------------------------------------------------------

    @abstractmethod
    def make_sides(self) -> tuple[Side, ...]:
        """The native variants, then taskbridge's side (named "tb")."""

    @property
    @abstractmethod
    def worker_title(self) -> str:
        """The worker in throughput rows, e.g. "Celery worker (prefork, concurrency 2)"."""

    @property
    @abstractmethod
    def memory_label(self) -> str:
        """The worker in the memory row."""

    @abstractmethod
    def queue_for(self, side: str) -> str:
        """The queue the worker of `side` consumes."""

    @abstractmethod
    def argv(self, side: Side) -> list[str]:
        """The command line of the worker of `side`."""

    @abstractmethod
    async def dispatch_started(self, side: Side, key: str) -> None:
        """Queue one task for `side` that RPUSHes its start time onto `key`, the way that
        side's users do."""

    @abstractmethod
    async def fill(self, side: Side, n: int) -> None:
        """Put a backlog of `n` no-op tasks where the worker of `side` does not see it yet."""

    @abstractmethod
    def release(self, side: Side) -> None:
        """Make the backlog appear in the worker's queue at once."""

    @abstractmethod
    def remaining(self, side: Side) -> int:
        """Tasks not yet done: the backlog is drained at 0."""

    # -- defaults -------------------------------------------------------------------------

    def env(self, side: Side) -> dict[str, str]:
        return {**self.run.config.env(engines=(self.engine,)), **side.env}

    def size(self, side: Side) -> int:
        """Backlog per round."""
        return int(self.run.args.tasks)

    def samples(self, side: Side) -> int:
        """Latency samples per round."""
        return int(self.run.args.latency_samples)

    def arrival(self, side: Side) -> float:
        """The longest random pause before a latency sample (a random moment in a poll)."""
        return 0.012

    def describe(self, side: Side) -> str:
        """What is left, for the error message when a backlog does not drain."""
        return ""

    async def settle(self, side: Side) -> None:  # noqa: B027 - optional hook
        """After the probe task started: wait until the worker is idle."""

    async def open(self) -> None:
        """Clients, and anything built once (the workers are starting meanwhile)."""
        import redis
        import redis.asyncio

        from . import tbside

        assert self.run.config.redis_url is not None
        self.client = redis.asyncio.Redis.from_url(self.run.config.redis_url)
        self.sync = redis.Redis.from_url(self.run.config.redis_url)
        await tbside.bridge.open()

    async def close(self) -> None:
        from . import tbside

        await tbside.bridge.close()
        if self.client is not None:
            await self.client.aclose()
        if self.sync is not None:
            self.sync.close()

    async def wait_started(self, key: str, timeout: float) -> float:
        """The start time a task RPUSHed onto `key`."""
        found = await self.client.blpop([key], timeout=timeout)
        if found is None:
            raise RuntimeError(f"no task recorded its start on {key} within {timeout}s")
        return float(found[1])


# -- Celery on Redis ------------------------------------------------------------------------


class CeleryKit(WorkerKit):
    """Native `celery worker` (with Celery's delivery defaults, and with taskbridge's) against
    `taskbridge worker celery`; backlogs built once under another prefix, COPYed each round."""

    engine = "celery-redis"
    key = "celery"
    title = "Celery/Redis"
    native_label = "celery worker"
    tb_label = "taskbridge worker celery"

    def make_sides(self) -> tuple[Side, ...]:
        return (
            Side("native", "Celery's delivery defaults"),
            Side(
                "nativesame",
                "taskbridge's delivery settings",
                {"BENCH_CELERY_DELIVERY": "taskbridge"},
                like_for_like=True,
            ),
            Side("tb"),
        )

    @property
    def worker_title(self) -> str:
        return f"Celery worker (prefork, concurrency {self.run.args.concurrency})"

    @property
    def memory_label(self) -> str:
        return f"{self.worker_title}, all processes"

    @property
    def unacked(self) -> str:
        """kombu's hash of delivered, unacknowledged messages (shared by the workers)."""
        return self.run.config.prefix + "unacked"

    def queue_for(self, side: str) -> str:
        return self.run.config.queue(f"cw-{side}")

    def argv(self, side: Side) -> list[str]:
        queue, concurrency = self.queues[side.name], str(self.run.args.concurrency)
        if side.native:
            return [
                *(PYTHON, "-m", "celery", "-A", "bench.native_celery:worker_app", "worker"),
                *("-Q", queue, "-n", f"{side.name}@%h", "-P", "prefork", "-c", concurrency),
                *("-l", "WARNING", *CELERY_WORKER_FLAGS),
            ]
        return [
            *(*TB_WORKER, "celery", "bench.tbside:bridge", "--queues", queue),
            *("--hostname", "tb@%h", "--pool", "prefork", "--concurrency", concurrency),
            *("--loglevel", "WARNING", *CELERY_WORKER_FLAGS),
        ]

    async def open(self) -> None:
        from . import native_celery, tbside

        await super().open()
        self.native_started = native_celery.redis_app().tasks["bench.celery_started"]
        self.tb_started = tbside.T.celery_started.using(queue=self.queues["tb"])
        self.sources = await self._templates()

    async def _templates(self) -> dict[str, str]:
        """The backlogs, built once by each side's own producer under the template prefix."""
        from taskbridge import TaskBridge

        from . import native_celery, tbside

        config, n = self.run.config, int(self.run.args.tasks)
        assert config.redis_url is not None
        tpl_native = config.queue("cw-tpl-native")
        tpl_app = native_celery.make_app(
            config.redis_url, tpl_native, prefix=config.template_prefix
        )
        tpl_noop = tpl_app.tasks["bench.celery_noop"]
        for i in range(n):
            tpl_noop.delay(i)
        tpl_tb = config.queue("cw-tpl-tb")
        tpl_bridge = TaskBridge(
            {
                "backends": {
                    "celery": {
                        "broker_url": config.redis_url,
                        "key_prefix": config.template_prefix,
                        "default_queue": tpl_tb,
                    }
                }
            }
        )
        tpl_task = tpl_bridge.task(name="bench.celery_noop", backend="celery")(tbside.celery_noop)
        await tpl_bridge.open()
        for start in range(0, n, 500):
            count = min(500, n - start)
            await tpl_bridge.dispatch(
                [tpl_bridge.prepare(tpl_task, (start + i,), {}) for i in range(count)]
            )
        await tpl_bridge.close()
        sources = {
            "native": config.template_prefix + tpl_native,
            "nativesame": config.template_prefix + tpl_native,
            "tb": config.template_prefix + tpl_tb,
        }
        for source in set(sources.values()):
            length = self.sync.llen(source)
            assert length == n, f"template {source} has {length} of {n}"
        return sources

    async def close(self) -> None:
        if self.sync is not None:  # the run's keys: templates, latency lists, queues
            keys = list(self.sync.scan_iter(match=f"{self.run.config.run}:*", count=1000))
            for start in range(0, len(keys), 5000):
                self.sync.delete(*keys[start : start + 5000])
        await super().close()

    async def dispatch_started(self, side: Side, key: str) -> None:
        if side.native:
            self.native_started.apply_async((key,), queue=self.queues[side.name])
        else:
            await self.tb_started.enqueue(key)

    async def settle(self, side: Side) -> None:
        deadline = time.monotonic() + 30  # the probe acknowledged
        while await self.client.hlen(self.unacked) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def fill(self, side: Side, n: int) -> None:
        """Nothing: the templates were built once (`open`)."""

    def release(self, side: Side) -> None:
        queue_key = self.run.config.prefix + self.queues[side.name]
        self.sync.copy(self.sources[side.name], queue_key, replace=True)

    def remaining(self, side: Side) -> int:
        pipe = self.sync.pipeline(transaction=False)
        pipe.llen(self.run.config.prefix + self.queues[side.name])
        pipe.hlen(self.unacked)
        length, pending = pipe.execute()
        return int(length) + int(pending)

    def describe(self, side: Side) -> str:
        queue_key = self.run.config.prefix + self.queues[side.name]
        return f"(queue {self.sync.llen(queue_key)}, unacked {self.sync.hgetall(self.unacked)})"


# -- ARQ --------------------------------------------------------------------------------------


class ArqKit(WorkerKit):
    """ARQ's own worker (at the default `poll_delay` and a tuned one) against `taskbridge worker
    arq`; each round's backlog is enqueued into a staging queue, then RENAMEd."""

    engine = "arq"
    key = "arq"
    title = "ARQ"
    native_label = "ARQ worker"
    tb_label = "taskbridge worker arq"

    def make_sides(self) -> tuple[Side, ...]:
        tuned = str(self.run.args.arq_tuned_poll_delay)
        return (
            Side("native", "default poll_delay 0.5 s"),
            Side("nativetuned", f"poll_delay {tuned} s", {"BENCH_ARQ_POLL_DELAY": tuned}),
            Side("tb"),
        )

    @property
    def worker_title(self) -> str:
        return "ARQ worker (max_jobs 10)"

    @property
    def memory_label(self) -> str:
        return "ARQ worker"

    @property
    def staging(self) -> str:
        return self.run.config.arq_queue("aw-staging")

    def queue_for(self, side: str) -> str:
        return self.run.config.arq_queue(f"aw-{side}")

    def env(self, side: Side) -> dict[str, str]:
        env = super().env(side)
        if side.native:  # bench/native_arq.py's WorkerSettings.queue_name
            env["BENCH_QUEUE_ARQW_NATIVE"] = self.queues[side.name]
        return env

    def argv(self, side: Side) -> list[str]:
        if side.native:
            return [PYTHON, "-m", "bench.native_arq"]
        return [*TB_WORKER, "arq", "bench.tbside:bridge", "--queue", self.queues["tb"]]

    def size(self, side: Side) -> int:
        if side.name == "native":  # at poll_delay 0.5 s ARQ is slow: a smaller backlog
            return max(100, int(self.run.args.tasks) // int(self.run.args.arq_default_divisor))
        return super().size(side)

    def samples(self, side: Side) -> int:
        if side.name == "native":
            return int(self.run.args.arq_default_samples)
        return super().samples(side)

    def arrival(self, side: Side) -> float:
        return 0.5 if side.native else 0.012  # a random moment within ARQ's poll cycle

    async def open(self) -> None:
        from arq.connections import ArqRedis

        from . import tbside

        await super().open()
        assert self.run.config.redis_url is not None
        self.pool = ArqRedis.from_url(self.run.config.redis_url)
        self.tb_started = tbside.T.arq_started.using(queue=self.queues["tb"])
        self.tb_staging = tbside.T.arq_noop.using(queue=self.staging)

    async def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            await self.pool.aclose()
        await super().close()

    async def dispatch_started(self, side: Side, key: str) -> None:
        if side.native:
            job = await self.pool.enqueue_job(
                "bench.arq_started", key, _queue_name=self.queues[side.name]
            )
            assert job is not None
            self.run.arq_ids.append(job.job_id)
        else:
            self.run.arq_ids.append((await self.tb_started.enqueue(key)).id)

    async def fill(self, side: Side, n: int) -> None:
        from . import tbside

        if side.native:
            for start in range(0, n, 200):
                jobs = await asyncio.gather(
                    *(
                        self.pool.enqueue_job("bench.arq_noop", i, _queue_name=self.staging)
                        for i in range(start, min(n, start + 200))
                    )
                )
                self.run.arq_ids += [j.job_id for j in jobs if j is not None]
        else:
            bridge = tbside.bridge
            for start in range(0, n, 500):
                calls = [
                    bridge.prepare(self.tb_staging, (start + i,), {})
                    for i in range(min(500, n - start))
                ]
                self.run.arq_ids += [call.id for _, call in calls]
                await bridge.dispatch(calls)
        assert self.sync.zcard(self.staging) == n

    def release(self, side: Side) -> None:
        self.sync.rename(self.staging, self.queues[side.name])

    def remaining(self, side: Side) -> int:
        return int(self.sync.zcard(self.queues[side.name]))
