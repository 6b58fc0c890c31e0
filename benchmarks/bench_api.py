"""Benchmark of ``sow serve-api``: ``GET /api/prices/latest`` latency under a steady load.

Run: ``.venv/bin/python benchmarks/bench_api.py [--rate 200] [--clients 50] [--seconds 20]
[--runs 3]``.

It starts its own nats-server and Redis-protocol server (``sowcli.infra``, free ports, temporary
folder), fills ``latest:{market}:{symbol}`` for the default 15 symbols × 2 markets with realistic
Quotes (what ``sow cache`` writes), and runs ``sow serve-api`` in a **separate process** (the
same code as the command, rate limit off). QuestDB is not started: ``/latest`` answers from the
cache; the pool's QuestDB URL points at a closed port and is never used on this path.

The load comes from this process: ``--clients`` keep-alive HTTP/1.1 connections, each sending on
a fixed schedule so that together they send ``--rate`` requests per second (open loop: a slow
answer does not slow the schedule down, and latency is measured from the *scheduled* send time,
so queueing is counted). The client is a minimal hand-written HTTP/1.1 reader on asyncio streams
(uvloop), so the figures are the server's, not an HTTP library's. Every answer is checked: 200,
``X-Sow-Source: cache``, 30 quotes.

Each run lasts ``--seconds`` after a 2 s warm-up; reported: p50, p90, p99 and max latency, the
achieved rate, and the server process's CPU (% of one core) and RSS. Figures are medians over
``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

from sowcli.config import DEFAULT_SYMBOLS
from sowcli.infra import free_port, start_nats, start_redis
from sowcli.model import Quote, encode_quote
from sowcli.runtime import new_event_loop
from sowcli.sinks.cache import latest_key

SERVER = """
import logging
from sowcli.config import load_settings
from sowcli.logs import configure_logging
from sowcli.runtime import run_until_signal
from sowcli.servers.api import ApiServer

settings = load_settings()
configure_logging(settings.log_level, settings.log_format)
run_until_signal(ApiServer(settings).run)
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill_cache(redis_url: str) -> int:
    r = redis.Redis.from_url(redis_url)
    ts = int(time.time() * 1000)
    n = 0
    for i, symbol in enumerate(DEFAULT_SYMBOLS):
        for market in ("SPOT", "FUTURES"):
            p = 10.0 ** (i % 5) * 1.2345
            fut = market == "FUTURES"
            q = Quote(
                symbol=symbol, market=market, price=p, volume=123456.789, turnover=98765432.1,
                high24h=p * 1.03, low24h=p * 0.97, change24h=-1.2345, bid=p * 0.9999,
                ask=p * 1.0001, mark_price=p if fut else None, index_price=p if fut else None,
                funding_rate=0.0001 if fut else None, open_interest=1e6 if fut else None,
                ts=ts, recv_us=ts * 1000, seq=1_000_000 + n,
            )  # fmt: skip
            r.set(latest_key(market, symbol), encode_quote(q))
            n += 1
    r.close()
    return n


class Conn:
    """One keep-alive HTTP/1.1 connection that sends GET and reads the whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def get(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        return status, headers, body


async def run_load(
    port: int, rate: float, clients: int, seconds: float, expect: int, path: str
) -> tuple[list[float], float]:
    """Latencies (ms) of the requests sent during ``seconds`` and the achieved rate."""
    request = b"GET %b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode()
    latest = path == "/api/prices/latest"
    conns = [Conn(*await asyncio.open_connection("127.0.0.1", port)) for _ in range(clients)]
    interval = clients / rate  # each client's period
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    warmup = 2.0
    start = clock() + 0.2
    end = start + warmup + seconds
    latencies: list[float] = []
    errors: list[str] = []

    async def client(i: int, conn: Conn) -> None:
        t = start + interval * i / clients  # staggered phases: a steady stream, not bursts
        prev_done = 0.0
        while t < end:
            delay = t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = clock()
            status, headers, body = await conn.get(request)
            done = clock()
            # From the scheduled time when the previous answer made this request late (queueing
            # counts); else from the actual send (the client's timer granularity does not).
            began_at = t if prev_done > t else sent
            prev_done = done
            if status != 200 or (latest and headers.get(b"x-sow-source") != b"cache"):
                errors.append(f"{status} {headers.get(b'x-sow-source')!r}")
            elif t >= start + warmup:
                if latest and orjson.loads(body)["count"] != expect:
                    errors.append("wrong count")
                latencies.append((done - began_at) * 1000)
            t += interval

    began = time.perf_counter()
    await asyncio.gather(*(client(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - began - warmup - 0.2
    for c in conns:
        c.writer.close()
    if errors:
        raise SystemExit(f"{len(errors)} bad answers, e.g. {errors[:3]}")
    return latencies, len(latencies) / elapsed


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second, in total")
    ap.add_argument("--clients", type=int, default=50, help="concurrent connections")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--path", default="/api/prices/latest", help="what to GET (default /latest)")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="sow-bench-api-"))
    nats = start_nats(home / "nats")
    cache = start_redis(home / "redis")
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": nats.nats_url,
        "DRAGONFLY_URL": cache.redis_url,
        "QUESTDB_URL": f"postgres://admin:quest@127.0.0.1:{free_port()}/qdb",
        "SOW_API_PORT": str(port),
        "SOW_API_RATE_LIMIT_PER_SECOND": "0",
        "SOW_LOG_LEVEL": "ERROR",
    }
    server: subprocess.Popen[bytes] | None = None
    try:
        expect = fill_cache(cache.redis_url)
        server = subprocess.Popen([sys.executable, "-c", SERVER], env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                import httpx

                if httpx.get(f"http://127.0.0.1:{port}/api/prices/latest").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("serve-api did not start")
            time.sleep(0.1)

        rows = []
        for run in range(1, args.runs + 1):
            cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                lat, achieved = runner.run(
                    run_load(port, args.rate, args.clients, args.seconds, expect, args.path)
                )
            cpu = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - t0) * 100
            row = {
                "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat),
                "rate": achieved, "cpu": cpu, "rss": rss_mb(server.pid), "n": len(lat),
                "load": os.getloadavg()[0],
            }  # fmt: skip
            rows.append(row)
            print(
                f"run {run}: {row['n']} requests at {achieved:.0f}/s: p50 {row['p50']:.2f} ms, "
                f"p90 {row['p90']:.2f} ms, p99 {row['p99']:.2f} ms, max {row['max']:.1f} ms; "
                f"server CPU {cpu:.0f} % of a core, RSS {row['rss']:.0f} MB; "
                f"load avg {row['load']:.1f}",
                flush=True,
            )
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print()
        print(
            f"GET {args.path} ({expect} quotes in the cache), {args.clients} clients, "
            f"{args.rate:.0f} req/s, medians of {args.runs} runs of {args.seconds:.0f} s on "
            f"{platform.machine()} × {os.cpu_count()} CPUs, Python {platform.python_version()} "
            f"(load average {med['load']:.1f}):"
        )
        print(
            f"  p50 {med['p50']:.2f} ms | p90 {med['p90']:.2f} ms | p99 {med['p99']:.2f} ms | "
            f"max {med['max']:.1f} ms | server CPU {med['cpu']:.0f} % of one core | "
            f"RSS {med['rss']:.0f} MB"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        cache.stop()
        nats.stop()


if __name__ == "__main__":
    main()
