"""Status: what the call index costs and gives, on every backend that keeps one: a page of
`GET /tasks`, an event's way to an SSE client, and dispatch with the index on and off.

    uv run python -m bench --only status            # 2-3 minutes on 2 cores
    uv run python -m bench --only status --quick    # a smoke run

Each engine has a redis-server of its own, started here: ARQ, Celery (Redis broker, Redis
results) and in-process with the shared status store (`status_url`). Its API (uvicorn, the
bridge's router) and, for ARQ and Celery, a `taskbridge worker` run as in a deployment.

1. **Pages.** 10,000 calls are dispatched with `Task.enqueue` (gathered 250 at a time, so
   dispatch groups them as it does under load): 40% to three tasks that the worker runs (one of
   them fails one call in 25), 60% to a task routed to a queue no worker reads, so they stay
   queued (in-process, it runs like the others). Then `GET /tasks?limit=50` through the HTTP server,
   one keep-alive connection, requests back to back: the first page, a page 5,000 calls deep
   (a cursor from following `next`), filtered by the commonest state, by `failed` (rare), by
   task, by task and a state rare in it, and `GET /tasks/stats`. Target: ≤ 20 ms p50.
2. **Events.** A task reports progress every 30 ms, 50 times, each message its `time.time()`
   (and returns them all); a client on `GET /tasks/{id}/events` notes each event's arrival. The
   stream sends snapshots, so reports that come faster than it reads merge into one event (the
   newest): per report, the figure is the wait until the client had it or a later one; events
   received are counted against reports. Target: ≤ 50 ms p50. Also the in-process backend
   without a shared store (its index in memory).
3. **Dispatch, index on and off.** The same loop of single `await task.enqueue(n)` calls, with
   the alias's defaults and with `index_max_entries=0`, in interleaved rounds (shuffled order),
   into a queue nothing reads, on a flushed database; the ratio on ÷ off per round, and CPU per
   call of this process and of redis-server.

Results go to docs/benchmarks/results-status.json and the status block of
docs/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from taskbridge import TaskBridge, Tasks, report_progress

from .infra import PYTHON, Proc, git_revision, scrub, start_redis, uvicorn
from .loadgen import percentile
from .results import log
from .status_report import LABELS, summary_lines, write_status_report

ENGINES = ("arq", "celery", "inprocess")
"""Engines whose index is paged; events are also measured on `inprocess-memory`."""
FAIL_EVERY = 25
"""`status.flaky` fails the calls whose argument is a multiple of this."""
SETTLED_SHARE = 0.4
"""Share of the calls sent to tasks a worker runs; the rest stay queued (ARQ, Celery)."""
RUN_TASKS = ("status.quick", "status.other", "status.flaky")
LEAD = 0.3
"""Seconds a progress task waits before its first report (the client subscribes meanwhile)."""
SETTLE_TIMEOUT = 60.0
"""Seconds the calls that run may take to settle before the pages are timed anyway."""
CELERY_FLAGS = ["--without-mingle", "--without-gossip", "--without-heartbeat"]


# -- the task bodies -----------------------------------------------------------------------


def noop(n: int) -> int:
    """Succeeds."""
    return n


def flaky(n: int) -> int:
    """Fails one call in FAIL_EVERY."""
    if n % FAIL_EVERY == 0:
        raise ValueError(f"call {n} fails, as planned")
    return n


async def noop_async(n: int) -> int:
    """Succeeds (async)."""
    return n


async def flaky_async(n: int) -> int:
    """Fails one call in FAIL_EVERY (async)."""
    return flaky(n)


def progress(steps: int, interval: float, lead: float) -> list[str]:
    """Reports `steps` times, `interval` apart; each message is the time of its report, and the
    result lists them all (so a client knows the reports it was not sent)."""
    time.sleep(lead)
    sent = []
    for i in range(1, steps + 1):
        sent.append(f"{time.time():.6f}")
        report_progress(i / steps, sent[-1])
        time.sleep(interval)
    return sent


async def progress_async(steps: int, interval: float, lead: float) -> list[str]:
    """`progress` for event loops."""
    await asyncio.sleep(lead)
    sent = []
    for i in range(1, steps + 1):
        sent.append(f"{time.time():.6f}")
        report_progress(i / steps, sent[-1])
        await asyncio.sleep(interval)
    return sent


# -- the bridge and app, built from STATUS_* variables in the child processes ----------------


def settings_for(engine: str, url: str, run: str, *, index: bool = True) -> dict[str, Any]:
    """The bridge's settings for `engine` on the Redis at `url` (`index=False`: index off)."""
    off: dict[str, Any] = {} if index else {"index_max_entries": 0}
    if engine == "arq":
        return {"backends": {"arq": {"redis_url": url, "queue_name": f"{run}:arq", **off}}}
    if engine == "celery":
        celery = {"broker_url": url, "result_backend": url, "default_queue": f"{run}-celery"}
        return {"backends": {"celery": {**celery, **off}}}
    if engine == "inprocess":
        return {"backends": {"inprocess": {"status_url": url}}}
    return {}  # inprocess-memory: the in-process backend as it comes


def alias_of(engine: str) -> str:
    return engine.split("-")[0]


def build_bridge(engine: str, url: str, run: str, *, index: bool = True) -> TaskBridge:
    """A bridge with the bench's tasks on `engine`'s alias."""
    bridge = TaskBridge(settings_for(engine, url, run, index=index))
    alias, blocking = alias_of(engine), engine == "celery"
    for name in ("status.quick", "status.other"):
        bridge.task(name=name, backend=alias)(noop if blocking else noop_async)
    bridge.task(name="status.flaky", backend=alias)(flaky if blocking else flaky_async)
    # ARQ and Celery: a queue no worker reads, so these calls stay queued
    idle = None if engine.startswith("inprocess") else f"{run}-idle"
    bridge.task(name="status.bulk", backend=alias, queue=idle)(noop if blocking else noop_async)
    bridge.task(name="status.progress", backend=alias)(progress if blocking else progress_async)
    return bridge


def _from_env() -> TaskBridge:
    env = os.environ
    return build_bridge(env["STATUS_ENGINE"], env.get("STATUS_REDIS", ""), env["STATUS_RUN"])


def _app() -> FastAPI:
    bridge = _cached("bridge")
    job = bridge.get_task("status.progress")
    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.router())

    @app.post("/progress")
    async def start_progress(steps: int, interval: float, tasks: Tasks) -> dict[str, str]:
        return {"id": tasks.add_task(job, steps, interval, LEAD).id}

    return app


_BUILDERS = {"bridge": _from_env, "app": _app}
_built: dict[str, Any] = {}


def _cached(name: str) -> Any:
    if name not in _built:
        _built[name] = _BUILDERS[name]()
    return _built[name]


def __getattr__(name: str) -> Any:
    """`bench.status:bridge` and `bench.status:app` for the child processes."""
    if name in _BUILDERS:
        return _cached(name)
    raise AttributeError(name)


# -- measurements --------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    """Count, p50, p90, p99 and max of `values` (ms)."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 0.5),
        "p90": percentile(ordered, 0.9),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else float("nan"),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """In-process calls run in this process: keep their planned failures out of the log."""
    logger = logging.getLogger("taskbridge")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def fill(bridge: TaskBridge, engine: str, total: int) -> None:
    """Dispatch `total` calls, gathered 250 at a time; SETTLED_SHARE of them to tasks that run."""
    runs = [bridge.get_task(name) for name in RUN_TASKS]
    bulk = bridge.get_task("status.bulk")
    calls = []
    for n in range(total):
        if n % 100 < SETTLED_SHARE * 100:
            calls.append((runs[n % len(runs)], n))
        else:  # ARQ, Celery: stays queued; in-process: runs like the others
            calls.append((bulk, n))
    with _quiet():
        for start in range(0, total, 250):
            await asyncio.gather(*(task.enqueue(n) for task, n in calls[start : start + 250]))


async def settled(
    client: Any, expected: int, timeout: float, tasks: tuple[str, ...]
) -> dict[str, Any]:
    """`GET /tasks/stats` once the index holds `expected` calls and those of `tasks` have all
    settled (or after `timeout`, with `settled: False`)."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = (await client.get("/tasks/stats")).json()
        moving = sum(
            n
            for name in tasks
            for state, n in stats["tasks"].get(name, {}).items()
            if state in ("queued", "running", "retrying")
        )
        if (stats["total"] >= expected and not moving) or time.monotonic() > deadline:
            return {**stats, "settled": not moving and stats["total"] >= expected}
        await asyncio.sleep(0.25)


async def time_queries(
    client: Any, queries: dict[str, dict[str, Any]], requests: int, rounds: int = 4
) -> dict[str, dict[str, Any]]:
    """Each query `requests` times back to back over one connection, interleaved in `rounds`
    (after 10 unmeasured ones each); latency ms and the items per page."""
    times: dict[str, list[float]] = {name: [] for name in queries}
    items: dict[str, list[int]] = {name: [] for name in queries}
    errors = dict.fromkeys(queries, 0)

    async def one(name: str) -> float:
        path, params = queries[name]["path"], queries[name]["params"]
        began = time.perf_counter()
        response = await client.get(path, params=params)
        elapsed = (time.perf_counter() - began) * 1000
        if response.status_code != 200:
            errors[name] += 1
        elif path == "/tasks":
            items[name].append(len(response.json()["items"]))
        return elapsed

    for name in queries:
        for _ in range(10):
            await one(name)
    for r in range(rounds):
        share = requests // rounds + (1 if r < requests % rounds else 0)
        for name in queries:
            for _ in range(share):
                times[name].append(await one(name))
    return {
        name: {
            **queries[name],
            "ms": summary(times[name]),
            "items": statistics.median(items[name]) if items[name] else None,
            "errors": errors[name],
        }
        for name in queries
    }


async def deep_cursor(client: Any, pages: int) -> tuple[str | None, int]:
    """The `next` after following `pages` pages of 50 from the newest, and how many calls that
    skipped."""
    cursor, skipped = None, 0
    for _ in range(pages):
        params: dict[str, Any] = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/tasks", params=params)).json()
        skipped += len(page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    return cursor, skipped


async def events_run(client: Any, steps: int, interval: float) -> dict[str, Any]:
    """Start one progress task through the API and follow its events to the end.

    Per report: the wait until the client had it or a later one (a snapshot can carry several
    reports: the newest); per event received: its arrival minus its own report's time.
    """
    started = await client.post("/progress", params={"steps": steps, "interval": interval})
    task_id = started.json()["id"]
    arrivals: list[tuple[float, float]] = []  # (report time, arrival) of each progress event
    events, last = 0, None
    for _ in range(40):  # (the call may not be readable for a moment)
        async with client.stream("GET", f"/tasks/{task_id}/events") as response:
            if response.status_code == 404:
                await asyncio.sleep(0.05)
                continue
            data = None
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data = line[5:].strip()
                elif not line and data is not None:
                    arrived = time.time()
                    last, data = json.loads(data), None
                    events += 1
                    message = last.get("progress_message")
                    if message and (not arrivals or float(message) > arrivals[-1][0]):
                        arrivals.append((float(message), arrived))
            break
    reports = [float(t) for t in (last or {}).get("result") or []]
    per_report = []
    for sent in reports:
        seen = next((arrived for t, arrived in arrivals if t >= sent), None)
        if seen is not None:
            per_report.append((seen - sent) * 1000)
    return {
        "id": task_id,
        "final": None if last is None else last["state"],
        "reports": len(reports) or steps,
        "events": events,
        "progress_events": len(arrivals),
        "per_report_ms": [round(ms, 3) for ms in per_report],
        "per_event_ms": [round((arrived - t) * 1000, 3) for t, arrived in arrivals],
    }


def _redis_cpu(client: Any) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def dispatch_rounds(
    engine: str, url: str, run: str, rounds: int, calls: int, rng: random.Random
) -> dict[str, Any]:
    """`calls` single enqueues with the index on and off, interleaved over `rounds`."""
    import redis

    bridges = {side: build_bridge(engine, url, run, index=side == "on") for side in ("on", "off")}
    sync = redis.Redis.from_url(url)
    rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    try:
        for bridge in bridges.values():
            await bridge.open()
        for _ in range(rounds):
            order = ["on", "off"]
            rng.shuffle(order)
            for side in order:
                task = bridges[side].get_task("status.quick")
                sync.flushdb()
                for n in range(50):  # connections, scripts
                    await task.enqueue(n)
                cpu, redis_cpu = time.process_time(), _redis_cpu(sync)
                began = time.perf_counter()
                for n in range(calls):
                    await task.enqueue(n)
                elapsed = time.perf_counter() - began
                rows[side].append(
                    {
                        "calls_per_s": calls / elapsed,
                        "cpu_us_per_call": (time.process_time() - cpu) / calls * 1e6,
                        "redis_cpu_us_per_call": (_redis_cpu(sync) - redis_cpu) / calls * 1e6,
                    }
                )
    finally:
        for bridge in bridges.values():
            await bridge.close()
        sync.flushdb()
        sync.close()
    ratios = [
        on["calls_per_s"] / off["calls_per_s"]
        for on, off in zip(rows["on"], rows["off"], strict=True)
    ]

    def median(side: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[side])

    return {
        "calls": calls,
        "rounds": rows,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        **{
            f"{key}_{side}": median(side, key)
            for side in ("on", "off")
            for key in ("calls_per_s", "cpu_us_per_call", "redis_cpu_us_per_call")
        },
    }


# -- the run -------------------------------------------------------------------------------


class Plan:
    """How much each part does (`--quick` makes it small)."""

    def __init__(self, quick: bool) -> None:
        self.calls = 3000 if quick else 10_000
        self.requests = 60 if quick else 200
        self.deep_pages = 20 if quick else 100
        self.sse_calls, self.steps, self.interval = (2, 30, 0.03) if quick else (3, 50, 0.03)
        self.rounds, self.dispatches = (2, 500) if quick else (5, 2000)


def _problem(engine: str, *, index: bool = True) -> str | None:
    """Why `engine` (with its index off: `index=False`) cannot be built with this checkout's
    options (None when it can)."""
    try:
        build_bridge(engine, "redis://127.0.0.1:6379/1", "check", index=index).validate()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def measure_engine(
    engine: str, plan: Plan, workdir: Path, run: str, rng: random.Random
) -> dict[str, Any]:
    """Every part for one engine: its Redis, API and worker, then pages, events, dispatch."""
    import httpx2 as httpx

    found: dict[str, Any] = {"engine": engine, "label": LABELS[engine], "notes": []}
    redis_proc: Proc | None = None
    services: list[Proc] = []
    url = ""
    try:
        if engine != "inprocess-memory":
            url, redis_proc = start_redis(workdir / engine)
        env = {"STATUS_RUN": run, "STATUS_ENGINE": engine, "STATUS_REDIS": url}
        if engine in ("arq", "celery"):
            argv = [PYTHON, "-m", "taskbridge.cli", "--log-level", "WARNING", "worker", engine]
            argv.append("bench.status:bridge")
            if engine == "celery":  # by default it reads every queue routed here: the idle one too
                argv += ["-Q", f"{run}-celery", "-n", "status@%h", "-c", "2", "-l", "WARNING"]
                argv += CELERY_FLAGS
            services.append(Proc(f"{engine}-worker", argv, env, workdir / f"{engine}.log"))
        api, port = uvicorn(f"{engine}-api", "bench.status:app", env, workdir)
        services.append(api)
        indexed = await _indexed(engine, url, run)
        if not indexed:
            found["notes"].append("the backend keeps no index: pages not measured, events polled")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            if engine != "inprocess-memory" and indexed:
                found["pages"] = await _pages(engine, url, run, plan, client, found["notes"])
            log(f"status {engine}: events, {plan.sse_calls} calls of {plan.steps} reports")
            found["events"] = await _events(plan, client, indexed)
        while services:  # nothing but this process and redis-server during dispatch
            services.pop().stop()
        if engine in ("arq", "celery"):
            problem = _problem(engine, index=False)
            if problem is not None:
                found["notes"].append(f"index off not measured: {problem.split(' (backend ')[0]}")
            else:
                log(f"status {engine}: dispatch, index on vs off ({plan.rounds} rounds)")
                other_db = url.rsplit("/", 1)[0] + "/2"
                found["dispatch"] = await dispatch_rounds(
                    engine, other_db, f"{run}d", plan.rounds, plan.dispatches, rng
                )
    finally:
        for proc in reversed(services):
            proc.stop()
        if redis_proc is not None:
            redis_proc.stop()
    return found


async def _indexed(engine: str, url: str, run: str) -> bool:
    """Whether `engine`'s backend keeps an index (in this checkout)."""
    bridge = build_bridge(engine, url, run)
    try:
        await bridge.open()
        return bridge.backend(alias_of(engine)).index is not None
    finally:
        await bridge.close()


async def _pages(
    engine: str, url: str, run: str, plan: Plan, client: Any, notes: list[str]
) -> dict[str, Any]:
    bridge = build_bridge(engine, url, run)
    with _quiet():  # (in-process, the calls run here, and some fail as planned)
        try:
            await bridge.open()
            log(f"status {engine}: dispatching {plan.calls:,} calls")
            began = time.monotonic()
            await fill(bridge, engine, plan.calls)
            filled = time.monotonic() - began
            running = RUN_TASKS if engine != "inprocess" else (*RUN_TASKS, "status.bulk")
            stats = await settled(client, plan.calls, SETTLE_TIMEOUT, running)
        finally:
            await bridge.close()
    if not stats["settled"]:
        notes.append(f"calls still moving after {SETTLE_TIMEOUT:g} s: {stats['states']}")
    states = {k: v for k, v in stats["states"].items() if v}
    common = max(states, key=lambda s: states[s])
    cursor, skipped = await deep_cursor(client, plan.deep_pages)
    base: dict[str, Any] = {"limit": 50}
    queries = {
        "first page": {"path": "/tasks", "params": base},
        f"{skipped:,} calls deep (a `next` cursor)": {
            "path": "/tasks",
            "params": {**base, "cursor": cursor},
        },
        f"`state={common}` (commonest)": {"path": "/tasks", "params": {**base, "state": common}},
        "`state=failed` (rare)": {"path": "/tasks", "params": {**base, "state": "failed"}},
        "`task=status.quick`": {"path": "/tasks", "params": {**base, "task": "status.quick"}},
        "`task=status.flaky&state=failed` (rare in the task)": {
            "path": "/tasks",
            "params": {**base, "task": "status.flaky", "state": "failed"},
        },
        "`GET /tasks/stats`": {"path": "/tasks/stats", "params": {}},
    }
    if cursor is None:
        del queries[next(q for q in queries if "deep" in q)]
    log(f"status {engine}: timing {len(queries)} queries, {plan.requests} requests each")
    timed = await time_queries(client, queries, plan.requests)
    return {"fill_s": round(filled, 1), "stats": stats, "queries": timed}


async def _events(plan: Plan, client: Any, indexed: bool) -> dict[str, Any]:
    runs = [await events_run(client, plan.steps, plan.interval) for _ in range(plan.sse_calls)]
    return {
        "indexed": indexed,
        "runs": runs,
        "interval_s": plan.interval,
        "reports": sum(r["reports"] for r in runs),
        "reports_seen": sum(len(r["per_report_ms"]) for r in runs),
        "progress_events": sum(r["progress_events"] for r in runs),
        "events": sum(r["events"] for r in runs),
        "ms": summary([ms for r in runs for ms in r["per_report_ms"]]),
        "per_event_ms": summary([ms for r in runs for ms in r["per_event_ms"]]),
    }


def run_status(args: argparse.Namespace) -> int:
    """Measure every engine in turn, then write results-status.json and the README block."""

    quick = bool(getattr(args, "quick", False))
    plan = Plan(quick)
    workdir = Path(tempfile.mkdtemp(prefix="tbstatus-"))
    run = f"tbstatus{uuid.uuid4().hex[:8]}"
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    started = time.monotonic()
    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench --only status" + (" --quick" if quick else ""),
        "git": git_revision(),
        "run_id": run,
        "seed": seed,
        "cpus": os.cpu_count(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "plan": vars(plan),
        "engines": {},
        "skipped": {},
    }
    try:
        for engine in (*ENGINES, "inprocess-memory"):
            problem = _problem(engine)
            if problem is None:
                log(f"status {engine}: starting")
                try:
                    found = asyncio.run(measure_engine(engine, plan, workdir, run, rng))
                    data["engines"][engine] = found
                except Exception as exc:
                    log(traceback.format_exc())
                    problem = f"failed: {type(exc).__name__}: {exc}"
            if problem is not None:
                problem = problem.split(" (backend ")[0]
                log(f"status {engine}: skipped ({problem})")
                data["skipped"][engine] = problem
    finally:
        if getattr(args, "keep_logs", False):
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    data["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    data["duration_s"] = round(time.monotonic() - started, 1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-status.json").write_text(scrub(json.dumps(data, indent=1)) + "\n")
    write_status_report(data, out / "README.md")
    for line in summary_lines(data):
        log(line)
    log(f"status done in {data['duration_s']:.0f} s; wrote {out}")
    return 0
