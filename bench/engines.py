"""The engine table: what each section needs to know about Celery on Redis, Celery on RabbitMQ
and ARQ, one entry per engine. The sections (bench/sections.py, bench/workers.py) loop over it.

An entry says how each side dispatches from an endpoint (bench/api_native.py's `delay()`,
`send_task()`, `enqueue_job()` against bench/api_tb.py's `Tasks.add_task`), which queue that
fills and how to purge it, which rows compare which endpoints, how the workers are measured
(`workers`: a `WorkerKit`, bench/kits.py) and which taskbridge worker consumes the isolation
section's routed tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Config
from .kits import CELERY_WORKER_FLAGS, ArqKit, CeleryKit, WorkerKit
from .results import log

if TYPE_CHECKING:
    from .context import Run


@dataclass(frozen=True)
class Endpoint:
    """One way of queueing from an endpoint: POST `path/<k>/<n>` adds k tasks."""

    name: str
    side: str
    """"native" (bench/api_native.py) or "tb" (bench/api_tb.py)."""
    path: str
    queue_kind: str
    """The queue it fills (purged after every measurement window)."""


@dataclass(frozen=True)
class Pair:
    """An enqueue row: one native endpoint against one taskbridge endpoint."""

    key: str
    label: str
    native: str
    native_label: str
    tb: str
    tb_label: str


@dataclass(frozen=True)
class Engine:
    """One engine: its dispatch endpoints, the rows comparing them, its workers, its queues."""

    name: str
    title: str
    alias: str
    """The taskbridge backend alias of bench/tbside.py that the taskbridge side uses."""
    queue: Callable[[Config, str], str]
    purge: Callable[[Run, str], None]
    endpoints: tuple[Endpoint, ...]
    pairs: tuple[Pair, ...]
    workers: type[WorkerKit] | None = None
    """Throughput and latency of its native and taskbridge workers (None: not measured)."""
    isolation_worker: Callable[[str], list[str]] | None = None
    """`taskbridge worker ...` arguments consuming `queue` in the isolation section."""

    @property
    def tb_queue_kind(self) -> str:
        """The queue kind of taskbridge's default queue for this engine (bench/tbside.py)."""
        return next(e.queue_kind for e in self.endpoints if e.side == "tb")

    def endpoint(self, name: str) -> Endpoint:
        return next(e for e in self.endpoints if e.name == name)


# -- purges: empty a queue between measurements --------------------------------------------


def purge_celery_redis(run: Run, queue: str) -> None:
    """Delete a kombu Redis queue and its priority lists."""
    client = run.sync_redis()
    key = run.config.prefix + queue
    client.delete(key, *(f"{key}\x06\x16{p}" for p in (3, 6, 9)))
    client.close()


def purge_arq(run: Run, queue: str) -> None:
    """Delete an ARQ queue and the jobs it lists."""
    client = run.sync_redis()
    ids = [i.decode() for i in client.zrange(queue, 0, -1)]
    for start in range(0, len(ids), 5000):
        client.delete(*(f"arq:job:{i}" for i in ids[start : start + 5000]))
    client.delete(queue)
    client.close()


def purge_amqp(run: Run, queue: str) -> None:
    """Purge a RabbitMQ queue (remembered, to be deleted at the end)."""
    from kombu import Connection  # type: ignore[import-untyped]

    assert run.config.amqp_url is not None
    run.amqp_queues.add(queue)
    try:
        with Connection(run.config.amqp_url, connect_timeout=5) as connection:
            connection.default_channel.queue_purge(queue)
    except Exception as exc:  # not declared yet: nothing to purge
        log(f"purge of {queue}: {type(exc).__name__}: {exc}")


def _kombu_queue(config: Config, kind: str) -> str:
    return config.queue(kind)


def _arq_queue(config: Config, kind: str) -> str:
    return config.arq_queue(kind)


def _celery_isolation(queue: str) -> list[str]:
    return [
        *("worker", "celery", "bench.tbside:bridge", "--queues", queue),
        *("--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING"),
        *CELERY_WORKER_FLAGS,
    ]


def _arq_isolation(queue: str) -> list[str]:
    return ["worker", "arq", "bench.tbside:bridge", "--queue", queue]


TB = "Tasks.add_task"

ENGINE_TABLE: tuple[Engine, ...] = (
    Engine(
        name="celery-redis",
        title="Celery/Redis",
        alias="celery",
        queue=_kombu_queue,
        purge=purge_celery_redis,
        endpoints=(
            Endpoint("delay", "native", "/celery/delay", "celery-native"),
            Endpoint("send", "native", "/celery/send", "celery-native"),
            Endpoint("tb", "tb", "/celery", "celery-tb"),
        ),
        pairs=(
            Pair("celery-redis-delay", "vs `delay()`", "delay", "delay()", "tb", TB),
            Pair("celery-redis-send", "vs `send_task()`", "send", "send_task()", "tb", TB),
        ),
        workers=CeleryKit,
        isolation_worker=_celery_isolation,
    ),
    Engine(
        name="celery-amqp",
        title="Celery/RabbitMQ",
        alias="amqp",
        queue=_kombu_queue,
        purge=purge_amqp,
        endpoints=(
            Endpoint("delay", "native", "/amqp/delay", "amqp-native"),
            Endpoint("confirm", "native", "/amqp/confirm", "amqp-nativeconfirm"),
            Endpoint("tb", "tb", "/amqp", "amqp-tb"),
            Endpoint("tbnc", "tb", "/amqpnc", "amqp-tbnc"),
        ),
        pairs=(
            Pair(
                key="amqp-confirm",
                label="both confirmed (apples to apples)",
                native="confirm",
                native_label="delay(), confirm_publish=True",
                tb="tb",
                tb_label=f"{TB} (confirms)",
            ),
            Pair(
                key="amqp-noconfirm",
                label="neither confirmed (apples to apples)",
                native="delay",
                native_label="delay()",
                tb="tbnc",
                tb_label=f"{TB}, confirm_publish=false",
            ),
            Pair(
                key="amqp-defaults",
                label="each side's default",
                native="delay",
                native_label="delay() (no confirms)",
                tb="tb",
                tb_label=f"{TB} (confirms)",
            ),
        ),
        # Workers are measured on Redis only: a backlog is copied into a queue in one command
        # there, and the tasks record their start time in Redis.
    ),
    Engine(
        name="arq",
        title="ARQ",
        alias="arq",
        queue=_arq_queue,
        purge=purge_arq,
        endpoints=(
            Endpoint("native", "native", "/arq", "arq-native"),
            Endpoint("tb", "tb", "/arq", "arq-tb"),
        ),
        pairs=(Pair("arq", "vs `enqueue_job()`", "native", "enqueue_job()", "tb", TB),),
        workers=ArqKit,
        isolation_worker=_arq_isolation,
    ),
)

ENGINES_BY_NAME = {e.name: e for e in ENGINE_TABLE}
