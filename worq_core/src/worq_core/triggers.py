"""Schedule triggers: the tick times of a periodic schedule, as Unix times.

A trigger answers two questions for the scheduler, both pure and cheap enough to ask every
second: :meth:`Trigger.next_after` (the first tick strictly after a time) and
:meth:`Trigger.last_at` (the latest tick at or before a time). Tick times depend on the
trigger alone, never on when a worker looks, so workers agree on them without talking.

:class:`CronTrigger` takes a cron expression: five fields (minute hour day-of-month month
day-of-week), six with the seconds *first* (as BullMQ, Quartz and Spring have it:
``"*/10 * * * * *"`` is every ten seconds), or a macro (``@hourly``, ``@daily``,
``@midnight``, ``@weekly``, ``@monthly``, ``@yearly``, ``@annually``). When day-of-month and
day-of-week are both restricted (neither is ``*`` or ``?``), a day matches if *either* does,
as POSIX cron has it. An equal range (``5-5``) is that one value, and a reversed range wraps
(``22-2`` in the hour field is 22, 23, 0, 1, 2). croniter parses and searches the expression;
random and hashed fields (``R``, ``H``) are refused, since workers must agree on the ticks.
This module adds the time-zone rules.

Cron ticks and time zones (zoneinfo; no zone means UTC). A tick is a local wall-clock time that
matches the expression. Around DST transitions expressions behave as in Debian's cron, which
tells two kinds apart:

* **Fixed-time** expressions (neither the minute nor the hour field starts with ``*``, as
  ``30 2 * * *`` or ``@daily``): a wall time that does not exist (the spring-forward gap, e.g.
  02:30 in Europe/Berlin on the last Sunday of March) fires once, at the first instant after
  the gap (03:00 local), and several gap ticks collapse to that one instant; a wall time that
  occurs twice (the autumn fold) fires once, at its first occurrence (``fold=0``). So a 02:30
  daily job fires exactly once on both transition days. This map from wall time to instant
  never goes backwards, which lets the trigger search in wall time (croniter, on naive
  datetimes) and map the result to an instant afterwards.
* **Wildcard** expressions (the minute or the hour field starts with ``*``, as ``*/5 * * * *``,
  ``0 * * * *`` or ``@hourly``) follow real time: they fire at every instant whose wall clock
  reading matches, so in both passes of a fold (a job every five minutes keeps running every
  five minutes through the repeated hour) and never for wall times that do not exist (the gap
  is an hour that did not happen).

:class:`EveryTrigger` ticks at ``anchor + k * interval`` for ``k = 0, 1, 2, ...``.
"""

from __future__ import annotations

import math
import re
import threading
from abc import ABC, abstractmethod
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, CroniterError, croniter
from croniter.croniter import DOW_ALPHAS, M_ALPHAS

from worq_core.errors import ScheduleError

__all__ = ["CronTrigger", "EveryTrigger", "ScheduleError", "Trigger"]

MIN_INTERVAL = 0.001
"""The shortest ``every`` interval, in seconds. Below it float tick times near today's Unix
times (spaced about 0.24 microseconds apart) would no longer be distinct enough to count on."""

_NAIVE_EPOCH = datetime(1970, 1, 1)

# croniter expands "R" (random) and "H" (hashed) fields itself. A random field differs in every
# process, so workers would disagree on ticks; hashing needs an id the trigger does not have.
_RANDOM_OR_HASHED = re.compile(r"[rh](\(\d+-\d+\))?(/\d+)?", re.ASCII | re.IGNORECASE)

_RANGE = re.compile(r"(\w+)-(\w+)(/\d+)?", re.ASCII)

# Positions in croniter's field order (minute hour day month weekday, then the seconds); the
# package does not export the weekday's.
_DAY_FIELD, _DOW_FIELD = 2, 4

# croniter's macros (the table is private to croniter._expand); "@reboot" has no tick times.
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class Trigger(ABC):
    """When a periodic schedule's ticks are; pure, and safe to share between threads."""

    @abstractmethod
    def next_after(self, t: float) -> float:
        """Unix time of the first tick strictly after ``t``."""

    @abstractmethod
    def last_at(self, t: float) -> float | None:
        """Unix time of the latest tick at or before ``t``; ``None`` if there is none."""

    @abstractmethod
    def describe(self) -> str:
        """Stable text naming the trigger, such as ``cron */5 * * * * (Europe/Berlin)``.

        Used in schedule names: equal text means equal ticks.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trigger):
            return NotImplemented
        return type(self) is type(other) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((type(self), self.describe()))


def _zone(tz: str | ZoneInfo | None) -> ZoneInfo:
    if tz is None:
        return ZoneInfo("UTC")
    if isinstance(tz, ZoneInfo):
        # describe() names the zone, and schedule names must mean the same in every process:
        # a zone read from a file (ZoneInfo.from_file) has no name to give.
        if tz.key is None:
            raise ScheduleError(f"time zone {tz!r} has no key; use ZoneInfo(key) or a key string")
        return tz
    if not isinstance(tz, str):
        raise ScheduleError(f"time zone must be a zone key or a ZoneInfo, not {tz!r}")
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError, OSError) as exc:  # not found, malformed key, a directory
        raise ScheduleError(f"unknown time zone {tz!r}: {exc}") from exc


class CronTrigger(Trigger):
    """Ticks at the local wall-clock times in ``tz`` that match a cron expression.

    ``expression`` has five fields, six with the seconds first, or is a macro such as
    ``@daily``; ``tz`` is a zone key or a :class:`~zoneinfo.ZoneInfo` (``None`` means UTC).
    Around DST transitions a fixed-time expression fires a wall time skipped by a gap at the
    first instant after the gap (several such ticks fire once) and a repeated wall time at its
    first occurrence; a wildcard expression (minute or hour starting with ``*``) fires at every
    instant whose wall clock matches (see the module docstring). Raises
    :class:`ScheduleError` for a bad expression, one that never matches, or an unknown zone.
    """

    def __init__(self, expression: str, tz: str | ZoneInfo | None = None) -> None:
        if not isinstance(expression, str):
            raise ScheduleError(f"cron expression must be a string, not {expression!r}")
        self.expression = " ".join(expression.split())
        """The expression as given, with its whitespace collapsed."""
        self.zone = _zone(tz)
        """The zone whose wall clock the expression is read in."""
        fields = self.expression.split(" ")
        if not self.expression.startswith("@") and len(fields) not in (5, 6):
            raise self._bad(
                f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 "
                f"(second first), got {len(fields)}"
            )
        for field in fields:
            if any(_RANDOM_OR_HASHED.fullmatch(part) for part in [field, *field.split(",")]):
                raise self._bad(
                    f"random (R) and hashed (H) fields are not supported ({field!r}): "
                    f"every worker must compute the same ticks"
                )
        if self.expression.startswith("@") and self.expression.lower() not in _MACROS:
            raise self._bad(f"unknown macro; the known ones are {', '.join(_MACROS)}")
        if self.expression.startswith("@"):
            self.wildcard = self.expression.lower() == "@hourly"
        else:
            minute, hour = fields[-5], fields[-4]
            self.wildcard = minute.startswith("*") or hour.startswith("*")
        """Whether it follows real time across DST transitions (minute or hour starts with
        ``*``), rather than firing each wall time once."""
        text = self.expression if self.expression.startswith("@") else _single_values(fields)
        try:
            self._cron = _day_or_fixed(croniter(text, 0.0, second_at_beginning=True))
        except CroniterError as exc:
            raise self._bad(str(exc)) from exc
        # croniter is stateful (it keeps a current time), so calls share it under a lock:
        # building one per call costs several times the query itself.
        self._lock = threading.Lock()
        # croniter accepts dates that never come ("0 0 30 2 *") and only fails when asked for
        # a tick; ask once now. A satisfiable expression matches within 8 years (Feb 29th).
        try:
            self._next_wall(_wall_seconds(datetime(2000, 1, 1)))
        except CroniterBadDateError as exc:
            raise self._bad("it matches no date") from exc

    def _bad(self, reason: str) -> ScheduleError:
        return ScheduleError(f"bad cron expression {self.expression!r}: {reason}")

    def describe(self) -> str:
        """``cron <expression> (<zone key>)``, for example ``cron 30 2 * * * (UTC)``."""
        return f"cron {self.expression} ({self.zone.key})"

    def next_after(self, t: float) -> float:
        """Unix time of the first tick strictly after ``t`` (DST rules as in the class)."""
        try:
            if self.wildcard:
                return float(self._next_real(math.floor(t)))
            return self._instant(self._next_wall(self._wall_bound(t)))
        except (CroniterBadDateError, OverflowError, ValueError, OSError) as exc:
            raise ScheduleError(f"{self.describe()}: no tick after {t!r} ({exc})") from exc

    def last_at(self, t: float) -> float | None:
        """Unix time of the latest tick at or before ``t`` (DST rules as in the class).

        ``None`` only if there is none within the dates Python can represent.
        """
        try:
            if self.wildcard:
                return float(self._last_real(math.floor(t)))
            return self._instant(self._prev_wall(self._wall_bound(t)))
        except (CroniterBadDateError, OverflowError, ValueError, OSError):
            return None

    # Wall times are whole seconds on the local clock, counted like Unix times ("wall
    # seconds"), so croniter can search them as if they were UTC. Instants are Unix times.

    def _next_wall(self, wall: int) -> int:
        """The first matching wall time strictly after ``wall``."""
        with self._lock:
            return int(self._cron.get_next(float, float(wall)))

    def _prev_wall(self, wall: int) -> int:
        """The latest matching wall time at or before ``wall``."""
        # get_prev is strictly before its start; ticks are whole seconds.
        with self._lock:
            return int(self._cron.get_prev(float, float(wall + 1)))

    def _offset(self, instant: int) -> int:
        """The zone's UTC offset at ``instant``, in seconds."""
        return _offset_of(datetime.fromtimestamp(instant, self.zone))

    def _transition(self, before: int, after: int) -> int:
        """The first instant in ``(before, after]`` with the offset of ``after``.

        The two instants must have different offsets, with a single change between them.
        Transitions fall on whole seconds, and the search is a bisection: a dozen look-ups
        for a two-hour span, and only for times within a DST gap or fold.
        """
        old = self._offset(before)
        while after - before > 1:
            middle = (before + after) // 2
            if self._offset(middle) == old:
                before = middle
            else:
                after = middle
        return after

    def _instant(self, wall: int) -> float:
        """The instant a matching wall time fires at: the rules of the module docstring."""
        first, second = self._offsets(wall)
        if first >= second:
            # Unambiguous, or a fold: fold=0 is the first occurrence, at the earlier offset.
            return float(wall - first)
        # A gap: fold=0 reads the wall with the offset from before the gap, fold=1 with the
        # one after, so the gap's end (the first instant after it) lies between the two.
        return float(self._transition(wall - second, wall - first))

    def _offsets(self, wall: int) -> tuple[int, int]:
        """The offsets ``wall`` reads with at ``fold=0`` and ``fold=1``.

        Equal: it occurs once. The first larger: a fold, it occurs twice (first pass at the
        first offset). The first smaller: a gap, it does not occur.
        """
        naive = _NAIVE_EPOCH + timedelta(seconds=wall)
        return (
            _offset_of(naive.replace(tzinfo=self.zone, fold=0)),
            _offset_of(naive.replace(tzinfo=self.zone, fold=1)),
        )

    def _reading(self, second: int) -> tuple[int, int, int]:
        """The wall clock at instant ``second``, its offset, and the other pass's offset.

        The third is the offset of the same wall time's other occurrence in a fold (the
        second pass's while in the first pass, and the other way round), else the offset.
        """
        local = datetime.fromtimestamp(second, self.zone)
        offset = _offset_of(local)
        return second + offset, offset, _offset_of(local.replace(fold=1 - local.fold))

    def _next_real(self, second: int) -> int:
        """Wildcard mode: the first instant after ``second`` whose wall clock matches."""
        wall, offset, other = self._reading(second)
        best: int | None = None
        if other < offset:
            # In a fold's first pass: the second pass, later, reads its walls again.
            shift = offset - other
            second_pass = self._transition(second, second + shift)
            start = self._next_wall(second_pass + other - 1)
            if start < second_pass + offset:  # a matching wall within the fold
                best = start - other
        while True:
            wall = self._next_wall(wall)
            first, again = self._offsets(wall)
            if first < again:  # in a gap: go on from its last wall
                wall = self._transition(wall - again, wall - first) + again - 1
                continue
            instants = [i for i in (wall - first, wall - again) if i > second]
            if instants:
                found = min(instants)
                return found if best is None else min(found, best)

    def _last_real(self, second: int) -> int:
        """Wildcard mode: the latest instant at or before ``second`` whose wall clock matches."""
        wall, offset, other = self._reading(second)
        best: int | None = None
        if other > offset:
            # In a fold's second pass: the first pass, earlier, read the walls after this one.
            shift = other - offset
            second_pass = self._transition(second - shift, second)
            end = self._prev_wall(second_pass + other - 1)
            if end > wall:
                best = end - other
        wall += 1  # _prev_wall is at or before; the loop steps strictly before
        while True:
            wall = self._prev_wall(wall - 1)
            first, again = self._offsets(wall)
            if first < again:  # in a gap: go on from the wall before it
                wall = self._transition(wall - again, wall - first) + first
                continue
            instants = [i for i in (wall - first, wall - again) if i <= second]
            if instants:
                found = max(instants)
                return found if best is None else max(found, best)

    def _wall_bound(self, t: float) -> int:
        """The wall time W with: a tick's instant is at or before ``t`` iff its wall <= W.

        Usually the wall clock reading at ``t``. During the second pass of a fold, the wall
        times of the whole fold have already fired (at their first occurrence), so W is the
        last wall second of the fold; the next tick is at or after the fold's end.
        """
        second = math.floor(t)
        local = datetime.fromtimestamp(second, self.zone)
        wall = second + _offset_of(local)
        if not local.fold:
            return wall
        first = _offset_of(local.replace(fold=0))
        # The fold is the span [T, T + shift) of instants; ``second`` lies in it.
        shift = first - _offset_of(local)
        change = self._transition(second - shift, second)
        return change + first - 1


def _single_values(fields: list[str]) -> str:
    """The expression with each equal range (``5-5``, ``mon-mon``) written as its one value.

    croniter reads an equal range as the whole field, so ``0 0 * 3-3 *`` would fire every
    day of the year and ``5-5/2`` on even minutes; in cron it is that single value.
    """
    month, weekday = len(fields) - 2, len(fields) - 1
    written = []
    for index, field in enumerate(fields):
        parts = []
        for part in field.split(","):
            match = _RANGE.fullmatch(part)
            if match:
                low, high = (_value(bound, index, month, weekday) for bound in match.group(1, 2))
                if low is not None and low == high:
                    part = match.group(1)
            parts.append(part)
        written.append(",".join(parts))
    return " ".join(written)


def _value(bound: str, index: int, month: int, weekday: int) -> int | None:
    """A range bound's number as croniter reads it (names, and 7 for Sunday); None if odd."""
    bound = bound.lower()
    if bound.isdigit():
        value = int(bound)
    elif index == month and bound in M_ALPHAS:
        value = int(M_ALPHAS[bound])
    elif index == weekday and bound in DOW_ALPHAS:
        value = int(DOW_ALPHAS[bound])
    else:
        return None
    return 0 if index == weekday and value == 7 else value


def _day_or_fixed(cron: croniter) -> croniter:
    """``cron``, or an equivalent that gets day-of-month OR day-of-week right.

    Standard cron matches a day on either field when both are restricted (neither is ``*``).
    croniter reads a field that covers its whole range (``1-31``, ``*/1``) as ``*`` when the
    other field's text contains a ``*`` (``*/2``), and then requires both: ``0 0 1-31 * */2``
    would fire every other weekday, not every day. A whole-range field on the OR side matches
    every day, so both fields become ``*``.
    """
    texts, fields = cron.expressions, cron.expanded
    restricted = all(texts[i] not in ("*", "?") for i in (_DAY_FIELD, _DOW_FIELD))
    if restricted and "*" in (fields[_DAY_FIELD][0], fields[_DOW_FIELD][0]):
        # expressions holds the seconds last (croniter's own order) after second_at_beginning.
        every_day = [
            ("*" if i in (_DAY_FIELD, _DOW_FIELD) else text) for i, text in enumerate(texts)
        ]
        return croniter(" ".join(every_day), 0.0)
    return cron


def _offset_of(moment: datetime) -> int:
    offset = moment.utcoffset()
    assert offset is not None  # aware datetimes from a ZoneInfo always have one
    return int(offset.total_seconds())


def _wall_seconds(naive: datetime) -> int:
    return int((naive - _NAIVE_EPOCH).total_seconds())


def _number(seconds: float) -> str:
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)


class EveryTrigger(Trigger):
    """Ticks at ``anchor + k * interval`` for ``k = 0, 1, 2, ...`` (Unix seconds).

    With the default anchor (the epoch) ticks are multiples of the interval, so every worker
    agrees on them; there is no tick before ``anchor``. ``interval`` is a timedelta or
    seconds, at least :data:`MIN_INTERVAL`; raises :class:`ScheduleError` otherwise.
    """

    def __init__(self, interval: timedelta | float, *, anchor: float = 0.0) -> None:
        if isinstance(interval, timedelta):
            seconds = interval.total_seconds()
        elif isinstance(interval, int | float) and not isinstance(interval, bool):
            seconds = float(interval)
        else:
            raise ScheduleError(f"interval must be a timedelta or seconds, not {interval!r}")
        if not math.isfinite(seconds) or seconds <= 0:
            raise ScheduleError(f"interval must be positive, not {interval!r}")
        if seconds < MIN_INTERVAL:
            raise ScheduleError(f"interval must be at least {MIN_INTERVAL}s, not {seconds!r}s")
        if isinstance(anchor, bool) or not isinstance(anchor, int | float):
            raise ScheduleError(f"anchor must be a Unix time, not {anchor!r}")
        if not math.isfinite(anchor):
            raise ScheduleError(f"anchor must be finite, not {anchor!r}")
        self.interval = seconds
        """Seconds between two ticks."""
        self.anchor = float(anchor)
        """The first tick, as a Unix time."""

    def describe(self) -> str:
        """``every <seconds>s``, with `` from <anchor>`` unless the anchor is the epoch."""
        text = f"every {_number(self.interval)}s"
        return text if self.anchor == 0 else f"{text} from {_number(self.anchor)}"

    def _tick(self, k: int) -> float:
        # The one formula for tick k; both queries compare against exactly these floats.
        return self.anchor + k * self.interval

    def _index(self, t: float) -> int:
        """The largest k >= 0 with tick k at or before ``t`` (which is not before anchor)."""
        k = max(0, math.floor((t - self.anchor) / self.interval))
        # The division rounds, so k can be one off; settle it against the ticks themselves.
        while k > 0 and self._tick(k) > t:
            k -= 1
        while self._tick(k + 1) <= t:
            k += 1
        return k

    def next_after(self, t: float) -> float:
        """Unix time of the first tick strictly after ``t``: ``anchor`` if ``t`` is before it."""
        if t < self.anchor:
            return self.anchor
        return self._tick(self._index(t) + 1)

    def last_at(self, t: float) -> float | None:
        """Unix time of the latest tick at or before ``t``; ``None`` before ``anchor``."""
        if t < self.anchor:
            return None
        return self._tick(self._index(t))
