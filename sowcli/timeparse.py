"""Times, durations, ranges and intervals as users type them: ``sow query``, ``sow backfill``, API.

Every parser takes the name of the parameter it reads (``--from`` on the command line, ``from`` in
the API) and raises :class:`~sowcli.errors.UsageError` naming it, e.g.
``--from '2024-13-01': not a valid time (ISO-8601, epoch ms or e.g. 7d)``.

Times (:func:`parse_time`) are returned as aware UTC datetimes:

- ``now``;
- a duration ago: ``7d``, ``24h``, ``15m``, ``30s``, ``2w`` (a leading ``-`` is accepted: ``-7d``);
- ISO-8601: ``2024-01-01``, ``2024-01-01T12:00``, ``2024-01-01T12:00:00Z``,
  ``2024-01-01T14:00:00+02:00``; a time without an offset is taken as **UTC**, a date alone as
  midnight UTC;
- epoch numbers: 9 or more digits. Values below 10^11 are **seconds** (``1704067200``), larger
  ones **milliseconds** (``1704067200000``): 10^11 ms is 1973 and 10^11 s is the year 5138, so
  the two cannot be confused for any date the exchange has data for. Shorter digit strings are
  read as ISO basic dates (``20240101``).

Intervals come from fixed sets, because QuestDB's ``SAMPLE BY`` cannot take its interval as a bind
parameter: :data:`OHLC_INTERVALS` (``1m 5m 15m 1h 4h 1d``) for OHLC queries and
:data:`KLINE_INTERVALS` (Bybit's ``1 3 5 15 30 60 120 240 360 720 D W M``, also spelled
``1m … 12h 1d 1w 1M``) for backfill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sowcli.errors import UsageError

TIME_HELP = "ISO-8601, epoch ms or e.g. 7d"
#: Oldest and newest time accepted anywhere: keeps typos like year 20244 out of the database.
MIN_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(2100, 1, 1, tzinfo=UTC)
EPOCH_MS_FROM = 10**11

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION_RE = re.compile(r"^\s*(\d{1,7})\s*(s|m|h|d|w)\s*$", re.IGNORECASE)


def utc(value: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken to be UTC already, as QuestDB returns them)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def to_epoch_ms(value: datetime) -> int:
    return int(utc(value).timestamp() * 1000)


def from_epoch_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def to_epoch_us(value: datetime) -> int:
    """Microseconds since the epoch, computed without float rounding."""
    delta = utc(value) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso(value: datetime) -> str:
    """``2024-01-01T00:00:00Z`` (microseconds only when present)."""
    text = utc(value).isoformat()
    return text.replace("+00:00", "Z")


# --- durations -----------------------------------------------------------------------------


def parse_duration(
    text: str, *, param: str = "duration", max_span: timedelta | None = None
) -> timedelta:
    """``7d``, ``24h``, ``15m``, ``30s``, ``2w`` -> timedelta (greater than zero)."""
    match = _DURATION_RE.match(text or "")
    if not match:
        raise UsageError(f"{param} {text!r}: not a valid duration (e.g. 30s, 15m, 24h, 7d, 2w)")
    span = timedelta(seconds=int(match.group(1)) * _UNITS_S[match.group(2).lower()])
    if span <= timedelta(0):
        raise UsageError(f"{param} {text!r}: must be greater than zero")
    if max_span is not None and span > max_span:
        raise UsageError(f"{param} {text!r}: at most {format_duration(max_span)}")
    return span


def format_duration(span: timedelta) -> str:
    """timedelta -> the largest whole unit: ``7d``, ``36h``, ``90s``."""
    seconds = int(span.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS_S[unit] == 0:
            return f"{seconds // _UNITS_S[unit]}{unit}"
    return f"{seconds}s"


# --- points in time ------------------------------------------------------------------------


def _bad_time(param: str, text: str, why: str | None = None) -> UsageError:
    return UsageError(f"{param} {text!r}: {why or f'not a valid time ({TIME_HELP})'}")


def parse_time(
    text: str | datetime, *, param: str = "time", now: datetime | None = None
) -> datetime:
    """A user's time (see the module docstring) -> aware UTC datetime within 2000..2100."""
    if isinstance(text, datetime):
        value = utc(text)
        shown = iso(value)
    else:
        shown = text
        raw = text.strip()
        if not raw:
            raise _bad_time(param, text)
        if raw.lower() == "now":
            value = utc(now or datetime.now(UTC))
        elif _DURATION_RE.match(raw.lstrip("-")):
            value = utc(now or datetime.now(UTC)) - parse_duration(raw.lstrip("-"), param=param)
        elif raw.isdigit() and len(raw) >= 9:
            number = int(raw)
            try:
                value = (
                    from_epoch_ms(number)
                    if number >= EPOCH_MS_FROM
                    else datetime.fromtimestamp(number, tz=UTC)
                )
            except (OverflowError, OSError, ValueError):
                raise _bad_time(param, text, "epoch value out of range") from None
        else:
            value = _parse_iso(raw, param, text)
    if not MIN_TIME <= value < MAX_TIME:
        raise _bad_time(param, shown, "out of range (2000-01-01 to 2100-01-01)")
    return value


def _parse_iso(raw: str, param: str, text: str) -> datetime:
    candidate = raw[:-1] + "+00:00" if raw[-1:] in "zZ" else raw
    try:
        if len(candidate) <= 10 and "T" not in candidate.upper():
            day = date.fromisoformat(candidate)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        return utc(datetime.fromisoformat(candidate))
    except ValueError:
        raise _bad_time(param, text) from None


# --- ranges --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open range ``[start, end)`` of aware UTC datetimes."""

    start: datetime
    end: datetime

    @property
    def span(self) -> timedelta:
        return self.end - self.start


def time_range(
    start: str | datetime | None,
    end: str | datetime | None,
    *,
    default_span: timedelta,
    max_span: timedelta | None = None,
    params: tuple[str, str] = ("from", "to"),
    now: datetime | None = None,
) -> TimeRange:
    """``--from``/``--to`` -> TimeRange; a missing ``to`` is now, a missing ``from`` is
    ``to - default_span``. Requires ``from < to`` and, when given, ``to - from <= max_span``."""
    now = utc(now or datetime.now(UTC))
    end_dt = parse_time(end, param=params[1], now=now) if end is not None else now
    start_dt = (
        parse_time(start, param=params[0], now=now) if start is not None else end_dt - default_span
    )
    if start_dt >= end_dt:
        raise UsageError(f"{params[0]} {iso(start_dt)} must be before {params[1]} {iso(end_dt)}")
    if max_span is not None and end_dt - start_dt > max_span:
        raise UsageError(
            f"{params[0]}..{params[1]} spans {format_duration(end_dt - start_dt)}: "
            f"at most {format_duration(max_span)} per request"
        )
    return TimeRange(start_dt, end_dt)


# --- intervals -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    """An OHLC bucket size: ``name`` as QuestDB's ``SAMPLE BY`` spells it, and its length."""

    name: str
    seconds: int

    @property
    def span(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    def floor(self, value: datetime) -> datetime:
        """The start of the bucket holding ``value`` (every interval here divides a day, so this
        equals QuestDB's ``ALIGN TO CALENDAR`` in UTC)."""
        us = to_epoch_us(value)
        step = self.seconds * 1_000_000
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us - us % step)


OHLC_INTERVALS: dict[str, Interval] = {
    name: Interval(name, seconds)
    for name, seconds in (
        ("1m", 60),
        ("5m", 300),
        ("15m", 900),
        ("1h", 3600),
        ("4h", 14_400),
        ("1d", 86_400),
    )
}


def parse_interval(text: str, *, param: str = "interval") -> Interval:
    """``1m 5m 15m 1h 4h 1d`` (any case) -> Interval."""
    interval = OHLC_INTERVALS.get((text or "").strip().lower())
    if interval is None:
        raise UsageError(
            f"{param} {text!r}: not a valid interval (choose from {', '.join(OHLC_INTERVALS)})"
        )
    return interval


@dataclass(frozen=True, slots=True)
class KlineInterval:
    """A Bybit kline interval: our ``name`` (stored in ``candles.interval``), Bybit's ``code``
    (the REST ``interval`` parameter) and its nominal length (a month counts 31 days)."""

    name: str
    code: str
    ms: int

    def next_start(self, start_ms: int) -> int:
        """Start of the candle after the one starting at ``start_ms`` (calendar months for M)."""
        if self.code != "M":
            return start_ms + self.ms
        start = from_epoch_ms(start_ms)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return to_epoch_ms(start.replace(year=year, month=month, day=1))


_MINUTE_MS = 60_000
KLINE_INTERVALS: dict[str, KlineInterval] = {
    k.name: k
    for k in (
        KlineInterval("1m", "1", _MINUTE_MS),
        KlineInterval("3m", "3", 3 * _MINUTE_MS),
        KlineInterval("5m", "5", 5 * _MINUTE_MS),
        KlineInterval("15m", "15", 15 * _MINUTE_MS),
        KlineInterval("30m", "30", 30 * _MINUTE_MS),
        KlineInterval("1h", "60", 60 * _MINUTE_MS),
        KlineInterval("2h", "120", 120 * _MINUTE_MS),
        KlineInterval("4h", "240", 240 * _MINUTE_MS),
        KlineInterval("6h", "360", 360 * _MINUTE_MS),
        KlineInterval("12h", "720", 720 * _MINUTE_MS),
        KlineInterval("1d", "D", 1440 * _MINUTE_MS),
        KlineInterval("1w", "W", 7 * 1440 * _MINUTE_MS),
        KlineInterval("1M", "M", 31 * 1440 * _MINUTE_MS),
    )
}
_KLINE_BY_CODE = {k.code: k for k in KLINE_INTERVALS.values()}


def parse_kline_interval(text: str, *, param: str = "interval") -> KlineInterval:
    """Bybit's codes (``1 3 5 15 30 60 120 240 360 720 D W M``) or names (``1m … 12h 1d 1w 1M``).

    ``M``/``1M`` is a month and ``1m`` a minute; other names are case-insensitive.
    """
    raw = (text or "").strip()
    if raw in _KLINE_BY_CODE or raw in KLINE_INTERVALS:
        found: KlineInterval | None = _KLINE_BY_CODE.get(raw) or KLINE_INTERVALS[raw]
    elif raw.lower() == "1mo":
        found = KLINE_INTERVALS["1M"]
    else:  # d, w, 1H, 4H, 1D...: anything but a month is case-insensitive
        by_code = raw in ("d", "w")
        found = _KLINE_BY_CODE.get(raw.upper()) if by_code else KLINE_INTERVALS.get(raw.lower())
    if found is None:
        names = " ".join(KLINE_INTERVALS)
        codes = " ".join(_KLINE_BY_CODE)
        raise UsageError(
            f"{param} {text!r}: not a Bybit kline interval (choose from {names}, or {codes})"
        )
    return found


__all__ = [
    "KLINE_INTERVALS",
    "OHLC_INTERVALS",
    "TIME_HELP",
    "Interval",
    "KlineInterval",
    "TimeRange",
    "format_duration",
    "from_epoch_ms",
    "iso",
    "parse_duration",
    "parse_interval",
    "parse_kline_interval",
    "parse_time",
    "time_range",
    "to_epoch_ms",
    "to_epoch_us",
    "utc",
]
