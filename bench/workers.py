"""Sections 3 and 4, for every engine of the table with a worker kit: worker throughput on a
backlog, and dispatch -> start latency of one task at a time (the same workers)."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from .context import Run
from .engines import ENGINE_TABLE
from .infra import Proc, cpu_seconds
from .kits import WorkerKit
from .loadgen import percentile
from .results import interleaved, log


def section_workers(run: Run, *, throughput: bool = True, latency: bool = True) -> None:
    """Throughput and/or latency of each engine's native workers against taskbridge's."""
    if run.config.redis_url is None:
        run.results.skipped.append("workers: no Redis (needed to record task start times)")
        return
    for engine in ENGINE_TABLE:
        if engine.workers is None:
            continue
        if not run.config.has(engine.name):
            run.results.skipped.append(f"workers/{engine.name}: not available")
            continue
        try:
            asyncio.run(measure(run, engine.workers(run), throughput, latency))
        except Exception:
            run.results.skipped.append(f"workers/{engine.name}: failed: {traceback.format_exc()}")
            log(traceback.format_exc())


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
    return {
        "p50_ms": percentile(values, 0.5) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": values[-1] * 1000,
        "n": len(values),
    }


async def measure(run: Run, kit: WorkerKit, throughput: bool, latency: bool) -> None:
    """Start the kit's workers, measure them, record the rows, stop them."""
    sides = {side.name: side for side in kit.sides}
    procs = {
        name: run.start(f"{kit.key}-worker-{name}", kit.argv(side), kit.env(side))
        for name, side in sides.items()
    }
    rates: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    delays: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    try:
        await kit.open()
        for name, side in sides.items():  # ready: each worker ran a task
            key = f"{run.config.run}:probe:{name}"
            await kit.dispatch_started(side, key)
            await kit.wait_started(key, 90)
            await kit.settle(side)
            procs[name].pause()
        log(f"{kit.key} workers ready")
        if throughput:
            await measure_throughput(run, kit, procs, rates)
            worker_memory(run, kit, procs)
        if latency:
            await measure_latency(run, kit, procs, delays)
            if not throughput:
                worker_memory(run, kit, procs)
    finally:
        await kit.close()
    record(run, kit, rates if throughput else None, delays if latency else None)
    run.stop(*procs.values())


def worker_memory(run: Run, kit: WorkerKit, procs: dict[str, Proc]) -> None:
    """The memory row: the first native variant against taskbridge's worker."""
    native = next(s for s in kit.sides if s.native)
    run.memory_row(f"{kit.key}-worker", kit.memory_label, procs[native.name], procs["tb"])


async def measure_throughput(
    run: Run, kit: WorkerKit, procs: dict[str, Proc], rates: dict[str, list[dict[str, float]]]
) -> None:
    for index, name in interleaved(list(procs), run.args.rounds, run.rng):
        side, proc = next(s for s in kit.sides if s.name == name), procs[name]
        n = kit.size(side)
        await kit.fill(side, n)
        proc.resume()
        cpu = cpu_seconds(proc.pid)
        kit.release(side)
        outcome = drain_rate(
            partial(kit.remaining, side),
            n,
            timeout=run.args.drain_timeout,
            describe=partial(kit.describe, side),
        )
        outcome["cpu_us"] = (cpu_seconds(proc.pid) - cpu) * 1e6 / n
        proc.pause()
        rates[name].append(outcome)
        log(
            f"{kit.key} throughput round {index + 1}: {name:<12} {outcome['rate']:7.0f}/s "
            f"{outcome['cpu_us']:5.0f} µs CPU/task"
        )


async def measure_latency(
    run: Run, kit: WorkerKit, procs: dict[str, Proc], delays: dict[str, list[dict[str, float]]]
) -> None:
    for index, name in interleaved(list(procs), run.args.rounds, run.rng):
        side, proc = next(s for s in kit.sides if s.name == name), procs[name]
        proc.resume()
        key = f"{run.config.run}:lat:{name}"
        samples = []
        for _ in range(kit.samples(side)):
            await asyncio.sleep(run.rng.uniform(0.002, kit.arrival(side)))
            dispatched = time.time()
            await kit.dispatch_started(side, key)
            samples.append(await kit.wait_started(key, 30) - dispatched)
        proc.pause()
        delays[name].append(latency_summary(samples))
        log(
            f"{kit.key} latency round {index + 1}: {name:<12} "
            f"p50 {delays[name][-1]['p50_ms']:.2f} ms"
        )


def record(
    run: Run,
    kit: WorkerKit,
    rates: dict[str, list[dict[str, float]]] | None,
    delays: dict[str, list[dict[str, float]]] | None,
) -> None:
    """One throughput row and two latency rows (p50, p99) per native variant."""
    tb = next(s for s in kit.sides if not s.native)
    for side in (s for s in kit.sides if s.native):
        native_label = f"{kit.native_label} ({side.what})"
        if rates is not None:
            run.results.compare(
                "workers",
                f"{kit.key}-throughput-{side.name}",
                f"{kit.worker_title}, native with {side.what}"
                + (" (like for like)" if side.like_for_like else ""),
                "tasks/s",
                (native_label, [o["rate"] for o in rates[side.name]]),
                (kit.tb_label, [o["rate"] for o in rates[tb.name]]),
                target=0.9,
                goal=1.0,
                extra={
                    "tasks": kit.size(side),
                    "tb_tasks": kit.size(tb),
                    "cpu_us": {
                        "native": [o["cpu_us"] for o in rates[side.name]],
                        "tb": [o["cpu_us"] for o in rates[tb.name]],
                    },
                },
            )
        if delays is None:
            continue
        for q in ("p50_ms", "p99_ms"):
            extra: dict[str, Any] = {
                "samples_per_round": kit.samples(tb),
                "native_samples_per_round": kit.samples(side),
                "tb_goal_ms": 5.0 if q == "p50_ms" else None,
            }
            run.results.compare(
                "latency",
                f"{kit.key}-latency-{side.name}-{q[:3]}",
                f"{kit.title} dispatch -> start {q[:3]}; native with {side.what}",
                "ms",
                (native_label, [s[q] for s in delays[side.name]]),
                ("taskbridge", [s[q] for s in delays[tb.name]]),
                higher_is_better=False,
                extra=extra,
            )
