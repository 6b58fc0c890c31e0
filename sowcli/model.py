"""Quote: the record every stage exchanges, and its JSON codec.

A Quote is one ticker update for one symbol on one market, normalised from Bybit's wire format.
Field names are part of the public contract (NATS payloads, Redis values, QuestDB columns, the API):

======================  =======================================================================
``symbol``              upper-case Bybit symbol, e.g. ``BTCUSDT``
``market``              ``"SPOT"`` or ``"FUTURES"`` (USDT linear perpetuals)
``price``               last traded price
``volume``/``turnover`` 24 h volume in base / quote currency
``high24h``/``low24h``  24 h high / low
``change24h``           24 h change in percent (Bybit's ``price24hPcnt`` × 100)
``bid``/``ask``         best bid / ask, ``null`` when unknown
``mark_price`` ...      ``mark_price``, ``index_price``, ``funding_rate``, ``open_interest``:
                        FUTURES only, ``null`` on SPOT
``ts``                  exchange event time, ms since the epoch
``recv_us``             local receive time, µs since the epoch
``seq``                 Bybit's cross sequence ``cs``
======================  =======================================================================

``msgspec.Struct(frozen=True)`` is used because it is the cheapest immutable record to build and
encode on the hot path (see STYLE.md for the measurements). ``gc=False``: a Quote holds only
strings and numbers, so it can never be part of a reference cycle; untracked, the hundreds of
thousands created per second do not trigger the cyclic garbage collector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

Market = Literal["SPOT", "FUTURES"]
MARKET_NAMES: dict[str, Market] = {"spot": "SPOT", "futures": "FUTURES"}


class Quote(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One normalised ticker update (see the module docstring for the meaning of each field)."""

    symbol: str
    market: Market
    price: float
    volume: float | None = None
    turnover: float | None = None
    high24h: float | None = None
    low24h: float | None = None
    change24h: float | None = None
    bid: float | None = None
    ask: float | None = None
    mark_price: float | None = None
    index_price: float | None = None
    funding_rate: float | None = None
    open_interest: float | None = None
    ts: int
    recv_us: int
    seq: int | None = None

    @property
    def key(self) -> tuple[Market, str]:
        """(market, symbol): the identity of a quote stream."""
        return (self.market, self.symbol)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Quote)


# Quote -> JSON bytes (``null`` for unknown values; field order as declared). The encoder's own
# method, not a wrapper: it runs once per quote on the hot path.
encode_quote: Callable[[Quote], bytes] = _encoder.encode
# The same into a reusable buffer (replacing its content): no new bytes object per quote.
encode_quote_into: Callable[[Quote, bytearray], None] = _encoder.encode_into


def decode_quote(data: bytes | str) -> Quote:
    """JSON -> Quote; raises ``msgspec.ValidationError``/``DecodeError`` on a bad payload."""
    return _decoder.decode(data)


def market_name(market: str) -> Market:
    """``spot``/``SPOT``/``futures``... -> ``"SPOT"``/``"FUTURES"``; ValueError otherwise."""
    try:
        return MARKET_NAMES[market.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown market {market!r} (choose from SPOT, FUTURES)") from None
