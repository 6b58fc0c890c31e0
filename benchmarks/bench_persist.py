"""Benchmark of ``sow persist``: rows/s from a pre-filled JetStream stream into QuestDB.

Run: ``.venv/bin/python benchmarks/bench_persist.py [--quotes 500000] [--runs 3]``.

It starts its own nats-server (JetStream) and QuestDB (``sowcli.infra``: free ports, temporary
folder), pre-fills the ``QUOTES`` stream with realistic quotes (the default 15 symbols on SPOT and
FUTURES, every field filled as the live streams fill it), then alternates, ``--runs`` times:

- **persist** — the real stage (:class:`sowcli.persist.Persister`, default batch 10,000 rows /
  250 ms) on a fresh durable consumer, from "pulling" to the last message acked after its
  QuestDB write. ``market_data`` is truncated before each run (every run inserts, none upserts).
  QuestDB's asynchronous WAL apply is timed separately ("applied").
- **ceilings** — bare consume + ack loops on fresh consumers, no decoding, nothing written:
  ``push-ackall`` (push consumer, callback, one AckAll per 5,000: the issue's ceiling),
  ``pull-ackall`` (our pull requests, one AckAll per 5,000) and ``pull-bulk`` (our pull requests,
  one explicit ack per message written in bulk: persist's own delivery path). The ceiling is the
  fastest of them: the most nats-py can take off JetStream here.

QuestDB runs with low worker spin thresholds by default (``--questdb-spin default`` for its
stock settings; see ``LOW_SPIN_QUESTDB``), and the CPU time of each server per row is printed.

Figures are medians; msgs per CPU-second of this process is printed beside the wall rate because
all servers share the machine's cores with the benchmark (and, on a shared box, with other work).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from sowcli.bus.jetstream import ensure_quotes_stream, send_acks
from sowcli.bus.nats import quote_subject
from sowcli.config import DEFAULT_SYMBOLS, Settings
from sowcli.infra import ServerProcess, questdb_wal_pending, start_nats, start_questdb
from sowcli.logs import configure_logging
from sowcli.model import Quote, encode_quote
from sowcli.persist import WRITE_LANES, Persister
from sowcli.runtime import new_event_loop
from sowcli.sinks.questdb import ensure_tables

BATCH = 5000

# QuestDB's worker threads spin (yield) for a long while between jobs before they nap. persist
# writes a batch every few tens of ms, so with the defaults the workers never nap and burn most
# of a core - on a 2-core box shared with nats-server and persist that is the largest cost of all
# (measured: ~17 µs CPU/row of QuestDB for intermittent 5,000-row writes, ~5-10 with these).
LOW_SPIN_QUESTDB = {
    f"QDB_{pool}_WORKER_{what}_THRESHOLD": value
    for pool in ("SHARED", "HTTP", "WAL_APPLY")
    for what, value in (("YIELD", "10"), ("NAP", "20"), ("SLEEP", "100"))
}


def make_quotes(n: int, seed: int = 7) -> list[Quote]:
    rng = random.Random(seed)
    base = {s: 10 ** rng.uniform(-1, 4.8) for s in DEFAULT_SYMBOLS}
    ts0 = int(time.time() * 1000) - n  # one quote per ms, ending now
    out = []
    for i in range(n):
        symbol = DEFAULT_SYMBOLS[i % len(DEFAULT_SYMBOLS)]
        futures = (i // len(DEFAULT_SYMBOLS)) % 2 == 1
        p = base[symbol] * (1 + rng.uniform(-0.01, 0.01))
        out.append(Quote(
            symbol=symbol, market="FUTURES" if futures else "SPOT", price=p,
            volume=rng.uniform(1e3, 1e7), turnover=rng.uniform(1e6, 1e9),
            high24h=p * 1.03, low24h=p * 0.97, change24h=rng.uniform(-5, 5),
            bid=p * 0.9999, ask=p * 1.0001,
            mark_price=p * 1.00001 if futures else None, index_price=p * 0.99999 if futures else None,
            funding_rate=0.0001 if futures else None, open_interest=rng.uniform(1e4, 1e8) if futures else None,
            ts=ts0 + i, recv_us=(ts0 + i) * 1000 + 250, seq=1_000_000 + i,
        ))  # fmt: skip
    return out


async def prefill(nc: Client, settings: Settings, quotes: list[Quote]) -> float:
    js = nc.jetstream()
    await ensure_quotes_stream(js, settings)
    t0 = time.perf_counter()
    for i, q in enumerate(quotes, 1):
        await nc.publish(quote_subject(q.market, q.symbol), encode_quote(q))
        if i % 5000 == 0:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(settings.stream_name)).state.messages < len(quotes):
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


# --- ceilings: bare consume + ack loops ----------------------------------------------------


async def push_ackall(nc: Client, js: JetStreamContext, stream: str, name: str, n: int) -> None:
    done = asyncio.Event()
    count = 0

    async def cb(msg: Msg) -> None:
        nonlocal count
        count += 1
        if count % BATCH == 0 or count == n:
            await msg.ack()
            if count == n:
                done.set()

    sub = await js.subscribe(
        "quotes.>",
        stream=stream,
        durable=name,
        cb=cb,
        manual_ack=True,
        pending_msgs_limit=200_000,
        config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=4 * BATCH),
    )
    await done.wait()
    await sub.unsubscribe()


async def _pull_loop(
    nc: Client,
    js: JetStreamContext,
    stream: str,
    name: str,
    n: int,
    policy: AckPolicy,
    ack: Callable[[list[str]], Awaitable[None]],
) -> None:
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            ack_policy=policy,
            max_ack_pending=20 * BATCH,
            filter_subject="quotes.>",
        ),
    )
    inbox = nc.new_inbox()
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
    request = json.dumps({"batch": BATCH, "expires": 5_000_000_000}).encode()
    done = asyncio.Event()
    held: list[str] = []
    count = credit = 0

    async def cb(msg: Msg) -> None:
        nonlocal count, credit
        if not msg.reply:
            return
        count += 1
        credit -= 1
        held.append(msg.reply)
        if len(held) >= BATCH or count == n:
            await ack(held)
            held.clear()
            if count == n:
                done.set()
        if credit < BATCH and count < n:
            credit += BATCH
            await nc.publish(subject, request, reply=inbox)

    sub = await nc.subscribe(inbox, cb=cb, pending_msgs_limit=200_000)
    for _ in range(3):
        credit += BATCH
        await nc.publish(subject, request, reply=inbox)
    await done.wait()
    await sub.unsubscribe()


async def pull_ackall(nc: Client, js: JetStreamContext, stream: str, name: str, n: int) -> None:
    async def ack(replies: list[str]) -> None:
        await nc.publish(replies[-1])

    await _pull_loop(nc, js, stream, name, n, AckPolicy.ALL, ack)


async def pull_bulk(nc: Client, js: JetStreamContext, stream: str, name: str, n: int) -> None:
    async def ack(replies: list[str]) -> None:
        await send_acks(nc, replies)

    await _pull_loop(nc, js, stream, name, n, AckPolicy.EXPLICIT, ack)


CEILINGS = {"push-ackall": push_ackall, "pull-ackall": pull_ackall, "pull-bulk": pull_bulk}


# --- the stage ------------------------------------------------------------------------------


def truncate(qdb: ServerProcess) -> None:
    with psycopg.connect(qdb.questdb_url, autocommit=True) as conn:
        conn.execute("TRUNCATE TABLE market_data")


async def wait_applied(qdb: ServerProcess) -> None:
    while (await asyncio.to_thread(questdb_wal_pending, qdb, "market_data")).get("market_data", 1):
        await asyncio.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of another process, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_persist(
    settings: Settings, qdb: ServerProcess, n: int, servers: dict[str, int], lanes: int
) -> tuple[float, float, float, dict[str, float]]:
    """(seconds from pulling to the last ack, CPU seconds of this process, seconds to applied,
    CPU seconds of each server meanwhile)."""
    stop = asyncio.Event()
    persister = Persister(settings, lanes=lanes)
    task = asyncio.create_task(persister.run(stop))
    while persister.state != "running":
        await asyncio.sleep(0.005)
    t0, c0 = time.perf_counter(), time.process_time()
    s0 = {name: cpu_seconds(pid) for name, pid in servers.items()}
    while persister.messages_total < n:
        await asyncio.sleep(0.002)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    used = {name: cpu_seconds(pid) - s0[name] for name, pid in servers.items()}
    stop.set()
    await task
    await wait_applied(qdb)
    applied = time.perf_counter() - t0
    assert persister.rows_total == n and persister.invalid == 0, persister.status()
    return dt, dc, applied, used


async def main(args: argparse.Namespace) -> None:
    configure_logging("WARNING", "kv")
    home = Path(tempfile.mkdtemp(prefix="sow-bench-persist-"))
    nats_srv = start_nats(home)
    qdb = start_questdb(home, heap=args.heap)
    if args.questdb_spin == "low":
        qdb.env.update(LOW_SPIN_QUESTDB)
        qdb.restart()
    try:
        settings = dataclasses.replace(
            Settings(),
            nats_url=nats_srv.nats_url,
            questdb_url=qdb.questdb_url,
            questdb_http_url=qdb.questdb_http_url,
            heartbeat_interval_seconds=1.0,
            persist_batch_rows=args.batch_rows,
        )
        nc = await nats.connect(nats_srv.nats_url, pending_size=8 * 1024 * 1024)
        js = nc.jetstream()
        quotes = make_quotes(args.quotes)
        n = len(quotes)
        fill_s = await prefill(nc, settings, quotes)
        del quotes
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"NATS, QuestDB and this process on the same machine"
        )
        print(
            f"pre-filled {n:,} quotes into JetStream in {fill_s:.1f} s; batch {settings.persist_batch_rows}, "
            f"flush {settings.persist_flush_ms} ms, {args.lanes} write lane(s); QuestDB worker spin: "
            f"{args.questdb_spin}"
        )
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in (*CEILINGS, "persist")}
        applied: list[float] = []
        cpu_us: list[dict[str, float]] = []
        servers = {"nats-server": nats_srv.pid, "questdb": qdb.pid}
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        await asyncio.to_thread(ensure_tables, qdb.questdb_url)
        for run in range(1, args.runs + 1):
            for name, loop in CEILINGS.items():
                t0, c0 = time.perf_counter(), time.process_time()
                await loop(nc, js, settings.stream_name, f"bench-{name}-{run}", n)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                results[name].append((n / dt, n / dc))
                print(
                    f"run {run}  {name:12s} {n / dt:9,.0f} msgs/s  {n / dc:9,.0f} msgs/CPU-s",
                    flush=True,
                )
            await asyncio.to_thread(truncate, qdb)
            await wait_applied(qdb)
            cfg = dataclasses.replace(settings, persist_consumer=f"bench-persist-{run}")
            dt, dc, ap, used = await run_persist(cfg, qdb, n, servers, args.lanes)
            results["persist"].append((n / dt, n / dc))
            applied.append(n / ap)
            per_row = {
                name: round(sec / n * 1e6, 1) for name, sec in {"persist": dc, **used}.items()
            }
            cpu_us.append(per_row)
            print(
                f"run {run}  {'persist':12s} {n / dt:9,.0f} rows/s  {n / dc:9,.0f} rows/CPU-s  "
                f"(applied by QuestDB: {n / ap:,.0f} rows/s; CPU µs per row: {per_row})",
                flush=True,
            )
        await nc.close()
    finally:
        nats_srv.stop()
        qdb.stop()

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    ceiling_name = max(CEILINGS, key=lambda k: med(k, 0))
    ceiling = med(ceiling_name, 0)
    persist = med("persist", 0)
    print(f"\nmedians over {args.runs} runs of {n:,} quotes:")
    for name in CEILINGS:
        print(f"  ceiling {name:12s} {med(name, 0):9,.0f} msgs/s  {med(name, 1):9,.0f} msgs/CPU-s")
    print(
        f"  sow persist          {persist:9,.0f} rows/s  {med('persist', 1):9,.0f} rows/CPU-s  "
        f"(applied: {statistics.median(applied):,.0f} rows/s)"
    )
    cpu = {k: statistics.median(r[k] for r in cpu_us) for k in cpu_us[0]}
    print(
        f"  CPU µs per row while persisting (median): {cpu}; load average now "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"  persist / ceiling ({ceiling_name}): {persist / ceiling:.0%}   "
        f"(per CPU-second of this process: {med('persist', 1) / med(ceiling_name, 1):.0%})   "
        f"targets: >= 50,000 rows/s {'met' if persist >= 50_000 else 'MISSED'}, "
        f">= 60 % {'met' if persist >= 0.6 * ceiling else 'MISSED'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quotes", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heap", default="1g", help="QuestDB -Xmx")
    parser.add_argument("--batch-rows", type=int, default=Settings().persist_batch_rows)
    parser.add_argument("--lanes", type=int, default=WRITE_LANES, help="QuestDB writes in flight")
    parser.add_argument(
        "--questdb-spin",
        choices=("default", "low"),
        default="low",
        help="QuestDB worker yield/nap/sleep thresholds (see LOW_SPIN_QUESTDB)",
    )
    a = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(a))
