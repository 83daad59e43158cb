"""Sections 1, 2 and 5: HTTP with in-process tasks, enqueue from an endpoint, isolation.

Each builds its variants (a port, a path, a server), measures them in interleaved rounds with
the two sides of a pair back to back, and records taskbridge ÷ native per round. Sections 3
and 4 (workers) are in bench/workers.py; the engine-specific parts in bench/engines.py.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskbridge._dev import free_port

from .context import Run, connections_label, connections_suffix
from .engines import ENGINE_TABLE, Engine
from .infra import PYTHON, Proc, port_open, wait_for
from .kits import TB_CLI
from .results import grouped, interleaved, log, pairs, pick


@dataclass(frozen=True)
class Variant:
    """One thing measured per round: closed-loop load on `path` of `server`."""

    port: int
    path: str
    server: Proc
    after: Callable[[], None] | None = None
    """Run after each window (purge the queue it filled)."""


def run_rounds(
    run: Run, section: str, variants: dict[str, Variant], groups: list[list[str]], connections: int
) -> dict[str, list[dict[str, Any]]]:
    """Every variant once per round; groups (pairs) back to back, order shuffled."""
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for index, name in grouped(groups, run.args.rounds, run.rng):
        v = variants[name]
        outcome = run.closed(v.port, v.path, connections=connections, server=v.server)
        if v.after is not None:
            v.after()
        measured[name].append(outcome)
        log(
            f"{section} round {index + 1}: {name:<22} {outcome['rps']:8.0f} req/s "
            f"{outcome['cpu_us']:6.0f} µs CPU/req ({connections} conn.)"
        )
    return measured


# -- 1. HTTP, in-process tasks ------------------------------------------------------------

HTTP_PAIRS = (
    # key, label, target, native variant and label, taskbridge variant and label
    (
        "sync",
        "1 in-process `def` task",
        0.97,
        ("native-sync", "BackgroundTasks.add_task"),
        ("tb-sync", "Tasks.add_task"),
    ),
    (
        "async",
        "1 in-process `async def` task",
        0.97,
        ("native-async", "BackgroundTasks.add_task"),
        ("tb-async", "Tasks.add_task"),
    ),
    (
        "notask",
        "`Tasks` endpoint with no task, vs an endpoint that takes `BackgroundTasks`",
        None,
        ("native-none", "BackgroundTasks parameter, no task"),
        ("tb-noop", "Tasks parameter, no task"),
    ),
    (
        "floor",
        "FastAPI's floor: `BackgroundTasks` through a one-line dependency, vs taken directly "
        "(both native)",
        None,
        ("native-none", "BackgroundTasks parameter, no task"),
        ("native-depnone", "BackgroundTasks via Depends, no task"),
    ),
    (
        "notask-dep",
        "`Tasks` endpoint with no task, vs `BackgroundTasks` through a one-line dependency",
        0.97,
        ("native-depnone", "BackgroundTasks via Depends, no task"),
        ("tb-noop", "Tasks parameter, no task"),
    ),
    (
        "async-dep",
        "1 in-process `async def` task, vs `BackgroundTasks` through a one-line dependency",
        0.97,
        ("native-depasync", "BackgroundTasks via Depends: add_task"),
        ("tb-async", "Tasks.add_task"),
    ),
    (
        "noop",
        "`Tasks` dependency, no task (native: no dependency)",
        None,
        ("native-noop", "plain endpoint"),
        ("tb-noop", "Tasks dependency"),
    ),
)


def section_http(run: Run) -> None:
    """BackgroundTasks vs Tasks for in-process tasks; the load generator's ceiling."""
    config, args = run.config, run.args
    connections = max(args.connections)
    env = config.env(engines=())
    native, nport = run.serve("api-native-bare", "bench.api_native:app", env)
    tb, tport = run.serve("api-tb-bare", "bench.api_tb:app", env)
    trivial_port = free_port()
    trivial = run.start(
        "trivial-server", [PYTHON, "-m", "bench.loadgen", "trivial", str(trivial_port)], {}
    )
    wait_for(lambda: port_open(trivial_port), 10, "the trivial server", trivial)
    variants = {
        "ceiling-trivial": Variant(trivial_port, "/x", trivial),
        "native-noop": Variant(nport, "/noop", native),
        "native-none": Variant(nport, "/inproc/none", native),
        "native-depnone": Variant(nport, "/dep/none", native),
        "native-depasync": Variant(nport, "/dep/async", native),
        "tb-noop": Variant(tport, "/noop", tb),
        "native-sync": Variant(nport, "/inproc/sync", native),
        "tb-sync": Variant(tport, "/inproc/sync", tb),
        "native-async": Variant(nport, "/inproc/async", native),
        "tb-async": Variant(tport, "/inproc/async", tb),
    }
    for v in variants.values():  # warm-up: imports, thread pool, connections
        run.closed(v.port, v.path, connections=connections, duration=0.5)
    groups = [
        ["ceiling-trivial"],
        ["native-noop", "native-none", "native-depnone", "tb-noop"],
        ["native-sync", "tb-sync"],
        ["native-async", "native-depasync", "tb-async"],
    ]
    measured = run_rounds(run, "http", variants, groups, connections)
    run.stop(trivial)
    run.results.ceilings["loadgen_trivial_rps"] = pick(measured["ceiling-trivial"], "rps")
    run.results.ceilings["uvicorn_noop_rps"] = pick(measured["native-noop"], "rps")
    for key, label, target, (nname, nlabel), (tname, tlabel) in HTTP_PAIRS:
        n, t = measured[nname], measured[tname]
        run.results.compare(
            "http",
            f"http-{key}",
            label,
            "req/s",
            (nlabel, pick(n, "rps")),
            (tlabel, pick(t, "rps")),
            target=target,
            extra={**pairs(n, t, "p50_ms", "p99_ms", "cpu_us"), "connections": connections},
        )
        for q in ("p50_ms", "p99_ms"):
            run.results.compare(
                "http-latency",
                f"http-{key}-{q[:3]}",
                f"{label}: {q[:3]} latency",
                "ms",
                (nlabel, pick(n, q)),
                ("Tasks", pick(t, q)),
                higher_is_better=False,
            )
    if args.profile:
        from .profile import profile_endpoint

        reference = statistics.median(pick(measured["tb-async"], "cpu_us"))
        try:
            run.results.profile = profile_endpoint(
                run, tb, tport, "/inproc/async", connections, "profile-inprocess.txt", reference
            )
        except Exception as exc:
            run.results.skipped.append(f"http: profile failed: {type(exc).__name__}: {exc}")
            log(f"profile failed: {exc}")
    run.memory_row("api-bare", "API process (uvicorn), in-process only", native, tb)
    run.stop(native, tb)


# -- 2. enqueue through an endpoint -------------------------------------------------------


def section_enqueue(run: Run) -> None:
    """Each engine's native dispatch against `Tasks.add_task`, 1 and 5 tasks per request, at
    each connection count of --connections."""
    config = run.config
    engines = [e for e in ENGINE_TABLE if config.has(e.name)]
    if not engines:
        run.results.skipped.append("enqueue: no broker available")
        return
    env = config.env(engines=tuple(e.name for e in engines))
    native, nport = run.serve("api-native", "bench.api_native:app", env)
    tb, tport = run.serve("api-tb", "bench.api_tb:app", env)
    apps = {"native": (native, nport), "tb": (tb, tport)}

    def variant(engine: Engine, name: str, k: int) -> Variant:
        endpoint = engine.endpoint(name)
        server, port = apps[endpoint.side]
        queue = engine.queue(config, endpoint.queue_kind)
        return Variant(port, f"{endpoint.path}/{k}", server, lambda: engine.purge(run, queue))

    variants = {
        f"{e.name}-{p.name}-{k}": variant(e, p.name, k)
        for k in (1, 5)
        for e in engines
        for p in e.endpoints
    }
    for v in variants.values():  # warm-up: connections, queue declarations
        run.closed(v.port, v.path, connections=max(run.args.connections), duration=0.3)
        assert v.after is not None
        v.after()
    groups = [[f"{e.name}-{p.name}-{k}" for p in e.endpoints] for k in (1, 5) for e in engines]
    for connections in run.args.connections:
        measured = run_rounds(run, "enqueue", variants, groups, connections)
        for k in (1, 5):
            per = f"{k} task{'s' if k > 1 else ''}/request"
            for engine in engines:
                for pair in engine.pairs:
                    n = measured[f"{engine.name}-{pair.native}-{k}"]
                    t = measured[f"{engine.name}-{pair.tb}-{k}"]
                    run.results.compare(
                        "enqueue",
                        f"{pair.key}-{k}{connections_suffix(connections)}",
                        f"{engine.title}, {per}, {pair.label}, {connections_label(connections)}",
                        "req/s",
                        (pair.native_label, pick(n, "rps")),
                        (pair.tb_label, pick(t, "rps")),
                        target=0.9 if k == 1 else 1.5,
                        goal=2.0 if k == 1 else None,
                        extra={
                            **pairs(n, t, "p50_ms", "p99_ms", "cpu_us"),
                            "connections": connections,
                        },
                    )
    names = ", ".join(e.name for e in engines)
    run.memory_row("api-engines", f"API process (uvicorn), {names}", native, tb)
    run.stop(native, tb)
    for engine in engines:
        for queue in {engine.queue(config, e.queue_kind) for e in engine.endpoints}:
            engine.purge(run, queue)


# -- 5. isolation -------------------------------------------------------------------------


def section_isolation(run: Run) -> None:
    """Light requests' latency while heavy tasks run in-process, or routed to a queue."""
    config, args = run.config, run.args
    engine = next(
        (e for e in ENGINE_TABLE if e.isolation_worker is not None and config.has(e.name)), None
    )
    if engine is None or engine.isolation_worker is None:
        run.results.skipped.append("isolation: no queue engine available")
        return
    queue = engine.queue(config, "iso")
    env = config.env(engines=(engine.name,), **{engine.tb_queue_kind: queue})
    routes = json.dumps({"bench.heavy": engine.alias})
    inproc, iport = run.serve("api-iso-inprocess", "bench.api_tb:app", env)
    routed, rport = run.serve(
        "api-iso-routed", "bench.api_tb:app", {**env, "TASKBRIDGE_ROUTES": routes}
    )
    worker_argv = engine.isolation_worker(queue)
    worker = run.start("iso-worker", [*TB_CLI, *worker_argv], env)
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
            f"light requests' {q[:3]} while {args.heavy_rate:g}/s requests each add a "
            f"{args.heavy_ms} ms CPU task",
            "ms",
            ("heavy task in-process (default)", pick(measured["inprocess"], q)),
            (f"routed to {engine.name} by TASKBRIDGE_ROUTES", pick(measured["routed"], q)),
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
