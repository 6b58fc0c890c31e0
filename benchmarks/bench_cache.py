"""Benchmark of ``sow cache``: quotes/s written into Redis, next to a same-run ceiling.

Run: ``.venv/bin/python benchmarks/bench_cache.py [--quotes 200000] [--runs 5]``.

It starts its own nats-server and Redis-protocol server (``sowcli.infra``, free ports, temporary
folder) and pre-generates realistic Quotes (the default 15 symbols on SPOT and FUTURES, every field
filled as the live streams fill it). Each run starts from an empty database. Three measurements:

- **stage** — the real ``sow cache`` path: a publisher *process* sends the pre-encoded quotes to
  ``quotes.{market}.{SYMBOL}`` as fast as nats-py allows; a :class:`CacheStage` (queue group
  subscription, decode, coalesce, pipeline, Lua) in this process writes them. Time from "go" to
  the last quote acknowledged by Redis.
- **writer** — :class:`CacheWriter` fed in-process (the ``sow up`` seam: no NATS, no decode), at
  full speed with back-pressure at 50,000 pending quotes.
- **NATS ceiling** — the same publisher process, received by a bare nats-py subscription whose
  callback only counts: the most quotes/s this process can take off NATS at all, so the ceiling
  of the stage path.
- **Redis ceiling** — the same pre-encoded JSON bytes pushed with a bare pipelined loop: one
  multi-value ``LPUSH`` per stream per batch of ``BATCH_MAX`` quotes, no decoding, no encoding, no
  other key. The cache writes each quote twice (history and timeseries) plus stats and latest,
  so this ceiling is generous; it is the ceiling of the writer.

All processes share this machine's cores; the figures are medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis

from sowcli.config import DEFAULT_SYMBOLS, Settings
from sowcli.infra import start_nats, start_redis
from sowcli.model import Quote, encode_quote
from sowcli.runtime import new_event_loop
from sowcli.sinks.cache import BATCH_MAX, CacheStage, CacheWriter

PUBLISHER = """
import asyncio, sys
import nats
from sowcli.runtime import new_event_loop
from sowcli.bus.nats import quote_subject
sys.path.insert(0, sys.argv[3])
from bench_cache import make_quotes
from sowcli.model import encode_quote

async def main():
    quotes = make_quotes(int(sys.argv[2]))
    msgs = [(quote_subject(q.market, q.symbol), encode_quote(q)) for q in quotes]
    nc = await nats.connect(sys.argv[1], pending_size=64 * 1024 * 1024)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    publish = nc.publish
    for subject, payload in msgs:
        await publish(subject, payload)
    await nc.flush(timeout=60)
    await nc.close()

with asyncio.Runner(loop_factory=new_event_loop) as runner:
    runner.run(main())
"""


def make_quotes(n: int, seed: int = 7) -> list[Quote]:
    """``n`` plausible quotes round-robin over 15 symbols × 2 markets, ts increasing."""
    rng = random.Random(seed)
    streams = [(m, s) for s in DEFAULT_SYMBOLS for m in ("SPOT", "FUTURES")]
    prices = {key: 10 ** rng.uniform(-1, 5) for key in streams}
    ts0 = 1_786_000_000_000
    out: list[Quote] = []
    for i in range(n):
        market, symbol = streams[i % len(streams)]
        p = prices[(market, symbol)] * (1 + rng.gauss(0, 0.0005))
        prices[(market, symbol)] = p
        fut = market == "FUTURES"
        out.append(
            Quote(
                symbol=symbol,
                market=market,  # type: ignore[arg-type]
                price=round(p, 6),
                volume=round(rng.uniform(1e3, 1e7), 3),
                turnover=round(rng.uniform(1e6, 1e10), 2),
                high24h=round(p * 1.03, 6),
                low24h=round(p * 0.97, 6),
                change24h=round(rng.uniform(-5, 5), 4),
                bid=round(p * 0.9999, 6),
                ask=round(p * 1.0001, 6),
                mark_price=round(p, 6) if fut else None,
                index_price=round(p * 0.9998, 6) if fut else None,
                funding_rate=0.0001 if fut else None,
                open_interest=round(rng.uniform(1e4, 1e8), 3) if fut else None,
                ts=ts0 + i // 3,
                recv_us=(ts0 + i // 3) * 1000 + 1500,
                seq=1_000_000 + i,
            )
        )
    return out


async def wait_for(check: Callable[[], bool], poll_s: float = 0.002) -> None:
    while not check():
        await asyncio.sleep(poll_s)


async def wait_count(
    count: Callable[[], int], n: int, pub: subprocess.Popen[str], what: str
) -> None:
    """Wait until ``count()`` reaches ``n``; fail (not hang) when the publisher is done and
    nothing has moved for 3 s (nats-server cuts a subscriber more than 64 MB behind)."""
    last, moved = count(), time.monotonic()
    while last < n:
        await asyncio.sleep(0.002)
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif pub.poll() is not None and time.monotonic() - moved > 3:
            raise SystemExit(
                f"{what}: {now:,} of {n:,} quotes arrived (publisher rc {pub.returncode})"
            )


def start_publisher(nats_url: str, n: int, here: Path) -> subprocess.Popen[str]:
    """A process that publishes ``n`` pre-encoded quotes once it reads "go" on stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, nats_url, str(n), str(here)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def run_stage(settings: Settings, n: int, here: Path) -> tuple[float, dict[str, object]]:
    """Publisher process -> NATS -> CacheStage -> Redis; seconds from 'go' to the last write."""
    pub = start_publisher(settings.nats_url, n, here)
    assert pub.stdin is not None and pub.stdout is not None
    stop = asyncio.Event()
    stage = CacheStage(settings)
    task = asyncio.create_task(stage.run(stop))
    await wait_for(lambda: stage.subscribed.is_set())
    line = await asyncio.to_thread(pub.stdout.readline)
    assert line.strip() == "ready", line
    w = stage.writer.stats
    started = time.perf_counter()
    pub.stdin.write("go\n")
    pub.stdin.flush()
    await wait_count(lambda: w.written + w.dropped, n, pub, "stage")
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    pub.wait(30)
    status = stage.status()
    if w.written != n:
        raise SystemExit(f"stage wrote {w.written} of {n} quotes: {status}")
    return elapsed, status


async def run_nats_ceiling(nats_url: str, n: int, here: Path) -> float:
    """The same publisher, received by a callback that only counts (no decode, no Redis)."""
    import nats

    pub = start_publisher(nats_url, n, here)
    assert pub.stdin is not None and pub.stdout is not None
    nc = await nats.connect(nats_url)
    got = 0

    async def count(_msg: object) -> None:
        nonlocal got
        got += 1

    sub = await nc.subscribe("quotes.>", queue="bench", cb=count, pending_msgs_limit=n + 1,
                             pending_bytes_limit=n * 1024)  # fmt: skip
    await nc.flush()
    line = await asyncio.to_thread(pub.stdout.readline)
    assert line.strip() == "ready", line
    started = time.perf_counter()
    pub.stdin.write("go\n")
    pub.stdin.flush()
    await wait_count(lambda: got, n, pub, "bare subscriber")
    elapsed = time.perf_counter() - started
    pub.wait(30)
    await sub.unsubscribe()
    await nc.close()
    if got != n:
        raise SystemExit(f"bare subscriber got {got} of {n} messages")
    return elapsed


async def run_writer(url: str, quotes: list[Quote]) -> float:
    """CacheWriter fed in-process at full speed (back-pressure at 50,000 pending quotes)."""
    writer = CacheWriter(url, flush_ms=50)
    await writer.start()
    started = time.perf_counter()
    add = writer.add
    for i in range(0, len(quotes), 1000):
        for q in quotes[i : i + 1000]:
            add(q)
        while writer.pending > 50_000:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)
    await writer.drained()
    elapsed = time.perf_counter() - started
    assert writer.stats.written == len(quotes), writer.stats
    await writer.stop()
    return elapsed


async def run_ceiling(url: str, quotes: list[Quote]) -> float:
    """Pre-encoded JSON, one multi-value LPUSH per stream per batch, pipelined: no other work."""
    docs = [(f"history:{q.market.lower()}:{q.symbol}", encode_quote(q)) for q in quotes]
    client = aioredis.Redis.from_url(url)
    started = time.perf_counter()
    for i in range(0, len(docs), BATCH_MAX):
        groups: dict[str, list[bytes]] = {}
        for key, doc in docs[i : i + BATCH_MAX]:
            groups.setdefault(key, []).append(doc)
        pipe = client.pipeline(transaction=False)
        for key, values in groups.items():
            pipe.lpush(key, *values)
        await pipe.execute()
    elapsed = time.perf_counter() - started
    await client.aclose()
    return elapsed


async def flushall(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


async def bench(n: int, runs: int, here: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="sow-bench-cache-") as tmp:
        nats_srv = start_nats(Path(tmp))
        redis_srv = start_redis(Path(tmp))
        try:
            settings = dataclasses.replace(
                Settings(),
                nats_url=nats_srv.nats_url,
                dragonfly_url=redis_srv.redis_url,
                heartbeat_interval_seconds=1.0,
                log_level="WARNING",
            )
            quotes = make_quotes(n)
            size = sum(len(encode_quote(q)) for q in quotes) / n
            try:
                parser = f"hiredis {importlib.metadata.version('hiredis')}"
            except importlib.metadata.PackageNotFoundError:
                parser = "pure-Python reply parser (no hiredis)"
            print(
                f"{n:,} quotes ({size:.0f} B JSON each), 30 streams, {runs} runs; "
                f"Python {platform.python_version()}, {os.cpu_count()} cores, {parser}"
            )
            results: dict[str, list[float]] = {"stage": [], "nats": [], "writer": [], "ceiling": []}
            for run in range(runs):
                await flushall(redis_srv.redis_url)
                elapsed, status = await run_stage(settings, n, here)
                results["stage"].append(n / elapsed)
                results["nats"].append(n / await run_nats_ceiling(nats_srv.nats_url, n, here))
                await flushall(redis_srv.redis_url)
                results["writer"].append(n / await run_writer(redis_srv.redis_url, quotes))
                await flushall(redis_srv.redis_url)
                results["ceiling"].append(n / await run_ceiling(redis_srv.redis_url, quotes))
                print(
                    f"  run {run + 1}: stage {results['stage'][-1]:>8,.0f}/s "
                    f"(NATS ceiling {results['nats'][-1]:>8,.0f}/s)  "
                    f"writer {results['writer'][-1]:>8,.0f}/s "
                    f"(Redis ceiling {results['ceiling'][-1]:>8,.0f}/s)  "
                    f"(batches {status['batches']}, last flush {status['last_flush_ms']} ms, "
                    f"peak buffer {status['buffered_peak']})"
                )
            med = {k: statistics.median(v) for k, v in results.items()}
            print("medians:")
            rows = [
                ("sow cache stage (NATS -> Redis)", med["stage"], med["stage"] / med["nats"]),
                ("  ceiling: bare NATS subscriber", med["nats"], None),
                ("CacheWriter in-process", med["writer"], med["writer"] / med["ceiling"]),
                ("  ceiling: bare pipelined LPUSH", med["ceiling"], None),
            ]
            for label, rate, share in rows:
                tail = f"  ({share:.0%} of its ceiling)" if share is not None else ""
                print(f"  {label:<34}{rate:>10,.0f} quotes/s{tail}")
        finally:
            nats_srv.stop()
            redis_srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quotes",
        type=int,
        default=150_000,
        help="quotes per run (about 340 B each; keep the "
        "total under nats-server's 64 MB per-client backlog)",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is reported)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(bench(args.quotes, args.runs, Path(__file__).resolve().parent))


if __name__ == "__main__":
    main()
