"""What every benchmark process agrees on: broker URLs, the run id, and the names made from it.

The orchestrator passes `BENCH_*` environment variables to the servers and workers it starts;
each process builds the same `Config` from them. Every queue name and Redis key prefix contains
the run id, so a run never touches anything it did not create (and never database 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENGINES = ("celery-redis", "celery-amqp", "arq")


@dataclass(frozen=True)
class Config:
    run: str
    redis_url: str | None = None
    amqp_url: str | None = None
    engines: tuple[str, ...] = ()
    """Engines this process sets up (servers get a subset, e.g. none for the in-process test)."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Queue names replaced for one process (`BENCH_QUEUE_<KIND>`)."""

    # -- names ------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """Redis key prefix of every Celery broker key (kombu's global_keyprefix)."""
        return f"{self.run}:"

    @property
    def template_prefix(self) -> str:
        """Prefix under which worker backlogs are built before being copied into a queue."""
        return f"{self.run}:tpl:"

    def queue(self, kind: str) -> str:
        """The queue of `kind` (e.g. "celery-tb", "arq-native"), unique to this run."""
        return self.overrides.get(kind) or f"{self.run}-{kind}"

    def arq_queue(self, kind: str) -> str:
        return self.overrides.get(kind) or f"{self.run}:{kind}"

    # -- environment ------------------------------------------------------------------------

    def env(self, engines: tuple[str, ...] | None = None, **queues: str) -> dict[str, str]:
        """The BENCH_* variables that make a child process build this Config."""
        values = {
            "BENCH_RUN": self.run,
            "BENCH_ENGINES": ",".join(self.engines if engines is None else engines),
        }
        if self.redis_url:
            values["BENCH_REDIS_URL"] = self.redis_url
        if self.amqp_url:
            values["BENCH_AMQP_URL"] = self.amqp_url
        for kind, name in {**self.overrides, **queues}.items():
            values[f"BENCH_QUEUE_{kind.upper().replace('-', '_')}"] = name
        return values

    @classmethod
    def from_env(cls) -> Config:
        overrides = {
            key[len("BENCH_QUEUE_") :].lower().replace("_", "-"): value
            for key, value in os.environ.items()
            if key.startswith("BENCH_QUEUE_")
        }
        engines = tuple(e for e in os.environ.get("BENCH_ENGINES", "").split(",") if e)
        return cls(
            run=os.environ.get("BENCH_RUN", "tbbench-local"),
            redis_url=os.environ.get("BENCH_REDIS_URL") or None,
            amqp_url=os.environ.get("BENCH_AMQP_URL") or None,
            engines=engines,
            overrides=overrides,
        )

    def has(self, engine: str) -> bool:
        return engine in self.engines
