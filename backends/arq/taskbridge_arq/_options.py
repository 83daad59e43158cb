"""The options of an ARQ backend alias (`TASKBRIDGE_BACKENDS__ARQ__*`), named as ARQ names them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from taskbridge.backends import BackendOptions, redact_url

__all__ = ["DEFAULT_QUEUE", "ArqOptions", "SentinelAddress", "sentinel_address"]

DEFAULT_QUEUE = "taskbridge:queue"
"""Not ARQ's `arq:queue`: a pickle-based ARQ worker on the same database would take taskbridge's
JSON jobs and fail them, and a taskbridge worker would reject its pickled ones."""

_SCHEMES = ("redis", "rediss", "unix", "sentinel", "sentinels")


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """A `sentinel://` URL taken apart: the Sentinels to ask, and how to use the master."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None
    ssl: bool


def sentinel_address(url: str) -> SentinelAddress | None:
    """Parse `sentinel://[user:password@]host:port[;sentinel://host:port...][/db]` (kombu's and
    Celery's form; `sentinels://` for TLS), or None for a URL of another scheme. The password
    is the master's (as in kombu); the Sentinels are asked without one unless the
    `sentinel_password` option is set."""
    if not url.startswith(("sentinel://", "sentinels://")):
        return None
    hosts: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme not in ("sentinel", "sentinels") or not parts.hostname:
            raise ValueError(f"{redact_url(part)!r} is not sentinel://host:port")
        hosts.append((parts.hostname, parts.port or 26379))
        username = username or parts.username or None
        password = password or parts.password or None
        if parts.path.strip("/"):
            try:
                db = int(parts.path.strip("/"))
            except ValueError:
                raise ValueError(
                    f"{redact_url(url)!r}: the path must be a database number, e.g. /1"
                ) from None
    return SentinelAddress(hosts, db, username, password, url.startswith("sentinels://"))


class ArqOptions(BackendOptions):
    """Options of an ARQ alias. Durations are in seconds unless the name says otherwise."""

    redis_url: str = Field(min_length=1)
    """`redis://[user:password@]host[:port][/db]`, `rediss://` for TLS, `unix:///path?db=N`, or
    Redis Sentinel: `sentinel://[:password@]host:26379;sentinel://host2:26379/db` (the master
    named by `sentinel_master` is found through them, again after a failover)."""
    sentinel_master: str = Field(default="mymaster", min_length=1)
    """With a `sentinel://` URL: the monitored master's name (ARQ's `sentinel_master`)."""
    sentinel_password: str | None = None
    """With a `sentinel://` URL: the Sentinels' own password, if they require one."""
    queue_name: str = Field(default=DEFAULT_QUEUE, min_length=1)
    """Queue for tasks whose policy names none; a worker serves one queue (`--queue`)."""
    max_jobs: int = Field(default=10, ge=1)
    """Jobs a worker runs at once."""
    job_timeout: float = Field(default=300.0, gt=0)
    """Longest an attempt may run; a task's own `timeout` must not exceed it. It also bounds the
    lock ARQ holds on a running job (its in-progress key lives `job_timeout` + 11 s)."""
    keep_result: float = Field(default=3600.0, ge=0)
    """How long a finished job's result (or error) stays readable; 0 keeps none."""
    keep_result_forever: bool = False
    """Keep results without expiry."""
    max_tries: int = Field(default=5, ge=1)
    """Ceiling on tries of one job, counting tries cut short by a worker shutdown; a task's
    `retries + 1` raises it for that task."""
    poll_delay: float = Field(default=0.5, gt=0)
    """Longest a worker waits between polls; new jobs wake it at once (see the README)."""
    queue_read_limit: int | None = Field(default=None, ge=1)
    """Job ids read per poll; ARQ's default is max(max_jobs * 5, 100)."""
    expires_extra_ms: int = Field(default=86_400_000, gt=0)
    """A job not started this long after it was due is dropped (ARQ's default: one day)."""
    health_check_interval: float = Field(default=3600.0, gt=0)
    """How often a worker writes its health-check key."""
    health_check_key: str | None = Field(default=None, min_length=1)
    """Health-check key; ARQ's default is `<queue>:health-check`."""
    job_completion_wait: int = Field(default=0, ge=0)
    """Seconds a worker given SIGTERM lets running jobs finish before cancelling them."""
    conn_timeout: float = Field(default=1.0, gt=0)
    """Seconds to open a connection to Redis before the dispatch fails."""
    socket_timeout: float = Field(default=5.0, gt=0)
    """Seconds the API process or a worker waits for Redis to answer a command: a hung Redis
    fails the dispatch instead of holding it, and a worker reconnects."""
    conn_retries: int = Field(default=5, ge=0)
    """How many times a starting `--burst` worker retries connecting to Redis before it exits
    (code 1). Any other worker keeps trying, and reconnects after faults, for as long as it
    runs."""
    conn_retry_delay: float = Field(default=1.0, ge=0)
    """Seconds between those retries (other reconnection attempts back off from 0.1 s to 2 s)."""
    max_connections: int | None = Field(default=None, ge=1)
    """Size limit of the API process's connection pool (unbounded by default)."""
    cancel_wait: float = Field(default=5.0, ge=0)
    """Seconds `cancel()` waits for a worker to acknowledge the abort of a running job."""
    index_max_entries: int = Field(default=100_000, ge=0)
    """Most calls the alias's call index keeps (`GET /tasks`, `/tasks/stats`, `/tasks/{id}/events`),
    each for as long as its result is kept; 0 keeps no index."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if sentinel_address(value) is not None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                f"{redact_url(value)!r} is not a Redis URL; use redis://host:port/db, "
                "rediss:// for TLS, unix:///path/to/socket or sentinel://host:26379;..."
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"{redact_url(value)!r} names no host")
        if parts.scheme != "unix" and parts.path.strip("/"):
            try:
                int(parts.path.strip("/"))
            except ValueError:
                raise ValueError(
                    f"{redact_url(value)!r}: the path must be a database number, e.g. /1"
                ) from None
        return value
