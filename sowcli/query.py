"""Every read sow runs against QuestDB: shared by ``sow query``, ``sow backfill`` and the API.

Functions are ``async`` and take a :data:`Database`: a psycopg ``AsyncConnection`` (opened by
:func:`connect`, ``autocommit`` on as QuestDB asks) or a ``psycopg_pool.AsyncConnectionPool``
(:func:`open_pool`, for the API). Each returns :class:`Rows` (column names + tuples, timestamps as
aware UTC datetimes), so a caller renders them as a table, JSON or CSV without knowing the query.

Rules every query here follows:

- **Values are bound, never pasted into SQL.** Symbols, markets, times and limits travel as
  parameters. The only text put into SQL is the ``SAMPLE BY`` interval (QuestDB cannot bind it),
  and it is taken from the fixed set :data:`~sowcli.timeparse.OHLC_INTERVALS`, never from input.
- **Timestamps are bound as aware UTC datetimes** (psycopg sends ``timestamptz``). Checked on
  QuestDB 9.3.4: aware, naive-UTC and ``+02:00`` datetimes, microsecond integers and ISO strings
  all compare correctly against the designated timestamp in text and binary mode, also once
  psycopg prepares the statement. QuestDB returns timestamps as naive UTC; :class:`Rows` makes
  them aware.
- **OHLC gaps are filled here, not by QuestDB.** On 9.3.4 ``SAMPLE BY … FROM … TO … FILL(PREV)``
  returns a leading bucket of uninitialised memory and drops trailing buckets, and ``FILL(NULL)``
  with ``FROM``/``TO`` repeats the previous bucket or drops the last ones depending on alignment.
  So :func:`ohlc` asks for the buckets that hold data (``SAMPLE BY … ALIGN TO CALENDAR``) and lays
  them on the bucket grid itself: ``fill="null"`` gives empty buckets, ``fill="prev"`` carries the
  previous close into open/high/low/close of an empty bucket (``ticks`` 0) — the usual meaning for
  candles, seeded with the last price before the range.
- Validation (symbol, market, interval, range, limit) raises
  :class:`~sowcli.errors.UsageError`: exit code 2 on the command line, HTTP 400 in the API.
- A table that does not exist yet raises :class:`TableMissing` with a message saying how to fill
  it; an unreachable or failing QuestDB raises :class:`~sowcli.errors.UpstreamError`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

from sowcli.config import SYMBOL_RE
from sowcli.errors import SowError, UpstreamError, UsageError
from sowcli.model import Market, market_name
from sowcli.timeparse import (
    OHLC_INTERVALS,
    Interval,
    KlineInterval,
    TimeRange,
    format_duration,
    iso,
    utc,
)

Database = psycopg.AsyncConnection[Any] | AsyncConnectionPool[psycopg.AsyncConnection[Any]]
Fill = Literal["none", "null", "prev"]
T = TypeVar("T")

MAX_LIMIT = 10_000
"""Most rows one history/candles/sql call returns."""
MAX_BUCKETS = 50_000
"""Most OHLC buckets one call lays out (7 days of 1m candles is 10,080)."""
MAX_STATS_WINDOW = timedelta(days=366)
DEFAULT_TIMEOUT_S = 30.0

QUOTE_COLUMNS = (
    "timestamp",
    "symbol",
    "market",
    "price",
    "bid",
    "ask",
    "volume",
    "turnover",
    "high24h",
    "low24h",
    "change24h",
    "mark_price",
    "index_price",
    "funding_rate",
    "open_interest",
    "seq",
)
_QUOTE_SELECT = ", ".join(QUOTE_COLUMNS)
OHLC_COLUMNS = ("timestamp", "open", "high", "low", "close", "ticks")
STATS_COLUMNS = (
    "symbol",
    "market",
    "from",
    "to",
    "count",
    "first",
    "last",
    "min",
    "max",
    "avg",
    "change",
    "change_pct",
)
CANDLE_COLUMNS = (
    "timestamp",
    "symbol",
    "market",
    "interval",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "turnover",
)


class TableMissing(SowError):
    """The table has not been created yet: nothing was stored in it."""


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rows:
    """A query's result: column names and rows (timestamps aware UTC); ``truncated`` when more
    rows matched than the limit allowed."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    truncated: bool = False

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def _aware(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v for v in row
    )


# --- validation ----------------------------------------------------------------------------


def check_symbol(text: str, *, param: str = "symbol") -> str:
    """``btcusdt`` -> ``BTCUSDT``; anything but 2-30 letters and digits -> UsageError."""
    norm = (text or "").strip().upper()
    if not SYMBOL_RE.match(norm):
        raise UsageError(
            f"{param} {text!r}: not a valid symbol (2-30 letters and digits, e.g. BTCUSDT)"
        )
    return norm


def check_market(text: str, *, param: str = "market") -> Market:
    """``spot``/``FUTURES``/... -> ``"SPOT"``/``"FUTURES"``; else UsageError."""
    try:
        return market_name(text or "")
    except ValueError:
        raise UsageError(f"{param} {text!r}: not a market (choose from SPOT, FUTURES)") from None


def check_limit(limit: int, *, param: str = "limit", maximum: int = MAX_LIMIT) -> int:
    if not 1 <= limit <= maximum:
        raise UsageError(f"{param} {limit}: must be between 1 and {maximum:,}")
    return limit


def check_range(rng: TimeRange, *, params: tuple[str, str] = ("from", "to")) -> TimeRange:
    if rng.start >= rng.end:
        raise UsageError(f"{params[0]} {iso(rng.start)} must be before {params[1]} {iso(rng.end)}")
    return rng


_READ_ONLY_FIRST = ("select", "with", "show", "explain")
_WRITE_WORDS = frozenset(
    (
        "insert",
        "update",
        "delete",
        "drop",
        "create",
        "alter",
        "truncate",
        "rename",
        "copy",
        "backup",
        "vacuum",
        "reindex",
        "grant",
        "revoke",
        "snapshot",
        "checkpoint",
        "cancel",
        "resume",
        "refresh",
        "into",
        "lock",
    )
)
_TOKEN_RE = re.compile(
    r"(?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))"
    r"""|(?P<quoted>'(?:[^']|'')*(?:'|\Z)|"(?:[^"]|"")*(?:"|\Z))"""
    r"|(?P<semi>;)|(?P<word>[A-Za-z_]\w*)|(?P<other>\S)",
    re.DOTALL,
)


def check_read_only(text: str) -> str:
    """The statement of ``text`` when it is one read-only query; UsageError otherwise.

    Read-only means: one statement (a trailing ``;`` is fine) that starts with SELECT, WITH, SHOW
    or EXPLAIN and has no writing keyword (INSERT, UPDATE, DROP, ALTER, ... INTO) outside string
    literals, quoted names and comments. QuestDB's PG wire runs only the first of several
    statements silently, so a second statement is refused rather than ignored.
    """
    words: list[str] = []
    statements = 0
    pending = False  # content seen since the last ';'
    last_semicolon = -1
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup
        if kind == "semi":
            statements += pending
            pending = False
            last_semicolon = match.start()
        elif kind == "word":
            pending = True
            words.append(match.group().lower())
        elif kind != "comment":
            pending = True
    statements += pending
    if statements == 0:
        raise UsageError('sql: empty query (e.g. sow query sql "SELECT count() FROM market_data")')
    if statements > 1:
        raise UsageError(f"sql: one statement at a time, found {statements} separated by ';'")
    if not words or words[0] not in _READ_ONLY_FIRST:
        raise UsageError(
            "sql: only read-only queries are allowed (SELECT, WITH, SHOW, EXPLAIN), "
            f"not {words[0].upper() if words else text.strip()[:20]!r}"
        )
    writes = sorted({w.upper() for w in words if w in _WRITE_WORDS})
    if writes:
        raise UsageError(f"sql: only read-only queries are allowed; found {', '.join(writes)}")
    if not pending and last_semicolon >= 0:
        text = text[:last_semicolon]  # the statement ended with ';' (then comments, if any)
    return text.strip()


# --- connections ---------------------------------------------------------------------------


def _where(url: str) -> str:
    """``host:port`` of a QuestDB URL (never the password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 8812}"


async def connect(url: str, *, timeout_s: float = 5.0) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection to QuestDB's PG wire; UpstreamError when it cannot be reached."""
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, round(timeout_s))
        )
    except psycopg.OperationalError as exc:
        raise UpstreamError(f"cannot reach QuestDB at {_where(url)}: {_first_line(exc)}") from None


def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = 5.0
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """A connection pool for the API (not opened: ``async with open_pool(url) as pool``)."""
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
        open=False,
    )


async def with_connection(
    url: str,
    work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    timeout_s: float = 5.0,
) -> T:
    """Open a connection, run ``work(conn)``, close it (what the CLI does per command)."""
    conn = await connect(url, timeout_s=timeout_s)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


_MISSING_RE = re.compile(r"table does not exist \[table=([^\]]+)\]")
_HOW_TO_FILL = {
    "market_data": "start `sow persist` (or `sow backfill --from-cache`)",
    "candles": "run `sow backfill`",
}


def _translate(exc: psycopg.Error, url_hint: str, *, user_sql: bool) -> SowError:
    message = _first_line(exc)
    missing = _MISSING_RE.search(message)
    if missing:
        table = missing.group(1)
        how = _HOW_TO_FILL.get(table)
        if how:
            return TableMissing(
                f"QuestDB has no table {table} yet: nothing stored there ({how} first)"
            )
        if user_sql:
            return UsageError(f"sql: QuestDB has no table {table}")
        return TableMissing(f"QuestDB has no table {table} yet")
    if isinstance(exc, psycopg.OperationalError):
        return UpstreamError(f"QuestDB at {url_hint} failed: {message}")
    if user_sql:
        return UsageError(f"sql: QuestDB rejected the query: {message}")
    return UpstreamError(f"QuestDB query failed: {message}")


def _url_hint(conn: psycopg.AsyncConnection[Any]) -> str:
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except psycopg.Error:  # pragma: no cover - closed connection
        return "?"


async def _run(
    conn: psycopg.AsyncConnection[Any],
    sql: str,
    params: Sequence[Any] | dict[str, Any],
    max_rows: int | None,
) -> Rows:
    async with conn.cursor() as cur:
        await cur.execute(sql, params)
        columns = tuple(d.name for d in cur.description or ())
        if max_rows is None:
            raw = await cur.fetchall()
            return Rows(columns, [_aware(r) for r in raw])
        raw = await cur.fetchmany(max_rows + 1)
        return Rows(columns, [_aware(r) for r in raw[:max_rows]], truncated=len(raw) > max_rows)


async def fetch(
    db: Database,
    sql: str,
    params: Sequence[Any] | dict[str, Any] = (),
    *,
    max_rows: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    user_sql: bool = False,
) -> Rows:
    """Run one query with bound ``params`` and return its rows (errors translated, bounded time).

    Public so that tests and the API can run their own constant SQL through the same error
    handling; user-typed SQL goes through :func:`sql` instead.
    """
    hint = "QuestDB"
    try:
        async with asyncio.timeout(timeout_s):
            if isinstance(db, AsyncConnectionPool):
                async with db.connection() as conn:
                    hint = _url_hint(conn)
                    return await _run(conn, sql, params, max_rows)
            hint = _url_hint(db)
            return await _run(db, sql, params, max_rows)
    except TimeoutError:
        waited = format_duration(timedelta(seconds=timeout_s))
        raise UpstreamError(f"QuestDB at {hint} did not answer within {waited}") from None
    except psycopg.Error as exc:
        raise _translate(exc, hint, user_sql=user_sql) from None
    except Exception as exc:  # psycopg_pool.PoolTimeout and the like
        if type(exc).__module__.startswith("psycopg_pool"):
            raise UpstreamError(f"no QuestDB connection available: {_first_line(exc)}") from None
        raise


# --- the queries ---------------------------------------------------------------------------


async def latest(db: Database, *, symbol: str | None = None, market: str | None = None) -> Rows:
    """The newest row of every (symbol, market), optionally for one symbol and/or market."""
    where: list[str] = []
    params: list[Any] = []
    if symbol is not None:
        where.append("symbol = %s")
        params.append(check_symbol(symbol))
    if market is not None:
        where.append("market = %s")
        params.append(check_market(market))
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    sql = (
        f"SELECT * FROM (SELECT {_QUOTE_SELECT} FROM market_data {clause}"
        "LATEST ON timestamp PARTITION BY symbol, market) ORDER BY symbol, market"
    )
    return await fetch(db, sql, params)


async def history(
    db: Database,
    symbol: str,
    market: str,
    rng: TimeRange,
    *,
    limit: int = 1000,
    newest_first: bool = True,
) -> Rows:
    """Quotes of one symbol and market with ``rng.start <= timestamp < rng.end``, at most
    ``limit`` of them: the newest ones, listed newest first (or oldest first with
    ``newest_first=False`` — still the newest ``limit``)."""
    params = (
        check_symbol(symbol),
        check_market(market),
        check_range(rng).start,
        rng.end,
        check_limit(limit) + 1,
    )
    sql = (
        f"SELECT {_QUOTE_SELECT} FROM market_data "
        "WHERE symbol = %s AND market = %s AND timestamp >= %s AND timestamp < %s "
        "ORDER BY timestamp DESC LIMIT %s"
    )
    rows = await fetch(db, sql, params)
    kept = rows.rows[:limit]
    if not newest_first:
        kept.reverse()
    return Rows(rows.columns, kept, truncated=len(rows.rows) > limit)


async def stats(
    db: Database,
    symbol: str,
    market: str,
    *,
    window: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> Rows:
    """One row over ``[now - window, now)``: count, first, last, min, max, avg of the price,
    ``change`` (last - first) and ``change_pct`` (percent of first; null when first is 0 or no
    rows)."""
    sym, mkt = check_symbol(symbol), check_market(market)
    if not timedelta(0) < window <= MAX_STATS_WINDOW:
        raise UsageError(f"window {format_duration(window)}: must be between 1s and 366d")
    end = utc(now or datetime.now(UTC))
    start = end - window
    sql = (
        "SELECT count() AS count, first(price) AS first, last(price) AS last, min(price) AS min, "
        "max(price) AS max, avg(price) AS avg FROM market_data "
        "WHERE symbol = %s AND market = %s AND timestamp >= %s AND timestamp < %s"
    )
    res = await fetch(db, sql, (sym, mkt, start, end))
    empty: tuple[Any, ...] = (0, None, None, None, None, None)
    count, first, last, low, high, avg = res.rows[0] if res.rows else empty
    change = last - first if first is not None and last is not None else None
    change_pct = change / first * 100 if change is not None and first else None
    row = (sym, mkt, start, end, int(count or 0), first, last, low, high, avg, change, change_pct)
    return Rows(STATS_COLUMNS, [row])


def bucket_count(interval: Interval, rng: TimeRange) -> int:
    first = interval.floor(rng.start)
    return -(-int((rng.end - first).total_seconds()) // interval.seconds)


async def ohlc(
    db: Database,
    symbol: str,
    market: str,
    interval: Interval,
    rng: TimeRange,
    *,
    fill: Fill = "none",
) -> Rows:
    """Candles of the price in ``interval`` buckets aligned to the UTC calendar (``1h`` buckets
    start on the hour), covering ``rng`` (the first bucket is the one holding ``rng.start``).

    Columns: timestamp (bucket start), open, high, low, close, ticks (rows in the bucket).
    ``fill``: ``none`` lists buckets that hold data; ``null`` lists every bucket, empty ones with
    nulls; ``prev`` fills an empty bucket with the previous close (see the module docstring).
    """
    sym, mkt = check_symbol(symbol), check_market(market)
    check_range(rng)
    if fill not in ("none", "null", "prev"):
        raise UsageError(f"fill {fill!r}: choose from none, null, prev")
    if OHLC_INTERVALS.get(interval.name) != interval:
        raise UsageError(f"interval {interval.name!r}: not one of {', '.join(OHLC_INTERVALS)}")
    buckets = bucket_count(interval, rng)
    if buckets > MAX_BUCKETS:
        raise UsageError(
            f"{buckets:,} {interval.name} buckets from {iso(rng.start)} to {iso(rng.end)}: at most "
            f"{MAX_BUCKETS:,} per request (use a larger interval or a shorter range)"
        )
    # interval.name comes from the fixed OHLC_INTERVALS table (checked above), never from input.
    sql = (
        "SELECT timestamp, first(price) AS open, max(price) AS high, min(price) AS low, "
        "last(price) AS close, count() AS ticks FROM market_data "
        "WHERE symbol = %s AND market = %s AND timestamp >= %s AND timestamp < %s "
        f"SAMPLE BY {interval.name} ALIGN TO CALENDAR"
    )
    data = await fetch(db, sql, (sym, mkt, rng.start, rng.end))
    if fill == "none":
        return Rows(OHLC_COLUMNS, data.rows)
    prev_close: float | None = None
    if fill == "prev":
        lookback = max(rng.span, timedelta(days=1))
        prev_close = await _price_before(db, sym, mkt, rng.start, lookback=lookback)
    by_start = {row[0]: row for row in data.rows}
    out: list[tuple[Any, ...]] = []
    step = interval.span
    t = interval.floor(rng.start)
    while t < rng.end:
        row = by_start.get(t)
        if row is not None:
            out.append(row)
            prev_close = row[4]
        elif fill == "prev" and prev_close is not None:
            out.append((t, prev_close, prev_close, prev_close, prev_close, 0))
        else:
            out.append((t, None, None, None, None, 0))
        t += step
    return Rows(OHLC_COLUMNS, out)


async def _price_before(
    db: Database, symbol: str, market: str, before: datetime, *, lookback: timedelta
) -> float | None:
    """The last price stored before ``before`` (looking back at most ``lookback``)."""
    sql = (
        "SELECT price FROM market_data WHERE symbol = %s AND market = %s "
        "AND timestamp >= %s AND timestamp < %s LIMIT -1"
    )
    res = await fetch(db, sql, (symbol, market, before - lookback, before))
    return float(res.rows[0][0]) if res.rows and res.rows[0][0] is not None else None


async def sql(
    db: Database, text: str, *, max_rows: int = MAX_LIMIT, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Rows:
    """Run one read-only query typed by a user (see :func:`check_read_only`), at most
    ``max_rows`` rows; QuestDB's complaint about it becomes a UsageError."""
    statement = check_read_only(text)
    check_limit(max_rows, param="max rows")
    return await fetch(db, statement, (), max_rows=max_rows, timeout_s=timeout_s, user_sql=True)


# --- candles (sow backfill) ----------------------------------------------------------------


async def candles(
    db: Database,
    symbol: str,
    market: str,
    interval: KlineInterval,
    rng: TimeRange,
    *,
    limit: int = MAX_LIMIT,
) -> Rows:
    """Backfilled candles of one symbol, market and interval in ``rng``, oldest first."""
    params = (
        check_symbol(symbol),
        check_market(market),
        interval.name,
        check_range(rng).start,
        rng.end,
        check_limit(limit) + 1,
    )
    sql = (
        "SELECT timestamp, symbol, market, interval, open, high, low, close, volume, turnover "
        "FROM candles WHERE symbol = %s AND market = %s AND interval = %s "
        "AND timestamp >= %s AND timestamp < %s ORDER BY timestamp LIMIT %s"
    )
    rows = await fetch(db, sql, params)
    return Rows(rows.columns, rows.rows[:limit], truncated=len(rows.rows) > limit)


async def newest_candle(
    db: Database, symbol: str, market: str, interval: KlineInterval
) -> datetime | None:
    """Start of the newest stored candle (where a resumed backfill continues), or None."""
    sql = "SELECT max(timestamp) FROM candles WHERE symbol = %s AND market = %s AND interval = %s"
    try:
        res = await fetch(db, sql, (check_symbol(symbol), check_market(market), interval.name))
    except TableMissing:
        return None
    value = res.rows[0][0] if res.rows else None
    return value if isinstance(value, datetime) else None


async def wal_lag(db: Database, table: str) -> int | None:
    """Committed WAL transactions of ``table`` that QuestDB has not applied yet (None: no such
    table). Raises UpstreamError when the table is suspended: it would never catch up."""
    sql = "SELECT suspended, writerTxn, sequencerTxn FROM wal_tables() WHERE name = %s"
    res = await fetch(db, sql, (table,))
    if not res.rows:
        return None
    suspended, writer_txn, sequencer_txn = res.rows[0]
    if suspended:
        raise UpstreamError(
            f"QuestDB table {table} is suspended and applies no writes (ALTER TABLE {table} RESUME WAL)"
        )
    return int(sequencer_txn) - int(writer_txn)


__all__ = [
    "CANDLE_COLUMNS",
    "MAX_BUCKETS",
    "MAX_LIMIT",
    "OHLC_COLUMNS",
    "QUOTE_COLUMNS",
    "STATS_COLUMNS",
    "Database",
    "Fill",
    "Rows",
    "TableMissing",
    "bucket_count",
    "candles",
    "check_limit",
    "check_market",
    "check_range",
    "check_read_only",
    "check_symbol",
    "connect",
    "fetch",
    "history",
    "latest",
    "newest_candle",
    "ohlc",
    "open_pool",
    "sql",
    "stats",
    "wal_lag",
    "with_connection",
]
