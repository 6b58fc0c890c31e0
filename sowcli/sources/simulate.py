"""Simulated Bybit traffic for demos and benchmarks, in Bybit's own wire format.

Every symbol follows a random walk. SPOT gets a ``tickers`` snapshot and an ``orderbook.1`` frame
every 50 ms; FUTURES gets one ``tickers`` snapshot, then deltas carrying only the changed fields
every 100 ms — exactly the shapes the live streams send, pushed through the same
:class:`~sowcli.sources.feed.Feed` as live frames. Everything it produces is labelled simulated in
logs and heartbeats; it never pretends to be the exchange.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sowcli.model import Market
from sowcli.sources.feed import Feed, now_us

SPOT_INTERVAL_S = 0.05
LINEAR_INTERVAL_S = 0.1

# Rough price levels so that simulated screens look plausible; other symbols get a stable
# pseudo-random level derived from their name.
_BASE_PRICES = {
    "BTCUSDT": 95_000.0,
    "ETHUSDT": 3_400.0,
    "BNBUSDT": 650.0,
    "SOLUSDT": 180.0,
    "XRPUSDT": 2.2,
    "ADAUSDT": 0.75,
    "DOGEUSDT": 0.2,
    "TRXUSDT": 0.25,
    "TONUSDT": 5.5,
    "AVAXUSDT": 35.0,
    "LINKUSDT": 18.0,
    "DOTUSDT": 6.5,
    "POLUSDT": 0.45,
    "ICPUSDT": 9.0,
    "NEARUSDT": 5.0,
}


def base_price(symbol: str) -> float:
    if symbol in _BASE_PRICES:
        return _BASE_PRICES[symbol]
    return round(0.5 + (zlib.crc32(symbol.encode()) % 20_000) / 100, 4)


def _fmt(x: float, ref: float) -> str:
    decimals = 2 if ref >= 100 else 4 if ref >= 1 else 6
    return f"{x:.{decimals}f}"


@dataclass
class _Walk:
    symbol: str
    price: float
    prev24h: float
    high: float
    low: float
    volume: float
    cs: int
    oi: float

    def step(self, rng: random.Random) -> None:
        self.price *= 1 + rng.gauss(0, 0.0004)
        self.high = max(self.high, self.price)
        self.low = min(self.low, self.price)
        self.volume += abs(rng.gauss(0, 2))
        self.cs += rng.randint(1, 50)
        self.oi = max(0.0, self.oi * (1 + rng.gauss(0, 0.0001)))


class SimOrigin:
    def __init__(self, market: Market) -> None:
        self.market: Market = market
        self.name = f"simulated-{market.lower()}"
        self.last_data_mono = 0.0

    def on_control(self, msg: dict[str, Any], recv_us: int) -> None:
        return None


def _walks(symbols: Sequence[str], rng: random.Random) -> dict[str, _Walk]:
    out = {}
    for sym in symbols:
        p = base_price(sym) * (1 + rng.uniform(-0.01, 0.01))
        out[sym] = _Walk(
            sym,
            p,
            p * (1 - rng.uniform(-0.03, 0.03)),
            p * 1.01,
            p * 0.99,
            rng.uniform(1e3, 1e5),
            rng.randint(10**9, 10**10),
            rng.uniform(1e4, 1e6),
        )
    return out


def spot_frames(w: _Walk, ts: int, rng: random.Random) -> tuple[bytes, bytes]:
    ref = w.price
    ticker = {
        "topic": f"tickers.{w.symbol}",
        "ts": ts,
        "type": "snapshot",
        "cs": w.cs,
        "data": {
            "symbol": w.symbol,
            "lastPrice": _fmt(w.price, ref),
            "highPrice24h": _fmt(w.high, ref),
            "lowPrice24h": _fmt(w.low, ref),
            "prevPrice24h": _fmt(w.prev24h, ref),
            "volume24h": f"{w.volume:.4f}",
            "turnover24h": f"{w.volume * w.price:.4f}",
            "price24hPcnt": f"{(w.price / w.prev24h - 1):.4f}",
            "usdIndexPrice": _fmt(w.price * 1.0001, ref),
        },
    }
    spread = w.price * 0.00002
    book = {
        "topic": f"orderbook.1.{w.symbol}",
        "type": "snapshot",
        "ts": ts,
        "data": {
            "s": w.symbol,
            "b": [[_fmt(w.price - spread, ref), f"{rng.uniform(0.1, 5):.3f}"]],
            "a": [[_fmt(w.price + spread, ref), f"{rng.uniform(0.1, 5):.3f}"]],
            "u": w.cs,
            "seq": w.cs,
        },
        "cts": ts,
    }
    return orjson.dumps(ticker), orjson.dumps(book)


def linear_snapshot(w: _Walk, ts: int) -> bytes:
    ref = w.price
    spread = w.price * 0.00001
    data = {
        "symbol": w.symbol,
        "tickDirection": "PlusTick",
        "price24hPcnt": f"{(w.price / w.prev24h - 1):.6f}",
        "lastPrice": _fmt(w.price, ref),
        "prevPrice24h": _fmt(w.prev24h, ref),
        "highPrice24h": _fmt(w.high, ref),
        "lowPrice24h": _fmt(w.low, ref),
        "prevPrice1h": _fmt(w.price, ref),
        "markPrice": _fmt(w.price, ref),
        "indexPrice": _fmt(w.price * 0.9999, ref),
        "openInterest": f"{w.oi:.2f}",
        "openInterestValue": f"{w.oi * w.price:.2f}",
        "turnover24h": f"{w.volume * w.price:.4f}",
        "volume24h": f"{w.volume:.4f}",
        "nextFundingTime": str((ts // 28_800_000 + 1) * 28_800_000),
        "fundingRate": "0.0001",
        "bid1Price": _fmt(w.price - spread, ref),
        "bid1Size": "1.000",
        "ask1Price": _fmt(w.price + spread, ref),
        "ask1Size": "1.000",
    }
    frame = {"topic": f"tickers.{w.symbol}", "type": "snapshot", "data": data, "cs": w.cs, "ts": ts}
    return orjson.dumps(frame)


def linear_delta(w: _Walk, ts: int, rng: random.Random) -> bytes:
    ref = w.price
    spread = w.price * 0.00001
    data: dict[str, str] = {"symbol": w.symbol}
    if rng.random() < 0.8:
        data["lastPrice"] = _fmt(w.price, ref)
        data["tickDirection"] = rng.choice(("PlusTick", "MinusTick", "ZeroPlusTick"))
        data["volume24h"] = f"{w.volume:.4f}"
        data["turnover24h"] = f"{w.volume * w.price:.4f}"
        data["price24hPcnt"] = f"{(w.price / w.prev24h - 1):.6f}"
        data["highPrice24h"] = _fmt(w.high, ref)
        data["lowPrice24h"] = _fmt(w.low, ref)
    if rng.random() < 0.6:
        data["bid1Price"] = _fmt(w.price - spread, ref)
        data["ask1Price"] = _fmt(w.price + spread, ref)
        data["bid1Size"] = f"{rng.uniform(0.1, 50):.3f}"
    if rng.random() < 0.3:
        data["markPrice"] = _fmt(w.price, ref)
        data["indexPrice"] = _fmt(w.price * 0.9999, ref)
        data["openInterest"] = f"{w.oi:.2f}"
    frame = {"topic": f"tickers.{w.symbol}", "type": "delta", "data": data, "cs": w.cs, "ts": ts}
    return orjson.dumps(frame)


async def simulate(
    feed: Feed, symbols: Sequence[str], markets: Sequence[Market], *, seed: int | None = None
) -> None:
    """Generate frames until cancelled."""
    rng = random.Random(seed)
    tasks = []
    if "SPOT" in markets:
        tasks.append(_spot_loop(feed, _walks(symbols, rng), rng))
    if "FUTURES" in markets:
        tasks.append(_linear_loop(feed, _walks(symbols, rng), rng))
    await asyncio.gather(*tasks)


async def _spot_loop(feed: Feed, walks: dict[str, _Walk], rng: random.Random) -> None:
    origin = SimOrigin("SPOT")
    feed.connection_reset(origin)
    next_at = time.monotonic()
    while True:
        ts = time.time_ns() // 1_000_000
        for w in walks.values():
            w.step(rng)
            ticker, book = spot_frames(w, ts, rng)
            if feed.normalizer.spot_book:
                await feed.put(origin, book, now_us())
            await feed.put(origin, ticker, now_us())
        next_at += SPOT_INTERVAL_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _linear_loop(feed: Feed, walks: dict[str, _Walk], rng: random.Random) -> None:
    origin = SimOrigin("FUTURES")
    feed.connection_reset(origin)
    ts = time.time_ns() // 1_000_000
    for w in walks.values():
        await feed.put(origin, linear_snapshot(w, ts), now_us())
    next_at = time.monotonic()
    while True:
        next_at += LINEAR_INTERVAL_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        ts = time.time_ns() // 1_000_000
        for w in walks.values():
            w.step(rng)
            await feed.put(origin, linear_delta(w, ts, rng), now_us())
