"""Benchmark of ``sow query ohlc``: OHLC 1 h over 7 days for one symbol out of 10 M rows.

Run: ``.venv/bin/python benchmarks/bench_query.py [--rows 10000000] [--runs 20] [--max-load-s 600]``.

It starts its own QuestDB (``sowcli.infra``, free ports, temporary folder, removed afterwards),
creates ``market_data`` with the production DDL (WAL, DEDUP keys) and loads ``--rows`` synthetic
quotes over ILP/HTTP with the ``questdb`` client (``Buffer.row``, 100,000 rows per HTTP request):
the default 15 symbols on SPOT and FUTURES, every field filled as the live streams fill it, spread
evenly over the 14 days before now, in time order. Load time is reported twice: until the last
request is acknowledged, and until QuestDB has applied every WAL transaction (``wal_tables()``).
If loading takes longer than ``--max-load-s``, it stops there and says how many rows it measured.

Then, over one psycopg connection and through :mod:`sowcli.query` (the code ``sow query`` and the
API run), each query runs once cold and ``--runs`` times warm; the median, p90 and min are shown:

- ``ohlc`` BTCUSDT SPOT 1 h over the last 7 days (the target: median ≤ 100 ms),
- the same with ``fill="prev"`` (one more query for the seed price),
- ``stats`` BTCUSDT SPOT over 24 h, ``history`` of the last hour (limit 1,000), and
  ``latest`` over all 30 streams (``LATEST ON``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sowcli import query
from sowcli.config import DEFAULT_SYMBOLS
from sowcli.infra import ServerProcess, questdb_wal_pending, start_questdb
from sowcli.sinks.questdb import MARKET_DATA_DDL
from sowcli.timeparse import OHLC_INTERVALS, TimeRange

DAYS = 14
BATCH = 100_000


def exec_http(server: ServerProcess, sql: str) -> None:
    url = f"{server.questdb_http_url}/exec?" + urllib.parse.urlencode({"query": sql})
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()


def load(server: ServerProcess, rows: int, max_load_s: float) -> tuple[int, float, float]:
    """Load up to ``rows`` quotes; (rows loaded, seconds to last ack, seconds to applied)."""
    from questdb.ingress import Sender, TimestampNanos

    streams = [(s, m) for s in DEFAULT_SYMBOLS for m in ("SPOT", "FUTURES")]
    ticks = rows // len(streams)
    end_ns = time.time_ns()
    step_ns = DAYS * 86_400 * 10**9 // max(ticks, 1)
    start_ns = end_ns - ticks * step_ns
    rng = random.Random(42)
    price = {key: 10.0 ** rng.uniform(-1, 4.8) for key in streams}
    seq = {key: rng.randrange(10**9) for key in streams}
    conf = server.questdb_http_url.replace("http://", "http::addr=") + ";auto_flush=off;"
    loaded = 0
    t0 = time.perf_counter()
    with Sender.from_conf(conf) as sender:
        buf = sender.new_buffer()
        for tick in range(ticks):
            ts = start_ns + tick * step_ns
            at = TimestampNanos(ts)
            for key in streams:
                symbol, market = key
                p = price[key] = price[key] * (1 + rng.gauss(0, 0.0005))
                s = seq[key] = seq[key] + 1
                columns: dict[str, Any] = {
                    "price": p,
                    "volume": 12_345.6,
                    "high24h": p * 1.02,
                    "low24h": p * 0.98,
                    "change24h": 1.25,
                    "turnover": 12_345.6 * p,
                    "bid": p * 0.9999,
                    "ask": p * 1.0001,
                    "seq": s,
                    "recv_us": ts // 1000 + 900,
                }
                if market == "FUTURES":
                    columns.update(
                        mark_price=p,
                        index_price=p * 0.9998,
                        funding_rate=0.0001,
                        open_interest=54_321.0,
                    )
                buf.row(
                    "market_data",
                    symbols={"symbol": symbol, "market": market},
                    columns=columns,
                    at=at,
                )
            loaded += len(streams)
            if len(buf) >= BATCH:
                sender.flush(buf)
                if time.perf_counter() - t0 > max_load_s:
                    break
        if len(buf):
            sender.flush(buf)
    acked = time.perf_counter() - t0
    while questdb_wal_pending(server, "market_data").get("market_data", 1) > 0:
        time.sleep(0.1)
    applied = time.perf_counter() - t0
    return loaded, acked, applied


async def measure(
    name: str, work: Callable[[], Awaitable[Any]], runs: int
) -> tuple[str, float, float, float, float, int]:
    t = time.perf_counter()
    result = await work()
    cold = (time.perf_counter() - t) * 1000
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        await work()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p90 = samples[min(len(samples) - 1, math.ceil(0.9 * len(samples)) - 1)]
    return name, cold, statistics.median(samples), p90, samples[0], len(result)


async def queries(
    server: ServerProcess, runs: int
) -> list[tuple[str, float, float, float, float, int]]:
    now = datetime.now(UTC)
    week = TimeRange(now - timedelta(days=7), now)
    hour = TimeRange(now - timedelta(hours=1), now)
    h1 = OHLC_INTERVALS["1h"]
    async with await query.connect(server.questdb_url) as db:
        return [
            await measure(
                "ohlc 1h × 7 d (BTCUSDT SPOT)",
                lambda: query.ohlc(db, "BTCUSDT", "SPOT", h1, week),
                runs,
            ),
            await measure(
                "ohlc 1h × 7 d, fill=prev",
                lambda: query.ohlc(db, "BTCUSDT", "SPOT", h1, week, fill="prev"),
                runs,
            ),
            await measure("stats 24 h", lambda: query.stats(db, "BTCUSDT", "SPOT"), runs),
            await measure(
                "history 1 h, limit 1000",
                lambda: query.history(db, "BTCUSDT", "SPOT", hour, limit=1000),
                runs,
            ),
            await measure("latest (30 streams)", lambda: query.latest(db), runs),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-load-s", type=float, default=600.0)
    parser.add_argument("--heap", default="2g")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="sow-bench-query-"))
    server = start_questdb(home, heap=args.heap)
    try:
        exec_http(server, " ".join(MARKET_DATA_DDL.split()))
        print(f"loading {args.rows:,} rows into market_data ...", file=sys.stderr, flush=True)
        loaded, acked, applied = load(server, args.rows, args.max_load_s)
        results = asyncio.run(queries(server, args.runs))
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)

    print(
        f"# bench_query — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, QuestDB via sowcli.infra"
    )
    print()
    print(
        f"rows loaded: {loaded:,} ({DAYS} days, 30 streams)  "
        f"load: {acked:.1f} s to last ack ({loaded / acked:,.0f} rows/s), "
        f"{applied:.1f} s until applied ({loaded / applied:,.0f} rows/s)"
    )
    print()
    print("| query | cold ms | median ms | p90 ms | min ms | rows |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cold, median, p90, best, n in results:
        print(f"| {name} | {cold:.1f} | {median:.1f} | {p90:.1f} | {best:.1f} | {n} |")


if __name__ == "__main__":
    main()
