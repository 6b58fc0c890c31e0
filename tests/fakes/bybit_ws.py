"""A fake Bybit v5 *public* websocket exchange, for tests and benchmarks.

It imitates what the real streams (``wss://stream.bybit.com/v5/public/{spot,linear}``) do, as
far as the listener can observe it; see ``/work/shared/reference/bybit-v5.md`` and its samples:

* one path per market (``/v5/public/spot`` and ``/v5/public/linear``); any other path is refused
  during the opening handshake with HTTP 404, as Bybit's gateway does;
* application-level heartbeats: the *text* frame ``{"op":"ping"}`` is answered with a pong JSON
  (protocol-level websocket pings are answered by the websockets library, but do not count);
* ``subscribe`` / ``unsubscribe`` with the exact ack and error JSON of each market (spot: at most 10
  args, invalid symbols rejected one by one; linear: one bad or duplicate topic rejects the whole
  request);
* data frames in the wire format: numbers as strings, ``ts`` in ms, ``cs`` an increasing integer,
  spot ``tickers`` always full snapshots, linear ``tickers`` one snapshot per subscription then
  deltas carrying only changed fields (plus ``symbol``), ``orderbook.1`` top-of-book snapshots.

Tests drive it deterministically with ``auto=False`` and the ``send_*`` methods; the automatic
generator (``auto=True``, the default) produces a realistic random walk every ``auto_interval``
seconds. Run as a program (``python -m tests.fakes.bybit_ws --help``) it is the load generator
of the benchmarks: see :func:`main`.
"""

# The wait_* helpers take a ``timeout`` argument on purpose: it is the convenient test API.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import math
import random
import signal
import string
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Literal

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = [
    "KLINE_INTERVALS",
    "MARKETS",
    "FakeBybit",
    "Market",
    "base_price",
    "fmt_price",
    "fmt_qty",
    "price_decimals",
    "qty_decimals",
    "synthetic_ticker",
]

Market = Literal["spot", "linear"]
MARKETS: Final[tuple[Market, Market]] = ("spot", "linear")
KLINE_INTERVALS: Final[frozenset[str]] = frozenset(
    {"1", "3", "5", "15", "30", "60", "120", "240", "360", "720", "D", "W", "M"}
)
# orderbook depths Bybit publishes per market (``orderbook.{depth}.{symbol}``).
_BOOK_DEPTHS: Final[dict[str, frozenset[str]]] = {
    "spot": frozenset({"1", "50", "200", "1000"}),
    "linear": frozenset({"1", "50", "200", "500", "1000"}),
}
_QUOTES: Final[tuple[str, ...]] = ("USDT", "USDC", "USD", "BTC", "ETH", "EUR")
_KNOWN_PRICES: Final[dict[str, float]] = {
    "BTC": 65000.0,
    "ETH": 3000.0,
    "SOL": 150.0,
    "BNB": 600.0,
    "XRP": 0.6,
    "DOGE": 0.12,
    "ADA": 0.45,
    "LTC": 80.0,
    "LINK": 15.0,
    "AVAX": 30.0,
    "DOT": 6.0,
    "TON": 5.5,
    "TRX": 0.13,
    "SUI": 1.5,
    "PEPE": 0.00001,
    "1000PEPE": 0.01,
}


def _json(obj: object) -> str:
    """Serialise like Bybit's Go gateway: compact, with ``<``, ``>``, ``&`` escaped as ``\\u003c``…

    (The spot sample ``"args size \\u003e10"`` shows Go's HTML-safe escaping.)
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hash_unit(*parts: object) -> float:
    """Deterministic pseudo-random number in [0, 1) from ``parts`` (stable across processes)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _base_coin(symbol: str) -> str:
    for quote in _QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)]
    return symbol


def base_price(symbol: str) -> float:
    """A plausible reference price for ``symbol`` (known coins roughly right, others hashed)."""
    coin = _base_coin(symbol)
    if coin in _KNOWN_PRICES:
        return _KNOWN_PRICES[coin]
    return float(10 ** (_hash_unit("price", symbol) * 5 - 2))  # 0.01 … 1000


def price_decimals(price: float) -> int:
    """Decimals of the tick size Bybit would use for this price (BTC 2, ETH 2, DOGE 6…)."""
    return max(2, min(8, 4 - math.floor(math.log10(max(price, 1e-9)))))


def qty_decimals(price: float) -> int:
    """Decimals of quantities for a coin at this price (BTC 3, ETH 2, DOGE 0)."""
    return max(0, min(3, math.floor(math.log10(max(price, 1e-9))) - 1))


def fmt_price(value: float, decimals: int, market: str) -> str:
    """Format a price as Bybit does: linear keeps the tick's decimals (``"65114.30"``), spot strips
    trailing zeros (``"65140.5"``, ``"20575"``)."""
    text = f"{value:.{decimals}f}"
    if market == "spot" and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def fmt_qty(value: float, decimals: int) -> str:
    return f"{max(value, 0.0):.{decimals}f}"


def _next_funding_ms(now_ms: int) -> int:
    period = 8 * 3_600_000
    return (now_ms // period + 1) * period


@dataclass
class _Sim:
    """Numeric state of one (market, symbol), random-walked by the automatic generator."""

    market: str
    symbol: str
    rng: random.Random
    decimals: int = 2
    qdec: int = 3
    tick: float = 0.01
    last: float = 0.0
    prev24h: float = 0.0
    prev1h: float = 0.0
    high: float = 0.0
    low: float = 0.0
    volume: float = 0.0
    turnover: float = 0.0
    mark: float = 0.0
    index: float = 0.0
    oi: float = 0.0
    bid_size: float = 0.0
    ask_size: float = 0.0
    funding: float = 0.0001
    direction: str = "ZeroPlusTick"
    u: int = 0
    seq: int = 0

    @classmethod
    def create(cls, market: str, symbol: str, seed: int) -> _Sim:
        rng = random.Random(f"{seed}|{market}|{symbol}")
        price = base_price(symbol) * (1 + rng.uniform(-0.02, 0.02))
        decimals = price_decimals(price)
        sim = cls(market=market, symbol=symbol, rng=rng, decimals=decimals)
        sim.qdec = qty_decimals(price)
        sim.tick = 10.0**-decimals
        sim.last = round(price / sim.tick) * sim.tick
        sim.prev24h = sim.last * (1 + rng.uniform(-0.03, 0.03))
        sim.prev1h = sim.last * (1 + rng.uniform(-0.005, 0.005))
        sim.high = max(sim.last, sim.prev24h) * (1 + rng.uniform(0.001, 0.02))
        sim.low = min(sim.last, sim.prev24h) * (1 - rng.uniform(0.001, 0.02))
        sim.volume = 5e7 / price * rng.uniform(0.5, 2.0)
        sim.turnover = sim.volume * (sim.high + sim.low) / 2
        sim.mark = sim.last
        sim.index = sim.last * (1 + rng.uniform(-0.0005, 0.0005))
        sim.oi = sim.volume * rng.uniform(2.0, 4.0)
        sim.bid_size = 2e5 / price * rng.uniform(0.1, 1.0)
        sim.ask_size = 2e5 / price * rng.uniform(0.1, 1.0)
        sim.u = rng.randrange(1_000_000, 90_000_000)
        sim.seq = rng.randrange(10**10, 9 * 10**11)
        return sim

    def p(self, value: float) -> str:
        return fmt_price(value, self.decimals, self.market)

    def q(self, value: float) -> str:
        return fmt_qty(value, self.qdec)

    @property
    def bid(self) -> float:
        return self.last - self.tick if self.direction.endswith("PlusTick") else self.last

    @property
    def ask(self) -> float:
        return self.bid + self.tick

    def step(self) -> None:
        """One random-walk step: a trade of a few ticks, book sizes, mark/index/OI drift."""
        rng = self.rng
        move = rng.choice((-2, -1, -1, 0, 0, 0, 1, 1, 2))
        if move:
            self.direction = "PlusTick" if move > 0 else "MinusTick"
        else:
            self.direction = (
                "ZeroPlusTick" if self.direction.endswith("PlusTick") else "ZeroMinusTick"
            )
        self.last = max(self.tick, self.last + move * self.tick)
        self.high = max(self.high, self.last)
        self.low = min(self.low, self.last)
        traded = 2e3 / self.last * rng.uniform(0.01, 1.0)
        self.volume += traded
        self.turnover += traded * self.last
        self.bid_size = max(self.bid_size * rng.uniform(0.8, 1.25), 10.0**-self.qdec)
        self.ask_size = max(self.ask_size * rng.uniform(0.8, 1.25), 10.0**-self.qdec)
        self.mark = self.last + rng.choice((-1, 0, 0, 1)) * self.tick
        self.index = self.last * (1 + rng.uniform(-0.0003, 0.0003))
        self.oi = max(0.0, self.oi + rng.uniform(-1, 1) * traded)

    def spot_fields(self) -> dict[str, str]:
        pcnt = self.last / self.prev24h - 1 if self.prev24h else 0.0
        return {
            "symbol": self.symbol,
            "lastPrice": self.p(self.last),
            "highPrice24h": self.p(self.high),
            "lowPrice24h": self.p(self.low),
            "prevPrice24h": self.p(self.prev24h),
            "volume24h": f"{self.volume:.6f}",
            "turnover24h": f"{self.turnover:.8f}",
            "price24hPcnt": f"{pcnt:.4f}",
            "usdIndexPrice": f"{self.index:.6f}",
        }

    def linear_fields(self) -> dict[str, str]:
        pcnt = self.last / self.prev24h - 1 if self.prev24h else 0.0
        oi = f"{self.oi:.{self.qdec}f}"
        oiv = f"{self.oi * self.mark:.2f}"
        single = f"{self.oi / 2:.{self.qdec}f}"
        return {
            "symbol": self.symbol,
            "tickDirection": self.direction,
            "price24hPcnt": f"{pcnt:.6f}",
            "lastPrice": self.p(self.last),
            "prevPrice24h": self.p(self.prev24h),
            "highPrice24h": self.p(self.high),
            "lowPrice24h": self.p(self.low),
            "prevPrice1h": self.p(self.prev1h),
            "markPrice": self.p(self.mark),
            "indexPrice": self.p(self.index),
            "openInterest": oi,
            "openInterestValue": oiv,
            "turnover24h": f"{self.turnover:.4f}",
            "volume24h": f"{self.volume:.4f}",
            "fundingIntervalHour": "8",
            "fundingCap": "0.005",
            "singleOpenInterest": single,
            "singleOpenInterestValue": f"{self.oi / 2 * self.mark:.2f}",
            "nextFundingTime": str(_next_funding_ms(_now_ms())),
            "fundingRate": f"{self.funding:.6f}".rstrip("0").rstrip("."),
            "bid1Price": self.p(self.bid),
            "bid1Size": self.q(self.bid_size),
            "ask1Price": self.p(self.ask),
            "ask1Size": self.q(self.ask_size),
            "preOpenPrice": "",
            "preQty": "",
            "curPreListingPhase": "",
        }


# Field groups that change together in linear ticker deltas (cf. the samples and the recording).
_DELTA_GROUPS: Final[tuple[tuple[str, ...], ...]] = (
    ("tickDirection", "lastPrice", "price24hPcnt", "highPrice24h", "lowPrice24h", "turnover24h",
     "volume24h"),
    ("bid1Price", "bid1Size", "ask1Price", "ask1Size"),
    ("markPrice", "openInterest", "openInterestValue", "singleOpenInterest",
     "singleOpenInterestValue"),
    ("indexPrice",),
)  # fmt: skip


def synthetic_ticker(market: str, symbol: str, seed: int = 0) -> dict[str, str]:
    """A full, plausible ticker ``data`` object for ``symbol`` as the WS snapshot of ``market``."""
    sim = _Sim.create(market, symbol, seed)
    return sim.spot_fields() if market == "spot" else sim.linear_fields()


def _random_conn_id(rng: random.Random) -> str:
    """A conn_id shaped like the 2026 recording's (``d8bu1olkndm7crnfs1e0-j6akw``)."""
    alphabet = string.digits + string.ascii_lowercase
    head = "".join(rng.choice(alphabet[:32]) for _ in range(20))
    return head + "-" + "".join(rng.choice(alphabet) for _ in range(5))


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    market: Market
    conn_id: str
    topics: set[str] = field(default_factory=set)


def _ws_text_frame(text: str) -> bytes:
    """One unmasked, uncompressed server-to-client text frame (RFC 6455 5.2), FIN set."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def _topic_symbol(topic: str) -> str:
    return topic.rsplit(".", 1)[-1]


class FakeBybit:
    """An in-process Bybit v5 public websocket server on ``127.0.0.1`` (a free port by default).

    >>> async with FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto=False) as ex:
    ...     # point the listener at ex.spot_url / ex.linear_url, then:
    ...     await ex.wait_subscribed("linear", "tickers.BTCUSDT")
    ...     frame = await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice="65000.10")

    Symbols: ``valid_symbols`` is used for both markets unless ``spot_symbols`` /
    ``linear_symbols`` are given (e.g. linear lists ``1000PEPEUSDT`` where spot lists
    ``PEPEUSDT``). The sets are live and mutable (:meth:`symbols`); so are :attr:`delisted`
    (rejected on subscribe *and* silent for existing subscriptions, like a symbol Bybit removed)
    and :attr:`quiet` (still subscribable, but the generator never sends anything for them: a
    symbol nobody trades).

    Frame generation:

    * ``initial_snapshot`` (default True, even with ``auto=False``): send the snapshot Bybit sends
      right after a successful ``tickers`` / ``orderbook.1`` subscription, to the subscribing
      connection only (content: :meth:`state`). With ``auto=False, initial_snapshot=False`` nothing
      at all is sent unless a test calls ``send*`` (e.g. to test a delta that has no snapshot).
    * ``snapshot_before_ack``: send that snapshot *before* the ack (observed on the real exchange).
    * ``auto``: every ``auto_interval`` s, per active topic, a spot ticker snapshot, a linear ticker
      delta, or an ``orderbook.1`` snapshot. Topics other than ``tickers`` / ``orderbook.1``
      (``publicTrade``, ``kline``, deeper books…) are accepted but stay silent.

    Targets: ``send_ticker_*`` / ``send_book`` go to the connections subscribed to the topic (as
    on Bybit: call :meth:`wait_subscribed` first); :meth:`send` goes to every open connection of a
    market.
    """

    def __init__(
        self,
        valid_symbols: Iterable[str] = ("BTCUSDT", "ETHUSDT", "SOLUSDT"),
        *,
        spot_symbols: Iterable[str] | None = None,
        linear_symbols: Iterable[str] | None = None,
        auto: bool = True,
        auto_interval: float = 0.05,
        initial_snapshot: bool = True,
        snapshot_before_ack: bool = False,
        idle_timeout: float | None = None,
        compression: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            idle_timeout: close a connection that sent nothing (no ping) for this many seconds, as
                Bybit does after 10 minutes; ``None`` disables it.
            compression: negotiate permessage-deflate if the client offers it (off by default).
            seed: seed of the random walk and of the conn_ids (frames are reproducible per seed).
        """
        base = set(valid_symbols)
        self.valid_symbols: set[str] = base
        self._symbols: dict[Market, set[str]] = {
            "spot": set(spot_symbols) if spot_symbols is not None else base,
            "linear": set(linear_symbols) if linear_symbols is not None else base,
        }
        self.delisted: set[str] = set()
        self.quiet: set[str] = set()
        self.auto = auto
        self.auto_interval = auto_interval
        self.initial_snapshot = initial_snapshot
        self.snapshot_before_ack = snapshot_before_ack
        self.idle_timeout = idle_timeout
        self.pong_enabled = True
        self.accepting = True
        """When False, new websocket handshakes are refused with HTTP 503 (an outage)."""
        self.host = host
        self._port = port
        self._compression = compression
        self._seed = seed
        self._rng = random.Random(seed)

        self.subscribe_requests: list[tuple[Market, list[str]]] = []
        """Every ``subscribe`` request received, in order: (market, args)."""
        self.messages: list[tuple[Market, str]] = []
        """Every text frame received from clients, in order."""
        self.pings_received: dict[Market, int] = {"spot": 0, "linear": 0}
        self.connects: dict[Market, int] = {"spot": 0, "linear": 0}
        """Accepted websocket connections so far, per market."""
        self.refused: int = 0
        """Handshakes refused (unknown path, or ``accepting`` False)."""

        self._conns: dict[Market, set[_Conn]] = {"spot": set(), "linear": set()}
        self._sims: dict[tuple[str, str], _Sim] = {}
        self._state: dict[tuple[str, str], dict[str, Any]] = {}
        self._cs: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeBybit:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start listening (and the automatic generator when ``auto``)."""
        self._server = await serve(
            self._handler,
            self.host,
            self._port,
            process_request=self._process_request,
            compression="deflate" if self._compression else None,
            ping_interval=None,
            close_timeout=1,
            max_queue=None,
        )
        self._port = self._server.sockets[0].getsockname()[1] if self._server.sockets else 0
        if self.auto:
            self._spawn(self._auto_loop())

    async def stop(self) -> None:
        """Stop the generator and close every connection (close code 1001, like a restart)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT`` (no path)."""
        return f"ws://{self.host}:{self._port}"

    @property
    def spot_url(self) -> str:
        return f"{self.url}/v5/public/spot"

    @property
    def linear_url(self) -> str:
        return f"{self.url}/v5/public/linear"

    def url_for(self, market: Market) -> str:
        return f"{self.url}/v5/public/{market}"

    # ------------------------------------------------------------------ observation

    def symbols(self, market: Market) -> set[str]:
        """The live, mutable set of symbols that exist on ``market``."""
        return self._symbols[market]

    def subscribed(self, market: Market) -> set[str]:
        """Topics currently active on ``market``, across all open connections."""
        out: set[str] = set()
        for conn in self._conns[market]:
            out |= conn.topics
        return out

    def connections(self, market: Market) -> int:
        """Number of currently open connections on ``market``."""
        return len(self._conns[market])

    def conn_topics(self, market: Market) -> list[set[str]]:
        """The topic set of each open connection of ``market`` (copies)."""
        return [set(c.topics) for c in self._conns[market]]

    def state(self, market: Market, symbol: str) -> dict[str, Any]:
        """The ticker as last published for ``symbol`` (what a correct merge must equal)."""
        return dict(self._ticker_state(market, symbol))

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = 5.0) -> None:
        """Wait until ``predicate()`` is true; it is re-checked after every connect, disconnect,
        (un)subscription and received message. Raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_subscribed(self, market: Market, topic: str, timeout: float = 5.0) -> None:
        """Wait until ``topic`` is active on some connection of ``market``."""
        await self.wait_for(lambda: topic in self.subscribed(market), timeout)

    async def wait_connects(self, market: Market, n: int, timeout: float = 5.0) -> None:
        """Wait until ``connects[market] >= n`` (e.g. a reconnect after :meth:`drop`)."""
        await self.wait_for(lambda: self.connects[market] >= n, timeout)

    async def wait_pings(self, market: Market, n: int, timeout: float = 5.0) -> None:
        """Wait until ``pings_received[market] >= n``."""
        await self.wait_for(lambda: self.pings_received[market] >= n, timeout)

    # ------------------------------------------------------------------ connection handling

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v5/public/spot", "/v5/public/linear"):
            self.refused += 1
            self._bump()
            return conn.respond(HTTPStatus.NOT_FOUND, "404 page not found\n")
        if not self.accepting:
            self.refused += 1
            self._bump()
            return conn.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, "503 Service Temporarily Unavailable\n"
            )
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0].rstrip("/") if ws.request else ""
        market: Market = "spot" if path.endswith("/spot") else "linear"
        conn = _Conn(ws=ws, market=market, conn_id=_random_conn_id(self._rng))
        self._conns[market].add(conn)
        self.connects[market] += 1
        self._bump()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        message = await ws.recv()
                except TimeoutError:
                    await ws.close(1000, "idle")
                    break
                if isinstance(message, str):
                    self.messages.append((market, message))
                    await self._on_text(conn, message)
                    self._bump()
        except ConnectionClosed:
            pass
        finally:
            self._conns[market].discard(conn)
            conn.topics.clear()
            self._bump()

    async def _on_text(self, conn: _Conn, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            await self._ack(conn, {}, False, "error:request not supported", op="")
            return
        op = req.get("op")
        if op == "ping":
            self.pings_received[conn.market] += 1
            if self.pong_enabled:
                await self._ack(conn, req, True, "pong", op="ping")
        elif op == "subscribe":
            await self._subscribe(conn, req)
        elif op == "unsubscribe":
            args = [a for a in req.get("args") or [] if isinstance(a, str)]
            conn.topics.difference_update(args)
            await self._ack(conn, req, True, "unsubscribe" if conn.market == "spot" else "", op=op)
        else:
            await self._ack(conn, req, False, f"error:op {op} not supported", op=str(op or ""))

    async def _ack(self, conn: _Conn, req: Mapping[str, Any], ok: bool, msg: str, op: str) -> None:
        """Ack / error / pong JSON. Spot echoes ``req_id`` only when the request had one; linear
        always carries it (``""`` when absent), cf. the samples."""
        frame: dict[str, Any] = {"success": ok, "ret_msg": msg, "conn_id": conn.conn_id}
        req_id = req.get("req_id")
        if conn.market == "linear":
            frame["req_id"] = req_id if req_id is not None else ""
        elif req_id is not None:
            frame["req_id"] = req_id
        frame["op"] = op
        await self._send_conn(conn, _json(frame))

    def _topic_ok(self, market: Market, topic: str) -> bool:
        parts = topic.split(".")
        symbol = parts[-1]
        if symbol not in self._symbols[market] or symbol in self.delisted:
            return False
        match parts:
            case ["tickers" | "publicTrade", _]:
                return True
            case ["orderbook", depth, _]:
                return depth in _BOOK_DEPTHS[market]
            case ["kline", interval, _]:
                return interval in KLINE_INTERVALS
            case ["allLiquidation" | "liquidation", _]:
                return market == "linear"
        return False

    async def _subscribe(self, conn: _Conn, req: Mapping[str, Any]) -> None:
        """Subscribe exactly as Bybit answers it.

        Spot: more than 10 args → ``"args size >10"`` and nothing subscribed. Otherwise each topic
        is judged on its own: unknown ones are listed in ``"Invalid symbol :[a,b]"`` and the valid
        ones of the same request ARE subscribed (assumption: the observed error names only the bad
        topics, so the request is not all-or-nothing). Assumption too: a topic the connection
        already has is reported as ``"error:already subscribed,topic:…"`` (the others still
        subscribed).

        Linear: the first unknown topic → ``"error:handler not found,topic:…"``, the first topic
        already active on the connection (or repeated in the request) →
        ``"error:already subscribed,topic:…"``; either way NOTHING of the request is subscribed.
        """
        market = conn.market
        raw = req.get("args")
        args: list[str] = [a for a in raw if isinstance(a, str)] if isinstance(raw, list) else []
        self.subscribe_requests.append((market, list(args)))
        new: list[str] = []
        error: str | None = None
        if market == "spot":
            if len(args) > 10:
                await self._ack(conn, req, False, "args size >10", op="subscribe")
                return
            bad = [a for a in args if not self._topic_ok(market, a)]
            dup: list[str] = []
            for a in args:
                if a in bad:
                    continue
                if a in conn.topics or a in new:
                    dup.append(a)
                else:
                    new.append(a)
            if bad:
                error = "Invalid symbol :[" + ",".join(bad) + "]"
            elif dup:
                error = "error:already subscribed,topic:" + ",".join(dup)
        else:
            seen: set[str] = set()
            for a in args:
                if not self._topic_ok(market, a):
                    error = f"error:handler not found,topic:{a}"
                    break
                if a in conn.topics or a in seen:
                    error = f"error:already subscribed,topic:{a}"
                    break
                seen.add(a)
            new = [] if error else list(args)

        ok_msg = "subscribe" if market == "spot" else ""
        if self.snapshot_before_ack:
            await self._initial_snapshots(conn, new)
            await self._ack(conn, req, error is None, error or ok_msg, op="subscribe")
        else:
            await self._ack(conn, req, error is None, error or ok_msg, op="subscribe")
            await self._initial_snapshots(conn, new)
        conn.topics.update(new)

    async def _initial_snapshots(self, conn: _Conn, topics: list[str]) -> None:
        if not self.initial_snapshot:
            return
        for topic in topics:
            symbol = _topic_symbol(topic)
            if topic.startswith("tickers."):
                frame = self._ticker_frame(conn.market, symbol, "snapshot", None)
            elif topic.startswith("orderbook.1."):
                frame = self._book_frame(conn.market, symbol, None, None)
            else:
                continue
            await self._send_conn(conn, _json(frame))

    # ------------------------------------------------------------------ sending

    async def _send_conn(self, conn: _Conn, data: str | bytes) -> bool:
        try:
            await conn.ws.send(data)
        except ConnectionClosed:
            return False
        return True

    async def _send_frames(self, conn: _Conn, frames: list[bytes]) -> bool:
        """Write already-framed text frames with one socket write, then wait for the socket.

        The load generator's path: a burst of frames costs one write instead of one ``send`` each,
        so that the fake is not what limits a fast client (a busy real server coalesces its
        writes too). Uncompressed frames are valid whatever extensions were negotiated."""
        ws = conn.ws
        if ws.state is not State.OPEN:
            return False
        try:
            ws.transport.write(b"".join(frames))
            await ws.drain()
        except (ConnectionError, ConnectionClosed, RuntimeError):
            return False
        return ws.state is State.OPEN

    async def _publish(self, market: Market, topic: str, data: str) -> int:
        sent = 0
        for conn in list(self._conns[market]):
            if topic in conn.topics and await self._send_conn(conn, data):
                sent += 1
        return sent

    async def send(self, market: Market, frame: Mapping[str, Any] | str | bytes) -> int:
        """Send a raw frame to EVERY open connection of ``market``: a dict is JSON-encoded, a str
        is sent verbatim as a text frame (use it for non-JSON or hand-written frames), bytes as a
        binary frame. Returns the number of connections it reached."""
        data = frame if isinstance(frame, str | bytes) else _json(frame)
        sent = 0
        for conn in list(self._conns[market]):
            if await self._send_conn(conn, data):
                sent += 1
        return sent

    def _sim(self, market: str, symbol: str) -> _Sim:
        key = (market, symbol)
        if key not in self._sims:
            self._sims[key] = _Sim.create(market, symbol, self._seed)
        return self._sims[key]

    def _ticker_state(self, market: str, symbol: str) -> dict[str, Any]:
        key = (market, symbol)
        if key not in self._state:
            sim = self._sim(market, symbol)
            self._state[key] = sim.spot_fields() if market == "spot" else sim.linear_fields()
        return self._state[key]

    def _next_cs(self, market: str, symbol: str) -> int:
        key = (market, symbol)
        cs = self._cs.get(key)
        if cs is None:
            cs = int(_hash_unit("cs", market, symbol) * 9 * 10**11) + 10**10
        cs += self._rng.randrange(1, 10_000)
        self._cs[key] = cs
        return cs

    def _ticker_frame(
        self,
        market: str,
        symbol: str,
        kind: Literal["snapshot", "delta"],
        data: dict[str, Any] | None,
        ts: int | None = None,
        cs: int | None = None,
    ) -> dict[str, Any]:
        """Build a tickers frame (key order as Bybit: spot topic,ts,type,cs,data; linear
        topic,type,data,cs,ts) and record what it publishes in the symbol's state."""
        state = self._ticker_state(market, symbol)
        if kind == "snapshot":
            if data is None:
                data = dict(state)
            state.clear()
            state.update(data)
        else:
            if data is None:
                data = {"symbol": symbol}
            state.update(data)
        ts = _now_ms() if ts is None else ts
        cs = self._next_cs(market, symbol) if cs is None else cs
        topic = f"tickers.{symbol}"
        if market == "spot":
            return {"topic": topic, "ts": ts, "type": kind, "cs": cs, "data": data}
        return {"topic": topic, "type": kind, "data": data, "cs": cs, "ts": ts}

    async def send_ticker_snapshot(
        self,
        market: Market,
        symbol: str,
        *,
        ts: int | None = None,
        cs: int | None = None,
        omit: Collection[str] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """Publish a full ``tickers`` snapshot: the symbol's current state updated with ``fields``
        (values are sent as given: pass strings like Bybit, or wrong types on purpose), minus the
        keys in ``omit``. ``ts`` / ``cs`` default to now / the next sequence number. Returns the
        frame dict exactly as sent to the subscribers of ``tickers.{symbol}``."""
        data = {**self._ticker_state(market, symbol), **fields}
        for key in omit:
            data.pop(key, None)
        frame = self._ticker_frame(market, symbol, "snapshot", data, ts, cs)
        await self._publish(market, frame["topic"], _json(frame))
        return frame

    async def send_ticker_delta(
        self,
        market: Market,
        symbol: str,
        *,
        ts: int | None = None,
        cs: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Publish a ``tickers`` delta carrying ``symbol`` plus only ``fields`` (as on linear; real
        spot never sends deltas, but a test may). With no fields, a realistic random delta is
        generated. Returns the frame dict exactly as sent."""
        data = {"symbol": symbol, **fields} if fields else self._random_delta(market, symbol)
        frame = self._ticker_frame(market, symbol, "delta", data, ts, cs)
        await self._publish(market, frame["topic"], _json(frame))
        return frame

    def _random_delta(self, market: str, symbol: str) -> dict[str, Any]:
        """A delta like Bybit's: 1-2 groups of related fields; a group is sent whole when any field
        in it changed, so unchanged fields are sometimes repeated (observed on the real stream)."""
        sim = self._sim(market, symbol)
        state = self._ticker_state(market, symbol)
        if market == "spot":
            sim.step()
            changed = {k: v for k, v in sim.spot_fields().items() if v != state.get(k)}
            return {"symbol": symbol, **changed}
        for _ in range(4):
            sim.step()
            full = sim.linear_fields()
            groups = sim.rng.sample(_DELTA_GROUPS, k=sim.rng.choice((1, 1, 2)))
            data: dict[str, Any] = {"symbol": symbol}
            for group in groups:
                if any(full[k] != state.get(k) for k in group):
                    data.update(
                        {k: full[k] for k in group if k not in ("highPrice24h", "lowPrice24h")}
                    )
                    for k in ("highPrice24h", "lowPrice24h"):
                        if k in group and full[k] != state.get(k):
                            data[k] = full[k]
            if len(data) > 1:
                return data
        return {"symbol": symbol, "lastPrice": sim.p(sim.last)}

    def _book_frame(
        self, market: str, symbol: str, bid: tuple[str, str] | None, ask: tuple[str, str] | None
    ) -> dict[str, Any]:
        sim = self._sim(market, symbol)
        sim.u += 1
        sim.seq += sim.rng.randrange(1, 5_000)
        ts = _now_ms()
        b = bid if bid is not None else (sim.p(sim.bid), sim.q(sim.bid_size))
        a = ask if ask is not None else (sim.p(sim.ask), sim.q(sim.ask_size))
        return {
            "topic": f"orderbook.1.{symbol}",
            "type": "snapshot",
            "ts": ts,
            "data": {"s": symbol, "b": [list(b)], "a": [list(a)], "u": sim.u, "seq": sim.seq},
            "cts": ts - sim.rng.randrange(0, 5),
        }

    async def send_book(
        self,
        market: Market,
        symbol: str,
        bid: tuple[str, str] | str,
        ask: tuple[str, str] | str,
    ) -> dict[str, Any]:
        """Publish an ``orderbook.1.{symbol}`` snapshot with one level per side; ``bid`` / ``ask``
        are ``(price, size)`` or just a price (size ``"1"``). Returns the frame as sent."""
        b = (bid, "1") if isinstance(bid, str) else bid
        a = (ask, "1") if isinstance(ask, str) else ask
        frame = self._book_frame(market, symbol, b, a)
        await self._publish(market, frame["topic"], _json(frame))
        return frame

    async def drop(self, market: Market) -> int:
        """Cut every connection of ``market`` abruptly (TCP abort, no close frame: what a client
        sees when Bybit or the network drops it) and wait until they are gone. Returns how many."""
        conns = list(self._conns[market])
        for conn in conns:
            transport = conn.ws.transport
            if transport is not None:
                transport.abort()
        await self.wait_for(lambda: not any(c in self._conns[market] for c in conns))
        return len(conns)

    async def close_connections(self, market: Market, code: int = 1001, reason: str = "") -> int:
        """Close every connection of ``market`` with a proper close handshake."""
        conns = list(self._conns[market])
        await asyncio.gather(*(c.ws.close(code, reason) for c in conns))
        await self.wait_for(lambda: not any(c in self._conns[market] for c in conns))
        return len(conns)

    # ------------------------------------------------------------------ automatic generator

    async def _auto_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.tick()
            next_at += self.auto_interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind: don't burst, just go on
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def tick(self) -> None:
        """One round of the generator: per active ``tickers`` topic a spot snapshot or a linear
        delta, per ``orderbook.1`` topic a book snapshot (delisted / quiet symbols stay silent)."""
        for market in MARKETS:
            for topic in sorted(self.subscribed(market)):
                symbol = _topic_symbol(topic)
                if symbol in self.delisted or symbol in self.quiet:
                    continue
                if topic.startswith("tickers."):
                    if market == "spot":
                        sim = self._sim(market, symbol)
                        sim.step()
                        frame = self._ticker_frame(market, symbol, "snapshot", sim.spot_fields())
                    else:
                        data = self._random_delta(market, symbol)
                        frame = self._ticker_frame(market, symbol, "delta", data)
                elif topic.startswith("orderbook.1."):
                    frame = self._book_frame(market, symbol, None, None)
                else:
                    continue
                await self._publish(market, topic, _json(frame))

    # ------------------------------------------------------------------ recording replay

    async def replay_recording(
        self,
        path: str | Path,
        market: Market,
        *,
        rate: float | None = None,
        topic_prefixes: Collection[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Replay the ``recv`` frames of the recording's ``market`` connection (found through the
        ``connect`` lines' ``addr``: ``BYBIT.ws.2`` is linear, ``BYBIT.ws.3`` spot), in order and
        byte for byte, to every open connection of ``market``. Acks and pongs (frames with ``op``)
        are skipped; ``topic_prefixes`` (e.g. ``("tickers.",)``) keeps only those topics. ``rate``
        is frames/s (default: as fast as possible). Returns the parsed frames that were sent.
        Raises ``ValueError`` when the recording has no connection to that market."""
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        suffix = f"/v5/public/{market}"
        conn_name = next(
            (
                r.get("conn")
                for r in records
                if r.get("t") == "connect" and str(r.get("addr", "")).rstrip("/").endswith(suffix)
            ),
            None,
        )
        if conn_name is None:
            raise ValueError(f"no {market} connection in {path}")
        prefixes = tuple(topic_prefixes) if topic_prefixes is not None else ("",)
        texts: list[str] = []
        frames: list[dict[str, Any]] = []
        for rec in records:
            if rec.get("t") != "recv" or rec.get("conn") != conn_name:
                continue
            obj = json.loads(rec["data"])
            if not isinstance(obj, dict) or "op" in obj:  # acks and pongs
                continue
            if not str(obj.get("topic", "")).startswith(prefixes):
                continue
            texts.append(rec["data"])
            frames.append(obj)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, text in enumerate(texts):
            if rate:
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send(market, text)
        return frames

    # ------------------------------------------------------------------ benchmark stream

    async def stream_deltas(
        self,
        market: Market = "linear",
        *,
        rate: float = 2000.0,
        frames: int | None = None,
        variants: int = 512,
    ) -> int:
        """Send linear-style ``tickers`` deltas round-robin over the subscribed ticker topics of
        ``market`` at ``rate`` frames/s in total (``0`` = as fast as the sockets take them), until
        ``frames`` frames were sent (forever when ``None``). Each frame's ``ts`` is its send wall
        time in ms and ``cs`` increases per symbol. Frames are pre-built (``variants`` per symbol)
        and sent in bursts paced by ``asyncio.sleep``. Only frames that reached at least one
        connection are counted; with no subscriber it waits. Returns the number of frames sent."""
        loop = asyncio.get_running_loop()
        prefixes: dict[str, str] = {}
        bodies: dict[str, list[str]] = {}
        cs: dict[str, int] = {}

        def prepare(symbol: str) -> None:
            prefixes[symbol] = '{"topic":"tickers.' + symbol + '","type":"delta","data":'
            bodies[symbol] = [_json(self._random_delta(market, symbol)) for _ in range(variants)]
            cs[symbol] = self._next_cs(market, symbol)

        sent = 0
        idx = 0
        burst_cap = max(1, int(rate * 0.05)) if rate > 0 else 256
        start = loop.time()
        base = 0
        while frames is None or sent < frames:
            topics = sorted(t for t in self.subscribed(market) if t.startswith("tickers."))
            if not topics:
                await self.wait_for(
                    lambda: any(t.startswith("tickers.") for t in self.subscribed(market)), None
                )
                start, base = loop.time(), sent
                continue
            if rate > 0:
                due = int((loop.time() - start) * rate) + 1 - (sent - base)
                if due <= 0:
                    # sleep at least 2 ms: frames go out in bursts, not one wake-up per frame
                    await asyncio.sleep(max(0.002, start + (sent - base) / rate - loop.time()))
                    continue
                n = min(due, burst_cap)
            else:
                n = burst_cap
            if frames is not None:
                n = min(n, frames - sent)
            conns = list(self._conns[market])
            sent_before = sent
            out: dict[_Conn, list[bytes]] = {}
            for _ in range(n):
                topic = topics[idx % len(topics)]
                idx += 1
                symbol = topic[8:]
                if symbol not in prefixes:
                    prepare(symbol)
                cs[symbol] += 1 + (idx & 7)
                text = (
                    prefixes[symbol]
                    + bodies[symbol][idx % variants]
                    + ',"cs":'
                    + str(cs[symbol])
                    + ',"ts":'
                    + str(time.time_ns() // 1_000_000)
                    + "}"
                )
                frame = b""
                for conn in conns:
                    if topic in conn.topics:
                        frame = frame or _ws_text_frame(text)
                        out.setdefault(conn, []).append(frame)
                if frame:
                    sent += 1
            for conn, burst in out.items():
                await self._send_frames(conn, burst)
            if rate <= 0:
                await asyncio.sleep(0)
            elif sent == sent_before:
                # no connection took a frame (the last client just left): never spin
                await asyncio.sleep(0.002)
        return sent


# ---------------------------------------------------------------------- program entry point


async def _serve_main(args: argparse.Namespace) -> None:
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    market: Market = args.market
    ex = FakeBybit(
        valid_symbols=symbols, auto=False, host=args.host, port=args.port, seed=args.seed
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with ex:
        print(f"READY {ex.url}", flush=True)

        async def produce() -> None:
            await ex.wait_for(
                lambda: any(t.startswith("tickers.") for t in ex.subscribed(market)), None
            )
            sent = await ex.stream_deltas(market, rate=args.rate, frames=args.frames)
            print(f"DONE {sent}", flush=True)

        producer = asyncio.create_task(produce())
        await stop.wait()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.fakes.bybit_ws --port 0 --rate 2000 --symbols BTCUSDT,ETHUSDT
    --market linear [--frames N]``

    Prints ``READY ws://127.0.0.1:PORT`` once listening (connect to ``…/v5/public/{market}``).
    When a client has subscribed to ``tickers.*`` topics it gets the usual snapshot per topic, then
    ticker deltas at ``--rate`` frames/s in total (0 = as fast as possible), ``ts`` = send time in
    ms. After ``--frames`` frames it prints ``DONE N`` and keeps serving (pings) until SIGTERM /
    SIGINT.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.bybit_ws", description=main.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=2000.0, help="frames/s in total; 0 = max")
    parser.add_argument("--symbols", default="BTCUSDT,ETHUSDT,SOLUSDT")
    parser.add_argument("--market", choices=MARKETS, default="linear")
    parser.add_argument("--frames", type=int, default=None, help="stop after N frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args(argv)
    runner: Callable[[Any], Any] = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve_main(args))


if __name__ == "__main__":
    main()
