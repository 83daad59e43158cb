"""Schedules without I/O: cron and `every` slots, daylight-saving changes, the settings entry,
the exact error texts and the missed-slot policy."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskbridge._exceptions import ConfigurationError
from taskbridge._schedule import Schedule, Scheduler, parse_schedules_setting, plan_slots, slot_id

NY = ZoneInfo("America/New_York")


def iso_slots(schedule: Schedule, start: datetime, end: datetime) -> list[str]:
    return [slot.isoformat() for slot in schedule.slots_between(start, end)]


def test_every_is_aligned_to_the_epoch_whatever_the_start() -> None:
    every = Schedule("tick", "app.tick", every=30)
    assert every.next_slot(datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 0, 30, tzinfo=UTC
    )
    # strictly after: a slot is not its own next slot
    assert every.next_slot(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 1, tzinfo=UTC
    )
    assert every.previous_slot(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 0, 30, tzinfo=UTC
    )
    # two processes starting at different instants compute the same slots
    a = every.slots_between(
        datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 2, tzinfo=UTC)
    )
    b = every.slots_between(
        datetime(2026, 1, 1, 0, 0, 29, tzinfo=UTC), datetime(2026, 1, 1, 0, 2, tzinfo=UTC)
    )
    assert a == b and len(a) == 4
    half = Schedule("fast", "app.tick", every=0.25)
    assert half.next_slot(datetime(2026, 1, 1, 0, 0, 0, 300_000, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC
    )


def test_every_slots_are_returned_in_the_schedules_zone() -> None:
    every = Schedule("tick", "app.tick", every=3600, timezone="America/New_York")
    slot = every.next_slot(datetime(2026, 1, 1, 12, 30, tzinfo=UTC))
    assert slot.isoformat() == "2026-01-01T08:00:00-05:00"


def test_cron_slots_in_utc_and_seconds_first_six_fields() -> None:
    five = Schedule("report", "app.report", cron="*/5 * * * *")
    start = datetime(2026, 5, 1, 10, 2, 30, tzinfo=UTC)
    assert iso_slots(five, start, start + timedelta(minutes=10)) == [
        "2026-05-01T10:05:00+00:00",
        "2026-05-01T10:10:00+00:00",
    ]
    six = Schedule("fast", "app.fast", cron="*/15 * * * * *")
    assert iso_slots(six, start, start + timedelta(seconds=30)) == [
        "2026-05-01T10:02:45+00:00",
        "2026-05-01T10:03:00+00:00",
    ]
    assert six.previous_slot(start) == datetime(2026, 5, 1, 10, 2, 30, tzinfo=UTC)


def test_slots_between_is_bounded() -> None:
    every = Schedule("tick", "app.tick", every=1)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert len(every.slots_between(start, start + timedelta(days=1), limit=50)) == 50


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Schedule("tick", "app.tick", every=1).next_slot(datetime(2026, 1, 1))


# America/New_York: 2026-03-08 02:00 EST jumps to 03:00 EDT; 2026-11-01 02:00 EDT goes back to
# 01:00 EST.
SPRING = (datetime(2026, 3, 7, 23, 0, tzinfo=NY), datetime(2026, 3, 8, 5, 0, tzinfo=NY))
FALL = (datetime(2026, 10, 31, 23, 0, tzinfo=NY), datetime(2026, 11, 1, 4, 0, tzinfo=NY))


@pytest.mark.parametrize(
    ("cron", "window", "expected"),
    [
        # fixed wall-clock time outside the change: once, at its wall time
        ("30 1 * * *", SPRING, ["2026-03-08T01:30:00-05:00"]),
        ("30 1 * * *", FALL, ["2026-11-01T01:30:00-04:00"]),
        # fixed time inside the skipped hour: runs at the first minute after the jump
        ("30 2 * * *", SPRING, ["2026-03-08T03:00:00-04:00"]),
        # the same with seconds (taskbridge extends cronsim's rule to 6 fields)
        ("0 30 2 * * *", SPRING, ["2026-03-08T03:00:00-04:00"]),
        ("0 30 1 * * *", FALL, ["2026-11-01T01:30:00-04:00"]),
        # wildcard hour: elapsed time, so no 02:00 in spring and two 01:00 in fall
        (
            "0 * * * *",
            SPRING,
            [
                "2026-03-08T00:00:00-05:00",
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00",
                "2026-03-08T05:00:00-04:00",
            ],
        ),
        (
            "0 * * * *",
            FALL,
            [
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T03:00:00-05:00",
                "2026-11-01T04:00:00-05:00",
            ],
        ),
        (
            "*/30 * * * *",
            SPRING,
            [
                "2026-03-07T23:30:00-05:00",
                "2026-03-08T00:00:00-05:00",
                "2026-03-08T00:30:00-05:00",
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T01:30:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:30:00-04:00",
                "2026-03-08T04:00:00-04:00",
                "2026-03-08T04:30:00-04:00",
                "2026-03-08T05:00:00-04:00",
            ],
        ),
        (
            "*/30 * * * *",
            FALL,
            [
                "2026-10-31T23:30:00-04:00",
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T00:30:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T02:30:00-05:00",
                "2026-11-01T03:00:00-05:00",
                "2026-11-01T03:30:00-05:00",
                "2026-11-01T04:00:00-05:00",
            ],
        ),
    ],
)
def test_daylight_saving_changes_in_new_york(
    cron: str, window: tuple[datetime, datetime], expected: list[str]
) -> None:
    schedule = Schedule("dst", "app.dst", cron=cron, timezone="America/New_York")
    slots = schedule.slots_between(*window)
    assert [slot.isoformat() for slot in slots] == expected
    # every slot is a distinct instant, in order, so slot keys never collide
    instants = [slot.timestamp() for slot in slots]
    assert instants == sorted(set(instants))


def test_fixed_time_runs_once_when_asked_from_inside_the_repeated_hour() -> None:
    schedule = Schedule("dst", "app.dst", cron="30 1 * * *", timezone="America/New_York")
    second_one_ten = datetime(2026, 11, 1, 1, 10, fold=1, tzinfo=NY)  # 01:10 EST
    assert schedule.next_slot(second_one_ten).isoformat() == "2026-11-02T01:30:00-05:00"
    assert schedule.previous_slot(second_one_ten).isoformat() == "2026-11-01T01:30:00-04:00"  # type: ignore[union-attr]


def test_previous_slot_of_a_time_moved_by_spring_forward() -> None:
    schedule = Schedule("dst", "app.dst", cron="30 2 * * *", timezone="America/New_York")
    at = datetime(2026, 3, 8, 3, 0, tzinfo=NY)
    assert schedule.previous_slot(at) == at
    assert schedule.previous_slot(at.astimezone(UTC) - timedelta(seconds=1)).isoformat() == (  # type: ignore[union-attr]
        "2026-03-07T02:30:00-05:00"
    )


def test_slot_ids_and_idempotency_keys_are_the_same_instant_in_any_zone() -> None:
    slot = datetime(2026, 11, 1, 1, 0, fold=1, tzinfo=NY)
    assert slot_id(slot) == slot_id(slot.astimezone(UTC)) == "1793512800"
    assert slot_id(datetime(2026, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC)) == "1767225600.250"
    schedule = Schedule("hourly", "app.h", cron="0 * * * *", timezone="America/New_York")
    assert schedule.idempotency_key(slot) == "schedule:hourly:1793512800"


PREFIX = "schedule 'nightly' (TASKBRIDGE_SCHEDULES[nightly]): "


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"task": "app.t", "cron": "61 * * * *"},
            "cron '61 * * * *' is invalid (Bad minute); write 5 fields (minute hour day-of-month "
            "month day-of-week) or 6 with seconds first, e.g. '*/5 * * * *'",
        ),
        (
            {"task": "app.t", "cron": "* * *"},
            "cron '* * *' is invalid (3 fields); write 5 fields (minute hour day-of-month "
            "month day-of-week) or 6 with seconds first, e.g. '*/5 * * * *'",
        ),
        (
            {"task": "app.t", "cron": "0 3 * * *", "timezone": "Mars/Olympus"},
            "timezone 'Mars/Olympus' is unknown; use an IANA name such as 'America/New_York' "
            "or 'UTC'",
        ),
        (
            {"task": "app.t", "cron": "0 3 * * *", "every": 60},
            "both of cron and every given; give exactly one: cron (e.g. '*/5 * * * *') or every "
            "(seconds, e.g. 30)",
        ),
        (
            {"task": "app.t"},
            "neither of cron and every given; give exactly one: cron (e.g. '*/5 * * * *') or "
            "every (seconds, e.g. 30)",
        ),
        (
            {"task": "app.t", "every": 0},
            "every must be a number of seconds greater than 0 (at least 0.001), not 0",
        ),
        (
            {"task": "app.t", "every": -5},
            "every must be a number of seconds greater than 0 (at least 0.001), not -5",
        ),
        ({"task": "app.t", "every": "5"}, "every must be a number of seconds, not '5'"),
        (
            {"task": "app.t", "every": 5, "missed": "all"},
            "missed must be 'once' or 'skip', not 'all'",
        ),
        (
            {"task": "app.t", "every": 5, "enabled": "no"},
            "enabled must be true or false, not 'no'",
        ),
        (
            {"task": "app.t", "cron": "0 0 31 2 *"},
            "cron '0 0 31 2 *' is invalid (Bad day-of-month); write 5 fields (minute hour "
            "day-of-month month day-of-week) or 6 with seconds first, e.g. '*/5 * * * *'",
        ),
    ],
)
def test_settings_errors_name_the_setting_and_the_problem(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_schedules_setting({"nightly": fields})
    assert str(caught.value) == PREFIX + message


def test_code_schedule_errors_name_the_schedule_only() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Schedule("cleanup", "app.cleanup", cron="0 25 * * *")
    assert str(caught.value) == (
        "schedule 'cleanup': cron '0 25 * * *' is invalid (Bad hour); write 5 fields (minute "
        "hour day-of-month month day-of-week) or 6 with seconds first, e.g. '*/5 * * * *'"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"x": {"task": "t", "every": 1, "cron_expr": "* * * * *"}},
            "TASKBRIDGE_SCHEDULES[x] has unknown field(s) 'cron_expr'; allowed: args, cron, "
            "enabled, every, kwargs, missed, task, timezone",
        ),
        (
            {"x": "0 3 * * *"},
            "TASKBRIDGE_SCHEDULES[x] must be an object such as "
            '{"task": "app.tasks.cleanup", "cron": "0 3 * * *"}, not \'0 3 * * *\'',
        ),
        (
            {"x": {"cron": "0 3 * * *"}},
            "TASKBRIDGE_SCHEDULES[x]: no schedule named 'x' is declared in code, so this entry "
            'must give "task" (the task\'s name) and "cron" or "every"',
        ),
        (
            {"x": {"task": "t", "every": 1, "args": "a"}},
            "TASKBRIDGE_SCHEDULES[x]: args must be a list, not 'a'",
        ),
        (
            {"x": {"task": "t", "every": 1, "kwargs": [1]}},
            "TASKBRIDGE_SCHEDULES[x]: kwargs must be an object, not [1]",
        ),
    ],
)
def test_malformed_setting_entries(value: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_schedules_setting(value)
    assert str(caught.value) == message


def test_setting_adds_changes_and_disables_schedules() -> None:
    declared = [
        Schedule("cleanup", "app.cleanup", cron="0 3 * * *"),
        Schedule("report", "app.report", every=60, args=(1,)),
        Schedule("untouched", "app.u", every=5),
    ]
    merged = parse_schedules_setting(
        {
            "cleanup": {"enabled": False},
            "report": {"cron": "*/10 * * * *", "timezone": "Europe/Paris", "kwargs": {"x": 1}},
            "digest": {"task": "app.digest", "every": 3600, "args": [1, "a"], "missed": "skip"},
        },
        declared,
    )
    by_name = {schedule.name: schedule for schedule in merged}
    assert [schedule.name for schedule in merged] == ["cleanup", "report", "untouched", "digest"]
    assert by_name["cleanup"].enabled is False and by_name["cleanup"].cron == "0 3 * * *"
    # a cron replaces the code's every; what the entry does not give is kept
    assert (by_name["report"].cron, by_name["report"].every) == ("*/10 * * * *", None)
    assert by_name["report"].args == (1,) and by_name["report"].kwargs == {"x": 1}
    assert by_name["report"].timezone == "Europe/Paris"
    assert by_name["untouched"] is declared[2]
    assert by_name["digest"] == Schedule(
        "digest", "app.digest", every=3600, args=(1, "a"), missed="skip"
    )
    assert by_name["digest"].source == "TASKBRIDGE_SCHEDULES[digest]"
    # a disabled schedule is listed but not run
    scheduler = Scheduler(merged, dispatch=_never, redis_url=None)
    assert [schedule.name for schedule in scheduler.schedules] == ["report", "untouched", "digest"]


def test_a_setting_change_is_validated_like_a_new_schedule() -> None:
    with pytest.raises(ConfigurationError, match=r"^schedule 'report' \(TASKBRIDGE_SCHEDULES"):
        parse_schedules_setting(
            {"report": {"every": -1}}, [Schedule("report", "app.report", cron="0 * * * *")]
        )


async def _never(schedule: Schedule, slot: datetime) -> None:
    raise AssertionError("not dispatched in this test")


T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def test_plan_runs_every_on_time_slot_and_nothing_early() -> None:
    every = Schedule("tick", "app.tick", every=1)
    assert plan_slots(every, T0, T0 + timedelta(seconds=0.999)) == ([], False)
    assert plan_slots(every, T0, T0 + timedelta(seconds=2.5), grace=3) == (
        [T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)],
        False,
    )


def test_plan_runs_missed_slots_once_at_the_latest() -> None:
    hourly = Schedule("hourly", "app.h", cron="0 * * * *")
    now = T0 + timedelta(hours=5, minutes=20)
    assert plan_slots(hourly, T0, now, grace=6) == ([T0 + timedelta(hours=5)], True)


def test_plan_skips_missed_slots_under_skip() -> None:
    hourly = Schedule("hourly", "app.h", cron="0 * * * *", missed="skip")
    assert plan_slots(hourly, T0, T0 + timedelta(hours=5, minutes=20), grace=6) == ([], True)
    # a slot still within the grace runs under either policy
    assert plan_slots(hourly, T0, T0 + timedelta(hours=5, seconds=3), grace=6) == (
        [T0 + timedelta(hours=5)],
        True,
    )


def test_plan_after_a_takeover_runs_the_slots_within_the_grace() -> None:
    every = Schedule("tick", "app.tick", every=1)
    now = T0 + timedelta(seconds=10.2)
    slots, missed = plan_slots(every, T0, now, grace=6)
    assert missed is True
    assert slots == [T0 + timedelta(seconds=s) for s in range(5, 11)]


async def test_in_memory_scheduler_dispatches_each_slot_in_order() -> None:
    seen: list[datetime] = []
    stop = asyncio.Event()

    async def dispatch(schedule: Schedule, slot: datetime) -> None:
        assert schedule.name == "fast"
        seen.append(slot)
        if len(seen) == 4:
            stop.set()

    scheduler = Scheduler([Schedule("fast", "app.f", every=0.2)], dispatch, redis_url=None)
    await asyncio.wait_for(scheduler.run(stop), 10)
    gaps = {round((b - a).total_seconds(), 3) for a, b in itertools.pairwise(seen)}
    assert gaps == {0.2}
    assert all(slot.tzinfo is not None for slot in seen)


async def test_in_memory_scheduler_retries_a_failed_dispatch_as_missed() -> None:
    attempts: list[datetime] = []
    stop = asyncio.Event()

    async def dispatch(schedule: Schedule, slot: datetime) -> None:
        attempts.append(slot)
        if len(attempts) == 1:
            raise ConnectionError("broker down")
        stop.set()

    scheduler = Scheduler([Schedule("s", "app.s", every=0.5)], dispatch, None, grace=5)
    await asyncio.wait_for(scheduler.run(stop), 10)
    # the retry came after the pause and ran the failed slot (still within the grace) again
    assert attempts[1] == attempts[0]


@pytest.mark.parametrize(
    "cron", ["30 1 * * *", "30 2 * * *", "0 * * * *", "*/30 * * * *", "0 30 1 * * *"]
)
@pytest.mark.parametrize("window", [SPRING, FALL], ids=["spring", "fall"])
def test_previous_and_next_slot_agree_across_the_change(
    cron: str, window: tuple[datetime, datetime]
) -> None:
    schedule = Schedule("dst", "app.dst", cron=cron, timezone="America/New_York")
    t = window[0].astimezone(UTC)
    while t < window[1]:
        before, after = schedule.previous_slot(t), schedule.next_slot(t)
        assert before is not None
        assert before.astimezone(UTC) <= t < after.astimezone(UTC)
        assert schedule.next_slot(before).astimezone(UTC) == after.astimezone(UTC), t
        t += timedelta(minutes=7)
