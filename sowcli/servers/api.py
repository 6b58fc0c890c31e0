"""``sow serve-api``: the REST API over Dragonfly/Redis and QuestDB, plus /health, /metrics, /docs
and the WebSocket bridge at /ws.

=====================================================  ============================================
``GET /api/prices/latest[?symbols=A,B&market=]``       latest quote per symbol and market: one
                                                       Redis MGET; QuestDB ``LATEST ON`` when the
                                                       cache is down or empty (header
                                                       ``X-Sow-Source: cache|questdb``)
``GET /api/prices/{symbol}/{market}/history``          ``from``, ``to`` (ISO-8601, epoch s/ms or
                                                       e.g. ``2h``; default the last hour),
                                                       ``limit`` (1..10,000, default 1000),
                                                       ``order`` (desc|asc); range at most 31 days
``GET /api/prices/{symbol}/{market}/stats``            24 h (``window``) count, first, last, min,
                                                       max, avg, change, change_pct
``GET /api/prices/{symbol}/{market}/ohlc``             ``interval`` (1m 5m 15m 1h 4h 1d), ``from``,
                                                       ``to`` (default the last 24 h), ``fill``
``GET /health``                                        each dependency's state and round trip; 503
                                                       naming the required ones that are down
``GET /metrics``                                       Prometheus (see :mod:`sowcli.servers.metrics`)
``GET /docs``, ``/openapi.json``                       OpenAPI
``WS /ws``                                             the bridge of :mod:`sowcli.servers.ws`
``/market``                                            the web dashboard's static export, when
                                                       ``api_static_dir`` exists
=====================================================  ============================================

Why FastAPI (on Starlette and uvicorn): the OpenAPI document and /docs come from the route
signatures, so they cannot drift from the code, and the fuzz tests generate requests from that
same document. Routes return pre-encoded JSON (orjson, msgspec) so pydantic stays off the hot
path; its models only describe the answers in the OpenAPI document.

Every SQL statement comes from :mod:`sowcli.query` (shared with ``sow query``), through a
psycopg_pool pool. Errors are JSON ``{"error": ..., "detail": ...}``, never a traceback:

====  ======================  ===========================================================
400   ``bad_request``         bad symbol, market, interval, time, range or limit
404   ``not_found``           no such route
413   ``too_large``           a request body over 64 KiB (no endpoint takes one)
414   ``uri_too_long``        path and query over 8 KiB
429   ``rate_limited``        per-client-IP token bucket (``Retry-After`` in seconds)
503   ``unavailable``         QuestDB (or, for /latest, both stores) unreachable
504   ``timeout``             QuestDB did not answer within ``api_questdb_timeout_seconds``
====  ======================  ===========================================================

Identical history/stats/ohlc requests within ``api_query_cache_ms`` share one answer (and one
query while it runs), keyed by the parameters as sent: ``to`` left out means "now" once per
that window. A table that does not exist yet (nothing persisted) gives empty answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sowcli import __version__, query
from sowcli.bus.nats import instance_id
from sowcli.config import Settings
from sowcli.errors import UpstreamError, UsageError
from sowcli.logs import kv
from sowcli.model import Market
from sowcli.servers.metrics import CONTENT_TYPE, ServerMetrics
from sowcli.servers.ws import (
    ALL_MARKETS,
    HEALTH_TIMEOUT_S,
    Bridge,
    BridgeEndpoint,
    CacheUnavailable,
    Check,
    LatestStore,
    TokenBucket,
    bind_socket,
    bounded,
    check_serving,
    health_answer,
    heartbeat,
    iso_ms,
    probe,
    serve_asgi,
)
from sowcli.timeparse import (
    OHLC_INTERVALS,
    TIME_HELP,
    format_duration,
    parse_duration,
    parse_interval,
    time_range,
    to_epoch_ms,
)

log = logging.getLogger("sow.api")

MAX_RANGE = timedelta(days=31)
HISTORY_SPAN = timedelta(hours=1)
OHLC_SPAN = timedelta(hours=24)
STATS_WINDOW = "24h"
MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_LATEST_SYMBOLS = 1000
QUERY_CACHE_BYTES = 64 * 1024 * 1024  # answers kept by the short-lived cache, all together
RATE_LIMIT_EXEMPT = ("/metrics",)  # scraped by Prometheus, costs nothing
RATE_LIMIT_TRACKED = 50_000  # client IPs remembered by the rate limiter
QUESTDB_BREAKER_S = 1.0  # after a QuestDB failure, answer 503 at once for this long
JSON = "application/json"
_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"))


class ApiError(Exception):
    """An answer other than 200, as JSON ``{"error": error, "detail": detail}``."""

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> Response:
        body = orjson.dumps({"error": self.error, "detail": self.detail})
        return Response(body, self.status, self.headers, media_type=JSON)


def _json(body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, 200, headers, media_type=JSON)


# --- per-IP rate limit ---------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client IP (``rate`` per second, ``burst`` at once); bounded memory."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, ip: str) -> float:
        """0 when the request may go; else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= RATE_LIMIT_TRACKED:
                self._prune()
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst)
        return bucket.take()

    def _prune(self) -> None:
        now = time.monotonic()
        refill_s = self.burst / self.rate
        self._buckets = {ip: b for ip, b in self._buckets.items() if now - b.last < refill_s}
        if len(self._buckets) >= RATE_LIMIT_TRACKED:  # a flood of addresses: forget the oldest
            keep = list(self._buckets.items())[RATE_LIMIT_TRACKED // 2 :]
            self._buckets = dict(keep)


# --- short-lived answers -------------------------------------------------------------------


class QueryCache:
    """Answers of identical requests shared for ``ttl_s``; one computation while it runs.

    Bounded by entries and by :data:`QUERY_CACHE_BYTES`; failures are never kept.
    """

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[float, asyncio.Future[bytes]]] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self, key: Hashable, compute: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, bool]:
        """(answer, True when it came from the cache)."""
        if self.ttl_s <= 0:
            return await compute(), False
        now = time.monotonic()
        entry = self._entries.get(key)
        hit = entry is not None and entry[0] > now
        if entry is not None and hit:
            fut = entry[1]
        else:
            if entry is not None:
                self._forget(key)
            fut = asyncio.ensure_future(compute())
            self._entries[key] = (now + self.ttl_s, fut)
            fut.add_done_callback(lambda f: self._done(key, f))
            while len(self._entries) > self.max_entries:
                self._forget(next(iter(self._entries)))
        # shield: a client hanging up must not cancel the query others wait for
        return await asyncio.shield(fut), hit

    def _done(self, key: Hashable, fut: asyncio.Future[bytes]) -> None:
        entry = self._entries.get(key)
        if fut.cancelled() or fut.exception() is not None:
            if entry is not None and entry[1] is fut:
                self._forget(key)
            return
        if entry is None or entry[1] is not fut:
            return
        size = len(fut.result())
        self._sizes[key] = size
        self.bytes += size
        while self.bytes > QUERY_CACHE_BYTES and self._entries:
            self._forget(next(iter(self._entries)))

    def _forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)
        self.bytes -= self._sizes.pop(key, 0)


# --- the answers' shapes (OpenAPI only: routes return pre-encoded JSON) --------------------


class QuoteOut(BaseModel):
    """A quote: the Quote fields of ARCHITECTURE.md plus ``timestamp``."""

    symbol: str
    market: Literal["SPOT", "FUTURES"]
    price: float | None
    volume: float | None = None
    turnover: float | None = None
    high24h: float | None = None
    low24h: float | None = None
    change24h: float | None = Field(None, description="24 h change in percent")
    bid: float | None = None
    ask: float | None = None
    mark_price: float | None = None
    index_price: float | None = None
    funding_rate: float | None = None
    open_interest: float | None = None
    ts: int = Field(description="exchange event time, ms since the epoch")
    recv_us: int | None = Field(None, description="local receive time, µs (null from QuestDB)")
    seq: int | None = None
    timestamp: str = Field(description="exchange event time, ISO-8601 UTC", examples=[
        "2024-01-01T00:00:00.000Z"])  # fmt: skip


class LatestOut(BaseModel):
    source: Literal["cache", "questdb"]
    count: int
    quotes: list[QuoteOut]


class HistoryOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    symbol: str
    market: Literal["SPOT", "FUTURES"]
    from_: str = Field(alias="from")
    to: str
    limit: int
    order: Literal["asc", "desc"]
    count: int
    truncated: bool = Field(description="more rows matched than limit")
    quotes: list[QuoteOut]


class StatsOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    symbol: str
    market: Literal["SPOT", "FUTURES"]
    window: str
    from_: str = Field(alias="from")
    to: str
    count: int
    first: float | None
    last: float | None
    min: float | None
    max: float | None
    avg: float | None
    change: float | None = Field(description="last - first")
    change_pct: float | None = Field(description="change in percent of first")


class CandleOut(BaseModel):
    timestamp: str
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    ticks: int


class OhlcOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    symbol: str
    market: Literal["SPOT", "FUTURES"]
    interval: str
    fill: Literal["none", "null", "prev"]
    from_: str = Field(alias="from")
    to: str
    count: int
    candles: list[CandleOut]


class DependencyOut(BaseModel):
    state: Literal["up", "down"]
    required: bool
    latency_ms: float | None
    detail: str | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "down"]
    dependencies: dict[str, DependencyOut]
    component: str
    version: str
    uptime_s: float
    ws_clients: int
    error: str | None = None
    detail: str | None = None


class ErrorOut(BaseModel):
    error: str = Field(examples=["bad_request"])
    detail: str = Field(examples=["symbol 'BTC-USDT': not a valid symbol"])


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "invalid parameter",
        429: "too many requests from this IP (see Retry-After)",
        503: "a store is unreachable",
        504: "QuestDB did not answer in time",
    }
    return {s: {"model": ErrorOut, "description": text[s]} for s in statuses}


# --- rows -> JSON --------------------------------------------------------------------------

_QUOTE_FIELDS = tuple(QuoteOut.model_fields)


def _stamp(value: Any) -> Any:
    return iso_ms(to_epoch_ms(value)) if isinstance(value, datetime) else value


def _row_quote(row: dict[str, Any]) -> dict[str, Any]:
    """A ``market_data`` row as a quote (the Quote's field order, ``ts`` and ``timestamp``)."""
    when = row["timestamp"]
    out = {name: row.get(name) for name in _QUOTE_FIELDS}
    ts = to_epoch_ms(when)
    out["ts"] = ts
    out["timestamp"] = iso_ms(ts)
    return out


def _rows_quotes(rows: query.Rows | None) -> list[dict[str, Any]]:
    return [_row_quote(d) for d in rows.dicts()] if rows is not None else []


# --- the service ---------------------------------------------------------------------------


class ApiService:
    """State and logic behind the routes: stores, pool, bridge, caches, counters."""

    def __init__(self, settings: Settings, *, bridge: Bridge | None = None) -> None:
        check_serving(settings)
        s = self.settings = settings
        self.metrics = ServerMetrics()
        self.store = LatestStore(
            s.dragonfly_url, timeout_s=s.api_redis_timeout_seconds, name="sow-api"
        )
        self.bridge = bridge or Bridge(s, store=self.store)
        self.metrics.register(self.bridge.collect)
        self.pool = query.open_pool(
            s.questdb_url,
            min_size=1,
            max_size=s.api_questdb_pool_size,
            timeout_s=s.api_questdb_timeout_seconds,
        )
        self.qdb_timeout_s = s.api_questdb_timeout_seconds
        where = urlsplit(s.questdb_url)
        self.qdb_where = f"{where.hostname or 'localhost'}:{where.port or 8812}"
        self._qdb_down_until = 0.0
        self._qdb_error = ""
        self.cache = QueryCache(s.api_query_cache_ms / 1000, s.api_query_cache_entries)
        self.limiter = RateLimiter(s.api_rate_limit_per_second, s.api_rate_limit_burst)
        self.instance = instance_id()
        self.started = time.time()
        self.state = "starting"
        self.port: int | None = None
        self.running = False
        self.requests = 0
        self.server_errors = 0
        self.rate_limited = 0
        self.latest_from = {"cache": 0, "questdb": 0}
        self.cache_hits = 0
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the QuestDB pool (connecting in the background), start the bridge and the
        heartbeat on ``sow.status.api``."""
        if self.running:
            return
        self.running = True
        await self.pool.open(wait=False)
        await self.bridge.start()
        self.state = "running"
        self._beat = asyncio.create_task(
            heartbeat(self.bridge, "api", self.status, self.settings.heartbeat_interval_seconds),
            name="api-heartbeat",
        )

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self.state = "stopped"
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        await self.bridge.publish_status("api", self.status())
        await self.bridge.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(), 5)
        await self.store.close()

    def status(self) -> dict[str, Any]:
        """The heartbeat document published on ``sow.status.api``."""
        ws = self.bridge.status()
        return {
            "component": "api",
            "instance": self.instance,
            "state": self.state,
            "since": self.started,
            "ts": time.time(),
            "port": self.port,
            "requests": self.requests,
            "errors": self.server_errors,
            "rate_limited": self.rate_limited,
            "latest_cache": self.latest_from["cache"],
            "latest_questdb": self.latest_from["questdb"],
            "query_cache_hits": self.cache_hits,
            "redis_connected": self.store.connected,
            "ws_clients": ws["clients"],
            "quotes_in": ws["quotes_in"],
            "quotes_out": ws["quotes_out"],
            "dropped": ws["dropped"],
            "nats_connected": ws["nats_connected"],
            "ws": ws,
        }

    # --- guard (size bounds, rate limit) and metrics -------------------------------------------
    def refuse(self, scope: Scope) -> ApiError | None:
        """Why an HTTP request is refused before routing (None: it may go on)."""
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) > MAX_URL_BYTES:
            return ApiError(
                414, "uri_too_long", f"path and query are limited to {MAX_URL_BYTES} bytes"
            )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return ApiError(400, "bad_request", "Content-Length is not a number")
                if size > MAX_BODY_BYTES:
                    return ApiError(
                        413, "too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
                    )
        if scope.get("path") in RATE_LIMIT_EXEMPT:
            return None
        client = scope.get("client")
        ip = client[0] if client else "?"
        wait = self.limiter.take(ip)
        if wait:
            self.rate_limited += 1
            self.metrics.rate_limited.inc()
            limit = f"{self.limiter.rate:g}/s, burst {self.limiter.burst}"
            return ApiError(
                429, "rate_limited", f"too many requests from {ip} (limit {limit})",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )  # fmt: skip
        return None

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.server_errors += 1
        route = scope.get("route")
        label = getattr(route, "path", None)
        method = scope.get("method", "GET")
        self.metrics.observe(
            label if isinstance(label, str) else "unmatched",
            method if method in _METHODS else "OTHER",
            status,
            seconds,
        )

    # --- backends --------------------------------------------------------------------------
    async def _questdb(self, work: Callable[[], Awaitable[query.Rows]]) -> query.Rows | None:
        """Run one query from :mod:`sowcli.query` with the API's timeout; None: no table yet.

        After a failure or a timeout QuestDB is skipped for :data:`QUESTDB_BREAKER_S` (requests
        fail fast with 503 instead of each waiting out the timeout); /health always tries.
        """
        if time.monotonic() < self._qdb_down_until:
            raise ApiError(503, "unavailable", f"{self._qdb_error} (retrying)")
        try:
            return await bounded(work(), self.qdb_timeout_s)
        except TimeoutError:
            waited = format_duration(timedelta(seconds=self.qdb_timeout_s))
            raise self._qdb_failed(
                504, "timeout", f"QuestDB did not answer within {waited}"
            ) from None
        except query.TableMissing as exc:
            log.debug("questdb table missing", extra=kv(error=str(exc)))
            return None
        except UpstreamError as exc:
            raise self._qdb_failed(503, "unavailable", self._qdb_text(exc)) from None

    def _qdb_failed(self, status: int, error: str, detail: str) -> ApiError:
        self.metrics.dependency_errors.labels("questdb").inc()
        self._qdb_down_until = time.monotonic() + QUESTDB_BREAKER_S
        self._qdb_error = detail
        return ApiError(status, error, detail)

    def _qdb_text(self, exc: Exception) -> str:
        # sowcli.query names the server only once it has a connection
        return str(exc).replace("QuestDB at QuestDB ", f"QuestDB at {self.qdb_where} ")

    async def _cached(self, key: Hashable, compute: Callable[[], Awaitable[bytes]]) -> Response:
        body, hit = await self.cache.get(key, compute)
        self.metrics.query_cache.labels("hit" if hit else "miss").inc()
        if hit:
            self.cache_hits += 1
        return _json(body, {"X-Sow-Cache": "hit" if hit else "miss"})

    # --- endpoints -------------------------------------------------------------------------
    async def latest(self, symbols: str | None, market: str | None) -> Response:
        mkt: Market | None = query.check_market(market) if market else None
        wanted: list[str] | None = None
        if symbols and symbols.strip():
            parts = [p for p in symbols.split(",") if p.strip()]
            if len(parts) > MAX_LATEST_SYMBOLS:
                raise UsageError(f"symbols: at most {MAX_LATEST_SYMBOLS} per request")
            wanted = list(dict.fromkeys(query.check_symbol(p, param="symbols") for p in parts))
        keys: list[tuple[str, str]]
        if wanted is not None:
            markets = (mkt,) if mkt else ALL_MARKETS
            keys = sorted(((m, s) for s in wanted for m in markets), key=lambda k: (k[1], k[0]))
        else:
            keys = [k for k in self.bridge.known_keys() if mkt is None or k[0] == mkt]
        try:
            entries = await self.store.entries(keys)
        except CacheUnavailable as exc:
            self.metrics.dependency_errors.labels("redis").inc()
            log.debug("latest: cache down, asking QuestDB", extra=kv(error=str(exc)))
            try:
                return await self._latest_questdb(wanted, mkt, required=True)
            except ApiError as qdb:
                raise ApiError(qdb.status, qdb.error, f"{exc}; {qdb.detail}") from None
        if not entries:
            with contextlib.suppress(ApiError):
                return await self._latest_questdb(wanted, mkt, required=False)
        self.latest_from["cache"] += 1
        self.metrics.latest_source.labels("cache").inc()
        body = (
            b'{"source":"cache","count":%d,"quotes":[' % len(entries)
            + b",".join([wire for _quote, wire in entries])
            + b"]}"
        )
        return _json(body, {"X-Sow-Source": "cache", "Cache-Control": "no-store"})

    async def _latest_questdb(
        self, wanted: list[str] | None, market: Market | None, *, required: bool
    ) -> Response:
        one = wanted[0] if wanted and len(wanted) == 1 else None

        async def compute() -> bytes:
            rows = await self._questdb(lambda: query.latest(self.pool, symbol=one, market=market))
            quotes = _rows_quotes(rows)
            if wanted is not None and one is None:
                chosen = set(wanted)
                quotes = [q for q in quotes if q["symbol"] in chosen]
            return orjson.dumps({"source": "questdb", "count": len(quotes), "quotes": quotes})

        # LATEST ON scans every partition: repeated fallbacks share one answer like history does
        key = ("latest", tuple(wanted) if wanted else None, market)
        body, _hit = await self.cache.get(key, compute)
        if not required and body.startswith(b'{"source":"questdb","count":0,'):
            raise ApiError(404, "not_found", "no quotes in QuestDB either")
        self.latest_from["questdb"] += 1
        self.metrics.latest_source.labels("questdb").inc()
        return _json(body, {"X-Sow-Source": "questdb", "Cache-Control": "no-store"})

    async def history(
        self,
        symbol: str,
        market: str,
        start: str | None,
        end: str | None,
        limit: int,
        order: Literal["asc", "desc"],
    ) -> Response:
        sym, mkt = query.check_symbol(symbol), query.check_market(market)
        query.check_limit(limit)
        rng = time_range(start, end, default_span=HISTORY_SPAN, max_span=MAX_RANGE)

        async def compute() -> bytes:
            rows = await self._questdb(
                lambda: query.history(
                    self.pool, sym, mkt, rng, limit=limit, newest_first=order == "desc"
                )
            )
            quotes = _rows_quotes(rows)
            doc = {
                "symbol": sym, "market": mkt, "from": _stamp(rng.start), "to": _stamp(rng.end),
                "limit": limit, "order": order, "count": len(quotes),
                "truncated": bool(rows is not None and rows.truncated), "quotes": quotes,
            }  # fmt: skip
            return orjson.dumps(doc)

        return await self._cached(("history", sym, mkt, start, end, limit, order), compute)

    async def stats(self, symbol: str, market: str, window: str) -> Response:
        sym, mkt = query.check_symbol(symbol), query.check_market(market)
        span = parse_duration(window, param="window", max_span=MAX_RANGE)

        async def compute() -> bytes:
            rows = await self._questdb(lambda: query.stats(self.pool, sym, mkt, window=span))
            if rows is None:  # no table yet: nothing stored
                now = datetime.now(UTC)
                values: dict[str, Any] = dict.fromkeys(query.STATS_COLUMNS)
                values.update(symbol=sym, market=mkt, count=0, to=now, **{"from": now - span})
            else:
                values = rows.dicts()[0]
            doc = {k: _stamp(v) for k, v in values.items()}
            doc["window"] = format_duration(span)
            return orjson.dumps(doc)

        return await self._cached(("stats", sym, mkt, span), compute)

    async def ohlc(
        self,
        symbol: str,
        market: str,
        interval: str,
        start: str | None,
        end: str | None,
        fill: Literal["none", "null", "prev"],
    ) -> Response:
        sym, mkt = query.check_symbol(symbol), query.check_market(market)
        step = parse_interval(interval)
        rng = time_range(start, end, default_span=OHLC_SPAN, max_span=MAX_RANGE)

        async def compute() -> bytes:
            rows = await self._questdb(
                lambda: query.ohlc(self.pool, sym, mkt, step, rng, fill=fill)
            )
            candles = [{k: _stamp(v) for k, v in d.items()} for d in rows.dicts()] if rows else []
            doc = {
                "symbol": sym, "market": mkt, "interval": step.name, "fill": fill,
                "from": _stamp(rng.start), "to": _stamp(rng.end), "count": len(candles),
                "candles": candles,
            }  # fmt: skip
            return orjson.dumps(doc)

        return await self._cached(("ohlc", sym, mkt, step.name, start, end, fill), compute)

    async def _questdb_ping(self) -> float:
        started = time.perf_counter()
        try:
            await query.fetch(self.pool, "SELECT 1", timeout_s=HEALTH_TIMEOUT_S)
        except UpstreamError as exc:
            raise UpstreamError(self._qdb_text(exc)) from None
        self._qdb_down_until = 0.0  # answering again: no need to wait for the breaker
        return (time.perf_counter() - started) * 1000

    async def health(self) -> Response:
        required = set(self.settings.api_health_required)
        checks: dict[str, Check] = dict(
            await asyncio.gather(
                probe("redis", self.store.ping, required),
                probe("questdb", self._questdb_ping, required),
                probe("nats", self.bridge.nats_rtt_ms, required),
            )
        )
        for name, check in checks.items():
            if check.state != "up":
                self.metrics.dependency_errors.labels(name).inc()
        status, doc = health_answer(
            checks,
            {
                "component": "api",
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 3),
                "ws_clients": len(self.bridge.clients),
            },
        )
        return Response(orjson.dumps(doc), status, {"Cache-Control": "no-store"}, media_type=JSON)


# --- ASGI middleware: bounds, rate limit, metrics, last-resort errors ----------------------


class Guard:
    """Refuses oversized and rate-limited requests, times every request for /metrics, and turns
    an unexpected exception into a JSON 500 (the traceback goes to the log only)."""

    def __init__(self, app: ASGIApp, service: ApiService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc = self.service
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = svc.refuse(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as exc:
            log.error(
                "unexpected error answering a request",
                exc_info=True,
                extra=kv(path=scope.get("path", ""), error=repr(exc)),
            )
            if status == 0:
                error = ApiError(500, "internal", "unexpected server error (details in the log)")
                await error.response()(scope, receive, send_and_note)
        finally:
            svc.observe(scope, status or 500, time.perf_counter() - started)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')} (got {got})")
    return "; ".join(parts)


# --- the application -----------------------------------------------------------------------

SymbolParam = Annotated[
    str,
    PathParam(
        description="Bybit symbol, 2-30 letters and digits (any case), e.g. BTCUSDT",
        json_schema_extra={"pattern": "^[A-Za-z0-9]{2,30}$"},
        examples=["BTCUSDT"],
    ),
]
MarketParam = Annotated[
    str,
    PathParam(
        description="SPOT or FUTURES (any case)",
        json_schema_extra={"enum": ["SPOT", "FUTURES"]},
        examples=["SPOT"],
    ),
]
FromParam = Annotated[
    str | None,
    Query(alias="from", description=f"start, inclusive ({TIME_HELP}, e.g. 2024-01-01T00:00:00Z)"),
]
ToParam = Annotated[
    str | None, Query(alias="to", description=f"end, exclusive ({TIME_HELP}); default now")
]


def create_app(settings: Settings, *, service: ApiService | None = None) -> FastAPI:
    """The ASGI app of ``sow serve-api`` (its lifespan starts and stops the service)."""
    svc = service or ApiService(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="sow API",
        version=__version__,
        summary="Bybit v5 market data (SPOT and USDT linear FUTURES) from Dragonfly and QuestDB.",
        description=(
            "Latest quotes from the Dragonfly/Redis cache; history, stats and OHLC candles from "
            'QuestDB. Errors are JSON `{"error": ..., "detail": ...}`. Live updates: '
            'WebSocket `/ws` (send `{"type":"subscribe","symbols":["*"]}`).'
        ),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.sow = svc

    async def usage_error(_request: Request, exc: Exception) -> Response:
        return ApiError(400, "bad_request", str(exc)).response()

    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return ApiError(400, "bad_request", _validation_detail(exc)).response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        names = {404: "not_found", 405: "method_not_allowed"}
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no such resource: {request.url.path[:200]} (see /docs)"
        elif exc.status_code == 405:
            detail = f"method {request.method[:20]} is not allowed here"
        error = ApiError(exc.status_code, names.get(exc.status_code, "http_error"), detail)
        error.headers.update(exc.headers or {})
        return error.response()

    app.add_exception_handler(UsageError, usage_error)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    @app.get(
        "/api/prices/latest",
        tags=["prices"],
        summary="Latest quote of every symbol and market",
        response_model=None,
        responses={
            200: {"model": LatestOut, "description": "header X-Sow-Source: cache|questdb"},
            **_errors(400, 429, 503, 504),
        },
    )
    async def latest(
        symbols: Annotated[
            str | None, Query(description="comma-separated symbols (default: all known)")
        ] = None,
        market: Annotated[
            str | None,
            Query(
                description="SPOT or FUTURES (default both)",
                json_schema_extra={"enum": ["SPOT", "FUTURES"]},
            ),
        ] = None,
    ) -> Response:
        """From the Dragonfly/Redis cache in one round trip; from QuestDB (`LATEST ON`) when the
        cache is down or empty. The `X-Sow-Source` header says which."""
        return await svc.latest(symbols, market)

    @app.get(
        "/api/prices/{symbol}/{market}/history",
        tags=["prices"],
        summary="Stored quotes of one symbol and market",
        response_model=None,
        responses={200: {"model": HistoryOut}, **_errors(400, 429, 503, 504)},
    )
    async def history(
        symbol: SymbolParam,
        market: MarketParam,
        start: FromParam = None,
        end: ToParam = None,
        limit: Annotated[
            int, Query(ge=1, le=query.MAX_LIMIT, description="most rows (the newest ones)")
        ] = 1000,
        order: Annotated[
            Literal["desc", "asc"], Query(description="desc: newest first; asc: oldest first")
        ] = "desc",
    ) -> Response:
        """Quotes with `from <= timestamp < to` (default: the last hour; at most 31 days)."""
        return await svc.history(symbol, market, start, end, limit, order)

    @app.get(
        "/api/prices/{symbol}/{market}/stats",
        tags=["prices"],
        summary="24 h statistics of one symbol and market",
        response_model=None,
        responses={200: {"model": StatsOut}, **_errors(400, 429, 503, 504)},
    )
    async def stats(
        symbol: SymbolParam,
        market: MarketParam,
        window: Annotated[str, Query(description="e.g. 24h, 7d (at most 31d)")] = STATS_WINDOW,
    ) -> Response:
        """count, first, last, min, max, avg, change and change_pct of the price over the
        window ending now."""
        return await svc.stats(symbol, market, window)

    @app.get(
        "/api/prices/{symbol}/{market}/ohlc",
        tags=["prices"],
        summary="OHLC candles of one symbol and market",
        response_model=None,
        responses={200: {"model": OhlcOut}, **_errors(400, 429, 503, 504)},
    )
    async def ohlc(
        symbol: SymbolParam,
        market: MarketParam,
        interval: Annotated[
            str,
            Query(description="bucket size", json_schema_extra={"enum": list(OHLC_INTERVALS)}),
        ] = "1m",
        start: FromParam = None,
        end: ToParam = None,
        fill: Annotated[
            Literal["none", "null", "prev"],
            Query(description="empty buckets: none = left out, null, prev = previous close"),
        ] = "none",
    ) -> Response:
        """Candles in buckets aligned to the UTC calendar (default: the last 24 hours; at most
        31 days)."""
        return await svc.ohlc(symbol, market, interval, start, end, fill)

    @app.get(
        "/health",
        tags=["operations"],
        summary="Dependencies and their round trips",
        response_model=None,
        responses={
            200: {"model": HealthOut},
            503: {"model": HealthOut, "description": "a required dependency is down"},
            **_errors(429),
        },
    )
    async def health() -> Response:
        return await svc.health()

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_model=None,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        doc = {
            "name": "sow API", "version": __version__, "docs": "/docs", "openapi": "/openapi.json",
            "health": "/health", "metrics": "/metrics", "websocket": "/ws",
            "latest": "/api/prices/latest",
        }  # fmt: skip
        return _json(orjson.dumps(doc))

    app.router.routes.append(WebSocketRoute("/ws", BridgeEndpoint(svc.bridge)))
    static = Path(settings.api_static_dir).expanduser()
    if static.is_dir():
        app.mount("/market", StaticFiles(directory=static, html=True), name="market")

    app.add_middleware(Guard, service=svc)
    origins = list(settings.cors_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if "*" in origins else origins,
        allow_methods=["GET", "HEAD", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["X-Sow-Source", "X-Sow-Cache", "Retry-After"],
        max_age=600,
    )
    return app


# --- sow serve-api -------------------------------------------------------------------------


class ApiServer:
    """The running ``sow serve-api``: :func:`create_app` on uvicorn (REST, /ws on one port)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = ApiService(settings)
        self.app = create_app(settings, service=self.service)

    @property
    def port(self) -> int | None:
        return self.service.port

    def status(self) -> dict[str, Any]:
        """The heartbeat document (``sow.status.api``), also what ``sow up`` shows."""
        return self.service.status()

    async def run(
        self, stop: asyncio.Event | None = None, *, sock: socket.socket | None = None
    ) -> None:
        """Serve until ``stop`` is set (``sock``: an already bound socket, e.g. for tests)."""
        stop = stop or asyncio.Event()
        s = self.settings
        sock = sock or bind_socket(s.api_host, s.api_port, what="sow serve-api")
        self.service.port = sock.getsockname()[1]
        await self.service.start()
        log.info(
            "serve-api listening",
            extra=kv(url=f"http://{s.api_host}:{self.service.port}", docs="/docs", ws="/ws"),
        )
        try:
            await serve_asgi(self.app, sock, s, stop)
        finally:
            await self.service.stop()


async def run_api(settings: Settings, stop: asyncio.Event | None = None) -> ApiServer:
    """Run ``sow serve-api`` until ``stop`` is set; returns the server for its counters."""
    server = ApiServer(settings)
    await server.run(stop)
    return server


__all__ = [
    "MAX_RANGE",
    "ApiError",
    "ApiServer",
    "ApiService",
    "Guard",
    "QueryCache",
    "RateLimiter",
    "create_app",
    "run_api",
]
