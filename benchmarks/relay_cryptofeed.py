"""cryptofeed 2.4.1's Bybit feed publishing its Ticker to NATS: the comparison of ``bench_publish.py``.

Run with the Python of a *separate* virtualenv that has cryptofeed (it is not a dependency of sow)::

    python3 -m venv /tmp/cf-venv
    /tmp/cf-venv/bin/pip install cryptofeed==2.4.1 nats-py orjson
    /tmp/cf-venv/bin/python benchmarks/relay_cryptofeed.py --url ws://127.0.0.1:PORT/v5/public/linear \
        --nats nats://127.0.0.1:4222 --symbols BTCUSDT,ETHUSDT

How cryptofeed is pointed at a local exchange (cryptofeed/exchanges/bybit.py, 2.4.1):

- the websocket address comes from the class attribute ``Bybit.websocket_endpoints`` (the first
  entry is ``wss://stream.bybit.com/v5/public/linear``); its ``address`` is replaced here. The feed
  takes the market from the URL's last path segment, so the URL must end in ``/v5/public/linear``;
- the symbol table normally comes from REST ``/v5/market/instruments-info`` when the feed is
  built; it is filled in beforehand (``Symbols.set``) from a synthetic instruments-info answer
  parsed by cryptofeed's own ``Bybit._parse_symbol_data``, so no network is needed.

Everything else is cryptofeed as shipped: its ``FeedHandler`` (uvloop on), its websockets
connection, its delta merge, its ``Ticker`` (``Decimal`` bid/ask). The callback publishes
``Ticker.to_dict(numeric_type=float)`` plus cryptofeed's ``receipt_timestamp`` (the time it read
the frame off the socket) as JSON to ``{prefix}.{SYMBOL}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="relay_cryptofeed.py",
        description="cryptofeed's Bybit feed -> Ticker -> NATS, against a local (fake) exchange.",
    )
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v5/public/linear")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--symbols", required=True, help="comma-separated Bybit linear symbols")
    parser.add_argument("--prefix", default="bench.cryptofeed")
    args = parser.parse_args(argv)
    symbols = [s for s in args.symbols.split(",") if s]
    if not args.url.rstrip("/").endswith("/linear"):
        sys.exit("--url must end in /v5/public/linear (cryptofeed reads the market from it)")

    import nats
    import orjson
    from cryptofeed import FeedHandler
    from cryptofeed import connection as cf_connection
    from cryptofeed.defines import BYBIT, TICKER
    from cryptofeed.exchanges import Bybit
    from cryptofeed.symbols import Symbols

    # 1. the endpoint: the linear websocket only, at the given address
    linear = Bybit.websocket_endpoints[0]
    assert linear.address.endswith("/v5/public/linear"), linear.address
    linear.address = args.url
    Bybit.websocket_endpoints = [linear]
    # WSAsyncConn refuses anything but wss://; the fake exchange speaks plain ws:// (as does sow's
    # side of the benchmark), so pass the check with wss:// and connect to the real address.
    ws_init = cf_connection.WSAsyncConn.__init__

    def plain_ws_init(self: Any, address: str, *a: Any, **kw: Any) -> None:
        plain = address.startswith("ws://")
        ws_init(self, "wss://" + address[5:] if plain else address, *a, **kw)
        if plain:
            self.address = address

    cf_connection.WSAsyncConn.__init__ = plain_ws_init

    # 2. the symbol table, without REST
    listing = [
        {
            "symbol": s,
            "baseCoin": s[:-4],
            "quoteCoin": "USDT",
            "contractType": "LinearPerpetual",
            "priceFilter": {"tickSize": "0.01"},
        }
        for s in symbols
        if s.endswith("USDT")
    ]
    normalized, info = Bybit._parse_symbol_data([{"result": {"list": listing}}])
    Symbols.set(BYBIT, normalized, info)
    std_symbols = [k for k, v in normalized.items() if v in symbols]

    fh = FeedHandler(config={"uvloop": True, "log": {"disabled": True}})
    publish: Any = None  # nc.publish, once connected
    dumps, prefix = orjson.dumps, args.prefix + "."

    async def on_ticker(ticker: Any, receipt_timestamp: float) -> None:
        doc = ticker.to_dict(numeric_type=float)
        doc["receipt_timestamp"] = receipt_timestamp
        await publish(prefix + normalized[doc["symbol"]], dumps(doc))

    # The callback needs the NATS connection, which needs the event loop: feed first, then both.
    fh.add_feed(Bybit(symbols=std_symbols, channels=[TICKER], callbacks={TICKER: on_ticker}))
    loop = asyncio.new_event_loop()  # uvloop: FeedHandler installed its policy
    asyncio.set_event_loop(loop)
    nc = loop.run_until_complete(
        nats.connect(args.nats, name="bench-cryptofeed", pending_size=8 * 1024 * 1024)
    )
    publish = nc.publish
    fh.run()  # until SIGTERM/SIGINT


if __name__ == "__main__":
    main()
