"""A fake Bybit v5 public REST API (``https://api.bybit.com``), for tests and benchmarks.

A tiny HTTP/1.1 server on ``asyncio.start_server`` (keep-alive, GET only, no dependencies) that
answers the market endpoints the hub uses with Bybit's envelope
``{"retCode":0,"retMsg":"OK","result":{...},"retExtInfo":{},"time":ms}``:

* ``/v5/market/instruments-info``: the known symbols, paginated with ``nextPageCursor`` on linear;
* ``/v5/market/kline``: deterministic synthetic candles, newest first, the running candle included;
* ``/v5/market/tickers`` and ``/v5/market/time``.

Business errors are HTTP 200 with ``retCode`` ≠ 0 (``10001 "params error: symbol invalid"``), as
on Bybit. Faults are injected with :meth:`FakeBybitRest.fail_next` /
:meth:`FakeBybitRest.timeout_next`, and an optional rate limit imitates Bybit's IP limit (HTTP 403
"access too frequent").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

from .bybit_ws import (
    KLINE_INTERVALS,
    _hash_unit,
    base_price,
    fmt_price,
    fmt_qty,
    price_decimals,
    qty_decimals,
)

if TYPE_CHECKING:
    from .bybit_ws import FakeBybit

__all__ = ["FakeBybitRest", "interval_ms", "kline_open"]

MINUTE: Final = 60_000
DAY: Final = 1440 * MINUTE
WEEK: Final = 7 * DAY
_MONDAY_OFFSET: Final = 4 * DAY  # 1970-01-01 was a Thursday; Bybit's weekly candles open on Monday
_CATEGORIES: Final = ("spot", "linear")
_QUOTES: Final = ("USDT", "USDC")
_REASONS: Final[dict[int, str]] = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def interval_ms(interval: str) -> int:
    """Length of a fixed-size kline interval in ms (``M`` has none: see :func:`kline_open`)."""
    if interval == "D":
        return DAY
    if interval == "W":
        return WEEK
    if interval == "M":
        raise ValueError("monthly candles have no fixed length")
    return int(interval) * MINUTE


def _month_start(ms: int, months_ahead: int = 0) -> int:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    index = dt.year * 12 + dt.month - 1 + months_ahead
    return int(datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp() * 1000)


def kline_open(ms: int, interval: str) -> int:
    """Open time of the candle containing ``ms``: minutes and ``D`` are aligned to the UTC epoch,
    ``W`` to Monday 00:00 UTC, ``M`` to the 1st of the (calendar) month 00:00 UTC."""
    if interval == "M":
        return _month_start(ms)
    if interval == "W":
        return ms - (ms - _MONDAY_OFFSET) % WEEK
    size = interval_ms(interval)
    return ms - ms % size


def _next_open(open_ms: int, interval: str) -> int:
    return _month_start(open_ms, 1) if interval == "M" else open_ms + interval_ms(interval)


def _prev_open(open_ms: int, interval: str) -> int:
    return _month_start(open_ms, -1) if interval == "M" else open_ms - interval_ms(interval)


def synthetic_price(symbol: str, ms: int) -> float:
    """The fake's deterministic "market price" of ``symbol`` at ``ms``: slow waves around
    :func:`base_price` plus per-minute noise. Candle N's close equals candle N+1's open."""
    base = base_price(symbol)
    phase = _hash_unit("phase", symbol) * 2 * math.pi
    hours = ms / 3_600_000
    noise = _hash_unit("noise", symbol, ms // MINUTE) * 2 - 1
    wave = 0.03 * math.sin(hours / 7 + phase) + 0.01 * math.sin(hours / 0.9 + 2 * phase)
    return base * (1 + wave + 0.002 * noise)


@dataclass
class _Fault:
    kind: str  # "fail" | "hang"
    remaining: int
    status: int = 500
    path: str | None = None
    body: str | None = None


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset={offset}".encode()).decode().rstrip("=")


def _offset(cursor: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        key, _, value = raw.partition("=")
        return int(value) if key == "offset" and int(value) >= 0 else None
    except ValueError:
        return None


class _ParamError(Exception):
    def __init__(self, message: str, code: int = 10001) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeBybitRest:
    """Fake Bybit public REST server on ``127.0.0.1`` (free port by default).

    >>> async with FakeBybitRest(valid_symbols={"BTCUSDT", "ETHUSDT"}) as rest:
    ...     async with httpx.AsyncClient(base_url=rest.url) as http:
    ...         r = await http.get("/v5/market/kline", params={"category": "linear", ...})

    Symbols: ``valid_symbols`` serves both categories unless ``spot_symbols`` / ``linear_symbols``
    are given; the sets are live (:meth:`symbols`). :attr:`status` overrides a symbol's
    instruments-info status (``{"LUNAUSDT": "Closed"}``); a symbol only named there is listed too.
    Kline and tickers answer only for listed symbols, whatever their status.

    Args:
        page_size: instruments-info page size when the request has no ``limit`` (Bybit: 500).
        spot_pagination: paginate spot instruments-info too. Off by default because real spot
            answers everything in one page, without a ``nextPageCursor`` key (see the recording).
        now_ms: freeze the clock (the running candle, ``/time``, envelopes) for exact assertions.
        hang_seconds: how long a :meth:`timeout_next` request hangs before the connection is closed
            without an answer (longer than any sane client timeout).
        rate_limit: ``(requests, window_s)``; over it, HTTP 403 "access too frequent" like Bybit's
            IP limit (600 per 5 s). ``None`` (default): unlimited, just counted.
        ws: a :class:`~tests.fakes.bybit_ws.FakeBybit` whose published ticker state
            ``/v5/market/tickers`` should report (so REST seeding matches the stream).
    """

    def __init__(
        self,
        valid_symbols: Iterable[str] = ("BTCUSDT", "ETHUSDT", "SOLUSDT"),
        *,
        spot_symbols: Iterable[str] | None = None,
        linear_symbols: Iterable[str] | None = None,
        page_size: int = 500,
        spot_pagination: bool = False,
        now_ms: int | None = None,
        hang_seconds: float = 30.0,
        rate_limit: tuple[int, float] | None = None,
        ws: FakeBybit | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        base = set(valid_symbols)
        self.valid_symbols: set[str] = base
        self._symbols: dict[str, set[str]] = {
            "spot": set(spot_symbols) if spot_symbols is not None else base,
            "linear": set(linear_symbols) if linear_symbols is not None else base,
        }
        self.status: dict[str, str] = {}
        """Per-symbol status override for instruments-info (``Trading`` otherwise)."""
        self.page_size = page_size
        self.spot_pagination = spot_pagination
        self.now_ms = now_ms
        self.hang_seconds = hang_seconds
        self.rate_limit = rate_limit
        self.ws = ws
        self.host = host
        self._port = port

        self.requests: list[tuple[str, dict[str, str]]] = []
        """Every request received, in order: (path, query parameters)."""
        self.request_times: list[float] = []
        """``time.monotonic()`` of every request (same order as :attr:`requests`)."""
        self.in_flight = 0
        self.max_in_flight = 0
        """Highest number of requests being answered at once (client concurrency)."""
        self._faults: list[_Fault] = []
        self._server: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeBybitRest:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._closing.clear()
        self._server = await asyncio.start_server(self._on_client, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._closing.set()  # releases hanging requests
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the REST base URL, no trailing slash)."""
        return f"http://{self.host}:{self._port}"

    def symbols(self, category: str) -> set[str]:
        """The live, mutable set of symbols of ``category`` (``spot`` / ``linear``)."""
        return self._symbols[category]

    # ------------------------------------------------------------------ faults and counters

    def fail_next(
        self, n: int = 1, status: int = 500, *, path: str | None = None, body: str | None = None
    ) -> None:
        """Answer the next ``n`` requests (to ``path`` only, if given) with HTTP ``status``.

        Default bodies: 403 → ``"access too frequent"`` (Bybit's IP ban page, text), others → a
        short JSON/text error. With ``status=200`` pass a ``body`` to inject e.g. a business error
        (``'{"retCode":10006,"retMsg":"Too many visits!",...}'``)."""
        self._faults.append(_Fault("fail", n, status=status, path=path, body=body))

    def timeout_next(self, n: int = 1, *, path: str | None = None) -> None:
        """Make the next ``n`` requests hang (``hang_seconds``, or until :meth:`stop`) and then
        close the connection without answering: the client must time out."""
        self._faults.append(_Fault("hang", n, path=path))

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def request_count(self) -> int:
        return len(self.requests)

    def count(self, path: str) -> int:
        """Requests received for ``path`` (e.g. ``"/v5/market/kline"``)."""
        return sum(1 for p, _ in self.requests if p == path)

    def max_requests_in(self, window: float) -> int:
        """Most requests seen within any ``window`` seconds: the observed peak rate."""
        times = self.request_times
        best = 0
        lo = 0
        for hi, t in enumerate(times):
            while t - times[lo] > window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.path is None or fault.path == path:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def recent_requests(self, window: float) -> int:
        """Requests received in the last ``window`` seconds (the current one included)."""
        now = time.monotonic()
        recent = 0
        for t in reversed(self.request_times):
            if now - t > window:
                break
            recent += 1
        return recent

    def _rate_limited(self) -> bool:
        if self.rate_limit is None:
            return False
        limit, window = self.rate_limit
        return self.recent_requests(window) > limit

    # ------------------------------------------------------------------ HTTP plumbing

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            while not self._closing.is_set():
                request_line = await reader.readline()
                if not request_line:
                    break
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                parts = request_line.decode("latin-1").split()
                if len(parts) != 3:
                    await self._write(writer, 400, "text/plain", "bad request\n", close=True)
                    break
                method, target, version = parts
                keep_alive = headers.get("connection", "").lower() != "close" and version.endswith(
                    "1.1"
                )
                answered = await self._serve(writer, method, target, keep_alive)
                if not answered or not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: str,
        *,
        close: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        payload = body.encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(payload)}",
            "Connection: close" if close else "Connection: keep-alive",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()

    async def _serve(
        self, writer: asyncio.StreamWriter, method: str, target: str, keep_alive: bool
    ) -> bool:
        """Answer one request; returns False when the connection must be dropped."""
        split = urlsplit(target)
        path = split.path
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        self.requests.append((path, params))
        self.request_times.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._take_fault(path)
            if fault is not None and fault.kind == "hang":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.hang_seconds)
                return False
            if fault is not None:
                await self._write_fault(writer, fault.status, fault.body, keep_alive)
                return True
            if self._rate_limited():
                await self._write_fault(writer, 403, None, keep_alive)
                return True
            if method != "GET":
                await self._write(writer, 405, "text/plain", "method not allowed\n")
                return True
            result = self._route(path, params)
            if result is None:
                await self._write(writer, 404, "text/plain", "404 page not found\n")
                return True
            await self._write(
                writer,
                200,
                "application/json; charset=utf-8",
                json.dumps(result, separators=(",", ":")),
                extra=self._limit_headers(),
            )
            return True
        finally:
            self.in_flight -= 1

    def _limit_headers(self) -> dict[str, str]:
        """``X-Bapi-Limit*`` headers as Bybit sends them (per-endpoint quota; informative)."""
        now = self._now()
        return {
            "X-Bapi-Limit": "600",
            "X-Bapi-Limit-Status": str(max(0, 600 - self.recent_requests(5.0))),
            "X-Bapi-Limit-Reset-Timestamp": str(now + 5000),
            "Timenow": str(now),
        }

    async def _write_fault(
        self, writer: asyncio.StreamWriter, status: int, body: str | None, keep_alive: bool
    ) -> None:
        if body is not None:
            content_type = "application/json" if body.lstrip().startswith("{") else "text/plain"
            await self._write(writer, status, content_type, body)
        elif status == 403:
            await self._write(writer, 403, "text/plain", "access too frequent")
        elif status == 200:
            await self._write(
                writer,
                200,
                "application/json",
                json.dumps(self._envelope(10006, "Too many visits!", {})),
            )
        else:
            reason = _REASONS.get(status, "Error")
            await self._write(writer, status, "text/plain", f"{status} {reason}\n")

    # ------------------------------------------------------------------ endpoints

    def _now(self) -> int:
        return self.now_ms if self.now_ms is not None else time.time_ns() // 1_000_000

    def _envelope(self, code: int, msg: str, result: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "retCode": code,
            "retMsg": msg,
            "result": dict(result),
            "retExtInfo": {},
            "time": self._now(),
        }

    def _route(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        handlers = {
            "/v5/market/instruments-info": self._instruments,
            "/v5/market/kline": self._kline,
            "/v5/market/tickers": self._tickers,
            "/v5/market/time": self._time,
        }
        handler = handlers.get(path.rstrip("/"))
        if handler is None:
            return None
        try:
            return self._envelope(0, "OK", handler(params))
        except _ParamError as err:
            return self._envelope(err.code, err.message, {})

    def _category(self, params: Mapping[str, str], default: str | None) -> str:
        category = params.get("category") or default
        if category not in _CATEGORIES:
            raise _ParamError("params error: category invalid" if category else "category is null")
        return category

    def _symbol(self, params: Mapping[str, str], category: str, required: bool) -> str | None:
        symbol = params.get("symbol")
        if not symbol:
            if required:
                raise _ParamError("params error: symbol invalid")
            return None
        if symbol not in self._symbols[category] and symbol not in self.status:
            raise _ParamError("params error: symbol invalid")
        return symbol

    def _time(self, params: Mapping[str, str]) -> dict[str, Any]:
        ns = self.now_ms * 1_000_000 if self.now_ms is not None else time.time_ns()
        return {"timeSecond": str(ns // 10**9), "timeNano": str(ns)}

    def _listed(self, category: str) -> list[str]:
        return sorted(self._symbols[category] | set(self.status))

    def _instruments(self, params: Mapping[str, str]) -> dict[str, Any]:
        """instruments-info: sorted symbols, ``status`` filter, ``symbol`` filter, ``limit``
        (1–1000, default :attr:`page_size`) and an opaque ``cursor`` → ``nextPageCursor`` (``""``
        on the last page)."""
        category = self._category(params, None)
        symbol = self._symbol(params, category, required=False)
        names = [symbol] if symbol else self._listed(category)
        wanted = params.get("status")
        if wanted:
            names = [s for s in names if self.status.get(s, "Trading") == wanted]
        items = [self._instrument(category, s) for s in names]
        paginate = category == "linear" or self.spot_pagination
        if not paginate:
            return {"category": category, "list": items}
        limit = self._int(params, "limit", self.page_size, 1, 1000)
        offset = 0
        if params.get("cursor"):
            parsed = _offset(params["cursor"])
            if parsed is None:
                raise _ParamError("params error: cursor invalid")
            offset = parsed
        page = items[offset : offset + limit]
        more = offset + limit < len(items)
        return {
            "category": category,
            "list": page,
            "nextPageCursor": _cursor(offset + limit) if more else "",
        }

    def _instrument(self, category: str, symbol: str) -> dict[str, Any]:
        status = self.status.get(symbol, "Trading")
        quote = next((q for q in _QUOTES if symbol.endswith(q)), "USDT")
        coin = symbol[: -len(quote)] if symbol.endswith(quote) else symbol
        price = base_price(symbol)
        pdec, qdec = price_decimals(price), qty_decimals(price)
        tick = f"{10.0**-pdec:.{pdec}f}"
        step = f"{10.0**-qdec:.{qdec}f}" if qdec else "1"
        if category == "spot":
            return {
                "symbol": symbol,
                "baseCoin": coin,
                "quoteCoin": quote,
                "innovation": "0",
                "status": status,
                "marginTrading": "utaOnly",
                "stTag": "0",
                "lotSizeFilter": {
                    "basePrecision": step,
                    "quotePrecision": "0.0000001",
                    "minOrderQty": step,
                    "maxOrderQty": "1000000",
                    "minOrderAmt": "5",
                    "maxOrderAmt": "8000000",
                },
                "priceFilter": {"tickSize": tick.rstrip("0").rstrip(".") or tick},
                "riskParameters": {"priceLimitRatioX": "0.005", "priceLimitRatioY": "0.01"},
                "symbolType": "",
            }
        return {
            "symbol": symbol,
            "contractType": "LinearPerpetual",
            "status": status,
            "baseCoin": coin,
            "quoteCoin": quote,
            "launchTime": "1585526400000",
            "deliveryTime": "0",
            "deliveryFeeRate": "",
            "priceScale": str(pdec),
            "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
            "priceFilter": {"minPrice": tick, "maxPrice": "1999999.80", "tickSize": tick},
            "lotSizeFilter": {
                "maxOrderQty": "1190.000",
                "minOrderQty": step,
                "qtyStep": step,
                "postOnlyMaxOrderQty": "1190.000",
                "maxMktOrderQty": "500.000",
                "minNotionalValue": "5",
            },
            "unifiedMarginTrade": True,
            "fundingInterval": 480,
            "settleCoin": quote,
            "copyTrading": "both",
            "upperFundingRate": "0.005",
            "lowerFundingRate": "-0.005",
            "isPreListing": False,
            "preListingInfo": None,
            "displayName": "",
            "symbolType": "",
        }

    @staticmethod
    def _int(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
        raw = params.get(name)
        if raw in (None, ""):
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _ParamError(f"params error: {name} invalid") from None
        if not lo <= value <= hi:
            raise _ParamError(f"params error: {name} invalid")
        return value

    def kline_row(self, category: str, symbol: str, interval: str, open_ms: int) -> list[str]:
        """The row the fake serves for the candle opening at ``open_ms``:
        ``[startMs, open, high, low, close, volume, turnover]`` as strings. The running candle
        (containing "now") closes at the current price and has a pro-rated volume."""
        now = self._now()
        close_ms = _next_open(open_ms, interval)
        running = open_ms <= now < close_ms
        o = synthetic_price(symbol, open_ms)
        c = synthetic_price(symbol, now if running else close_ms)
        wick = 0.002 * ((close_ms - open_ms) / MINUTE) ** 0.25
        high = max(o, c) * (1 + wick * _hash_unit("hi", symbol, interval, open_ms))
        low = min(o, c) * (1 - wick * _hash_unit("lo", symbol, interval, open_ms))
        minutes = (
            (min(now, close_ms) - open_ms) / MINUTE if running else (close_ms - open_ms) / MINUTE
        )
        volume = 5e4 / o * minutes * (0.5 + _hash_unit("vol", symbol, interval, open_ms))
        ref = base_price(symbol)  # one format per symbol: candle N's close == candle N+1's open
        pdec, qdec = price_decimals(ref), qty_decimals(ref)
        return [
            str(open_ms),
            fmt_price(o, pdec, category),
            fmt_price(high, pdec, category),
            fmt_price(low, pdec, category),
            fmt_price(c, pdec, category),
            fmt_qty(volume, qdec),
            f"{volume * (o + c) / 2:.4f}",
        ]

    def _kline(self, params: Mapping[str, str]) -> dict[str, Any]:
        """kline: candles whose open time is in ``[start, end]`` (``end`` defaults to now, and is
        capped at the running candle), newest first. When the window holds more than ``limit``
        candles the newest ``limit`` are returned (end-anchored, like Bybit). Intervals
        ``1 3 5 15 30 60 120 240 360 720`` minutes, ``D`` (UTC day), ``W`` (from Monday), ``M``
        (calendar month, UTC)."""
        category = self._category(params, "linear")
        symbol = self._symbol(params, category, required=True)
        assert symbol is not None
        interval = params.get("interval", "")
        if interval not in KLINE_INTERVALS:
            raise _ParamError("params error: interval invalid")
        limit = self._int(params, "limit", 200, 1, 1000)
        now = self._now()
        end = self._int(params, "end", now, 0, 2**62)
        start = self._int(params, "start", 0, 0, 2**62)
        if start > end:
            raise _ParamError("params error: start must be less than end")
        cursor = kline_open(min(end, now), interval)
        rows: list[list[str]] = []
        while len(rows) < limit and cursor >= start:
            rows.append(self.kline_row(category, symbol, interval, cursor))
            cursor = _prev_open(cursor, interval)
        return {"symbol": symbol, "category": category, "list": rows}

    def _tickers(self, params: Mapping[str, str]) -> dict[str, Any]:
        """tickers: one object per symbol (all listed symbols without ``symbol``). Spot includes
        bid1/ask1 (unlike the spot WS ticker). Values follow the linked :attr:`ws` fake's published
        state when there is one, else a synthetic ticker at :func:`synthetic_price`."""
        category = self._category(params, None)
        symbol = self._symbol(params, category, required=False)
        names = [symbol] if symbol else self._listed(category)
        return {"category": category, "list": [self._ticker(category, s) for s in names]}

    def _ticker(self, category: str, symbol: str) -> dict[str, Any]:
        now = self._now()
        last = synthetic_price(symbol, now)
        ref = base_price(symbol)
        pdec, qdec = price_decimals(ref), qty_decimals(ref)
        prev = synthetic_price(symbol, now - DAY)

        def p(value: float) -> str:
            return fmt_price(value, pdec, category)

        volume = 5e4 / last * 1440
        base: dict[str, Any] = {
            "symbol": symbol,
            "lastPrice": p(last),
            "prevPrice24h": p(prev),
            "price24hPcnt": f"{last / prev - 1:.4f}",
            "highPrice24h": p(max(last, prev) * 1.01),
            "lowPrice24h": p(min(last, prev) * 0.99),
            "turnover24h": f"{volume * last:.4f}",
            "volume24h": fmt_qty(volume, qdec),
            "bid1Price": p(last - 10.0**-pdec),
            "bid1Size": fmt_qty(2e4 / last, qdec),
            "ask1Price": p(last),
            "ask1Size": fmt_qty(2e4 / last, qdec),
        }
        if self.ws is not None:
            base.update(self.ws.state("spot" if category == "spot" else "linear", symbol))
        if category == "spot":
            base.setdefault("usdIndexPrice", p(last))
            return base
        linear = {
            "indexPrice": p(last),
            "markPrice": p(last),
            "prevPrice1h": p(synthetic_price(symbol, now - 3_600_000)),
            "openInterest": fmt_qty(volume * 3, qdec),
            "openInterestValue": f"{volume * 3 * last:.2f}",
            "fundingRate": "0.0001",
            "nextFundingTime": str((now // (8 * 3_600_000) + 1) * 8 * 3_600_000),
            "predictedDeliveryPrice": "",
            "basisRate": "",
            "deliveryFeeRate": "",
            "deliveryTime": "0",
            "basis": "",
            "preOpenPrice": "",
            "preQty": "",
            "curPreListingPhase": "",
        }
        return {**linear, **base}
