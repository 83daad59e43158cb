"""Run the benchmark suite: taskbridge against native FastAPI, Celery and ARQ, in one command.

    uv run python -m bench                      # everything available, 5 rounds
    uv run python -m bench --only http,enqueue  # a subset
    uv run python -m bench --quick              # a smoke run (2 rounds, short windows)
    uv run python -m bench --only soak          # the soak run (bench/soak.py), on its own
    uv run python -m bench --only status        # the call index (bench/status.py), on its own

Every figure is a ratio against the native baseline measured in the same run, in interleaved
rounds (the order shuffled each round), reported as the median and min-max over the rounds.
Results go to docs/benchmarks/ (results.json, results.md, chart.png, and the generated block
of README.md). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from .config import ENGINES, Config
from .context import DEFAULT_CONNECTIONS, Run
from .infra import ROOT, LoadGen, Proc, amqp_problem, check_redis_url, git_revision, scrub
from .results import Results, log
from .sections import section_enqueue, section_http, section_isolation
from .workers import section_workers

SECTIONS = ("http", "enqueue", "workers", "latency", "isolation")
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def _workers(run: Run) -> None:
    # "workers" includes the latency section (the same workers); "latency" alone skips
    # throughput.
    only = run.results.meta["sections"]
    section_workers(run, throughput="workers" in only, latency=True)


def _latency(run: Run) -> None:
    if "workers" not in run.results.meta["sections"]:
        section_workers(run, throughput=False, latency=True)


BODIES: dict[str, Callable[[Run], None]] = {
    "http": section_http,
    "enqueue": section_enqueue,
    "workers": _workers,
    "latency": _latency,
    "isolation": section_isolation,
}


def parse_connections(text: str) -> list[int]:
    """`--connections 1,32` -> [1, 32]."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give one or more positive counts, e.g. 1,32")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (bench/README.md lists the options)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma list of {SECTIONS}, or soak or status alone",
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {ENGINES}")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--duration", type=float, default=1.5, help="HTTP window, s (1.5)")
    parser.add_argument("--warmup", type=float, default=0.3, help="HTTP warm-up per window, s")
    parser.add_argument(
        "--connections",
        type=parse_connections,
        default=[1, DEFAULT_CONNECTIONS],
        help="keep-alive connections: enqueue runs each; http the largest (default 1,32)",
    )
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
        "--profile",
        action="store_true",
        help="http: py-spy the taskbridge API on the in-process async endpoint "
        "(writes profile-inprocess.txt)",
    )
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
    """Stop every process; on a Redis not ours, delete the run's keys; delete AMQP queues."""
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
        from .engines import ENGINES_BY_NAME

        try:
            from kombu import Connection

            engine = ENGINES_BY_NAME["celery-amqp"]
            names = {engine.queue(config, e.queue_kind) for e in engine.endpoints}
            names |= run.amqp_queues
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


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections and write the report; return the exit code."""
    args = parse_args(argv)
    started = time.monotonic()
    only = [s for s in args.only.split(",") if s]
    if "soak" in only:  # a run of its own: servers, workers and report (bench/soak.py)
        if only != ["soak"]:
            sys.exit("--only soak runs alone (its own servers and workers); drop the others")
        from .soak import run_soak

        return run_soak(args)
    if "status" in only:  # the same: pages, events and dispatch of the call index
        if only != ["status"]:
            sys.exit("--only status runs alone (its own servers and workers); drop the others")
        from .status import run_status

        return run_status(args)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}, soak or status")
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
            binary = scrub(redis_proc.argv[0])
            redis_source = f"private redis-server started by the bench ({binary})"
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

    options = {k: str(v) for k, v in vars(args).items()}
    options["connections"] = ",".join(str(c) for c in args.connections)
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
        "options": options,
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
        for section in SECTIONS:
            if section not in only:
                continue
            began = time.monotonic()
            try:
                BODIES[section](run)
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
        (args.out / "results.json").write_text(
            scrub(json.dumps(results.as_json(), indent=1)) + "\n"
        )
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    from .report import write_report

    write_report(results.as_json(), args.out)
    log(f"done in {time.monotonic() - started:.0f} s; wrote {args.out}")
    return 0
