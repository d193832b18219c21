"""Schedule triggers: cron (with time zones and DST) and every, checked by examples and against
an independent reference.

The reference knows only the small cron grammar the property tests generate, parses it itself
(no croniter or cronsim), enumerates matching local wall times, and maps each one to instants
with the rules of :mod:`worq_core.triggers` written out directly, from a table of transitions
found by scanning the zone's UTC offset. For a fixed-time expression a wall time that exists
maps to its first occurrence, and one that does not (a DST gap) to the end of the gap; for a
wildcard one (minute or hour starting with ``*``) a wall time maps to every occurrence it has,
none in a gap.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import math
import threading
import time as clock
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worq_core.errors import TaskError
from worq_core.triggers import CronTrigger, EveryTrigger, ScheduleError, Trigger

BERLIN = ZoneInfo("Europe/Berlin")


def at(zone: str | ZoneInfo, *fields: int, fold: int = 0) -> float:
    """The Unix time of a local wall time."""
    tz = ZoneInfo(zone) if isinstance(zone, str) else zone
    return datetime(*fields, tzinfo=tz, fold=fold).timestamp()


def utc(*fields: int) -> float:
    return at("UTC", *fields)


def local(t: float, zone: str | ZoneInfo) -> str:
    tz = ZoneInfo(zone) if isinstance(zone, str) else zone
    return datetime.fromtimestamp(t, tz).isoformat()


def ticks_between(trigger: Trigger, start: float, end: float) -> list[float]:
    """The ticks in [start, end), by iterating next_after."""
    ticks = []
    tick = trigger.next_after(start - 1e-3)
    while tick < end:
        ticks.append(tick)
        tick = trigger.next_after(tick)
    return ticks


def local_day(trigger: CronTrigger, zone: str, day: date) -> list[str]:
    """The ticks within one local calendar day, as local ISO times."""
    start = at(zone, day.year, day.month, day.day)
    following = day + timedelta(days=1)
    end = at(zone, following.year, following.month, following.day)
    return [local(tick, zone) for tick in ticks_between(trigger, start, end)]


# -- plain examples ----------------------------------------------------------------------------


def test_five_fields_in_utc() -> None:
    trigger = CronTrigger("*/5 * * * *")
    assert trigger.next_after(utc(2026, 1, 1, 12, 0)) == utc(2026, 1, 1, 12, 5)
    assert trigger.next_after(utc(2026, 1, 1, 12, 4, 59) + 0.9) == utc(2026, 1, 1, 12, 5)
    assert trigger.last_at(utc(2026, 1, 1, 12, 5)) == utc(2026, 1, 1, 12, 5)
    assert trigger.last_at(utc(2026, 1, 1, 12, 4, 59)) == utc(2026, 1, 1, 12, 0)
    assert trigger.describe() == "cron */5 * * * * (UTC)"


def test_next_after_is_strict_and_last_at_inclusive() -> None:
    trigger = CronTrigger("0 * * * *")
    tick = utc(2026, 5, 1, 7)
    assert trigger.next_after(tick) == tick + 3600
    assert trigger.next_after(tick - 1e-6) == tick
    assert trigger.last_at(tick) == tick
    assert trigger.last_at(tick - 1e-6) == tick - 3600


def test_a_zone_shifts_the_ticks() -> None:
    trigger = CronTrigger("0 9 * * 1-5", "Europe/Berlin")  # 09:00 on weekdays, Berlin time
    friday_evening = at(BERLIN, 2026, 1, 9, 18)
    assert trigger.next_after(friday_evening) == at(BERLIN, 2026, 1, 12, 9)  # Monday
    assert trigger.next_after(friday_evening) == utc(2026, 1, 12, 8)  # CET is UTC+1
    assert trigger.last_at(friday_evening) == at(BERLIN, 2026, 1, 9, 9)
    summer = at(BERLIN, 2026, 7, 1, 12)
    assert trigger.next_after(summer) == utc(2026, 7, 2, 7)  # CEST is UTC+2
    assert trigger.describe() == "cron 0 9 * * 1-5 (Europe/Berlin)"
    assert CronTrigger("0 9 * * 1-5", BERLIN).describe() == trigger.describe()


def test_six_fields_have_the_seconds_first() -> None:
    every_ten = CronTrigger("*/10 * * * * *")
    assert every_ten.next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 0, 10)
    assert every_ten.last_at(utc(2026, 1, 1, 0, 0, 29)) == utc(2026, 1, 1, 0, 0, 20)
    half_past_two = CronTrigger("15 30 2 * * *", "Europe/Berlin")  # 02:30:15 every day
    assert half_past_two.next_after(at(BERLIN, 2026, 1, 1)) == at(BERLIN, 2026, 1, 1, 2, 30, 15)
    assert half_past_two.describe() == "cron 15 30 2 * * * (Europe/Berlin)"


@pytest.mark.parametrize(
    ("macro", "after", "expected"),
    [
        ("@hourly", utc(2026, 1, 1, 10, 30), utc(2026, 1, 1, 11)),
        ("@daily", utc(2026, 1, 1, 10, 30), utc(2026, 1, 2)),
        ("@midnight", utc(2026, 1, 1, 10, 30), utc(2026, 1, 2)),
        ("@weekly", utc(2026, 1, 1, 10, 30), utc(2026, 1, 4)),  # Sunday
        ("@monthly", utc(2026, 1, 1, 10, 30), utc(2026, 2, 1)),
        ("@yearly", utc(2026, 1, 1, 10, 30), utc(2027, 1, 1)),
        ("@annually", utc(2026, 1, 1, 10, 30), utc(2027, 1, 1)),
        ("@DAILY", utc(2026, 1, 1, 10, 30), utc(2026, 1, 2)),
    ],
)
def test_macros(macro: str, after: float, expected: float) -> None:
    assert CronTrigger(macro).next_after(after) == expected


def test_a_macro_in_a_zone() -> None:
    assert CronTrigger("@daily", "America/New_York").next_after(utc(2026, 1, 1)) == utc(
        2026, 1, 1, 5
    )


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # The 13th, and every Friday: standard cron matches either.
    trigger = CronTrigger("0 0 13 * 5")
    days = [
        datetime.fromtimestamp(t, UTC).day
        for t in ticks_between(trigger, utc(2026, 2, 1), utc(2026, 3, 1))
    ]
    assert days == [6, 13, 20, 27]  # Fridays of Feb 2026, the 13th being one of them
    march = [
        datetime.fromtimestamp(t, UTC).day
        for t in ticks_between(trigger, utc(2026, 3, 1), utc(2026, 4, 1))
    ]
    assert march == [6, 13, 20, 27]
    april = [
        datetime.fromtimestamp(t, UTC).day
        for t in ticks_between(trigger, utc(2026, 4, 1), utc(2026, 5, 1))
    ]
    assert april == [3, 10, 13, 17, 24]


def test_whole_range_day_fields_still_or() -> None:
    # croniter alone reads 1-31 as "*" next to "*/2" and then ANDs: every other weekday.
    every_day = CronTrigger("0 0 1-31 * */2")
    days = ticks_between(every_day, utc(2026, 1, 1), utc(2026, 1, 8))
    assert len(days) == 7
    assert len(ticks_between(CronTrigger("0 0 */2 * */1"), utc(2026, 1, 1), utc(2026, 1, 8))) == 7


def test_an_equal_range_is_its_one_value() -> None:
    # croniter alone reads "5-5" as the whole field.
    assert CronTrigger("5-5 * * * *").next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 5)
    assert CronTrigger("5-5/2 * * * *").next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 0, 5)
    march = CronTrigger("0 0 1 mar-3 *")
    assert march.next_after(utc(2026, 1, 1)) == utc(2026, 3, 1)
    assert CronTrigger("0 0 * * sun-7").next_after(utc(2026, 1, 1)) == utc(2026, 1, 4)


def test_a_reversed_range_wraps() -> None:
    trigger = CronTrigger("0 22-1 * * *")
    hours = [
        datetime.fromtimestamp(t, UTC).hour
        for t in ticks_between(trigger, utc(2026, 1, 1, 12), utc(2026, 1, 2, 12))
    ]
    assert hours == [22, 23, 0, 1]


def test_names_and_question_marks() -> None:
    trigger = CronTrigger("0 12 ? JAN,jul MON")
    assert trigger.next_after(utc(2026, 1, 31)) == utc(2026, 7, 6, 12)


def test_rare_dates_are_found_quickly() -> None:
    leap = CronTrigger("0 0 29 2 *")
    assert leap.next_after(utc(2026, 1, 1)) == utc(2028, 2, 29)
    assert leap.last_at(utc(2026, 1, 1)) == utc(2024, 2, 29)


def test_whitespace_is_normalized_in_the_description() -> None:
    assert CronTrigger("  */5   *  * * *\t").describe() == "cron */5 * * * * (UTC)"


def test_triggers_compare_by_their_description() -> None:
    assert CronTrigger("*/5 * * * *", "UTC") == CronTrigger("*/5  * * * *")
    assert CronTrigger("*/5 * * * *") != CronTrigger("*/5 * * * *", "Europe/Berlin")
    assert len({EveryTrigger(30), EveryTrigger(timedelta(seconds=30))}) == 1
    assert CronTrigger("* * * * *") != EveryTrigger(60)
    assert "every 30s" in repr(EveryTrigger(30))


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields"),
        ("* * * * * * *", "got 7"),
        ("61 * * * *", "out of range"),
        ("* 24 * * *", "out of range"),
        ("0 0 0 * *", "out of range"),
        ("0 0 * 13 *", ""),
        ("*/0 * * * *", "step"),
        ("a b c d e", ""),
        ("0 0 30 2 *", "matches no date"),
        ("0 0 31 4,6,9,11 *", "matches no date"),
        ("R * * * *", "random (R) and hashed (H)"),
        ("H * * * *", "random (R) and hashed (H)"),
        ("0 H/2 * * *", "random (R) and hashed (H)"),
        ("@reboot", "unknown macro"),
        ("@every 5m", "unknown macro"),
    ],
)
def test_bad_expressions(expression: str, reason: str) -> None:
    with pytest.raises(ScheduleError, match="bad cron expression") as caught:
        CronTrigger(expression)
    assert reason in str(caught.value)
    assert isinstance(caught.value, TaskError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("zone", ["Nowhere/Special", "europe/berlin", "Europe", "", "../etc"])
def test_unknown_zones(zone: str) -> None:
    with pytest.raises(ScheduleError, match="unknown time zone"):
        CronTrigger("* * * * *", zone)


def test_a_zone_without_a_key_is_refused() -> None:
    data = resources.files("tzdata.zoneinfo").joinpath("Europe", "Berlin").read_bytes()
    keyless = ZoneInfo.from_file(io.BytesIO(data))
    with pytest.raises(ScheduleError, match="no key"):
        CronTrigger("* * * * *", keyless)


def test_a_wrong_type_is_a_schedule_error() -> None:
    with pytest.raises(ScheduleError):
        CronTrigger(5)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError):
        CronTrigger("* * * * *", UTC)  # type: ignore[arg-type]


def test_queries_are_fast_even_across_long_gaps() -> None:
    per_second = CronTrigger("* * * * * *", "Europe/Berlin")
    start = at(BERLIN, 2026, 4, 6)
    began = clock.perf_counter()
    assert per_second.last_at(start + 7 * 86400 + 0.5) == start + 7 * 86400
    for second in range(1000):
        per_second.next_after(start + second)
        CronTrigger.last_at(per_second, start + second)
    # About 60 microseconds a pair on a laptop; the bound only catches a search by iteration.
    assert clock.perf_counter() - began < 2.0


def test_triggers_can_be_shared_between_threads() -> None:
    trigger = CronTrigger("*/7 * * * * *", "Australia/Lord_Howe")
    start = utc(2026, 4, 4, 14)
    expected = [trigger.next_after(start + i) for i in range(300)]
    results: list[list[float]] = []

    def run() -> None:
        results.append([trigger.next_after(start + i) for i in range(300)])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 4


# -- DST examples ------------------------------------------------------------------------------


def test_a_half_past_two_job_fires_once_on_the_spring_forward_day() -> None:
    # 2026-03-29, Europe/Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    trigger = CronTrigger("30 2 * * *", "Europe/Berlin")
    assert local_day(trigger, "Europe/Berlin", date(2026, 3, 29)) == ["2026-03-29T03:00:00+02:00"]
    assert trigger.next_after(at(BERLIN, 2026, 3, 29)) == utc(2026, 3, 29, 1)
    assert trigger.last_at(utc(2026, 3, 29, 1)) == utc(2026, 3, 29, 1)
    assert trigger.last_at(utc(2026, 3, 29, 1) - 1) == at(BERLIN, 2026, 3, 28, 2, 30)
    # The days around it are ordinary.
    assert local_day(trigger, "Europe/Berlin", date(2026, 3, 28)) == ["2026-03-28T02:30:00+01:00"]
    assert local_day(trigger, "Europe/Berlin", date(2026, 3, 30)) == ["2026-03-30T02:30:00+02:00"]


def test_a_half_past_two_job_fires_once_on_the_fall_back_day() -> None:
    # 2026-10-25, Europe/Berlin: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    trigger = CronTrigger("30 2 * * *", "Europe/Berlin")
    assert local_day(trigger, "Europe/Berlin", date(2026, 10, 25)) == ["2026-10-25T02:30:00+02:00"]
    first = at(BERLIN, 2026, 10, 25, 2, 30, fold=0)
    second = at(BERLIN, 2026, 10, 25, 2, 30, fold=1)
    assert second - first == 3600
    assert trigger.next_after(at(BERLIN, 2026, 10, 25)) == first == utc(2026, 10, 25, 0, 30)
    assert trigger.next_after(first) == at(BERLIN, 2026, 10, 26, 2, 30)
    assert trigger.last_at(second) == first  # the second 02:30 is not a tick


def test_quarter_hours_across_the_spring_gap() -> None:
    trigger = CronTrigger("*/15 * * * *", "Europe/Berlin")
    day = local_day(trigger, "Europe/Berlin", date(2026, 3, 29))
    # 02:00, 02:15, 02:30 and 02:45 do not exist: a wildcard job skips the hour that did not
    # happen, and goes on at 03:00.
    assert len(day) == 96 - 4
    assert day[6:10] == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T01:45:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:15:00+02:00",
    ]
    # Inside the gap's hour of instants there is nothing to skip: 01:59 CET is 00:59 UTC.
    assert trigger.next_after(at(BERLIN, 2026, 3, 29, 1, 50)) == at(BERLIN, 2026, 3, 29, 3)


def test_quarter_hours_across_the_autumn_fold() -> None:
    trigger = CronTrigger("*/15 * * * *", "Europe/Berlin")
    day = local_day(trigger, "Europe/Berlin", date(2026, 10, 25))
    assert len(day) == 100  # a wildcard job follows real time: the day has 25 hours
    assert day[8:17] == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:15:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:45:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:15:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T02:45:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    during = at(BERLIN, 2026, 10, 25, 2, 20, fold=1)
    assert trigger.last_at(during) == at(BERLIN, 2026, 10, 25, 2, 15, fold=1)
    assert trigger.next_after(during) == at(BERLIN, 2026, 10, 25, 2, 30, fold=1)
    assert trigger.next_after(at(BERLIN, 2026, 10, 25, 2, 45, fold=0)) == at(
        BERLIN, 2026, 10, 25, 2, 0, fold=1
    )


def test_fixed_times_in_the_repeated_hour_fire_once() -> None:
    # Minute and hour both fixed: each wall time fires once, in the fold's first pass.
    trigger = CronTrigger("0,15,30,45 2 * * *", "Europe/Berlin")
    assert local_day(trigger, "Europe/Berlin", date(2026, 10, 25)) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:15:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:45:00+02:00",
    ]
    during = at(BERLIN, 2026, 10, 25, 2, 20, fold=1)
    assert trigger.last_at(during) == at(BERLIN, 2026, 10, 25, 2, 45, fold=0)
    assert trigger.next_after(during) == at(BERLIN, 2026, 10, 26, 2)
    # In the gap they collapse into its end, once.
    assert local_day(trigger, "Europe/Berlin", date(2026, 3, 29)) == ["2026-03-29T03:00:00+02:00"]


def test_which_expressions_follow_real_time() -> None:
    assert CronTrigger("*/5 * * * *").wildcard
    assert CronTrigger("0 * * * *").wildcard
    assert CronTrigger("*/10 30 2 * * *").wildcard is False  # seconds do not count
    assert CronTrigger("@hourly").wildcard
    assert not CronTrigger("@daily").wildcard
    assert not CronTrigger("30 2 * * *").wildcard
    assert not CronTrigger("0 9-17 * * mon-fri").wildcard


def test_per_second_ticks_across_the_gap_and_the_fold() -> None:
    trigger = CronTrigger("*/20 * * * * *", "Europe/Berlin")
    gap_end = utc(2026, 3, 29, 1)
    assert ticks_between(trigger, gap_end - 40, gap_end + 41) == [
        gap_end - 40,
        gap_end - 20,
        gap_end,
        gap_end + 20,
        gap_end + 40,
    ]
    fold_start = utc(2026, 10, 25, 1)  # 03:00 CEST becomes 02:00 CET
    ticks = ticks_between(trigger, fold_start - 40, fold_start + 3600 + 41)
    # Every 20 s of real time, through both passes of the repeated hour.
    assert ticks == [fold_start + n for n in range(-40, 3641, 20)]


def test_new_york() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT; 2026-11-01: 02:00 EDT falls back to 01:00 EST.
    zone = "America/New_York"
    daily = CronTrigger("30 2 * * *", zone)
    assert local_day(daily, zone, date(2026, 3, 8)) == ["2026-03-08T03:00:00-04:00"]
    assert local_day(daily, zone, date(2026, 11, 1)) == ["2026-11-01T02:30:00-05:00"]
    one_thirty = CronTrigger("30 1 * * *", zone)
    assert local_day(one_thirty, zone, date(2026, 11, 1)) == ["2026-11-01T01:30:00-04:00"]
    quarters = CronTrigger("*/15 * * * *", zone)
    assert len(local_day(quarters, zone, date(2026, 3, 8))) == 92
    assert len(local_day(quarters, zone, date(2026, 11, 1))) == 100


def test_lord_howe_shifts_by_half_an_hour() -> None:
    # Australia/Lord_Howe: +10:30 standard, +11 summer. 2026-04-05 02:00 falls back to 01:30;
    # 2026-10-04 02:00 jumps to 02:30.
    zone = "Australia/Lord_Howe"
    daily = CronTrigger("15 2 * * *", zone)
    assert local_day(daily, zone, date(2026, 10, 4)) == ["2026-10-04T02:30:00+11:00"]
    fold = CronTrigger("45 1 * * *", zone)
    assert local_day(fold, zone, date(2026, 4, 5)) == ["2026-04-05T01:45:00+11:00"]
    quarters = CronTrigger("*/15 * * * *", zone)
    spring = local_day(quarters, zone, date(2026, 10, 4))
    assert len(spring) == 96 - 2  # 02:00 and 02:15 do not exist
    assert "2026-10-04T01:45:00+10:30" in spring
    assert "2026-10-04T02:30:00+11:00" in spring
    autumn = local_day(quarters, zone, date(2026, 4, 5))
    assert len(autumn) == 98  # 01:30 and 01:45 happen twice
    assert autumn[6:11] == [
        "2026-04-05T01:30:00+11:00",
        "2026-04-05T01:45:00+11:00",
        "2026-04-05T01:30:00+10:30",
        "2026-04-05T01:45:00+10:30",
        "2026-04-05T02:00:00+10:30",
    ]


def test_a_southern_hemisphere_zone() -> None:
    # Australia/Sydney: summer time ends 2026-04-05 03:00 AEDT -> 02:00 AEST and begins
    # 2026-10-04 02:00 AEST -> 03:00 AEDT: the year's gap comes in October.
    zone = "Australia/Sydney"
    daily = CronTrigger("30 2 * * *", zone)
    assert local_day(daily, zone, date(2026, 4, 5)) == ["2026-04-05T02:30:00+11:00"]
    assert local_day(daily, zone, date(2026, 10, 4)) == ["2026-10-04T03:00:00+11:00"]
    quarters = CronTrigger("*/15 * * * *", zone)
    assert len(local_day(quarters, zone, date(2026, 4, 5))) == 100
    assert len(local_day(quarters, zone, date(2026, 10, 4))) == 92


def test_a_gap_at_midnight() -> None:
    # America/Santiago springs forward at 24:00: 2026-09-06 00:00 does not exist.
    zone = "America/Santiago"
    midnight = CronTrigger("0 0 * * *", zone)
    assert local_day(midnight, zone, date(2026, 9, 6)) == ["2026-09-06T01:00:00-03:00"]
    assert midnight.last_at(at(zone, 2026, 9, 6, 12)) == at(zone, 2026, 9, 6, 1)


# -- property tests against the reference ------------------------------------------------------

ZONES = [
    "UTC",
    "Asia/Tokyo",  # no DST
    "Asia/Kolkata",  # +05:30, no DST
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/St_Johns",  # -03:30 / -02:30
    "America/Santiago",  # southern, transitions at midnight
    "Australia/Sydney",  # southern
    "Australia/Lord_Howe",  # half-hour shifts
    "Pacific/Chatham",  # +12:45 / +13:45
    "Africa/Casablanca",  # an hour back for Ramadan, moving every year
]

FROM = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
UNTIL = int(datetime(2031, 1, 1, tzinfo=UTC).timestamp())
SCAN_FROM, SCAN_UNTIL = FROM - 366 * 86400, UNTIL + 366 * 86400
"""The reference knows the zones' offsets over these instants: 2019-2031."""


def offset_at(zone: ZoneInfo, instant: int) -> int:
    offset = datetime.fromtimestamp(instant, zone).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


@functools.cache
def transitions(key: str) -> tuple[tuple[int, int, int], ...]:
    """(instant, offset before, offset after) of each change of the zone's offset, in seconds.

    Found by scanning the offset every six hours (no zone here changes twice within that),
    then minute by minute and second by second where it changed.
    """
    zone = ZoneInfo(key)
    found = []
    step = 6 * 3600
    for instant in range(SCAN_FROM, SCAN_UNTIL, step):
        before, after = offset_at(zone, instant), offset_at(zone, instant + step)
        if before == after:
            continue
        minute = next(
            m for m in range(instant, instant + step + 1, 60) if offset_at(zone, m) != before
        )
        second = next(s for s in range(minute - 60, minute + 1) if offset_at(zone, s) != before)
        found.append((second, before, after))
    return tuple(found)


@functools.cache
def periods(key: str) -> tuple[list[int], list[int]]:
    """The zone as a table: the instants its offsets start at, and the offsets."""
    starts = [SCAN_FROM] + [instant for instant, _, _ in transitions(key)]
    offsets = [offset_at(ZoneInfo(key), SCAN_FROM)] + [after for _, _, after in transitions(key)]
    return starts, offsets


def occurrences(key: str, wall: int) -> list[int]:
    """Every instant whose local wall clock reads ``wall`` (seconds): none in a gap, two in a
    fold."""
    starts, offsets = periods(key)
    assert SCAN_FROM + 86400 < wall < SCAN_UNTIL - 86400, "outside the table"
    found = []
    for offset in set(offsets):
        instant = wall - offset
        # An occurrence: the instant reads ``wall`` because its period has this offset.
        if offsets[bisect.bisect_right(starts, instant) - 1] == offset:
            found.append(instant)
    return sorted(found)


def reference_instants(key: str, wall: int, wildcard: bool) -> list[int]:
    """The rules, for a matching wall time in seconds. Wildcard: every occurrence. Fixed: its
    first occurrence, if any, else the end of the gap it falls in."""
    found = occurrences(key, wall)
    if wildcard or found:
        return found if wildcard else found[:1]
    for instant, before, after in transitions(key):
        if instant + before <= wall < instant + after:
            return [instant]
    raise AssertionError(f"wall second {wall} in {key} does not occur, yet lies in no gap")


def largest_shift(key: str, t: float, reach: int) -> int:
    """The largest offset change within ``reach`` seconds of ``t``; 0 if there is none."""
    return max(
        (
            abs(after - before)
            for instant, before, after in transitions(key)
            if abs(instant - t) <= reach
        ),
        default=0,
    )


RANGES = {
    "second": (0, 59),
    "minute": (0, 59),
    "hour": (0, 23),
    "day": (1, 31),
    "month": (1, 12),
    "weekday": (0, 6),
}


def parse(text: str, field: str) -> frozenset[int]:
    """The values of one field in the generated grammar: *, n, */k, a-b, a-b/k, a,b."""
    low, high = RANGES[field]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first, last = (int(bound) for bound in base.split("-"))
        else:
            first = last = int(base)
        values.update(range(first, last + 1, int(step or 1)))
    return frozenset(values)


EPOCH_DAY = date(1970, 1, 1)


@dataclass(frozen=True)
class Spec:
    """A parsed expression of the generated grammar."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    either_day: bool
    """Both day fields are restricted (written other than "*"): either may match (POSIX)."""
    wildcard: bool
    """The minute or the hour field starts with "*": ticks follow real time across DST."""

    @classmethod
    def of(cls, expression: str) -> Spec:
        fields = expression.split()
        if len(fields) == 5:
            fields.insert(0, "0")
        second, minute, hour, day, month, weekday = fields
        return cls(
            tuple(sorted(parse(second, "second"))),
            tuple(sorted(parse(minute, "minute"))),
            tuple(sorted(parse(hour, "hour"))),
            parse(day, "day"),
            parse(month, "month"),
            parse(weekday, "weekday"),
            either_day=day != "*" and weekday != "*",
            wildcard=minute.startswith("*") or hour.startswith("*"),
        )

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = (day.weekday() + 1) % 7 in self.weekdays  # cron: 0 is Sunday
        return (by_date or by_weekday) if self.either_day else (by_date and by_weekday)

    def walls(self, start: int, end: int) -> Iterator[int]:
        """The matching wall times in [start, end], in order, as seconds of the local clock
        counted like Unix times.

        The same times a second-by-second scan with a matcher would find, without visiting
        the seconds that cannot match.
        """
        day = EPOCH_DAY + timedelta(days=start // 86400)
        while (midnight := (day - EPOCH_DAY).days * 86400) <= end:
            if self.matches_day(day):
                for hour in self.hours:
                    for minute in self.minutes:
                        for second in self.seconds:
                            wall = midnight + hour * 3600 + minute * 60 + second
                            if start <= wall <= end:
                                yield wall
            day += timedelta(days=1)


def reference(
    expression: str, key: str, t: float, spans: list[timedelta]
) -> tuple[float, float] | None:
    """(first tick after t, last tick at or before t), or None if no window settles them.

    The instants of the walls within a window around t's wall clock reading are sorted. For a
    fixed-time expression walls map to instants in order, so walls before (after) the window
    fire no later (no earlier) than the window's first (last) wall, and once the window's
    ticks straddle t, ticks outside it cannot be either answer. A wildcard expression's fold
    reads walls twice, so a wall outside the window may fire up to the fold's shift closer to
    t than the window's edge: answers must lie that much inside it.
    """
    spec = Spec.of(expression)
    reading = math.floor(t) + offset_at(ZoneInfo(key), math.floor(t))
    for span in spans:
        width = int(span.total_seconds())
        walls = spec.walls(reading - width, reading + width)
        instants = sorted(
            {i for wall in walls for i in reference_instants(key, wall, spec.wildcard)}
        )
        if not (instants and instants[0] <= t < instants[-1]):
            continue
        following = next(i for i in instants if i > t)
        latest = [i for i in instants if i <= t][-1]
        margin = largest_shift(key, t, width + 86400) if spec.wildcard else 0
        if following - t < width - margin and t - latest < width - margin:
            return float(following), float(latest)
    return None


def field_strategy(field: str, star: int) -> st.SearchStrategy[str]:
    """One field of the grammar; ``star`` weighs "*" against the other forms."""
    low, high = RANGES[field]
    value = st.integers(low, high)
    step = st.integers(1, max(1, (high - low) // 2))
    ordered = st.tuples(value, value).map(sorted)
    return st.one_of(
        *[st.just("*")] * star,
        value.map(str),
        step.map(lambda k: f"*/{k}"),
        ordered.map(lambda ab: f"{ab[0]}-{ab[1]}"),
        st.tuples(value, value).map(lambda ab: f"{ab[0]},{ab[1]}"),
        st.tuples(ordered, step).map(lambda abk: f"{abk[0][0]}-{abk[0][1]}/{abk[1]}"),
    )


five_fields = st.tuples(
    field_strategy("minute", 1),
    field_strategy("hour", 2),
    field_strategy("day", 4),
    field_strategy("month", 8),
    field_strategy("weekday", 3),
).map(" ".join)

# With seconds the reference's windows stay short, so the day fields are left open and the
# hours mostly so; what is tested is the seconds, and where they fall around transitions.
six_fields = st.tuples(
    field_strategy("second", 1),
    field_strategy("minute", 1),
    field_strategy("hour", 6),
    st.just("*"),
    st.just("*"),
    st.just("*"),
).map(" ".join)


@st.composite
def instants(draw: st.DrawFn, key: str) -> float:
    """A time in 2020-2030, half of the time within a day and a half of a DST transition."""
    nearby = [instant for instant, _, _ in transitions(key) if FROM <= instant < UNTIL]
    if nearby and draw(st.booleans()):
        # Mostly within the two hours either side, where a gap's or a fold's ticks go.
        distance = st.sampled_from([36 * 3600, 2 * 3600, 2 * 3600, 120]).flatmap(
            lambda span: st.integers(-span, span)
        )
        base = draw(st.sampled_from(nearby)) + draw(distance)
    else:
        base = draw(st.integers(FROM, UNTIL))
    if draw(st.booleans()):
        base -= base % 60  # on a whole minute, often a tick itself
    return base + draw(st.sampled_from([0.0, 0.0, 0.25, 0.999]))


def check_against_reference(expression: str, key: str, t: float, spans: list[timedelta]) -> None:
    spec, first = Spec.of(expression), date(2020, 1, 1)
    if not any(spec.matches_day(first + timedelta(days=n)) for n in range(9 * 366)):
        # Only an expression that matches no date at all is refused.
        with pytest.raises(ScheduleError, match="matches no date"):
            CronTrigger(expression, key)
        return
    trigger = CronTrigger(expression, key)
    expected = reference(expression, key, t, spans)
    assume(expected is not None)
    assert expected is not None
    following, latest = expected
    assert trigger.next_after(t) == following, (local(following, key), t)
    assert trigger.last_at(t) == latest, (local(latest, key), t)


FIVE_FIELD_SPANS = [timedelta(hours=2), timedelta(days=2), timedelta(days=20), timedelta(days=200)]
SIX_FIELD_SPANS = [
    timedelta(minutes=3),
    timedelta(hours=1, minutes=5),
    timedelta(hours=3),
    timedelta(hours=13),
]


@settings(max_examples=300, deadline=None)
@given(st.data(), five_fields, st.sampled_from(ZONES))
def test_five_fields_match_the_reference(data: st.DataObject, expression: str, key: str) -> None:
    check_against_reference(expression, key, data.draw(instants(key)), FIVE_FIELD_SPANS)


@settings(max_examples=150, deadline=None)
@given(st.data(), six_fields, st.sampled_from(ZONES))
def test_six_fields_match_the_reference(data: st.DataObject, expression: str, key: str) -> None:
    check_against_reference(expression, key, data.draw(instants(key)), SIX_FIELD_SPANS)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.sampled_from(ZONES))
def test_iteration_visits_each_tick_once_in_order(data: st.DataObject, key: str) -> None:
    expression = data.draw(
        st.sampled_from(["*/15 * * * *", "*/7 * * * *", "0,30 1-3 * * *", "*/17 */13 * * * *"])
    )
    trigger = CronTrigger(expression, key)
    t = data.draw(instants(key))
    ticks = ticks_between(trigger, t, t + 6 * 3600)
    assert ticks == sorted(set(ticks))
    for earlier, later in itertools.pairwise(ticks):
        assert trigger.last_at(later - 1e-3) == earlier
        assert trigger.last_at(later) == later


def test_the_reference_knows_the_transitions() -> None:
    # Berlin changes twice a year; Tokyo never; the table holds what the tests bias towards.
    assert len([i for i, _, _ in transitions("Europe/Berlin") if FROM <= i < UNTIL]) == 22
    assert transitions("Asia/Tokyo") == ()
    assert (int(utc(2026, 3, 29, 1)), 3600, 7200) in transitions("Europe/Berlin")


# -- every -------------------------------------------------------------------------------------


def test_every_ticks_on_multiples_of_the_interval() -> None:
    trigger = EveryTrigger(timedelta(seconds=30))
    assert trigger.next_after(1000.0) == 1020.0
    assert trigger.next_after(1020.0) == 1050.0
    assert trigger.last_at(1020.0) == 1020.0
    assert trigger.last_at(1049.9) == 1020.0
    assert trigger.describe() == "every 30s"
    assert EveryTrigger(30) == trigger


def test_every_with_an_anchor() -> None:
    trigger = EveryTrigger(0.5, anchor=10.25)
    assert trigger.next_after(0.0) == 10.25  # the anchor is the first tick
    assert trigger.last_at(10.0) is None
    assert trigger.last_at(10.25) == 10.25
    assert trigger.next_after(10.25) == 10.75
    assert trigger.last_at(11.3) == 11.25
    assert trigger.describe() == "every 0.5s from 10.25"
    assert EveryTrigger(timedelta(days=1), anchor=1_700_000_000).describe() == (
        "every 86400s from 1700000000"
    )


def test_every_with_the_default_anchor_has_no_tick_before_the_epoch() -> None:
    trigger = EveryTrigger(60)
    assert trigger.last_at(-1.0) is None
    assert trigger.next_after(-1.0) == 0.0


@pytest.mark.parametrize(
    "interval",
    [0, -1, -0.5, timedelta(0), timedelta(seconds=-5), math.inf, math.nan, 1e-4, True, "30"],
)
def test_every_refuses_bad_intervals(interval: object) -> None:
    with pytest.raises(ScheduleError, match="interval"):
        EveryTrigger(interval)  # type: ignore[arg-type]


@pytest.mark.parametrize("anchor", [math.inf, -math.inf, math.nan, "0"])
def test_every_refuses_bad_anchors(anchor: object) -> None:
    with pytest.raises(ScheduleError, match="anchor"):
        EveryTrigger(60, anchor=anchor)  # type: ignore[arg-type]


intervals = st.one_of(
    st.integers(1, 10 * 86400).map(float),
    st.floats(0.001, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.001, 0.1, 0.3, 1 / 3, 7.5, 86400.0]),
)
anchors = st.one_of(
    st.just(0.0),
    st.integers(-(10**9), 2 * 10**9).map(float),
    st.floats(-1e9, 2e9, allow_nan=False, allow_infinity=False),
)
times = st.one_of(
    st.floats(-1e9, 3e9, allow_nan=False, allow_infinity=False),
    st.integers(-(10**9), 3 * 10**9).map(float),
)


def tick_index(trigger: EveryTrigger, tick: float) -> int:
    """k with anchor + k * interval == tick exactly; fails if ``tick`` is no such float."""
    k = round((tick - trigger.anchor) / trigger.interval)
    matches = [
        j for j in (k - 1, k, k + 1) if j >= 0 and trigger.anchor + j * trigger.interval == tick
    ]
    assert matches, (tick, trigger)
    return matches[0]


@settings(max_examples=500, deadline=None)
@given(intervals, anchors, times)
def test_every_matches_arithmetic(interval: float, anchor: float, t: float) -> None:
    trigger = EveryTrigger(interval, anchor=anchor)
    following = trigger.next_after(t)
    latest = trigger.last_at(t)
    assert following > t
    k = tick_index(trigger, following)
    if t < anchor:
        assert latest is None
        assert following == anchor
        return
    assert latest is not None
    assert latest <= t
    j = tick_index(trigger, latest)
    assert anchor + (j + 1) * interval > t  # nothing between the last tick and t
    assert k == j + 1  # and the next tick is the one after it


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3600), st.integers(-(10**6), 10**6), st.integers(-(10**9), 3 * 10**9))
def test_every_with_whole_seconds_is_exact(interval: int, anchor: int, t: int) -> None:
    trigger = EveryTrigger(interval, anchor=anchor)
    if t < anchor:
        assert trigger.last_at(t) is None
        assert trigger.next_after(t) == anchor
    else:
        last = anchor + (t - anchor) // interval * interval
        assert trigger.last_at(t) == last
        assert trigger.next_after(t) == last + interval
