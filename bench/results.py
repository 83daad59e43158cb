"""What a run records: paired comparisons (taskbridge ÷ native per round), and the round order."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Results:
    """Everything results.json holds (bench/report.py renders it)."""

    meta: dict[str, Any]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ceilings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None

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
        """The document written to results.json."""
        data: dict[str, Any] = {
            "meta": self.meta,
            "skipped": self.skipped,
            "notes": self.notes,
            "ceilings": self.ceilings,
            "comparisons": self.comparisons,
        }
        if self.profile is not None:
            data["profile"] = self.profile
        return data


def interleaved(names: list[str], rounds: int, rng: random.Random) -> Iterator[tuple[int, str]]:
    """Every name once per round, in an order shuffled each round."""
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
    """One measured value from each round's outcome."""
    return [float(r[key]) for r in results]


def pairs(
    native: list[dict[str, Any]], tb: list[dict[str, Any]], *keys: str
) -> dict[str, dict[str, list[float]]]:
    """Per-round values of `keys` for both sides, as the `extra` of a comparison."""
    return {k: {"native": pick(native, k), "tb": pick(tb, k)} for k in keys}
