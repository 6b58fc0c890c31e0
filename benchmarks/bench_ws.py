"""Benchmark of ``sow serve-ws``: WebSocket fan-out to many browsers.

Run: ``.venv/bin/python benchmarks/bench_ws.py [--clients 500] [--rate 500] [--seconds 20]
[--runs 3]``.

Three processes besides nats-server and a Redis-protocol server (``sowcli.infra``, free ports,
temporary folder):

- **serve-ws** — the same code as ``sow serve-ws`` (uvloop, uvicorn, defaults: 100 ms batches,
  permessage-deflate), in its own process; its CPU time and RSS are read from ``/proc``.
- **clients** — ``--clients`` websockets clients in ``--client-procs`` (2) separate processes
  (permessage-deflate
  on, as browsers do), each subscribed to ``"*"``. ``--probes`` of them (spread evenly) parse
  every message and record, for every quote, ``now - recv_us``: the time from the publisher's
  ``nats.publish`` to the client holding the parsed quote (one machine, one clock), in a 1 ms
  histogram. The others receive and inflate every message but do not parse it, so that the
  client processes keep up (a client process that falls behind measures its own backlog, not the
  server's; what remains of its queueing is included in the figures: browsers, one process
  each, would see less).
- **publisher** — this process: ``--rate`` quotes per second round-robin over the default 15
  symbols × 2 markets, realistic values, ``recv_us`` stamped at publish time, paced every 5 ms.

Each run: clients connect and subscribe (snapshot from the cache), 3 s of warm-up, then
``--seconds`` measured. Reported per run and as medians over ``--runs``: serve-ws CPU (% of one
core), its RSS, latency p50/p99/max over every quote every client received, and what each client
got per second. The machine's load average is printed too: other work on the box shows up in the
latency figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
import redis

from sowcli.bus.nats import quote_subject
from sowcli.config import DEFAULT_SYMBOLS
from sowcli.infra import free_port, start_nats, start_redis
from sowcli.model import Quote, encode_quote
from sowcli.runtime import new_event_loop
from sowcli.sinks.cache import latest_key

SERVER = """
from sowcli.config import load_settings
from sowcli.logs import configure_logging
from sowcli.runtime import run_until_signal
from sowcli.servers.ws import WsServer

settings = load_settings()
configure_logging(settings.log_level, settings.log_format)
run_until_signal(WsServer(settings).run)
"""

CLIENTS = r"""
import asyncio, json, sys, time
import orjson
from websockets.asyncio.client import connect
from sowcli.runtime import new_event_loop

URL, N, PROBES = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BINS = 10_000  # 1 ms bins up to 10 s
hist = [0] * (BINS + 1)
state = {"measuring": False, "messages": 0, "quotes": 0, "closed": 0, "bytes": 0}

async def client(i, ready):
    probe = i % (N // PROBES or 1) == 0  # every (N/PROBES)th client parses and times
    async with connect(URL, max_size=None, open_timeout=60) as ws:
        await ws.recv()  # status
        await ws.send('{"type":"subscribe","symbols":["*"]}')
        while orjson.loads(await ws.recv())["type"] != "snapshot":
            pass
        ready()
        try:
            while True:
                message = await ws.recv(decode=False)
                if not state["measuring"]:
                    continue
                state["messages"] += 1
                state["bytes"] += len(message)
                if probe:
                    doc = orjson.loads(message)
                    now_us = time.time_ns() // 1000
                    quotes = doc.get("quotes", ())
                    state["quotes"] += len(quotes)
                    for q in quotes:
                        ms = (now_us - q["recv_us"]) // 1000
                        hist[min(max(ms, 0), BINS)] += 1
        except Exception:
            pass
        state["closed"] += 1

async def main():
    loop = asyncio.get_running_loop()
    subscribed = 0
    all_ready = asyncio.Event()
    def ready():
        nonlocal subscribed
        subscribed += 1
        if subscribed == N:
            all_ready.set()
    tasks = []
    for i in range(N):
        tasks.append(asyncio.create_task(client(i, ready)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    await all_ready.wait()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    state["measuring"] = True
    began = time.perf_counter()
    await loop.run_in_executor(None, sys.stdin.readline)
    state["measuring"] = False
    elapsed = time.perf_counter() - began
    print(json.dumps({"hist": hist, "elapsed": elapsed, **state}), flush=True)
    for t in tasks:
        t.cancel()

with asyncio.Runner(loop_factory=new_event_loop) as r:
    r.run(main())
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAMS = [(m, s) for s in DEFAULT_SYMBOLS for m in ("SPOT", "FUTURES")]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_quote(i: int, prices: dict[tuple[str, str], float], rng: random.Random) -> Quote:
    market, symbol = STREAMS[i % len(STREAMS)]
    p = prices[(market, symbol)] * (1 + rng.gauss(0, 0.0005))
    prices[(market, symbol)] = p
    fut = market == "FUTURES"
    now_us = time.time_ns() // 1000
    return Quote(
        symbol=symbol, market=market, price=round(p, 6),  # type: ignore[arg-type]
        volume=round(rng.uniform(1e3, 1e7), 3), turnover=round(rng.uniform(1e6, 1e10), 2),
        high24h=round(p * 1.03, 6), low24h=round(p * 0.97, 6),
        change24h=round(rng.uniform(-5, 5), 4), bid=round(p * 0.9999, 6),
        ask=round(p * 1.0001, 6), mark_price=round(p, 6) if fut else None,
        index_price=round(p * 0.9998, 6) if fut else None, funding_rate=0.0001 if fut else None,
        open_interest=round(rng.uniform(1e4, 1e8), 3) if fut else None,
        ts=now_us // 1000, recv_us=now_us, seq=i,
    )  # fmt: skip


async def publish(nats_url: str, rate: float, stop: asyncio.Event) -> int:
    """``rate`` quotes per second until ``stop``; returns how many were published."""
    nc = await nats.connect(nats_url)
    rng = random.Random(7)
    prices = {key: 10 ** rng.uniform(-1, 5) for key in STREAMS}
    start = time.perf_counter()
    sent = 0
    while not stop.is_set():
        due = int((time.perf_counter() - start) * rate)
        while sent < due:
            q = make_quote(sent, prices, rng)
            await nc.publish(quote_subject(q.market, q.symbol), encode_quote(q))
            sent += 1
        await asyncio.sleep(0.005)
    await nc.flush()
    await nc.close()
    return sent


def percentile(hist: list[int], p: float) -> float:
    total = sum(hist)
    want = p / 100 * total
    seen = 0
    for ms, n in enumerate(hist):
        seen += n
        if seen >= want:
            return float(ms)
    return float(len(hist))


def start_clients(args: argparse.Namespace, url: str) -> list[subprocess.Popen[str]]:
    """``--client-procs`` processes sharing ``--clients`` connections and ``--probes``."""
    procs = []
    for i in range(args.client_procs):
        n = args.clients // args.client_procs + (i < args.clients % args.client_procs)
        probes = args.probes // args.client_procs + (i < args.probes % args.client_procs)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CLIENTS, url, str(n), str(max(1, probes))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def tell(procs: list[subprocess.Popen[str]], word: str) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(word + "\n")
        p.stdin.flush()


async def one_run(
    args: argparse.Namespace, procs: list[subprocess.Popen[str]], server_pid: int, nats_url: str
) -> dict[str, float]:
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.to_thread(p.stdout.readline)
        if line.strip() != "ready":
            raise SystemExit(f"clients did not get ready: {line!r}")
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish(nats_url, args.rate, stop))
    await asyncio.sleep(3.0)  # warm-up
    load0 = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
    ccpu0 = sum(cpu_seconds(p.pid) for p in procs)
    tell(procs, "go")
    await asyncio.sleep(args.seconds)
    took = time.perf_counter() - t0
    cpu = (cpu_seconds(server_pid) - cpu0) / took * 100
    clients_cpu = (sum(cpu_seconds(p.pid) for p in procs) - ccpu0) / took * 100
    rss = rss_mb(server_pid)
    tell(procs, "stop")
    results = []
    for p in procs:
        assert p.stdout is not None
        results.append(json.loads(await asyncio.to_thread(p.stdout.readline)))
    stop.set()
    published = await publisher
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(30)
    hist = [sum(bins) for bins in zip(*(r["hist"] for r in results), strict=True)]
    elapsed = statistics.mean(r["elapsed"] for r in results)
    total = {k: sum(r[k] for r in results) for k in ("messages", "quotes", "bytes", "closed")}
    return {
        "cpu": cpu,
        "clients_cpu": clients_cpu,
        "rss": rss,
        "p50": percentile(hist, 50),
        "p99": percentile(hist, 99),
        "max": float(max((ms for ms, n in enumerate(hist) if n), default=0)),
        "msgs_per_client_s": total["messages"] / elapsed / args.clients,
        "quotes_per_client_s": total["quotes"] / elapsed / min(args.probes, args.clients),
        "kb_per_client_s": total["bytes"] / elapsed / args.clients / 1024,
        "closed": float(total["closed"]),
        "published": float(published),
        "load": (load0 + os.getloadavg()[0]) / 2,
    }


def fill_cache(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    rng = random.Random(1)
    prices = {key: 10 ** rng.uniform(-1, 5) for key in STREAMS}
    for i in range(len(STREAMS)):
        q = make_quote(i, prices, rng)
        r.set(latest_key(q.market, q.symbol), encode_quote(q))
    r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--rate", type=float, default=500.0, help="quotes per second into NATS")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--probes", type=int, default=50, help="clients that parse and time quotes")
    ap.add_argument("--client-procs", type=int, default=2, help="processes running the clients")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="sow-bench-ws-"))
    nats_server = start_nats(home / "nats")
    cache = start_redis(home / "redis")
    port = free_port()
    env = {
        **os.environ,
        "NATS_URL": nats_server.nats_url,
        "DRAGONFLY_URL": cache.redis_url,
        "SOW_WS_PORT": str(port),
        "SOW_WS_MAX_CLIENTS": str(max(1000, args.clients + 10)),
        "SOW_LOG_LEVEL": "WARNING",
    }
    server: subprocess.Popen[bytes] | None = None
    try:
        fill_cache(cache.redis_url)
        server = subprocess.Popen([sys.executable, "-c", SERVER], env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("serve-ws did not start")
            time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/ws"
        rows = []
        for run in range(1, args.runs + 1):
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                procs = start_clients(args, url)
                row = runner.run(one_run(args, procs, server.pid, nats_server.nats_url))
            rows.append(row)
            print(
                f"run {run}: serve-ws CPU {row['cpu']:.0f} % of a core, RSS {row['rss']:.0f} MB, "
                f"NATS->client p50 {row['p50']:.0f} ms, p99 {row['p99']:.0f} ms, "
                f"max {row['max']:.0f} ms; per client {row['msgs_per_client_s']:.1f} msg/s, "
                f"{row['quotes_per_client_s']:.0f} quotes/s, {row['kb_per_client_s']:.1f} KiB/s "
                f"(after inflate); clients closed {row['closed']:.0f}; clients process CPU "
                f"{row['clients_cpu']:.0f} %; load avg {row['load']:.1f}",
                flush=True,
            )
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        dropped = [ln for ln in metrics.splitlines() if ln.startswith("sow_ws_clients_dropped")]
        print()
        print(
            f"{args.clients} clients subscribed to all {len(STREAMS)} streams, {args.rate:.0f} "
            f"quotes/s in, medians of {args.runs} runs of {args.seconds:.0f} s on "
            f"{platform.machine()} × {os.cpu_count()} CPUs, Python {platform.python_version()} "
            f"(load average {med['load']:.1f}):"
        )
        print(
            f"  serve-ws CPU {med['cpu']:.0f} % of one core | RSS {med['rss']:.0f} MB | "
            f"NATS->client p50 {med['p50']:.0f} ms, p99 {med['p99']:.0f} ms | "
            f"{med['msgs_per_client_s']:.1f} batches/s and {med['quotes_per_client_s']:.0f} "
            f"quotes/s per client | {'; '.join(dropped)}"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        cache.stop()
        nats_server.stop()


if __name__ == "__main__":
    main()
