"""Bybit v5 frames -> Quotes: the snapshot/delta merge and the spot top of book. Pure: no I/O.

Bybit's linear ``tickers`` stream sends one full snapshot per symbol after subscribing, then deltas
carrying only the fields that changed. :class:`BybitNormalizer` keeps one merged dict per
(market, symbol): a snapshot replaces it, a delta updates it, and every ticker frame yields the
Quote of the merged state. Rules (see ../shared/reference/bybit-v5.md):

- a delta with no snapshot before it cannot be used: it is dropped and counted, never published as
  a partial quote;
- a frame whose ``cs`` is lower than the last one applied for that symbol is stale (reordered) and
  is dropped and counted;
- a frame that fails validation (wrong types, unparsable numbers, no price) is counted and leaves
  the merged state untouched;
- ``""`` means "no value" and becomes ``None``;
- :meth:`BybitNormalizer.reset` forgets a market's state; the listener calls it on every reconnect.

The merge state of a symbol is its last Quote: a delta parses only the fields it carries and
derives the next Quote from the last one (``msgspec.structs.replace``) instead of copying and
re-parsing the whole merged ticker: less than half the CPU per frame (benchmarks/bench_publish.py).

Two ways in, one result. :meth:`BybitNormalizer.on_message` takes a decoded frame (a dict) and
is the reference. :meth:`BybitNormalizer.ticker_from_bytes` is the hot path for ``tickers`` frames:
msgspec decodes the raw bytes straight into a typed frame, numbers-in-strings parsed to floats in
C, which costs about 0.6x the dict path per frame. Whatever it does not decode as a plain,
well-formed ticker it hands back (:data:`NOT_DECODED`) to the dict path, so the rules above and
their counters come from one place; the tests check that both give identical Quotes.

Spot tickers carry no bid/ask, so with ``spot_book`` on the normalizer also follows
``orderbook.1.{SYMBOL}`` and fills the SPOT quote's ``bid``/``ask`` from the latest top of book.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from msgspec import UNSET, UnsetType
from msgspec.structs import replace

from sowcli.model import Market, Quote

BOOK_LEVELS_MAX = 50  # orderbook.1 holds one level a side; the bound guards against odd deltas


@dataclass(slots=True)
class NormalizeStats:
    """What the normalizer saw, for heartbeats and metrics."""

    quotes: int = 0
    dropped_deltas: int = 0
    stale_frames: int = 0
    invalid_frames: int = 0
    ignored_frames: int = 0
    book_updates: int = 0


class InvalidFrame(ValueError):
    """A data frame that cannot be turned into a Quote (bad type, bad number, no price)."""


def _num(value: Any, field: str) -> float | None:
    """Bybit numbers are strings; ``""`` and ``None`` mean no value; NaN and infinities are bad."""
    if type(value) is str:  # the usual case first: this runs a dozen times per frame
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            raise InvalidFrame(f"{field}={value!r} is not a number") from None
    elif value is None:
        return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise InvalidFrame(f"{field}={value!r} has the wrong type")
    if number - number != 0.0:  # NaN or an infinity
        raise InvalidFrame(f"{field}={value!r} is not a finite number")
    return number


def _int(value: Any, field: str) -> int | None:
    if type(value) is int:
        return value
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise InvalidFrame(f"{field}={value!r} is not an integer")


# --- the typed fast path for tickers frames --------------------------------------------------
TICKER_PREFIX: Final = b'{"topic":"tickers.'  # how Bybit (and the fake) start a tickers frame
NOT_DECODED: Final[Any] = object()  # ticker_from_bytes: "take the dict path for this one"


class _TickerData(msgspec.Struct, gc=False):
    symbol: str = ""
    lastPrice: float | UnsetType = UNSET
    volume24h: float | UnsetType = UNSET
    turnover24h: float | UnsetType = UNSET
    highPrice24h: float | UnsetType = UNSET
    lowPrice24h: float | UnsetType = UNSET
    price24hPcnt: float | UnsetType = UNSET
    bid1Price: float | UnsetType = UNSET
    ask1Price: float | UnsetType = UNSET
    markPrice: float | UnsetType = UNSET
    indexPrice: float | UnsetType = UNSET
    fundingRate: float | UnsetType = UNSET
    openInterest: float | UnsetType = UNSET


class _TickerFrame(msgspec.Struct, gc=False):
    topic: str
    ts: int
    data: _TickerData
    type: str = "snapshot"
    cs: int | None = None


# strict=False: "65114.20" -> 65114.2 in C. Anything else odd ("", null, true, a list) fails
# validation and the frame takes the dict path, which has the final word.
_ticker_decoder = msgspec.json.Decoder(_TickerFrame, strict=False)


def _typed_value(d: _TickerData) -> Callable[[str], float | None]:
    """``value(wire_field)`` over a typed ticker: absent -> None; NaN/infinity -> InvalidFrame."""

    def value(field: str) -> float | None:
        v = getattr(d, field)
        if v is UNSET:
            return None
        if v - v != 0.0:
            raise InvalidFrame(f"{field}={v!r} is not a finite number")
        return v  # type: ignore[no-any-return]

    return value


def _dict_value(d: dict[str, Any]) -> Callable[[str], float | None]:
    """``value(wire_field)`` over a decoded ticker dict (the rules of :func:`_num`)."""
    return lambda field: _num(d.get(field), field)


# Wire field -> Quote field, per market: what a delta may change. ``price24hPcnt`` becomes
# ``change24h`` (× 100); SPOT bid/ask come from the order book, not from the ticker.
_SPOT_FIELDS: dict[str, str] = {
    "lastPrice": "price",
    "volume24h": "volume",
    "turnover24h": "turnover",
    "highPrice24h": "high24h",
    "lowPrice24h": "low24h",
    "price24hPcnt": "change24h",
}
_LINEAR_FIELDS: dict[str, str] = {
    **_SPOT_FIELDS,
    "bid1Price": "bid",
    "ask1Price": "ask",
    "markPrice": "mark_price",
    "indexPrice": "index_price",
    "fundingRate": "funding_rate",
    "openInterest": "open_interest",
}


def _linear_delta(s: Quote, d: _TickerData, ts: int, recv_us: int, cs: int | None) -> Quote | None:
    """The last Quote with the fields a typed linear delta carries; ``None`` if one of them is
    not a finite number. Spelled out field by field: the hottest code of ``sow publish``."""
    check = 0.0  # NaN and infinities survive a sum: one test for all the new values
    v = d.lastPrice
    if v is UNSET:
        price = s.price
    else:
        price = v
        check += v
    v = d.volume24h
    if v is UNSET:
        volume = s.volume
    else:
        volume = v
        check += v
    v = d.turnover24h
    if v is UNSET:
        turnover = s.turnover
    else:
        turnover = v
        check += v
    v = d.highPrice24h
    if v is UNSET:
        high = s.high24h
    else:
        high = v
        check += v
    v = d.lowPrice24h
    if v is UNSET:
        low = s.low24h
    else:
        low = v
        check += v
    v = d.price24hPcnt
    if v is UNSET:
        change = s.change24h
    else:
        check += v
        change = round(v * 100.0, 8)
    v = d.bid1Price
    if v is UNSET:
        bid = s.bid
    else:
        bid = v
        check += v
    v = d.ask1Price
    if v is UNSET:
        ask = s.ask
    else:
        ask = v
        check += v
    v = d.markPrice
    if v is UNSET:
        mark = s.mark_price
    else:
        mark = v
        check += v
    v = d.indexPrice
    if v is UNSET:
        index = s.index_price
    else:
        index = v
        check += v
    v = d.fundingRate
    if v is UNSET:
        funding = s.funding_rate
    else:
        funding = v
        check += v
    v = d.openInterest
    if v is UNSET:
        oi = s.open_interest
    else:
        oi = v
        check += v
    if check - check != 0.0:  # (a finite sum can overflow: such a frame takes the dict path)
        return None
    return Quote(
        symbol=s.symbol,
        market=s.market,
        price=price,
        volume=volume,
        turnover=turnover,
        high24h=high,
        low24h=low,
        change24h=change,
        bid=bid,
        ask=ask,
        mark_price=mark,
        index_price=index,
        funding_rate=funding,
        open_interest=oi,
        ts=ts,
        recv_us=recv_us,
        seq=cs,
    )


class _Book:
    """Top of book from ``orderbook.1`` frames (snapshot replaces, delta applies, size 0 deletes)."""

    __slots__ = ("asks", "bids")

    def __init__(self) -> None:
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}

    def apply(self, data: dict[str, Any], snapshot: bool) -> None:
        sides = []
        for key in ("b", "a"):
            levels = data.get(key, [])
            if not isinstance(levels, list):
                raise InvalidFrame(f"orderbook {key} is not a list")
            parsed = []
            for level in levels:
                if not isinstance(level, list) or len(level) < 2:
                    raise InvalidFrame(f"orderbook level {level!r} is malformed")
                price, size = _num(level[0], "price"), _num(level[1], "size")
                if price is None or size is None:
                    raise InvalidFrame(f"orderbook level {level!r} is malformed")
                parsed.append((price, size))
            sides.append(parsed)
        for book, parsed in zip((self.bids, self.asks), sides, strict=True):
            if snapshot:
                book.clear()
            for price, size in parsed:
                if size == 0:
                    book.pop(price, None)
                else:
                    book[price] = size
            if len(book) > BOOK_LEVELS_MAX:  # keep the best levels only
                keep = sorted(book, reverse=book is self.bids)[:BOOK_LEVELS_MAX]
                for price in set(book) - set(keep):
                    del book[price]

    @property
    def best_bid(self) -> float | None:
        return max(self.bids) if self.bids else None

    @property
    def best_ask(self) -> float | None:
        return min(self.asks) if self.asks else None


class BybitNormalizer:
    """Turns decoded Bybit data frames of one or more connections into Quotes."""

    def __init__(self, *, spot_book: bool = True) -> None:
        self.spot_book = spot_book
        self.stats = NormalizeStats()
        self._tickers: dict[tuple[Market, str], Quote] = {}  # the last Quote = the merged state
        self._last_cs: dict[tuple[Market, str], int] = {}
        self._books: dict[str, _Book] = {}

    def reset(self, market: Market) -> None:
        """Forget the merge state of one market (its connection was re-established)."""
        for key in [k for k in self._tickers if k[0] == market]:
            del self._tickers[key]
        for key in [k for k in self._last_cs if k[0] == market]:
            del self._last_cs[key]
        if market == "SPOT":
            self._books.clear()

    def on_message(self, market: Market, msg: dict[str, Any], recv_us: int) -> Quote | None:
        """Apply one decoded data frame (it has a ``topic``); return the Quote it produces, if any.

        Never raises for bad input: problems are counted in :attr:`stats`.
        """
        topic = msg.get("topic")
        if not isinstance(topic, str):
            self.stats.invalid_frames += 1
            return None
        try:
            if topic.startswith("tickers."):
                return self._ticker(market, topic, msg, recv_us)
            if topic.startswith("orderbook.1."):
                if market == "SPOT" and self.spot_book:
                    self._orderbook(msg)
                else:
                    self.stats.ignored_frames += 1
                return None
        except InvalidFrame:
            self.stats.invalid_frames += 1
            return None
        self.stats.ignored_frames += 1
        return None

    def ticker_from_bytes(self, market: Market, raw: bytes, recv_us: int) -> Quote | None:
        """The fast path for a raw ``tickers`` frame: its Quote, ``None`` (dropped and counted,
        as :meth:`on_message` would), or :data:`NOT_DECODED` for frames that need the dict path."""
        try:
            frame = _ticker_decoder.decode(raw)
        except msgspec.DecodeError:
            return NOT_DECODED  # type: ignore[no-any-return]
        topic = frame.topic
        if not topic.startswith("tickers."):
            return NOT_DECODED  # type: ignore[no-any-return]
        d = frame.data
        symbol = d.symbol or topic[8:]
        if not symbol:
            return NOT_DECODED  # type: ignore[no-any-return]
        key = (market, symbol)
        cs = frame.cs
        if self._stale(key, cs):
            return None
        kind = frame.type
        if kind == "delta":
            state = self._tickers.get(key)
            if state is None:
                self.stats.dropped_deltas += 1
                return None
            if market == "FUTURES":
                delta = _linear_delta(state, d, frame.ts, recv_us, cs)
            else:
                delta = self._spot_delta(state, d, frame.ts, recv_us, cs)
            if delta is None:
                return NOT_DECODED  # type: ignore[no-any-return]
            quote = delta
        elif kind == "snapshot":
            try:
                quote = self._snapshot(market, symbol, _typed_value(d), frame.ts, recv_us, cs)
            except InvalidFrame:  # the dict path says why, and counts it
                return NOT_DECODED  # type: ignore[no-any-return]
        else:
            return NOT_DECODED  # type: ignore[no-any-return]
        return self._commit(key, quote, cs)

    def _stale(self, key: tuple[Market, str], cs: int | None) -> bool:
        """A frame older (lower ``cs``) than the last one applied: counted, to be dropped."""
        if cs is None:
            return False
        last_cs = self._last_cs.get(key)
        if last_cs is not None and cs < last_cs:
            self.stats.stale_frames += 1
            return True
        return False

    def _commit(self, key: tuple[Market, str], quote: Quote, cs: int | None) -> Quote:
        """The frame produced a valid quote: it becomes the merge state."""
        self._tickers[key] = quote
        if cs is not None:
            self._last_cs[key] = cs
        self.stats.quotes += 1
        return quote

    def _spot_delta(
        self, state: Quote, d: _TickerData, ts: int, recv_us: int, cs: int | None
    ) -> Quote | None:
        changes: dict[str, Any] = {}
        for wire, name in _SPOT_FIELDS.items():
            value = getattr(d, wire)
            if value is not UNSET:
                if value - value != 0.0:
                    return None
                changes[name] = round(value * 100.0, 8) if name == "change24h" else value
        changes["bid"], changes["ask"] = self._spot_bid_ask(state.symbol)
        return replace(state, ts=ts, recv_us=recv_us, seq=cs, **changes)

    def _ticker(
        self, market: Market, topic: str, msg: dict[str, Any], recv_us: int
    ) -> Quote | None:
        data = msg.get("data")
        if not isinstance(data, dict):
            raise InvalidFrame("tickers data is not an object")
        symbol = data.get("symbol") or topic[8:]
        if not isinstance(symbol, str) or not symbol:
            raise InvalidFrame("tickers frame without a symbol")
        key = (market, symbol)
        kind = msg.get("type", "snapshot")  # spot tickers are always snapshots
        cs = _int(msg.get("cs"), "cs")
        if self._stale(key, cs):
            return None
        if kind == "snapshot":
            ts = _int(msg.get("ts"), "ts")
            if ts is None:
                raise InvalidFrame("frame without ts")
            quote = self._snapshot(market, symbol, _dict_value(data), ts, recv_us, cs)
        elif kind == "delta":
            state = self._tickers.get(key)
            if state is None:
                self.stats.dropped_deltas += 1
                return None
            quote = self._delta(market, symbol, state, data, msg, recv_us, cs)
        else:
            raise InvalidFrame(f"unknown frame type {kind!r}")
        # Commit only a frame that produced a valid quote: a bad delta must not poison the state.
        return self._commit(key, quote, cs)

    def _delta(
        self,
        market: Market,
        symbol: str,
        state: Quote,
        data: dict[str, Any],
        msg: dict[str, Any],
        recv_us: int,
        cs: int | None,
    ) -> Quote:
        """The last Quote with the fields this delta carries (absent fields keep their value)."""
        fields = _SPOT_FIELDS if market == "SPOT" else _LINEAR_FIELDS
        changes: dict[str, Any] = {}
        for name, value in data.items():
            target = fields.get(name)
            if target is not None:
                changes[target] = _num(value, name)
        if "price" in changes and changes["price"] is None:
            raise InvalidFrame("no lastPrice")
        pcnt = changes.get("change24h")
        if pcnt is not None:
            changes["change24h"] = round(pcnt * 100.0, 8)
        ts = _int(msg.get("ts"), "ts")
        if ts is None:
            raise InvalidFrame("frame without ts")
        if market == "SPOT":
            changes["bid"], changes["ask"] = self._spot_bid_ask(symbol)
        return replace(state, ts=ts, recv_us=recv_us, seq=cs, **changes)

    def _spot_bid_ask(self, symbol: str) -> tuple[float | None, float | None]:
        if self.spot_book:
            book = self._books.get(symbol)
            if book is not None:
                return book.best_bid, book.best_ask
        return None, None

    def _snapshot(
        self,
        market: Market,
        symbol: str,
        value: Callable[[str], float | None],
        ts: int,
        recv_us: int,
        cs: int | None,
    ) -> Quote:
        """A full ticker as a Quote; ``value(wire_field)`` reads one number (``None`` = absent)."""
        price = value("lastPrice")
        if price is None:
            raise InvalidFrame("no lastPrice")
        pcnt = value("price24hPcnt")
        common: dict[str, Any] = {
            "symbol": symbol,
            "market": market,
            "price": price,
            "volume": value("volume24h"),
            "turnover": value("turnover24h"),
            "high24h": value("highPrice24h"),
            "low24h": value("lowPrice24h"),
            "change24h": round(pcnt * 100.0, 8) if pcnt is not None else None,
            "ts": ts,
            "recv_us": recv_us,
            "seq": cs,
        }
        if market == "SPOT":
            bid, ask = self._spot_bid_ask(symbol)
            return Quote(**common, bid=bid, ask=ask)
        return Quote(
            **common,
            bid=value("bid1Price"),
            ask=value("ask1Price"),
            mark_price=value("markPrice"),
            index_price=value("indexPrice"),
            funding_rate=value("fundingRate"),
            open_interest=value("openInterest"),
        )

    def _orderbook(self, msg: dict[str, Any]) -> None:
        data = msg.get("data")
        if not isinstance(data, dict):
            raise InvalidFrame("orderbook data is not an object")
        symbol = data.get("s")
        if not isinstance(symbol, str) or not symbol:
            raise InvalidFrame("orderbook frame without a symbol")
        kind = msg.get("type")
        book = self._books.get(symbol)
        if book is None:
            book = self._books[symbol] = _Book()
        book.apply(data, snapshot=kind != "delta")
        self.stats.book_updates += 1
