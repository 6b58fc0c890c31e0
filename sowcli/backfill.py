"""``sow backfill``: Bybit REST klines -> QuestDB ``candles``; Dragonfly quotes -> ``market_data``.

**Klines** (:func:`backfill_klines`): ``GET /v5/market/kline`` for each symbol, oldest window first,
written over ILP/HTTP into ``candles`` (created at start with
:func:`~sowcli.sinks.questdb.ensure_tables`; its DEDUP keys ``(timestamp, symbol, market,
interval)`` make a rerun replace rows instead of adding them).

- *Range*: ``start`` (``--from``), else right after the newest stored candle of that symbol,
  market and interval (resume), else the last :data:`DEFAULT_CANDLES` candles; ``end``
  (``--to``, exclusive) defaults to Bybit's clock (``/v5/market/time``, one request).
- *Paging*: fixed windows of :data:`PAGE_CANDLES` candles (``start``/``end`` inclusive on Bybit's
  side, ``limit=1000``), so a page can never be cut short; rows are de-duplicated on their start
  time and kept only inside the window.
- *Unclosed candle*: Bybit lists the running candle first. A candle is stored only when it has
  closed by the response's ``time`` (Bybit's clock); the running one is skipped and counted, and
  the next run (resume) picks it up once closed. ``candles`` therefore holds closed candles only.
- *Rate limit*: a token bucket shared by all symbols (``backfill_requests_per_second``, at most
  :data:`MAX_REQUESTS_PER_SECOND`; Bybit allows 600 per 5 s per IP and answers more with HTTP 403
  and a ban of 10 minutes or more).
- *Retries*: timeouts, connection errors, HTTP 429 and 5xx and ``retCode`` 10006 ("too many
  visits") are retried with capped, jittered exponential backoff (tenacity), at most
  ``attempts`` times per request.
- *Errors*: another ``retCode`` (e.g. ``10001 params error: symbol invalid``) ends that symbol
  with a message naming it, and the other symbols go on; HTTP 403 raises
  :class:`~sowcli.errors.ExchangeBanned` and stops the whole run at once.

**Cache** (:func:`backfill_from_cache`): ``history:{market}:{symbol}`` lists and
``timeseries:{market}:{symbol}:{date}`` sorted sets (Quote JSON) are copied into ``market_data``;
its DEDUP keys ``(timestamp, symbol, market, seq)`` make repeated runs, and quotes that
``sow persist`` already stored, harmless. Quotes are de-duplicated on ``(ts, seq)`` per stream
before writing, so the overlap between ``history`` and ``timeseries`` costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx
import psycopg
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from sowcli import __version__, query
from sowcli.config import Settings
from sowcli.errors import ExchangeBanned, SowError, UpstreamError, UsageError
from sowcli.logs import kv
from sowcli.model import Market, Quote
from sowcli.sinks.questdb import add_quote, ensure_tables, ilp_conf
from sowcli.timeparse import KlineInterval, from_epoch_ms, iso, to_epoch_ms

log = logging.getLogger("sow.backfill")
# httpx logs every request at INFO: thousands of lines for a long backfill.
logging.getLogger("httpx").setLevel(logging.WARNING)

KLINE_PATH = "/v5/market/kline"
TIME_PATH = "/v5/market/time"
CATEGORY: dict[str, str] = {"SPOT": "spot", "FUTURES": "linear"}
PAGE_CANDLES = 1000
DEFAULT_CANDLES = 1000
MAX_REQUESTS_PER_SECOND = 100.0
RETRY_CODES = frozenset({10006, 10016})  # too many visits; server busy
BAN_MESSAGE = (
    "Bybit answered HTTP 403 (access too frequent): this IP is banned from Bybit's API for at "
    "least 10 minutes. Stop all Bybit clients on this machine, wait, then rerun (the backfill "
    "resumes where it stopped); keep backfill_requests_per_second low (now {rate:g}/s)."
)


# --- rate limiting -------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts of at most ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)


# --- reports and progress ------------------------------------------------------------------


@dataclass
class SymbolReport:
    """What one symbol's backfill did."""

    symbol: str
    market: Market
    interval: str
    start: datetime | None = None
    end: datetime | None = None
    rows: int = 0
    skipped_unclosed: int = 0
    requests: int = 0
    resumed: bool = False
    error: str | None = None


@dataclass
class BackfillReport:
    symbols: list[SymbolReport] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.symbols)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.symbols if s.error]


class Progress(Protocol):
    """Where a backfill reports progress (the CLI draws a Rich bar; the default does nothing)."""

    def begin(self, key: str, total: int) -> None: ...

    def advance(self, key: str, covered: int, stored: int) -> None:
        """``covered`` more units of the range are done, ``stored`` rows were written for them."""

    def finish(self, key: str, note: str) -> None: ...


class NoProgress:
    def begin(self, key: str, total: int) -> None:
        pass

    def advance(self, key: str, covered: int, stored: int) -> None:
        pass

    def finish(self, key: str, note: str) -> None:
        pass


# --- Bybit REST ----------------------------------------------------------------------------


class _Retryable(Exception):
    """A request that may succeed if sent again (timeout, 429, 5xx, retCode 10006)."""


class SymbolFailed(SowError):
    """Bybit refused the request for this symbol (retCode ≠ 0, an unexpected answer)."""


@dataclass(frozen=True, slots=True)
class Candle:
    start_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    turnover: float


class KlineClient:
    """``/v5/market/kline`` with the rate limiter, retries and Bybit's error conventions."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        limiter: TokenBucket,
        *,
        attempts: int = 5,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
    ) -> None:
        self.http = http
        self.limiter = limiter
        self.attempts = attempts
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.requests = 0

    async def page(
        self, symbol: str, market: Market, interval: KlineInterval, start_ms: int, end_ms: int
    ) -> tuple[list[Candle], int]:
        """Candles starting in ``[start_ms, end_ms]`` (both inclusive) and Bybit's clock (ms)."""
        params = {
            "category": CATEGORY[market],
            "symbol": symbol,
            "interval": interval.code,
            "start": str(start_ms),
            "end": str(end_ms),
            "limit": str(PAGE_CANDLES),
        }
        doc = await self._get_retrying(symbol, KLINE_PATH, params)
        result = doc.get("result") or {}
        rows = result.get("list") if isinstance(result, dict) else None
        if not isinstance(rows, list):
            raise SymbolFailed(f"{symbol}: Bybit kline answer has no result.list")
        candles: list[Candle] = []
        for row in rows:
            try:
                candles.append(Candle(int(row[0]), *(float(v) for v in row[1:7])))
            except (TypeError, ValueError, IndexError):
                raise SymbolFailed(f"{symbol}: unexpected kline row from Bybit: {row!r}") from None
        server_ms = doc.get("time")
        return candles, int(server_ms) if isinstance(server_ms, int) else int(time.time() * 1000)

    async def server_time_ms(self) -> int:
        """Bybit's clock (``/v5/market/time``): the default end of a backfill, so that a skewed
        local clock neither asks for candles from the future nor misses closed ones."""
        doc = await self._get_retrying("Bybit", TIME_PATH, {})
        server_ms = doc.get("time")
        if not isinstance(server_ms, int):
            raise UpstreamError("Bybit /v5/market/time answered without a time")
        return server_ms

    async def _get_retrying(self, symbol: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            # "full jitter": a random wait up to initial × 2^attempt, capped at retry_max_s
            wait=wait_random_exponential(multiplier=self.retry_initial_s, max=self.retry_max_s),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._get(symbol, path, params)
        except _Retryable as exc:
            raise SymbolFailed(
                f"{symbol}: Bybit kept failing after {self.attempts} attempts: {exc}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def _get(self, symbol: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        await self.limiter.acquire()
        self.requests += 1
        try:
            resp = await self.http.get(path, params=params)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        status = resp.status_code
        if status == 403:
            raise ExchangeBanned(BAN_MESSAGE.format(rate=self.limiter.rate))
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}")
        if status != 200:
            raise SymbolFailed(f"{symbol}: Bybit answered HTTP {status}: {resp.text[:200].strip()}")
        try:
            doc = resp.json()
        except ValueError:
            raise _Retryable("answer is not JSON") from None
        if not isinstance(doc, dict):
            raise SymbolFailed(f"{symbol}: unexpected answer from Bybit: {resp.text[:200]}")
        code = doc.get("retCode")
        if code != 0:
            message = f"Bybit retCode {code} {doc.get('retMsg', '')}".strip()
            if code in RETRY_CODES:
                raise _Retryable(message)
            raise SymbolFailed(f"{symbol}: {message}")
        return doc


# --- QuestDB -------------------------------------------------------------------------------


class IlpWriter:
    """One ``questdb`` Sender over ILP/HTTP, flushed in a worker thread, one flush at a time."""

    def __init__(self, http_url: str) -> None:
        from questdb.ingress import Sender

        self.http_url = http_url
        self._sender = Sender.from_conf(ilp_conf(http_url))
        self._lock = asyncio.Lock()
        self._open = False

    async def __aenter__(self) -> IlpWriter:
        try:
            await asyncio.to_thread(self._sender.establish)
        except Exception as exc:
            raise UpstreamError(f"cannot reach QuestDB at {self.http_url}: {exc}") from None
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._open:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._sender.close, False)

    async def write(self, fill: Any, count: int, *, attempts: int = 3) -> None:
        """Build a buffer with ``fill(buffer)`` and send it as one transaction (retried: a failed
        flush clears the buffer, so it is rebuilt each time)."""
        from questdb.ingress import IngressError

        last: Exception | None = None
        async with self._lock:
            for attempt in range(attempts):
                buffer = self._sender.new_buffer()
                fill(buffer)
                try:
                    await asyncio.to_thread(self._sender.flush, buffer)
                    return
                except IngressError as exc:
                    last = exc
                    await asyncio.sleep(0.2 * 2**attempt)
        raise UpstreamError(f"QuestDB at {self.http_url} refused {count} rows: {last}")


async def wait_applied(db: query.Database, table: str, timeout_s: float = 30.0) -> bool:
    """Wait until QuestDB has applied every committed WAL transaction of ``table`` (it applies
    them asynchronously), so that a query right after the backfill sees its rows. Returns False
    (and logs) when that takes longer than ``timeout_s``; the rows are committed either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = await query.wal_lag(db, table)
        if lag is None or lag <= 0:
            return True
        if time.monotonic() > deadline:
            log.warning(
                f"QuestDB has not applied {lag} committed transaction(s) of {table} yet; "
                "queries will see the rows shortly",
                extra=kv(table=table, pending=lag),
            )
            return False
        await asyncio.sleep(0.05)


# --- klines --------------------------------------------------------------------------------


def _candle_rows(
    symbol: str, market: Market, interval: KlineInterval, candles: Sequence[Candle]
) -> Any:
    from questdb.ingress import TimestampNanos

    def fill(buffer: Any) -> None:
        syms = {"symbol": symbol, "market": market, "interval": interval.name}
        for c in candles:
            buffer.row(
                "candles",
                symbols=syms,
                columns={
                    "open": c.open,
                    "high": c.high,
                    "low": c.low,
                    "close": c.close,
                    "volume": c.volume,
                    "turnover": c.turnover,
                },
                at=TimestampNanos(c.start_ms * 1_000_000),
            )

    return fill


def expected_candles(interval: KlineInterval, start_ms: int, end_ms: int) -> int:
    return max(0, -(-(end_ms - start_ms) // interval.ms))


async def _backfill_symbol(
    symbol: str,
    market: Market,
    interval: KlineInterval,
    start: datetime | None,
    end: datetime,
    *,
    client: KlineClient,
    writer: IlpWriter,
    db: psycopg.AsyncConnection[Any],
    progress: Progress,
) -> SymbolReport:
    report = SymbolReport(symbol, market, interval.name)
    key = f"{symbol} {market}"
    end_ms = to_epoch_ms(end)
    if start is not None:
        start_ms = to_epoch_ms(start)
    else:
        newest = await query.newest_candle(db, symbol, market, interval)
        if newest is not None:
            start_ms = interval.next_start(to_epoch_ms(newest))
            report.resumed = True
        else:
            start_ms = end_ms - DEFAULT_CANDLES * interval.ms
    report.start, report.end = from_epoch_ms(start_ms), end
    if start_ms >= end_ms:
        progress.begin(key, 0)
        progress.finish(key, "up to date")
        return report
    progress.begin(key, expected_candles(interval, start_ms, end_ms))
    window_ms = PAGE_CANDLES * interval.ms
    try:
        cursor = start_ms
        while cursor < end_ms:
            window_end = min(cursor + window_ms, end_ms) - 1  # inclusive on Bybit's side
            report.requests += 1
            page, server_ms = await client.page(symbol, market, interval, cursor, window_end)
            fresh: dict[int, Candle] = {}
            for c in page:
                if not cursor <= c.start_ms <= window_end:
                    continue
                if interval.next_start(c.start_ms) > server_ms:  # still running
                    report.skipped_unclosed += 1
                    continue
                fresh[c.start_ms] = c
            rows = [fresh[k] for k in sorted(fresh)]
            if rows:
                await writer.write(_candle_rows(symbol, market, interval, rows), len(rows))
                report.rows += len(rows)
            progress.advance(key, expected_candles(interval, cursor, window_end + 1), len(rows))
            cursor = window_end + 1
        progress.finish(key, f"{report.rows:,} candles")
    except SymbolFailed as exc:
        report.error = str(exc)
        progress.finish(key, "failed")
    return report


async def backfill_klines(
    settings: Settings,
    symbols: Iterable[str],
    market: str,
    interval: KlineInterval,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    progress: Progress | None = None,
    concurrency: int = 4,
    request_timeout_s: float = 10.0,
    attempts: int = 5,
    retry_initial_s: float = 0.5,
) -> BackfillReport:
    """Backfill ``interval`` klines of ``symbols`` on ``market`` into ``candles`` (see the module
    docstring). Raises ExchangeBanned on HTTP 403; other per-symbol failures are in the report."""
    mkt = query.check_market(market, param="--market")
    names = list(dict.fromkeys(query.check_symbol(s, param="--symbol") for s in symbols))
    if not names:
        raise UsageError("--symbol: give at least one symbol")
    rate = settings.backfill_requests_per_second
    if not 0 < rate <= MAX_REQUESTS_PER_SECOND:
        raise UsageError(
            f"backfill_requests_per_second {rate:g}: must be above 0 and at most "
            f"{MAX_REQUESTS_PER_SECOND:g} (Bybit bans an IP above 600 requests per 5 s)"
        )
    if start is not None and end is not None and start >= end:
        raise UsageError(f"--from {iso(start)} must be before --to {iso(end)}")
    progress = progress or NoProgress()
    await asyncio.to_thread(ensure_tables, settings.questdb_url)
    limiter = TokenBucket(rate)
    report = BackfillReport()
    gate = asyncio.Semaphore(max(1, concurrency))
    headers = {"User-Agent": f"sow/{__version__} (+backfill)"}
    async with (
        httpx.AsyncClient(
            base_url=settings.bybit_rest_url, timeout=request_timeout_s, headers=headers
        ) as http,
        IlpWriter(settings.questdb_http_url) as writer,
    ):
        client = KlineClient(http, limiter, attempts=attempts, retry_initial_s=retry_initial_s)
        if end is not None:
            end_dt = end
        else:
            try:
                end_dt = from_epoch_ms(await client.server_time_ms())
            except SymbolFailed as exc:
                raise UpstreamError(f"cannot read Bybit's clock: {exc}") from None
            if start is not None and start >= end_dt:
                raise UsageError(f"--from {iso(start)} is not before Bybit's time {iso(end_dt)}")
        db = await query.connect(settings.questdb_url)

        async def one(symbol: str) -> SymbolReport:
            async with gate:
                return await _backfill_symbol(
                    symbol,
                    mkt,
                    interval,
                    start,
                    end_dt,
                    client=client,
                    writer=writer,
                    db=db,
                    progress=progress,
                )

        try:
            tasks = [asyncio.create_task(one(s), name=f"backfill-{s}") for s in names]
            try:
                # The first ExchangeBanned (or QuestDB failure) ends every symbol at once.
                for report_item in await asyncio.gather(*tasks):
                    report.symbols.append(report_item)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if report.rows:
                await wait_applied(db, "candles")
        finally:
            await db.close()
    for item in report.symbols:
        if item.error:
            log.error(item.error, extra=kv(symbol=item.symbol, market=item.market))
    return report


# --- Dragonfly/Redis -> market_data ----------------------------------------------------------


@dataclass
class CacheReport:
    streams: int = 0
    quotes: int = 0
    written: int = 0
    invalid: int = 0
    keys: int = 0


def _quote_rows(quotes: Sequence[Quote]) -> Any:
    """Rows laid out exactly as ``sow persist`` writes them (same columns, same DEDUP keys)."""

    def fill(buffer: Any) -> None:
        for q in quotes:
            add_quote(buffer, q)

    return fill


def _parse_key(key: str) -> tuple[str, str] | None:
    """``history:spot:BTCUSDT`` / ``timeseries:spot:BTCUSDT:2024-01-01`` -> (market, symbol)."""
    parts = key.split(":")
    if len(parts) < 3 or parts[1] not in ("spot", "futures"):
        return None
    return parts[1], parts[2]


async def backfill_from_cache(
    settings: Settings,
    *,
    symbols: Iterable[str] | None = None,
    market: str | None = None,
    progress: Progress | None = None,
    batch_rows: int = 10_000,
) -> CacheReport:
    """Copy cached quotes (``history`` and ``timeseries`` keys) into ``market_data``; idempotent."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from sowcli.config import redis_url
    from sowcli.model import decode_quote

    wanted_markets = {query.check_market(market, param="--market").lower()} if market else None
    wanted_symbols = {query.check_symbol(s, param="--symbol") for s in symbols} if symbols else None
    progress = progress or NoProgress()
    await asyncio.to_thread(ensure_tables, settings.questdb_url)
    report = CacheReport()
    client = aioredis.from_url(redis_url(settings.dragonfly_url), socket_timeout=10)
    try:
        streams: dict[tuple[str, str], list[str]] = {}
        async for raw in client.scan_iter(match="history:*", count=1000):
            _add_key(streams, raw, wanted_markets, wanted_symbols)
        async for raw in client.scan_iter(match="timeseries:*", count=1000):
            _add_key(streams, raw, wanted_markets, wanted_symbols)
        report.streams = len(streams)
        report.keys = sum(len(v) for v in streams.values())
        async with IlpWriter(settings.questdb_http_url) as writer:
            for (mkt, sym), keys in sorted(streams.items()):
                task = f"{sym} {mkt.upper()}"
                seen: dict[tuple[int, int | None], Quote] = {}
                for key in keys:
                    for doc in await _read_key(client, key):
                        report.quotes += 1
                        try:
                            q = decode_quote(doc)
                        except Exception:  # msgspec errors: a foreign or broken value
                            report.invalid += 1
                            continue
                        if q.symbol != sym or q.market.lower() != mkt:
                            report.invalid += 1
                            continue
                        seen[(q.ts, q.seq)] = q
                progress.begin(task, len(seen))
                ordered = [seen[k] for k in sorted(seen, key=lambda k: (k[0], k[1] or -1))]
                for i in range(0, len(ordered), batch_rows):
                    chunk = ordered[i : i + batch_rows]
                    await writer.write(_quote_rows(chunk), len(chunk))
                    report.written += len(chunk)
                    progress.advance(task, len(chunk), len(chunk))
                progress.finish(task, f"{len(ordered):,} quotes")
        if report.written:
            await query.with_connection(
                settings.questdb_url, lambda db: wait_applied(db, "market_data")
            )
    except RedisError as exc:
        raise UpstreamError(
            f"cannot read Dragonfly/Redis at {settings.dragonfly_url}: {exc}"
        ) from None
    finally:
        await client.aclose()
    return report


def _add_key(
    streams: dict[tuple[str, str], list[str]],
    raw: bytes | str,
    markets: set[str] | None,
    symbols: set[str] | None,
) -> None:
    key = raw.decode() if isinstance(raw, bytes) else raw
    parsed = _parse_key(key)
    if parsed is None:
        return
    mkt, sym = parsed
    if (markets is None or mkt in markets) and (symbols is None or sym in symbols):
        streams.setdefault((mkt, sym), []).append(key)


async def _read_key(client: Any, key: str, page: int = 10_000) -> list[bytes]:
    kind = await client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "list":
        return list(await client.lrange(key, 0, -1))
    if kind == "zset":
        out: list[bytes] = []
        offset = 0
        while True:
            chunk = await client.zrange(key, offset, offset + page - 1)
            out.extend(chunk)
            if len(chunk) < page:
                return out
            offset += page
    return []


__all__ = [
    "BackfillReport",
    "CacheReport",
    "KlineClient",
    "Progress",
    "SymbolReport",
    "TokenBucket",
    "backfill_from_cache",
    "backfill_klines",
]
