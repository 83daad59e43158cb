"""Periodic tasks: what a schedule is, when its slots fall, and a scheduler that runs each once.

A `Schedule` names a task and when to call it: a cron expression (evaluated by cronsim, in the
schedule's IANA time zone) or a fixed period `every` seconds, aligned to the Unix epoch so that
every scheduler process computes the same slots.

Any number of `Scheduler`s may run. They elect a leader through a Redis lease (`SET NX PX` with an
owner token, renewed every third of its TTL); standbys take over when it lapses. Each slot is
claimed before it is dispatched by one Lua script that also checks the caller still holds the
lease and that the slot is after the schedule's last dispatched slot, so two processes that both
believe they lead (a lease that expired under a stalled leader) never dispatch one slot twice.

Redis keys, under `prefix` (default ``taskbridge:``):

    scheduler:leader                 the lease: owner token, expires after the lease TTL
    schedule:<name>:<slot-epoch>     a slot being dispatched (deleted once its cursor moved past)
    schedule:<name>:last             epoch milliseconds of the last dispatched slot (the cursor)
    startup:<name>[:<deployment>]    an on-startup call already dispatched for this start

Slots of a cron schedule across daylight-saving changes follow cronsim, which follows Debian's
cron: a schedule at a fixed wall-clock time (minute and hour fields without a wildcard) runs once
a day, at the first valid minute after a spring-forward gap that skipped its time (02:30 in
America/New_York on 2026-03-08 runs at 03:00 EDT) and only the first time a fall-back repeats
it. Schedules with a wildcard in the minute or hour field run in elapsed time: ``0 * * * *``
runs at 01:00 EDT and again at 01:00 EST on a fall-back day and has no 02:00 on a spring-forward
day. taskbridge applies the same rule to 6-field expressions (seconds first), which cronsim
itself evaluates in elapsed time only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "MissedPolicy",
    "Schedule",
    "Scheduler",
    "claim_startup",
    "parse_schedules_setting",
    "plan_slots",
    "slot_id",
]

logger = logging.getLogger("taskbridge.scheduler")

MissedPolicy = Literal["once", "skip"]
"""What a scheduler does with slots that passed while no scheduler ran: run the latest once, or
skip them."""

SETTING = "TASKBRIDGE_SCHEDULES"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_LONGEST_SHIFT = timedelta(hours=3)  # more than any daylight-saving change
_CRON_HINT = (
    "write 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, "
    "e.g. '*/5 * * * *'"
)
_SETTING_KEYS = frozenset(
    {"task", "cron", "every", "args", "kwargs", "enabled", "timezone", "missed"}
)


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


def _utc(moment: datetime) -> datetime:
    # Aware datetimes that share a tzinfo compare by wall time, ignoring `fold`: compare in UTC.
    return moment.astimezone(UTC)


def slot_id(slot: datetime) -> str:
    """The slot's Unix time as a key part: whole seconds, or with milliseconds when it has them."""
    ms = _epoch_ms(slot)
    return str(ms // 1000) if ms % 1000 == 0 else f"{ms // 1000}.{ms % 1000:03d}"


def _require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {moment!r}")


def _resolve_wall(naive: datetime, zone: tzinfo) -> datetime:
    """A wall-clock time in `zone`: the first occurrence when repeated, the first valid minute
    after the gap when skipped (cronsim's rule for 5-field expressions)."""
    while True:
        local = naive.replace(tzinfo=zone, fold=0)
        if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive:
            return local
        naive += timedelta(minutes=1)


@dataclass(frozen=True)
class Schedule:
    """A task called periodically: on a cron expression or every `every` seconds.

    `args`/`kwargs` are the call's arguments. `timezone` is the IANA zone a cron expression is
    read in. `missed` says what happens to slots that passed while no scheduler ran: ``"once"``
    runs the latest of them once, ``"skip"`` drops them. `source` names the setting a schedule
    came from, for error messages. Invalid values raise `ConfigurationError` naming the schedule.
    """

    name: str
    task: str
    cron: str | None = None
    every: float | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    enabled: bool = True
    missed: MissedPolicy = "once"
    source: str | None = field(default=None, compare=False)
    _zone: tzinfo = field(init=False, repr=False, compare=False)
    _every_ms: int = field(init=False, repr=False, compare=False, default=0)
    _wall: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise self._error(f"the name must be a non-empty string, not {self.name!r}")
        if not isinstance(self.task, str) or not self.task:
            raise self._error(f"task must be a task name, not {self.task!r}")
        if (self.cron is None) == (self.every is None):
            which = "both" if self.cron is not None else "neither"
            raise self._error(
                f"{which} of cron and every given; give exactly one: cron (e.g. '*/5 * * * *') "
                "or every (seconds, e.g. 30)"
            )
        if self.missed not in ("once", "skip"):
            raise self._error(f"missed must be 'once' or 'skip', not {self.missed!r}")
        if not isinstance(self.enabled, bool):
            raise self._error(f"enabled must be true or false, not {self.enabled!r}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        try:
            zone: tzinfo = UTC if self.timezone == "UTC" else ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise self._error(
                f"timezone {self.timezone!r} is unknown; use an IANA name such as "
                "'America/New_York' or 'UTC'"
            ) from None
        object.__setattr__(self, "_zone", zone)
        if self.every is not None:
            every = self.every
            if isinstance(every, bool) or not isinstance(every, int | float):
                raise self._error(f"every must be a number of seconds, not {every!r}")
            if not math.isfinite(every) or round(every * 1000) <= 0:
                raise self._error(
                    f"every must be a number of seconds greater than 0 (at least 0.001), "
                    f"not {every!r}"
                )
            object.__setattr__(self, "_every_ms", round(every * 1000))
            return
        assert self.cron is not None
        if not isinstance(self.cron, str):
            raise self._error(f"cron must be a string, not {self.cron!r}; {_CRON_HINT}")
        fields = self.cron.split()
        try:
            if len(fields) not in (5, 6):
                raise CronSimError(f"{len(fields)} fields")
            probe = CronSim(self.cron, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise self._error(f"cron {self.cron!r} is invalid ({exc}); {_CRON_HINT}") from None
        # cronsim's own rule for fixed-time (Debian) handling, extended to 6-field expressions.
        minute, hour = fields[-5], fields[-4]
        wall = zone is not UTC and not minute.startswith("*") and not hour.startswith("*")
        object.__setattr__(self, "_wall", wall)
        try:
            next(probe)
        except StopIteration:
            raise self._error(f"cron {self.cron!r} never matches a date; {_CRON_HINT}") from None

    def _error(self, problem: str) -> ConfigurationError:
        where = f" ({self.source})" if self.source else ""
        return ConfigurationError(f"schedule {self.name!r}{where}: {problem}")

    @property
    def zone(self) -> tzinfo:
        """The time zone slots are computed and returned in."""
        return self._zone

    def __hash__(self) -> int:
        return hash((self.name, self.task, self.cron, self.every, self.timezone))

    def idempotency_key(self, slot: datetime) -> str:
        """``schedule:<name>:<slot-epoch>``: the same for one slot in every scheduler process."""
        return f"schedule:{self.name}:{slot_id(slot)}"

    def describe(self) -> str:
        """``cron '0 3 * * *' (Europe/Paris)`` or ``every 30s``, for listings and logs."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron!r} ({self.timezone})"

    def next_slot(self, after: datetime) -> datetime:
        """The first slot strictly after `after` (timezone-aware), in the schedule's zone."""
        _require_aware(after, "after")
        if self.every is not None:
            step = self._every_ms
            ms = (_epoch_ms(after) // step + 1) * step
            return (_EPOCH + ms * _MS).astimezone(self.zone)
        after = _utc(after)
        for slot in self._cron(after, reverse=False):
            if _utc(slot) > after:
                return slot
        raise LookupError(f"schedule {self.name!r} has no slot after {after.isoformat()}")

    def previous_slot(self, at: datetime) -> datetime | None:
        """The latest slot at or before `at`, or None when there is none in 50 years."""
        _require_aware(at, "at")
        if self.every is not None:
            step = self._every_ms
            return (_EPOCH + (_epoch_ms(at) // step) * step * _MS).astimezone(self.zone)
        at = _utc(at)
        for slot in self._cron(at + timedelta(seconds=2), reverse=True):
            if _utc(slot) <= at:
                return slot
        return None

    def slots_between(self, start: datetime, end: datetime, limit: int = 1000) -> list[datetime]:
        """Slots `s` with ``start < s <= end``, earliest first, at most `limit` of them."""
        _require_aware(end, "end")
        end = _utc(end)
        slots: list[datetime] = []
        slot = self.next_slot(start)
        while _utc(slot) <= end and len(slots) < limit:
            slots.append(slot)
            slot = self.next_slot(slot)
        return slots

    def _cron(self, start: datetime, *, reverse: bool) -> Iterator[datetime]:
        """cronsim's matches from near `start`; callers filter the few around `start` itself."""
        assert self.cron is not None
        local = start.astimezone(self.zone)
        if not self._wall:
            yield from CronSim(self.cron, local, reverse=reverse)
            return
        naive = local.replace(tzinfo=None)
        if reverse:
            # Inside a repeated hour the wall clock reads earlier than slots already passed; the
            # first-occurrence mapping is monotonic, so start late enough and let callers filter.
            naive += _LONGEST_SHIFT
        for wall in CronSim(self.cron, naive, reverse=reverse):
            yield _resolve_wall(wall, self.zone)


def parse_schedules_setting(
    value: Mapping[str, Any], declared: Iterable[Schedule] = ()
) -> list[Schedule]:
    """Apply the `TASKBRIDGE_SCHEDULES` setting (name -> fields) to the schedules in code.

    An entry whose name is declared changes only the fields it gives (``{"enabled": false}``
    disables it; a `cron` replaces an `every` and the other way round); any other entry adds a
    schedule and needs `task` and one of `cron`/`every`. Returns the declared schedules in order,
    changed where the setting says, then the added ones. Raises `ConfigurationError` naming
    ``TASKBRIDGE_SCHEDULES[name]`` and the problem.
    """
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{SETTING} must be a JSON object of schedule name -> "
            f'{{"task": ..., "cron" or "every": ...}}, not {type(value).__name__}'
        )
    result = {schedule.name: schedule for schedule in declared}
    for name, entry in value.items():
        source = f"{SETTING}[{name}]"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(
                f"{source} must be an object such as "
                f'{{"task": "app.tasks.cleanup", "cron": "0 3 * * *"}}, not {entry!r}'
            )
        unknown = sorted(set(entry) - _SETTING_KEYS)
        if unknown:
            raise ConfigurationError(
                f"{source} has unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(_SETTING_KEYS))}"
            )
        fields = dict(entry)
        if "args" in fields:
            if not isinstance(fields["args"], list | tuple):
                raise ConfigurationError(f"{source}: args must be a list, not {fields['args']!r}")
            fields["args"] = tuple(fields["args"])
        if "kwargs" in fields and not isinstance(fields["kwargs"], Mapping):
            raise ConfigurationError(
                f"{source}: kwargs must be an object, not {fields['kwargs']!r}"
            )
        base = result.get(name)
        if base is None:
            if "task" not in fields:
                raise ConfigurationError(
                    f"{source}: no schedule named {name!r} is declared in code, so this entry "
                    'must give "task" (the task\'s name) and "cron" or "every"'
                )
            result[name] = Schedule(name=name, source=source, **fields)
            continue
        if "cron" in fields and "every" not in fields:
            fields["every"] = None
        elif "every" in fields and "cron" not in fields:
            fields["cron"] = None
        result[name] = replace(base, source=source, **fields)
    return list(result.values())


def plan_slots(
    schedule: Schedule, cursor: datetime, now: datetime, grace: float = 1.0
) -> tuple[list[datetime], bool]:
    """Which slots to dispatch at `now`, given the last slot handled (`cursor`).

    Slots within `grace` seconds of `now` are on time and all run. Older ones were missed: with
    ``missed="once"`` and no slot on time, the latest missed slot runs (once, however many were
    missed); with ``"skip"`` they are dropped. Returns the slots, earliest first, and whether any
    slot was missed. Pure: no clock, no I/O.
    """
    cursor, now = _utc(cursor), _utc(now)
    first = _utc(schedule.next_slot(cursor))
    if first > now:
        return [], False
    late_before = now - timedelta(seconds=grace)
    on_time = schedule.slots_between(max(cursor, late_before), now, limit=100)
    missed = first <= late_before
    if missed and not on_time and schedule.missed == "once":
        latest = schedule.previous_slot(late_before)
        assert latest is not None and _utc(latest) > cursor
        return [latest], True
    return on_time, missed


# The lease and slot scripts. KEYS/ARGV documented above each; all times in milliseconds.
# claim: KEYS lease, slot, cursor; ARGV token, slot_ms, slot_ttl_ms
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = redis.call('GET', KEYS[3])
if last and tonumber(last) >= tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""
# commit: KEYS cursor, slot; ARGV slot_ms, token
_COMMIT = """
local last = redis.call('GET', KEYS[1])
if not last or tonumber(last) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""
# acquire (ARGV token, ttl_ms): take a free lease or keep our own
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# renew (ARGV token, ttl_ms) and release (ARGV token) of KEYS lease, and of a slot claim
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A claim outlives a leader that died between claiming and committing, so the next leader skips
# that slot instead of dispatching it a second time.
_SLOT_TTL_MS = 24 * 3600 * 1000
_STARTUP_TTL = 7 * 24 * 3600


def _connect(url: str, timeout: float) -> Redis:
    try:
        from redis.asyncio import Redis
    except ImportError:
        raise ImportError(
            "the scheduler keeps its lease in Redis and needs the redis package; install it "
            "(pip install redis), or fastapi-taskbridge-arq / fastapi-taskbridge-celery which "
            "bring it"
        ) from None
    client: Redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return client


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, asyncio.TimeoutError)


class _MemoryStore:
    """Single-instance state, for a scheduler with no Redis (the API process's own)."""

    def __init__(self) -> None:
        self.cursors: dict[str, int] = {}

    async def cursor(self, schedule: Schedule, default: datetime) -> datetime:
        ms = self.cursors.setdefault(schedule.name, _epoch_ms(default))
        return (_EPOCH + ms * _MS).astimezone(schedule.zone)

    async def claim(self, schedule: Schedule, slot: datetime) -> bool:
        return _epoch_ms(slot) > self.cursors.get(schedule.name, -1)

    async def commit(self, schedule: Schedule, slot: datetime) -> None:
        self.cursors[schedule.name] = max(self.cursors.get(schedule.name, -1), _epoch_ms(slot))

    async def release(self, schedule: Schedule, slot: datetime) -> None:
        return None


class _RedisStore:
    """Cursors and slot claims in Redis, every claim fenced by the lease `token`."""

    def __init__(self, client: Redis, prefix: str, token: str) -> None:
        self.client, self.prefix, self.token = client, prefix, token
        self.lease_key = f"{prefix}scheduler:leader"

    def _keys(self, schedule: Schedule, slot: datetime | None = None) -> tuple[str, str]:
        base = f"{self.prefix}schedule:{schedule.name}:"
        return base + "last", base + (slot_id(slot) if slot is not None else "")

    async def cursor(self, schedule: Schedule, default: datetime) -> datetime:
        cursor_key, _ = self._keys(schedule)
        await self.client.set(cursor_key, _epoch_ms(default), nx=True)
        raw = await self.client.get(cursor_key)
        ms = int(raw) if raw is not None else _epoch_ms(default)
        return (_EPOCH + ms * _MS).astimezone(schedule.zone)

    async def claim(self, schedule: Schedule, slot: datetime) -> bool:
        cursor_key, slot_key = self._keys(schedule, slot)
        won = await self.client.eval(  # type: ignore[misc]
            _CLAIM, 3, self.lease_key, slot_key, cursor_key,
            self.token, str(_epoch_ms(slot)), str(_SLOT_TTL_MS),
        )  # fmt: skip
        if won == -1:
            raise _LeaseLost
        return bool(won == 1)

    async def commit(self, schedule: Schedule, slot: datetime) -> None:
        cursor_key, slot_key = self._keys(schedule, slot)
        await self.client.eval(  # type: ignore[misc]
            _COMMIT, 2, cursor_key, slot_key, str(_epoch_ms(slot)), self.token
        )

    async def release(self, schedule: Schedule, slot: datetime) -> None:
        await self.client.eval(_RELEASE, 1, self._keys(schedule, slot)[1], self.token)  # type: ignore[misc]


class _Store(Protocol):
    async def cursor(self, schedule: Schedule, default: datetime) -> datetime: ...
    async def claim(self, schedule: Schedule, slot: datetime) -> bool: ...
    async def commit(self, schedule: Schedule, slot: datetime) -> None: ...
    async def release(self, schedule: Schedule, slot: datetime) -> None: ...


class _LeaseLost(Exception):
    """The lease is no longer this scheduler's: stop dispatching."""


async def _wait(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Sleep `timeout` seconds or until one of `events` is set."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


Dispatch = Callable[[Schedule, datetime], Awaitable[None]]


class Scheduler:
    """Runs `schedules`, calling `dispatch(schedule, slot)` once per slot across all processes.

    With `redis_url`, any number of schedulers may run: one leads (a Redis lease of `lease_ttl`
    seconds, renewed every third of it) and the others stand by and take over within about
    `lease_ttl` seconds of its death. With `redis_url=None` it runs alone, keeping its state in
    memory. `dispatch` receives the schedule and the slot's time (timezone-aware, in the
    schedule's zone); a call it raises for is logged and the slot then counts as missed.

    A slot dispatched up to `grace` seconds late still runs; by default that is the lease TTL
    plus one second, so the slots that fall while a standby takes over all run. Slots older than
    that were missed and follow their schedule's `missed` policy.
    """

    def __init__(
        self,
        schedules: Iterable[Schedule],
        dispatch: Dispatch,
        redis_url: str | None = None,
        *,
        lease_ttl: float = 5.0,
        prefix: str = "taskbridge:",
        grace: float | None = None,
    ) -> None:
        if not lease_ttl > 0:
            raise ConfigurationError(f"the scheduler's lease TTL must be > 0 s, not {lease_ttl}")
        self.schedules = [schedule for schedule in schedules if schedule.enabled]
        self.dispatch = dispatch
        self.redis_url = redis_url
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        self.grace = lease_ttl + 1.0 if grace is None else grace
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.is_leader = False

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule until `stop` is set; a leader then deletes its lease so a standby takes over
        at once. A cancelled scheduler leaves its lease to lapse, as a dead one would."""
        if not self.schedules:
            logger.info("scheduler %s: no enabled schedules; waiting for stop", self.owner)
            await stop.wait()
            return
        if self.redis_url is None:
            self.is_leader = True
            try:
                await self._lead(_MemoryStore(), stop, asyncio.Event())
            finally:
                self.is_leader = False
            return
        client = _connect(self.redis_url, timeout=max(self.lease_ttl / 3, 0.2))
        store = _RedisStore(client, self.prefix, self.owner)
        errors = _redis_errors()
        ttl_ms = max(round(self.lease_ttl * 1000), 1)
        standing_by = False
        try:
            while not stop.is_set():
                try:
                    if await client.eval(_ACQUIRE, 1, store.lease_key, self.owner, str(ttl_ms)):  # type: ignore[misc]
                        standing_by = False
                        await self._hold(client, store, stop)
                        continue
                    if not standing_by:
                        logger.info("scheduler %s: standing by (another leads)", self.owner)
                        standing_by = True
                    remaining = await client.pttl(store.lease_key)
                except errors as exc:
                    logger.warning("scheduler %s: Redis unavailable: %s", self.owner, exc)
                    await _wait([stop], min(1.0, self.lease_ttl / 3))
                    continue
                # Sleep until the lease lapses, but look again now and then: a leader that stops
                # deletes it early.
                until_expiry = remaining / 1000 + 0.005 if remaining > 0 else 0.05
                await _wait([stop], min(until_expiry, self.lease_ttl / 5))
            if self.is_leader:
                with contextlib.suppress(*errors):
                    await client.eval(_RELEASE, 1, store.lease_key, self.owner)  # type: ignore[misc]
                logger.info("scheduler %s: stopped; lease released", self.owner)
        finally:
            self.is_leader = False
            await client.aclose()

    async def _hold(self, client: Redis, store: _RedisStore, stop: asyncio.Event) -> None:
        """Lead while the lease is ours: renew it beside the slot loop."""
        if not self.is_leader:
            logger.info("scheduler %s: became leader", self.owner)
        self.is_leader = True
        lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew(client, store, stop, lost))
        try:
            await self._lead(store, stop, lost)
        except _LeaseLost:
            lost.set()
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        if lost.is_set():
            self.is_leader = False
            logger.warning("scheduler %s: lost leadership", self.owner)

    async def _renew(
        self, client: Redis, store: _RedisStore, stop: asyncio.Event, lost: asyncio.Event
    ) -> None:
        ttl_ms = max(round(self.lease_ttl * 1000), 1)
        valid_until = time.monotonic() + self.lease_ttl
        errors = _redis_errors()
        while not stop.is_set():
            await _wait([stop], self.lease_ttl / 3)
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                renewed = await client.eval(_RENEW, 1, store.lease_key, self.owner, str(ttl_ms))  # type: ignore[misc]
            except errors as exc:
                # The lease may still be ours; stop leading only once it surely lapsed.
                logger.warning("scheduler %s: renewing the lease failed: %s", self.owner, exc)
                if time.monotonic() >= valid_until:
                    lost.set()
                    return
                continue
            if not renewed:
                lost.set()
                return
            valid_until = sent + self.lease_ttl

    async def _lead(self, store: _Store, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """The slot loop: sleep to the next slot, claim it, dispatch it, advance the cursor."""
        now = datetime.now(UTC)
        cursors = {s.name: await store.cursor(s, now) for s in self.schedules}
        while not (stop.is_set() or lost.is_set()):
            now = datetime.now(UTC)
            batch: list[tuple[Schedule, datetime]] = []
            for schedule in self.schedules:
                cursor = cursors[schedule.name]
                slots, missed = plan_slots(schedule, cursor, now, self.grace)
                if missed:
                    logger.warning(
                        "schedule %s: slots after %s were not run in time; %s",
                        schedule.name,
                        cursor.isoformat(),
                        f"running {slots[-1].isoformat()}" if slots else "skipping them",
                    )
                if slots or missed:
                    latest = schedule.previous_slot(now) or cursor
                    cursors[schedule.name] = max(latest, cursor, key=_utc)
                for slot in slots:
                    if await store.claim(schedule, slot):
                        batch.append((schedule, slot))
            results = await asyncio.gather(
                *(self.dispatch(schedule, slot) for schedule, slot in batch),
                return_exceptions=True,
            )
            failed = False
            for (schedule, slot), outcome in zip(batch, results, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    logger.error(
                        "schedule %s: slot %s of task %s was not dispatched: %r",
                        schedule.name, slot.isoformat(), schedule.task, outcome,
                    )  # fmt: skip
                    await store.release(schedule, slot)
                    cursors[schedule.name] = min(cursors[schedule.name], _utc(slot) - _MS, key=_utc)
                    failed = True
                    continue
                await store.commit(schedule, slot)
                logger.info(
                    "schedule %s: dispatched slot %s of task %s",
                    schedule.name, slot.isoformat(), schedule.task,
                )  # fmt: skip
            # After a failed dispatch, pause before its retry (under the missed policy); cut long
            # sleeps so that a change of the wall clock is noticed.
            wake = min((s.next_slot(cursors[s.name]) for s in self.schedules), key=_utc)
            delay = (wake - datetime.now(UTC)).total_seconds()
            await _wait([stop, lost], max(delay, 1.0) if failed else min(delay, 60.0))


async def claim_startup(
    name: str,
    redis_url: str | None,
    *,
    deployment_id: str | None = None,
    window: float = 60.0,
    prefix: str = "taskbridge:",
) -> bool:
    """True for exactly one of the processes of a deployment start that ask for `name`.

    With `deployment_id` (a release, image tag or commit the deployment sets), the first process
    of that deployment wins, for a week. Without it, processes starting within `window` seconds
    of the first one are the same start. With no `redis_url` there is one process: always True.
    """
    if redis_url is None:
        return True
    client = _connect(redis_url, timeout=5.0)
    try:
        if deployment_id is not None:
            key = f"{prefix}startup:{name}:{deployment_id}"
            won = await client.set(key, "1", nx=True, ex=_STARTUP_TTL)
        else:
            won = await client.set(f"{prefix}startup:{name}", "1", nx=True, px=round(window * 1000))
        return bool(won)
    finally:
        await client.aclose()
