"""`--profile`: py-spy on the taskbridge API process under load, summarised as a text file.

`py-spy record -f raw` samples the server's non-idle stacks while the load generator drives
one endpoint; a frame's inclusive share of the samples times the server's CPU time per request
(measured over the same window) estimates what that frame costs per request.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .context import Run
from .infra import ROOT, Proc, cpu_seconds, scrub, wait_for
from .results import log

RATE = 400
"""Samples per second."""
TOP = 25
IDLE_LEAVES = (
    "Condition.wait",
    "Event.wait",
    "Thread.join",
    "Thread._wait_for_tstate_lock",
    "Queue.get",
    "EpollSelector.select",
    "PollSelector.select",
    "SelectSelector.select",
)
"""Leaf frames of threads waiting (py-spy does not always tell them idle): not counted."""


def py_spy() -> str:
    """The py-spy of this environment (a dev dependency), else the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: `uv sync --all-packages` (dev dependency)")
    return found


def profile_endpoint(
    run: Run,
    server: Proc,
    port: int,
    path: str,
    connections: int,
    filename: str,
    reference_us: float | None = None,
) -> dict[str, Any]:
    """Profile `server` under closed-loop load on `path`; write the summary to --out/filename."""
    assert run.loadgen is not None
    seconds = max(5.0, 3 * float(run.args.duration))
    raw = run.workdir / "profile.raw"
    argv = [py_spy(), "record", "-p", str(server.pid), "-f", "raw", "-o", str(raw)]
    argv += ["-F", "--full-filenames", "--nonblocking", "-r", str(RATE)]
    argv += ["-d", str(math.ceil(seconds + 2))]
    cpu = cpu_seconds(server.pid)
    spy = run.start("py-spy", argv, {})
    wait_for(lambda: "Sampling process" in spy.output(), 20, "py-spy to attach", spy)
    outcome = run.loadgen.run(
        mode="closed",
        port=port,
        path=path,
        connections=connections,
        warmup=0.2,
        duration=seconds,
    )
    spy.process.wait(30)
    run.stop(spy)
    cpu_us = (cpu_seconds(server.pid) - cpu) * 1e6 / max(1, outcome["completed"])
    stacks = parse_raw(raw.read_text())
    # Per-request µs from the unprofiled rounds' CPU time when there are some: sampling
    # itself costs the server CPU.
    summary = summarise(stacks, reference_us or cpu_us)
    summary.update(
        profiled_cpu_us=cpu_us,
        endpoint=path,
        connections=connections,
        seconds=seconds,
        requests=outcome["completed"],
        rps=outcome["rps"],
        file=filename,
        reference_cpu_us=reference_us,
    )
    run.args.out.mkdir(parents=True, exist_ok=True)
    (run.args.out / filename).write_text(scrub("\n".join(render(summary))) + "\n")
    log(
        f"profile: {summary['samples']} samples, {cpu_us:.0f} µs CPU/request while sampled; "
        f"wrote {filename}"
    )
    return summary


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: `frame;frame;...;leaf count` per line."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def frame_name(frame: str) -> str:
    """`func (/abs/path.py:12)` -> `func (taskbridge/_x.py:12)`."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for root in (str(ROOT) + "/", "site-packages/"):
        if root in where:
            where = where.split(root, 1)[1]
    return f"{func} ({where})"


def is_taskbridge(name: str) -> bool:
    where = name.partition(" (")[2]
    return where.startswith(("taskbridge/", "backends/")) or "taskbridge_" in where


def summarise(stacks: list[tuple[list[str], int]], cpu_us: float) -> dict[str, Any]:
    """Inclusive and self shares of every frame, and per-request µs estimated from CPU time."""
    idle = sum(c for f, c in stacks if f[-1].partition(" (")[0] in IDLE_LEAVES)
    stacks = [(f, c) for f, c in stacks if f[-1].partition(" (")[0] not in IDLE_LEAVES]
    total = sum(count for _, count in stacks)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, count in stacks:
        names = [frame_name(f) for f in frames]
        for name in set(names):
            inclusive[name] += count
        own[names[-1]] += count

    def rows(names: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "frame": name,
                "inclusive_pct": 100 * inclusive[name] / total,
                "self_pct": 100 * own[name] / total,
                "us_per_request": cpu_us * inclusive[name] / total,
            }
            for name in names
        ]

    if not total:
        return {
            "samples": 0,
            "idle_samples": idle,
            "cpu_us_per_request": cpu_us,
            "taskbridge": [],
            "self": [],
        }
    ours = [n for n, _ in inclusive.most_common() if is_taskbridge(n)][:TOP]
    hottest = [n for n, _ in own.most_common(TOP)]
    return {
        "samples": total,
        "idle_samples": idle,
        "cpu_us_per_request": cpu_us,
        "taskbridge_pct": 100 * sum(c for f, c in stacks if any(map(_ours, f))) / total,
        "taskbridge": rows(ours),
        "self": rows(hottest),
    }


def _ours(frame: str) -> bool:
    return is_taskbridge(frame_name(frame))


def render(summary: dict[str, Any]) -> list[str]:
    """The text file: what was measured, then the two tables."""
    reference = summary.get("reference_cpu_us")
    lines = [
        "py-spy profile of the taskbridge API process (uvicorn, one process) under closed-loop",
        f"load on {summary['endpoint']} (one in-process `async def` task per request),",
        f"{summary['connections']} connections, {summary['seconds']:g} s: "
        f"{summary['requests']} requests, {summary['rps']:.0f} req/s while sampled.",
        f"`py-spy record -f raw -F --nonblocking -r {RATE}`: {summary['samples']} busy samples "
        f"({summary['idle_samples']} of threads waiting left out).",
        f"Server CPU per request: {summary['cpu_us_per_request']:.0f} µs"
        + (" (median of the unprofiled rounds)" if reference else "")
        + f", {summary['profiled_cpu_us']:.0f} µs while sampled.",
        f"taskbridge frames are on the stack in {summary.get('taskbridge_pct', 0):.1f}% of "
        "busy samples.",
        "",
        "incl % = share of samples with the frame on the stack; self % = as the leaf;",
        "µs/req = incl % x server CPU per request (an estimate: sampling, not tracing).",
        "",
        "Top taskbridge frames (by inclusive share)",
        "",
        f"{'incl %':>7} {'self %':>7} {'µs/req':>7}  frame",
    ]
    lines += [_row(r) for r in summary["taskbridge"]]
    lines += [
        "",
        "For context: the hottest frames of the process by self time (all code)",
        "",
        f"{'incl %':>7} {'self %':>7} {'µs/req':>7}  frame",
    ]
    lines += [_row(r) for r in summary["self"]]
    return lines


def _row(row: dict[str, Any]) -> str:
    return (
        f"{row['inclusive_pct']:7.1f} {row['self_pct']:7.1f} {row['us_per_request']:7.1f}  "
        f"{row['frame']}"
    )
