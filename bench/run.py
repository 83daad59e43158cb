"""Run the benchmark suite: taskbridge against native FastAPI, Celery and ARQ, in one command.

    uv run python -m bench                      # everything available, 5 rounds (< 10 min)
    uv run python -m bench --only http,enqueue  # a subset
    uv run python -m bench --quick              # a smoke run (2 rounds, short windows)

Every figure is a ratio against the native baseline measured in the same run, in interleaved
rounds (the order shuffled each round), reported as the median and min-max over the rounds.
Results go to docs/benchmarks/ (results.json, results.md, chart.png, and the generated block
of README.md). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ENGINES, Config
from .infra import (
    PYTHON,
    ROOT,
    LoadGen,
    Proc,
    amqp_problem,
    check_redis_url,
    cpu_seconds,
    memory,
    uvicorn,
)

SECTIONS = ("http", "enqueue", "workers", "isolation")
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
CELERY_WORKER_FLAGS = ["--without-mingle", "--without-gossip", "--without-heartbeat"]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- results ------------------------------------------------------------------------------


@dataclass
class Results:
    meta: dict[str, Any]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ceilings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def compare(
        self,
        section: str,
        key: str,
        label: str,
        metric: str,
        native: tuple[str, list[float]],
        tb: tuple[str, list[float]],
        *,
        higher_is_better: bool = True,
        target: float | None = None,
        goal: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a paired comparison; the ratio of each round is taskbridge / native."""
        ratios = [t / n if n else float("nan") for n, t in zip(native[1], tb[1], strict=True)]
        self.comparisons.append(
            {
                "section": section,
                "key": key,
                "label": label,
                "metric": metric,
                "higher_is_better": higher_is_better,
                "native_label": native[0],
                "tb_label": tb[0],
                "native": native[1],
                "tb": tb[1],
                "ratios": ratios,
                "target": target,
                "goal": goal,
                "extra": extra or {},
            }
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "skipped": self.skipped,
            "notes": self.notes,
            "ceilings": self.ceilings,
            "comparisons": self.comparisons,
        }


def interleaved(names: list[str], rounds: int, rng: random.Random) -> Iterator[tuple[int, str]]:
    for index in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            yield index, name


def grouped(groups: list[list[str]], rounds: int, rng: random.Random) -> Iterator[tuple[int, str]]:
    """Each round: the groups in random order, each group's members in random order (so the
    members of a pair run back to back and see the same background load)."""
    for index in range(rounds):
        order = [list(g) for g in groups]
        rng.shuffle(order)
        for group in order:
            rng.shuffle(group)
            for name in group:
                yield index, name


def pick(results: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in results]


# -- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    config: Config
    results: Results
    workdir: Path
    rng: random.Random
    loadgen: LoadGen | None = None
    procs: list[Proc] = field(default_factory=list)
    arq_ids: list[str] = field(default_factory=list)
    amqp_queues: set[str] = field(default_factory=set)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def serve(self, name: str, app: str, env: dict[str, str]) -> tuple[Proc, int]:
        proc, port = uvicorn(name, app, env, self.workdir)
        self.procs.append(proc)
        return proc, port

    def stop(self, *procs: Proc) -> None:
        for proc in procs:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def closed(
        self, port: int, path: str, duration: float | None = None, server: Proc | None = None
    ) -> dict[str, Any]:
        """Closed-loop load on `path`; with `server`, also its CPU time per answered request
        (insensitive to other processes' load, unlike req/s on a shared machine)."""
        assert self.loadgen is not None
        cpu = cpu_seconds(server.pid) if server is not None else 0.0
        outcome = self.loadgen.run(
            mode="closed",
            port=port,
            path=path,
            connections=self.args.connections,
            warmup=self.args.warmup,
            duration=duration or self.args.duration,
        )
        if server is not None:
            time.sleep(0.05)  # background tasks of the last answers
            used = cpu_seconds(server.pid) - cpu
            outcome["cpu_us"] = used * 1e6 / max(1, outcome["completed"])
        return outcome

    def sync_redis(self) -> Any:
        import redis

        assert self.config.redis_url is not None
        return redis.Redis.from_url(self.config.redis_url)


# -- 1. HTTP, in-process tasks ------------------------------------------------------------


def section_http(run: Run) -> None:
    """BackgroundTasks vs Tasks for in-process tasks; the load generator's ceiling."""
    config, args = run.config, run.args
    env = config.env(engines=())
    native, nport = run.serve("api-native-bare", "bench.api_native:app", env)
    tb, tport = run.serve("api-tb-bare", "bench.api_tb:app", env)
    trivial_port = __import__("bench.infra", fromlist=["free_port"]).free_port()
    trivial = run.start(
        "trivial-server", [PYTHON, "-m", "bench.loadgen", "trivial", str(trivial_port)], {}
    )
    from .infra import port_open, wait_for

    wait_for(lambda: port_open(trivial_port), 10, "the trivial server", trivial)
    variants = {
        "ceiling-trivial": (trivial_port, "/x", trivial),
        "native-noop": (nport, "/noop", native),
        "tb-noop": (tport, "/noop", tb),
        "native-sync": (nport, "/inproc/sync", native),
        "tb-sync": (tport, "/inproc/sync", tb),
        "native-async": (nport, "/inproc/async", native),
        "tb-async": (tport, "/inproc/async", tb),
    }
    for port, path, _ in variants.values():  # warm-up: imports, thread pool, connections
        run.closed(port, path, duration=0.5)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    groups = [["ceiling-trivial"], *[[f"native-{v}", f"tb-{v}"] for v in ("noop", "sync", "async")]]
    for index, name in grouped(groups, args.rounds, run.rng):
        port, path, server = variants[name]
        outcome = run.closed(port, path, server=server)
        measured[name].append(outcome)
        log(
            f"http round {index + 1}: {name:<16} {outcome['rps']:8.0f} req/s "
            f"{outcome['cpu_us']:6.0f} µs CPU/req"
        )
    run.stop(trivial)
    run.results.ceilings["loadgen_trivial_rps"] = pick(measured["ceiling-trivial"], "rps")
    run.results.ceilings["uvicorn_noop_rps"] = pick(measured["native-noop"], "rps")
    labels = {
        "noop": ("`Tasks` dependency, no task (native: no dependency)", None),
        "sync": ("1 in-process `def` task", 0.97),
        "async": ("1 in-process `async def` task", 0.97),
    }
    for variant, (label, target) in labels.items():
        n, t = measured[f"native-{variant}"], measured[f"tb-{variant}"]
        extra = {
            k: {"native": pick(n, k), "tb": pick(t, k)} for k in ("p50_ms", "p99_ms", "cpu_us")
        }
        native_label = "BackgroundTasks.add_task" if variant != "noop" else "plain endpoint"
        run.results.compare(
            "http",
            f"http-{variant}",
            label,
            "req/s",
            (native_label, pick(n, "rps")),
            ("Tasks.add_task" if variant != "noop" else "Tasks dependency", pick(t, "rps")),
            target=target,
            extra=extra,
        )
        for q in ("p50_ms", "p99_ms"):
            run.results.compare(
                "http-latency",
                f"http-{variant}-{q[:3]}",
                f"{label}: {q[:3]} latency",
                "ms",
                (native_label, pick(n, q)),
                ("Tasks", pick(t, q)),
                higher_is_better=False,
            )
    memory_row(run, "api-bare", "API process (uvicorn), in-process only", native, tb)
    run.stop(native, tb)


def memory_row(run: Run, key: str, label: str, native: Proc, tb: Proc) -> None:
    n, t = memory(native.pid), memory(tb.pid)
    metric = "tree_pss_mib" if n["processes"] > 1 else "rss_mib"
    run.results.compare(
        "memory",
        f"memory-{key}",
        label,
        "MiB PSS (all processes)" if metric == "tree_pss_mib" else "MiB RSS",
        ("native", [n[metric]]),
        ("taskbridge", [t[metric]]),
        higher_is_better=False,
        extra={"native": n, "tb": t},
    )


# -- 2. enqueue through an endpoint -------------------------------------------------------


def purge_celery_redis(run: Run, queue: str) -> None:
    client = run.sync_redis()
    key = run.config.prefix + queue
    client.delete(key, *(f"{key}\x06\x16{p}" for p in (3, 6, 9)))
    client.close()


def purge_arq(run: Run, queue: str) -> None:
    client = run.sync_redis()
    ids = [i.decode() for i in client.zrange(queue, 0, -1)]
    for start in range(0, len(ids), 5000):
        client.delete(*(f"arq:job:{i}" for i in ids[start : start + 5000]))
    client.delete(queue)
    client.close()


def purge_amqp(run: Run, queue: str) -> None:
    from kombu import Connection

    assert run.config.amqp_url is not None
    run.amqp_queues.add(queue)
    try:
        with Connection(run.config.amqp_url, connect_timeout=5) as connection:
            connection.default_channel.queue_purge(queue)
    except Exception as exc:  # not declared yet: nothing to purge
        log(f"purge of {queue}: {type(exc).__name__}: {exc}")


def section_enqueue(run: Run) -> None:
    config, args = run.config, run.args
    engines = tuple(e for e in ENGINES if config.has(e))
    if not engines:
        run.results.skipped.append("enqueue: no broker available")
        return
    env = config.env(engines=engines)
    native, nport = run.serve("api-native", "bench.api_native:app", env)
    tb, tport = run.serve("api-tb", "bench.api_tb:app", env)
    variants: dict[str, tuple[int, str, Callable[[], None]]] = {}
    servers = {nport: native, tport: tb}
    groups: list[list[str]] = []
    for k in (1, 5):
        if config.has("celery-redis"):
            nq, tq = config.queue("celery-native"), config.queue("celery-tb")
            variants[f"celery-delay-{k}"] = (
                nport,
                f"/celery/delay/{k}",
                lambda q=nq: purge_celery_redis(run, q),
            )
            variants[f"celery-send-{k}"] = (
                nport,
                f"/celery/send/{k}",
                lambda q=nq: purge_celery_redis(run, q),
            )
            variants[f"celery-tb-{k}"] = (
                tport,
                f"/celery/{k}",
                lambda q=tq: purge_celery_redis(run, q),
            )
            groups.append([f"celery-delay-{k}", f"celery-send-{k}", f"celery-tb-{k}"])
        if config.has("arq"):
            nq, tq = config.arq_queue("arq-native"), config.arq_queue("arq-tb")
            variants[f"arq-native-{k}"] = (nport, f"/arq/{k}", lambda q=nq: purge_arq(run, q))
            variants[f"arq-tb-{k}"] = (tport, f"/arq/{k}", lambda q=tq: purge_arq(run, q))
            groups.append([f"arq-native-{k}", f"arq-tb-{k}"])
        if config.has("celery-amqp"):
            for name, port, path, queue in (
                ("delay", nport, "/amqp/delay", "amqp-native"),
                ("confirm", nport, "/amqp/confirm", "amqp-nativeconfirm"),
                ("tb", tport, "/amqp", "amqp-tb"),
                ("tbnc", tport, "/amqpnc", "amqp-tbnc"),
            ):
                amqp_queue = config.queue(queue)
                variants[f"amqp-{name}-{k}"] = (
                    port,
                    f"{path}/{k}",
                    lambda q=amqp_queue: purge_amqp(run, q),
                )
            groups.append([f"amqp-{n}-{k}" for n in ("delay", "confirm", "tb", "tbnc")])
    for port, path, purge in variants.values():  # warm-up: connections, queue declarations
        run.closed(port, path, duration=0.3)
        purge()
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for index, name in grouped(groups, args.rounds, run.rng):
        port, path, purge = variants[name]
        outcome = run.closed(port, path, server=servers[port])
        purge()
        measured[name].append(outcome)
        log(
            f"enqueue round {index + 1}: {name:<18} {outcome['rps']:8.0f} req/s "
            f"{outcome['cpu_us']:6.0f} µs CPU/req"
        )

    def row(key: str, label: str, native: tuple[str, str], tb: tuple[str, str], k: int) -> None:
        n, t = measured[native[1]], measured[tb[1]]
        run.results.compare(
            "enqueue",
            key,
            label,
            "req/s",
            (native[0], pick(n, "rps")),
            (tb[0], pick(t, "rps")),
            target=0.9 if k == 1 else 1.5,
            goal=2.0 if k == 1 else None,
            extra={
                q: {"native": pick(n, q), "tb": pick(t, q)} for q in ("p50_ms", "p99_ms", "cpu_us")
            },
        )

    for k in (1, 5):
        per = f"{k} task{'s' if k > 1 else ''}/request"
        if config.has("celery-redis"):
            tb_label = ("Tasks.add_task", f"celery-tb-{k}")
            row(
                f"celery-redis-delay-{k}",
                f"Celery/Redis, {per}, vs `delay()`",
                ("delay()", f"celery-delay-{k}"),
                tb_label,
                k,
            )
            row(
                f"celery-redis-send-{k}",
                f"Celery/Redis, {per}, vs `send_task()`",
                ("send_task()", f"celery-send-{k}"),
                tb_label,
                k,
            )
        if config.has("arq"):
            row(
                f"arq-{k}",
                f"ARQ, {per}, vs `enqueue_job()`",
                ("enqueue_job()", f"arq-native-{k}"),
                ("Tasks.add_task", f"arq-tb-{k}"),
                k,
            )
        if config.has("celery-amqp"):
            row(
                f"amqp-confirm-{k}",
                f"Celery/RabbitMQ, {per}, both confirmed (apples to apples)",
                ("delay(), confirm_publish=True", f"amqp-confirm-{k}"),
                ("Tasks.add_task (confirms)", f"amqp-tb-{k}"),
                k,
            )
            row(
                f"amqp-noconfirm-{k}",
                f"Celery/RabbitMQ, {per}, neither confirmed (apples to apples)",
                ("delay()", f"amqp-delay-{k}"),
                ("Tasks.add_task, confirm_publish=false", f"amqp-tbnc-{k}"),
                k,
            )
            row(
                f"amqp-defaults-{k}",
                f"Celery/RabbitMQ, {per}, each side's default",
                ("delay() (no confirms)", f"amqp-delay-{k}"),
                ("Tasks.add_task (confirms)", f"amqp-tb-{k}"),
                k,
            )
    memory_row(run, "api-engines", f"API process (uvicorn), {', '.join(engines)}", native, tb)
    run.stop(native, tb)
    for queue in (config.queue("celery-native"), config.queue("celery-tb")):
        if config.has("celery-redis"):
            purge_celery_redis(run, queue)


# -- 3 and 4. workers: throughput and dispatch -> start latency ---------------------------


async def wait_started(client: Any, key: str, timeout: float) -> float:
    found = await client.blpop([key], timeout=timeout)
    if found is None:
        raise RuntimeError(f"no task recorded its start on {key} within {timeout}s")
    return float(found[1])


def drain_rate(
    remaining: Callable[[], int],
    total: int,
    timeout: float,
    interval: float = 0.002,
    describe: Callable[[], str] = lambda: "",
) -> dict[str, float]:
    """Poll the broker until nothing remains; the rate from the first change to the end."""
    began = time.perf_counter()
    first: tuple[float, int] | None = None
    while True:
        now = time.perf_counter()
        left = remaining()
        if first is None and left < total:
            first = (now, left)
        if left == 0:
            break
        if now - began > timeout:
            raise RuntimeError(
                f"{left} of {total} tasks still queued after {timeout}s {describe()}"
            )
        time.sleep(interval)
    assert first is not None
    span = max(now - first[0], 1e-6)
    return {"rate": first[1] / span, "pickup_s": first[0] - began, "span_s": span}


def latency_summary(samples: list[float]) -> dict[str, float]:
    values = sorted(samples)
    from .loadgen import percentile

    return {
        "p50_ms": percentile(values, 0.5) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": values[-1] * 1000,
        "n": len(values),
    }


async def section_workers_celery(run: Run) -> None:
    import redis.asyncio

    from taskbridge import TaskBridge

    from . import native_celery, tbside

    config, args = run.config, run.args
    env = config.env(engines=("celery-redis",))
    queues = {v: config.queue(f"cw-{v}") for v in ("native", "nativesame", "tb")}
    prefork = ["-P", "prefork", "-c", str(args.concurrency), "-l", "WARNING", *CELERY_WORKER_FLAGS]
    native_argv = [PYTHON, "-m", "celery", "-A", "bench.native_celery:worker_app", "worker"]
    procs = {
        "native": run.start(
            "celery-worker-native",
            [*native_argv, "-Q", queues["native"], "-n", "native@%h", *prefork],
            env,
        ),
        "nativesame": run.start(
            "celery-worker-native-same",
            [*native_argv, "-Q", queues["nativesame"], "-n", "nativesame@%h", *prefork],
            {**env, "BENCH_CELERY_DELIVERY": "taskbridge"},
        ),
        "tb": run.start(
            "celery-worker-tb",
            [
                *(PYTHON, "-m", "taskbridge.cli", "--log-level", "WARNING", "worker", "celery"),
                *("bench.tbside:bridge", "--queues", queues["tb"], "--hostname", "tb@%h"),
                *("--pool", "prefork", "--concurrency", str(args.concurrency)),
                *("--loglevel", "WARNING", *CELERY_WORKER_FLAGS),
            ],
            env,
        ),
    }
    assert config.redis_url is not None
    client = redis.asyncio.Redis.from_url(config.redis_url)
    native_app = native_celery.redis_app()
    native_started = native_app.tasks["bench.celery_started"]
    tb_started = {v: tbside.T.celery_started.using(queue=queues[v]) for v in ("tb",)}
    await tbside.bridge.open()

    async def dispatch(variant: str, key: str) -> None:
        if variant == "tb":
            await tb_started["tb"].enqueue(key)
        else:
            native_started.apply_async((key,), queue=queues[variant])

    try:
        unacked = config.prefix + "unacked"  # kombu's, shared by the three workers
        for variant in procs:  # ready: each worker ran a task (and acknowledged it)
            key = f"{config.run}:probe:{variant}"
            await dispatch(variant, key)
            await wait_started(client, key, 90)
            deadline = time.monotonic() + 30
            while await client.hlen(unacked) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            procs[variant].pause()
        log("celery workers ready")

        # Backlogs built once, under another key prefix, then copied into a queue per round.
        n = args.tasks
        sync = run.sync_redis()
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
            assert sync.llen(source) == n, f"template {source} has {sync.llen(source)} of {n}"
        throughput: dict[str, list[dict[str, float]]] = {v: [] for v in procs}
        for index, variant in interleaved(list(procs), args.rounds, run.rng):
            queue_key = config.prefix + queues[variant]

            def remaining(queue_key: str = queue_key) -> int:
                pipe = sync.pipeline(transaction=False)
                pipe.llen(queue_key)
                pipe.hlen(unacked)
                length, pending = pipe.execute()
                return int(length) + int(pending)

            procs[variant].resume()
            cpu = cpu_seconds(procs[variant].pid)
            sync.copy(sources[variant], queue_key, replace=True)
            outcome = drain_rate(
                remaining,
                n,
                timeout=args.drain_timeout,
                describe=lambda k=queue_key: (
                    f"(queue {sync.llen(k)}, unacked {sync.hgetall(unacked)})"
                ),
            )
            outcome["cpu_us"] = (cpu_seconds(procs[variant].pid) - cpu) * 1e6 / n
            procs[variant].pause()
            throughput[variant].append(outcome)
            log(
                f"celery throughput round {index + 1}: {variant:<11} {outcome['rate']:7.0f}/s "
                f"{outcome['cpu_us']:5.0f} µs CPU/task"
            )
        worker_memory = {v: memory(p.pid) for v, p in procs.items()}

        latency: dict[str, list[dict[str, float]]] = {v: [] for v in procs}
        for index, variant in interleaved(list(procs), args.rounds, run.rng):
            procs[variant].resume()
            key = f"{config.run}:lat:{variant}"
            samples = []
            for _ in range(args.latency_samples):
                await asyncio.sleep(run.rng.uniform(0.002, 0.012))
                dispatched = time.time()
                await dispatch(variant, key)
                samples.append(await wait_started(client, key, 30) - dispatched)
            procs[variant].pause()
            latency[variant].append(latency_summary(samples))
            log(
                f"celery latency round {index + 1}: {variant:<11} "
                f"p50 {latency[variant][-1]['p50_ms']:.2f} ms"
            )
    finally:
        await tbside.bridge.close()
        await client.aclose()
    pool = f"prefork, concurrency {args.concurrency}"
    for native_variant, what in (
        ("native", "Celery's delivery defaults"),
        ("nativesame", "taskbridge's delivery settings"),
    ):
        native_label = f"celery worker ({what})"
        run.results.compare(
            "workers",
            f"celery-throughput-{native_variant}",
            f"Celery worker ({pool}), native with {what}"
            + (" (like for like)" if native_variant == "nativesame" else ""),
            "tasks/s",
            (native_label, [o["rate"] for o in throughput[native_variant]]),
            ("taskbridge worker celery", [o["rate"] for o in throughput["tb"]]),
            target=0.9,
            goal=1.0,
            extra={
                "tasks": args.tasks,
                "cpu_us": {
                    "native": [o["cpu_us"] for o in throughput[native_variant]],
                    "tb": [o["cpu_us"] for o in throughput["tb"]],
                },
            },
        )
        for q in ("p50_ms", "p99_ms"):
            run.results.compare(
                "latency",
                f"celery-latency-{native_variant}-{q[:3]}",
                f"Celery/Redis dispatch -> start {q[:3]}; native with {what}",
                "ms",
                (native_label, [s[q] for s in latency[native_variant]]),
                ("taskbridge", [s[q] for s in latency["tb"]]),
                higher_is_better=False,
                extra={
                    "samples_per_round": args.latency_samples,
                    "tb_goal_ms": 5.0 if q == "p50_ms" else None,
                },
            )
    run.results.compare(
        "memory",
        "memory-celery-worker",
        f"Celery worker ({pool}), all processes",
        "MiB PSS (all processes)",
        ("native", [worker_memory["native"]["tree_pss_mib"]]),
        ("taskbridge", [worker_memory["tb"]["tree_pss_mib"]]),
        higher_is_better=False,
        extra={"native": worker_memory["native"], "tb": worker_memory["tb"]},
    )
    run.stop(*procs.values())
    client_sync = run.sync_redis()
    keys = list(client_sync.scan_iter(match=f"{config.run}:*", count=1000))
    if keys:
        client_sync.delete(*keys)


async def section_workers_arq(run: Run) -> None:
    import redis.asyncio
    from arq.connections import ArqRedis

    from . import tbside

    config, args = run.config, run.args
    assert config.redis_url is not None
    env = config.env(engines=("arq",))
    queues = {v: config.arq_queue(f"aw-{v}") for v in ("native", "nativetuned", "tb")}
    tuned = str(args.arq_tuned_poll_delay)
    procs = {
        "native": run.start(
            "arq-worker-native",
            [PYTHON, "-m", "bench.native_arq"],
            {**env, "BENCH_QUEUE_ARQW_NATIVE": queues["native"]},
        ),
        "nativetuned": run.start(
            "arq-worker-native-tuned",
            [PYTHON, "-m", "bench.native_arq"],
            {
                **env,
                "BENCH_QUEUE_ARQW_NATIVE": queues["nativetuned"],
                "BENCH_ARQ_POLL_DELAY": tuned,
            },
        ),
        "tb": run.start(
            "arq-worker-tb",
            [
                *(PYTHON, "-m", "taskbridge.cli", "--log-level", "WARNING", "worker", "arq"),
                *("bench.tbside:bridge", "--queue", queues["tb"]),
            ],
            env,
        ),
    }
    client = redis.asyncio.Redis.from_url(config.redis_url)
    native_pool = ArqRedis.from_url(config.redis_url)
    await tbside.bridge.open()
    tb_started = tbside.T.arq_started.using(queue=queues["tb"])

    async def dispatch(variant: str, key: str) -> None:
        if variant == "tb":
            run.arq_ids.append((await tb_started.enqueue(key)).id)
        else:
            job = await native_pool.enqueue_job(
                "bench.arq_started", key, _queue_name=queues[variant]
            )
            assert job is not None
            run.arq_ids.append(job.job_id)

    sizes = {"native": max(100, args.tasks // args.arq_default_divisor)}
    sizes["nativetuned"] = sizes["tb"] = args.tasks
    try:
        for variant in procs:
            key = f"{config.run}:probe:{variant}"
            await dispatch(variant, key)
            await wait_started(client, key, 60)
            procs[variant].pause()
        log("arq workers ready")
        sync = run.sync_redis()
        staging = config.arq_queue("aw-staging")
        tb_staging = tbside.T.arq_noop.using(queue=staging)
        throughput: dict[str, list[dict[str, float]]] = {v: [] for v in procs}
        for index, variant in interleaved(list(procs), args.rounds, run.rng):
            n = sizes[variant]
            if variant == "tb":
                for start in range(0, n, 500):
                    calls = [
                        tbside.bridge.prepare(tb_staging, (start + i,), {})
                        for i in range(min(500, n - start))
                    ]
                    run.arq_ids += [call.id for _, call in calls]
                    await tbside.bridge.dispatch(calls)
            else:
                for start in range(0, n, 200):
                    jobs = await asyncio.gather(
                        *(
                            native_pool.enqueue_job("bench.arq_noop", i, _queue_name=staging)
                            for i in range(start, min(n, start + 200))
                        )
                    )
                    run.arq_ids += [j.job_id for j in jobs if j is not None]
            assert sync.zcard(staging) == n
            procs[variant].resume()
            cpu = cpu_seconds(procs[variant].pid)
            sync.rename(staging, queues[variant])
            outcome = drain_rate(
                lambda q=queues[variant]: int(sync.zcard(q)), n, timeout=args.drain_timeout
            )
            outcome["cpu_us"] = (cpu_seconds(procs[variant].pid) - cpu) * 1e6 / n
            procs[variant].pause()
            throughput[variant].append(outcome)
            log(
                f"arq throughput round {index + 1}: {variant:<12} {outcome['rate']:7.0f}/s "
                f"{outcome['cpu_us']:5.0f} µs CPU/task"
            )
        worker_memory = {v: memory(p.pid) for v, p in procs.items()}

        latency: dict[str, list[dict[str, float]]] = {v: [] for v in procs}
        for index, variant in interleaved(list(procs), args.rounds, run.rng):
            procs[variant].resume()
            key = f"{config.run}:lat:{variant}"
            samples = []
            count = args.latency_samples if variant != "native" else args.arq_default_samples
            for _ in range(count):
                # random arrival within the poll cycle
                await asyncio.sleep(run.rng.uniform(0.002, 0.012 if variant == "tb" else 0.5))
                dispatched = time.time()
                await dispatch(variant, key)
                samples.append(await wait_started(client, key, 30) - dispatched)
            procs[variant].pause()
            latency[variant].append(latency_summary(samples))
            log(
                f"arq latency round {index + 1}: {variant:<12} "
                f"p50 {latency[variant][-1]['p50_ms']:.2f} ms"
            )
    finally:
        await tbside.bridge.close()
        await native_pool.aclose()
        await client.aclose()
    for native_variant, what in (
        ("native", "default poll_delay 0.5 s"),
        ("nativetuned", f"poll_delay {tuned} s"),
    ):
        native_label = f"ARQ worker ({what})"
        run.results.compare(
            "workers",
            f"arq-throughput-{native_variant}",
            f"ARQ worker (max_jobs 10), native with {what}",
            "tasks/s",
            (native_label, [o["rate"] for o in throughput[native_variant]]),
            ("taskbridge worker arq", [o["rate"] for o in throughput["tb"]]),
            target=0.9,
            goal=1.0,
            extra={
                "tasks": sizes[native_variant],
                "tb_tasks": sizes["tb"],
                "cpu_us": {
                    "native": [o["cpu_us"] for o in throughput[native_variant]],
                    "tb": [o["cpu_us"] for o in throughput["tb"]],
                },
            },
        )
        for q in ("p50_ms", "p99_ms"):
            run.results.compare(
                "latency",
                f"arq-latency-{native_variant}-{q[:3]}",
                f"ARQ dispatch -> start {q[:3]}; native with {what}",
                "ms",
                (native_label, [s[q] for s in latency[native_variant]]),
                ("taskbridge", [s[q] for s in latency["tb"]]),
                higher_is_better=False,
                extra={
                    "tb_goal_ms": 5.0 if q == "p50_ms" else None,
                    "samples_per_round": args.latency_samples,
                    "native_samples_per_round": args.arq_default_samples
                    if native_variant == "native"
                    else args.latency_samples,
                },
            )
    run.results.compare(
        "memory",
        "memory-arq-worker",
        "ARQ worker",
        "MiB RSS",
        ("native", [worker_memory["native"]["rss_mib"]]),
        ("taskbridge", [worker_memory["tb"]["rss_mib"]]),
        higher_is_better=False,
        extra={"native": worker_memory["native"], "tb": worker_memory["tb"]},
    )
    run.stop(*procs.values())


def section_workers(run: Run) -> None:
    if run.config.redis_url is None:
        run.results.skipped.append("workers: no Redis (needed to record task start times)")
        return
    for engine, body in (("celery-redis", section_workers_celery), ("arq", section_workers_arq)):
        if run.config.has(engine):
            try:
                asyncio.run(body(run))
            except Exception:
                run.results.skipped.append(f"workers/{engine}: failed: {traceback.format_exc()}")
                log(traceback.format_exc())
        else:
            run.results.skipped.append(f"workers/{engine}: not available")


# -- 5. isolation -------------------------------------------------------------------------


def section_isolation(run: Run) -> None:
    config, args = run.config, run.args
    if config.has("celery-redis"):
        engine, alias, queue_kind = "celery-redis", "celery", "celery-tb"
    elif config.has("arq"):
        engine, alias, queue_kind = "arq", "arq", "arq-tb"
    else:
        run.results.skipped.append("isolation: no queue engine available")
        return
    queue = config.queue("iso") if alias == "celery" else config.arq_queue("iso")
    env = config.env(engines=(engine,), **{queue_kind: queue})
    routes = json.dumps({"bench.heavy": alias})
    inproc, iport = run.serve("api-iso-inprocess", "bench.api_tb:app", env)
    routed, rport = run.serve(
        "api-iso-routed", "bench.api_tb:app", {**env, "TASKBRIDGE_ROUTES": routes}
    )
    if alias == "celery":
        worker_argv = ["worker", "celery", "bench.tbside:bridge", "--queues", queue]
        worker_argv += ["--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING"]
        worker_argv += CELERY_WORKER_FLAGS
    else:
        worker_argv = ["worker", "arq", "bench.tbside:bridge", "--queue", queue]
    worker = run.start(
        "iso-worker", [PYTHON, "-m", "taskbridge.cli", "--log-level", "WARNING", *worker_argv], env
    )
    light = {"path": "/light", "rate": args.light_rate}
    heavy = {"path": f"/heavy/{args.heavy_ms}", "rate": args.heavy_rate}
    variants = {
        "light-only": (iport, [light]),
        "inprocess": (iport, [light, heavy]),
        "routed": (rport, [light, heavy]),
    }
    assert run.loadgen is not None
    for port, streams in variants.values():  # warm-up (and the worker's first task)
        run.loadgen.run(mode="open", port=port, streams=streams, warmup=0, duration=1.0)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for index, name in interleaved(list(variants), args.rounds, run.rng):
        port, streams = variants[name]
        outcome = run.loadgen.run(
            mode="open", port=port, streams=streams, warmup=0.5, duration=args.isolation_duration
        )
        light_stats = outcome["streams"]["/light"]
        measured[name].append(light_stats)
        log(f"isolation round {index + 1}: {name:<10} light p99 {light_stats['p99_ms']:.2f} ms")
    for q in ("p99_ms", "p50_ms"):
        run.results.compare(
            "isolation",
            f"isolation-{q[:3]}",
            f"light requests' {q[:3]} while {args.heavy_rate}/s requests each add a "
            f"{args.heavy_ms} ms CPU task",
            "ms",
            ("heavy task in-process (default)", pick(measured["inprocess"], q)),
            (f"routed to {engine} by TASKBRIDGE_ROUTES", pick(measured["routed"], q)),
            higher_is_better=False,
            extra={
                "light_only": pick(measured["light-only"], q),
                "light_rate": args.light_rate,
                "heavy_rate": args.heavy_rate,
                "heavy_ms": args.heavy_ms,
                "routes": routes,
                "worker": " ".join(worker_argv),
            },
        )
    run.stop(inproc, routed, worker)


# -- set-up, tear-down --------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "fastapi-taskbridge",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "celery",
        "kombu",
        "arq",
        "redis",
        "uvloop",
        "httptools",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "taskbridge", "backends"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (taskbridge/ or backends/ modified)" if dirty else "")


def broker_versions(config: Config) -> dict[str, str]:
    found: dict[str, str] = {}
    if config.redis_url:
        client = __import__("redis").Redis.from_url(config.redis_url)
        found["redis-server"] = client.info("server")["redis_version"]
        client.close()
    if config.amqp_url:
        from kombu import Connection

        with Connection(config.amqp_url) as connection:
            connection.connect()
            props = connection.connection.server_properties
            found["rabbitmq"] = str(props.get("version", "?"))
    return found


def cleanup(run: Run, external_redis: bool) -> None:
    for proc in list(run.procs):
        proc.stop()
    run.procs.clear()
    config = run.config
    if config.redis_url and external_redis:
        try:
            client = run.sync_redis()
            keys = list(client.scan_iter(match=f"*{config.run}*", count=1000))
            prefixes = ("arq:job:", "arq:result:", "arq:retry:", "arq:in-progress:")
            keys += [p + i for i in run.arq_ids for p in prefixes]
            for start in range(0, len(keys), 5000):
                client.delete(*keys[start : start + 5000])
            client.close()
        except Exception as exc:
            log(f"Redis clean-up failed: {exc}")
    if config.amqp_url and config.has("celery-amqp"):
        try:
            from kombu import Connection

            names = {config.queue(k) for k in ("amqp-native", "amqp-nativeconfirm")}
            names |= {config.queue(k) for k in ("amqp-tb", "amqp-tbnc")} | run.amqp_queues
            with Connection(config.amqp_url, connect_timeout=5) as connection:
                for name in sorted(names):
                    for action in ("queue_delete", "exchange_delete"):
                        try:
                            getattr(connection.default_channel, action)(name)
                        except Exception:
                            connection.close()
                            connection.connect()
        except Exception as exc:
            log(f"RabbitMQ clean-up failed: {exc}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {ENGINES}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=float, default=1.5, help="HTTP window, s (1.5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="HTTP warm-up per window, s")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections (32)")
    parser.add_argument("--tasks", type=int, default=3000, help="worker backlog per round")
    parser.add_argument(
        "--arq-default-divisor",
        type=int,
        default=5,
        help="ARQ at poll_delay 0.5 s drains --tasks / this many jobs (it is slow)",
    )
    parser.add_argument("--arq-tuned-poll-delay", type=float, default=0.01)
    parser.add_argument("--drain-timeout", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=2, help="Celery prefork children")
    parser.add_argument("--latency-samples", type=int, default=40, help="per round and worker")
    parser.add_argument("--arq-default-samples", type=int, default=8, help="ARQ at 0.5 s poll")
    parser.add_argument("--light-rate", type=float, default=200, help="isolation: light req/s")
    parser.add_argument("--heavy-rate", type=float, default=10, help="isolation: heavy req/s")
    parser.add_argument("--heavy-ms", type=int, default=20, help="isolation: CPU per heavy task")
    parser.add_argument("--isolation-duration", type=float, default=3.0)
    parser.add_argument(
        "--redis-url", help="use this Redis (not database 0) instead of a private one"
    )
    parser.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", DEFAULT_AMQP))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 short rounds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 0.5, 0.2
        args.tasks, args.latency_samples, args.arq_default_samples = 500, 10, 3
        args.isolation_duration = 1.5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    only = [s for s in args.only.split(",") if s]
    if only == ["soak"]:  # a run of its own: servers, workers and report (bench/soak.py)
        from .soak import run_soak

        return run_soak(args)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    wanted = [e for e in args.engines.split(",") if e]
    workdir = Path(tempfile.mkdtemp(prefix="tbbench-"))
    run_id = f"tbbench{uuid.uuid4().hex[:8]}"
    skipped: list[str] = []
    redis_proc: Proc | None = None
    redis_url: str | None = None
    redis_source = ""
    needs_redis = any(e in wanted for e in ("celery-redis", "arq"))
    if needs_redis and args.redis_url:
        problem = check_redis_url(args.redis_url)
        if problem:
            sys.exit(f"--redis-url: {problem}")
        redis_url, redis_source = args.redis_url, "given by --redis-url"
    elif needs_redis:
        try:
            from .infra import start_redis

            redis_url, redis_proc = start_redis(workdir)
            redis_source = f"private redis-server started by the bench ({redis_proc.argv[0]})"
        except Exception as exc:
            skipped.append(f"Redis: {exc}; Celery/Redis and ARQ skipped")
    amqp_url: str | None = None
    if "celery-amqp" in wanted:
        problem = amqp_problem(args.amqp_url)
        if problem:
            skipped.append(f"RabbitMQ at {args.amqp_url.split('@')[-1]}: {problem}; skipped")
        else:
            amqp_url = args.amqp_url
    engines = tuple(
        e
        for e in wanted
        if (e == "celery-amqp" and amqp_url) or (e in ("celery-redis", "arq") and redis_url)
    )
    for engine in ENGINES:
        if engine not in wanted:
            skipped.append(f"{engine}: not selected (--engines)")
    config = Config(run=run_id, redis_url=redis_url, amqp_url=amqp_url, engines=engines)
    os.environ.update(config.env())  # this process imports bench.tbside etc. with it
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    import uvicorn as uvicorn_module  # noqa: F401 - only to report which loop/http it picks

    meta = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "brokers": broker_versions(config),
        "redis_source": redis_source,
        "engines": list(engines),
        "sections": only,
        "options": {k: str(v) for k, v in vars(args).items()},
        "seed": seed,
        "run_id": run_id,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    results = Results(meta, skipped=skipped)
    run = Run(args, config, results, workdir, random.Random(seed))
    log(f"run {run_id}: engines {', '.join(engines) or 'none'}; sections {', '.join(only)}")
    for line in skipped:
        log(f"skipped: {line}")
    run.loadgen = LoadGen()
    try:
        for section, body in (
            ("http", section_http),
            ("enqueue", section_enqueue),
            ("workers", section_workers),
            ("isolation", section_isolation),
        ):
            if section not in only:
                continue
            began = time.monotonic()
            try:
                body(run)
            except Exception:
                results.skipped.append(f"{section}: failed: {traceback.format_exc()}")
                log(traceback.format_exc())
            log(f"section {section} took {time.monotonic() - began:.0f} s")
    finally:
        run.loadgen.close()
        cleanup(run, external_redis=redis_proc is None)
        if redis_proc is not None:
            redis_proc.stop()
        results.meta["duration_s"] = round(time.monotonic() - started, 1)
        results.meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results.as_json(), indent=1) + "\n")
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    from .report import write_report

    write_report(results.as_json(), args.out)
    log(f"done in {time.monotonic() - started:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
