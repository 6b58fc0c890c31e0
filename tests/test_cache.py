"""`sow cache` against a real nats-server and a real Redis-protocol server (no mocks).

Every test uses symbols of its own, so they can share the session servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import typer
from nats.aio.client import Client as Nats
from typer.testing import CliRunner

from sowcli.bus.nats import status_subject
from sowcli.cli import cache as cache_cli
from sowcli.config import Settings
from sowcli.errors import ConfigError
from sowcli.infra import ServerProcess
from sowcli.model import Quote, decode_quote, encode_quote
from sowcli.sinks import cache as cache_module
from sowcli.sinks.cache import (
    CacheStage,
    CacheWriter,
    history_key,
    latest_key,
    stats_key,
    timeseries_key,
)
from tests.helpers import publish_quotes as publish

# 2026-08-09 23:59:59.000 UTC: quotes a few seconds apart straddle two UTC days.
T0 = int(datetime(2026, 8, 9, 23, 59, 59, tzinfo=UTC).timestamp() * 1000)
WAIT_S = 20.0  # upper bound of every poll below (a hang guard, not a performance threshold)


def symbol() -> str:
    return f"T{uuid.uuid4().hex[:10].upper()}USDT"


def quote(
    sym: str, price: float, ts: int, *, market: str = "SPOT", seq: int | None = None
) -> Quote:
    return Quote(
        symbol=sym,
        market=market,  # type: ignore[arg-type]
        price=price,
        volume=1.0,
        ts=ts,
        recv_us=ts * 1000 + 7,
        seq=seq if seq is not None else ts,
    )


async def eventually(check: Callable[[], Awaitable[object] | object], what: str) -> None:
    """Poll ``check`` until it is truthy; fail naming ``what`` after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def settings_for(nats_server: ServerProcess, redis: ServerProcess, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_server.nats_url,
        "dragonfly_url": redis.redis_url,
        "cache_flush_ms": 20,
        "cache_queue_group": f"test-{uuid.uuid4().hex[:8]}",
        "heartbeat_interval_seconds": 0.1,
    }
    values.update(extra)
    return dataclasses.replace(Settings(), **values)


class Running:
    """Cache stages running in this event loop, stopped (and checked) at the end of the test."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, settings: Settings) -> CacheStage:
        stage = CacheStage(settings)
        self.tasks.append(asyncio.create_task(stage.run(self.stop)))
        await eventually(lambda: stage.subscribed.is_set() or self.tasks[-1].done(), "subscription")
        assert not self.tasks[-1].done(), self.tasks[-1].exception()
        return stage

    def alive(self) -> bool:
        return not any(t.done() for t in self.tasks)


@pytest.fixture
async def stages() -> AsyncIterator[Running]:
    running = Running()
    try:
        yield running
    finally:
        running.stop.set()
        for task in running.tasks:
            await asyncio.wait_for(task, 15)  # raises if a stage crashed


def written(*stages: CacheStage) -> int:
    return sum(s.writer.stats.written for s in stages)


async def get_quote(r: aioredis.Redis, key: str) -> Quote:
    doc = await r.get(key)
    assert doc is not None, f"{key} is missing"
    return decode_quote(doc)


async def history_of(r: aioredis.Redis, key: str) -> list[Quote]:
    docs: list[Any] = await r.lrange(key, 0, -1)
    return [decode_quote(doc) for doc in docs]


async def series_of(r: aioredis.Redis, key: str) -> list[tuple[Quote, int]]:
    rows: list[Any] = await r.zrange(key, 0, -1, withscores=True)
    return [(decode_quote(member), int(score)) for member, score in rows]


async def stats_of(r: aioredis.Redis, key: str) -> dict[str, str]:
    raw: dict[Any, Any] = await r.hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


# --- the four key kinds --------------------------------------------------------------------


async def test_quotes_fill_latest_history_timeseries_and_stats(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    stage = await stages.start(settings_for(nats_server, redis_server, cache_history_max=5))
    sym = symbol()
    # Day 1 (2026-08-09): 3 quotes, day 2: 5 quotes; prices chosen so min/max != first/last.
    first_wave = [quote(sym, p, T0 + i * 300) for i, p in enumerate([101.5, 99.0, 103.25])]
    second_wave = [
        quote(sym, p, T0 + 1000 + i * 300) for i, p in enumerate([102.0, 98.5, 104.0, 100.0, 101.0])
    ]
    other = quote(sym, 7.0, T0, market="FUTURES")
    await publish(nc, [*first_wave, other])
    await eventually(lambda: written(stage) == 4, "first wave written")
    await publish(nc, second_wave)  # a second flush: stats merge with what is stored
    await eventually(lambda: written(stage) == 9, "second wave written")
    spot = [*first_wave, *second_wave]

    # latest: the newest quote, exactly as published
    assert await get_quote(redis, latest_key("SPOT", sym)) == spot[-1]
    assert await get_quote(redis, latest_key("FUTURES", sym)) == other
    assert await redis.exists(f"latest:spot:{sym}")  # market in lower case

    # history: newest first, capped at 5
    history = await history_of(redis, history_key("SPOT", sym))
    assert history == list(reversed(spot))[:5]

    # timeseries: one sorted set per UTC day, scored by exchange ts, with a TTL of 7 days
    day1 = timeseries_key("SPOT", sym, T0)
    day2 = timeseries_key("SPOT", sym, T0 + 1000)
    assert day1.endswith(":2026-08-09") and day2.endswith(":2026-08-10")
    assert await series_of(redis, day1) == [(q, q.ts) for q in first_wave]
    assert await series_of(redis, day2) == [(q, q.ts) for q in second_wave]
    for key in (day1, day2):
        assert 7 * 86_400 - 60 <= await redis.ttl(key) <= 7 * 86_400

    # stats per day: count, sum, min, max, first(_ts), last(_ts); same TTL
    s1 = await stats_of(redis, stats_key("SPOT", sym, T0))
    s2 = await stats_of(redis, stats_key("SPOT", sym, T0 + 1000))
    assert int(s1["count"]) == 3 and int(s2["count"]) == 5
    assert float(s1["sum"]) == pytest.approx(101.5 + 99.0 + 103.25)
    assert (float(s1["min"]), float(s1["max"])) == (99.0, 103.25)
    assert (float(s1["first"]), int(s1["first_ts"])) == (101.5, T0)
    assert (float(s1["last"]), int(s1["last_ts"])) == (103.25, T0 + 600)
    assert (float(s2["min"]), float(s2["max"])) == (98.5, 104.0)
    assert (float(s2["first"]), int(s2["first_ts"])) == (102.0, T0 + 1000)
    assert (float(s2["last"]), int(s2["last_ts"])) == (101.0, T0 + 2200)
    assert 7 * 86_400 - 60 <= await redis.ttl(stats_key("SPOT", sym, T0)) <= 7 * 86_400
    assert stage.writer.stats.write_errors == 0 and stage.writer.stats.dropped == 0


async def test_stats_merge_across_flushes(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    """A later flush with a lower min, a higher max, an earlier first and a later last."""
    stage = await stages.start(settings_for(nats_server, redis_server))
    sym = symbol()
    t = T0 + 10_000  # all on 2026-08-10
    await publish(nc, [quote(sym, 50.0, t + 500), quote(sym, 60.0, t + 600)])
    await eventually(lambda: written(stage) == 2, "first flush")
    await publish(
        nc, [quote(sym, 55.0, t + 550), quote(sym, 40.0, t + 100), quote(sym, 70.0, t + 900)]
    )
    await eventually(lambda: written(stage) == 5, "second flush")
    stats = await stats_of(redis, stats_key("SPOT", sym, t))
    assert stats["count"] == "5"
    assert (float(stats["min"]), float(stats["max"])) == (40.0, 70.0)
    assert (float(stats["first"]), int(stats["first_ts"])) == (40.0, t + 100)
    assert (float(stats["last"]), int(stats["last_ts"])) == (70.0, t + 900)
    assert float(stats["sum"]) == pytest.approx(275.0)


async def test_older_quote_never_replaces_latest(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    stage = await stages.start(settings_for(nats_server, redis_server))
    sym = symbol()
    newer = quote(sym, 200.0, T0 + 5000, seq=20)
    older = quote(sym, 100.0, T0 + 1000, seq=10)
    await publish(nc, [newer])
    await eventually(lambda: written(stage) == 1, "newer written")
    await publish(nc, [older])  # a flush of its own, arriving late
    await eventually(lambda: written(stage) == 2, "older written")
    assert await get_quote(redis, latest_key("SPOT", sym)) == newer

    # Same exchange time: the higher seq wins, whatever the arrival order.
    same_ts_high = quote(sym, 300.0, T0 + 9000, seq=31)
    same_ts_low = quote(sym, 299.0, T0 + 9000, seq=30)
    await publish(nc, [same_ts_high])
    await eventually(lambda: written(stage) == 3, "same-ts quote written")
    await publish(nc, [same_ts_low])
    await eventually(lambda: written(stage) == 4, "lower seq written")
    assert await get_quote(redis, latest_key("SPOT", sym)) == same_ts_high

    # Out of order inside one flush: the newest by ts is kept, history is in ts order.
    sym2 = symbol()
    q1, q2, q3 = (quote(sym2, float(p), T0 + p) for p in (300, 100, 200))
    await publish(nc, [q1, q2, q3])
    await eventually(lambda: written(stage) == 7, "one flush written")
    assert await get_quote(redis, latest_key("SPOT", sym2)) == q1
    history = await history_of(redis, history_key("SPOT", sym2))
    assert history == [q1, q3, q2]
    # history and timeseries still got every quote
    assert await redis.llen(history_key("SPOT", sym)) == 4
    assert await redis.zcard(timeseries_key("SPOT", sym, T0 + 1000)) == 4


async def test_writes_are_coalesced_per_window_and_per_full_batch(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    # A 2 s window: everything published at once goes out in one pipeline.
    stage = await stages.start(settings_for(nats_server, redis_server, cache_flush_ms=2000))
    a, b = symbol(), symbol()
    quotes = [quote(a if i % 2 else b, float(i), T0 + 12_000 + i) for i in range(100)]
    await publish(nc, quotes)
    await eventually(lambda: written(stage) == 100, "the window's quotes written")
    assert stage.writer.stats.batches == 1
    assert await redis.llen(history_key("SPOT", a)) == 50
    assert await get_quote(redis, latest_key("SPOT", a)) == quotes[-1]
    assert await get_quote(redis, latest_key("SPOT", b)) == quotes[-2]

    # Full batches do not wait for the window (here a minute long), nor does what queued
    # behind them.
    writer = CacheWriter(redis_server.redis_url, flush_ms=60_000, batch_max=10)
    await writer.start()
    c = symbol()
    try:
        for i in range(25):
            writer.add(quote(c, float(i), T0 + 13_000 + i))
        await eventually(lambda: writer.stats.written == 25, "full batches written")
        assert writer.stats.batches == 3  # 10 + 10 + 5
    finally:
        await writer.stop()
    assert writer.stats.dropped == 0
    assert await redis.llen(history_key("SPOT", c)) == 25


# --- scale-out -----------------------------------------------------------------------------


async def test_two_stages_in_one_queue_group_share_the_quotes(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    settings = settings_for(nats_server, redis_server)
    a = await stages.start(settings)
    b = await stages.start(settings)
    sym = symbol()
    quotes = [quote(sym, 100.0 + i % 7, T0 + 2000 + i) for i in range(600)]
    await publish(nc, quotes)
    await eventually(lambda: written(a, b) >= 600, "600 quotes written by the two stages")

    assert written(a, b) == 600  # each quote processed once
    assert a.writer.stats.written > 0 and b.writer.stats.written > 0
    assert await redis.llen(history_key("SPOT", sym)) == 600
    assert await redis.zcard(timeseries_key("SPOT", sym, T0 + 2000)) == 600
    assert await redis.hget(stats_key("SPOT", sym, T0 + 2000), "count") == b"600"
    # Two writers racing on latest: the script keeps the newest.
    assert await get_quote(redis, latest_key("SPOT", sym)) == quotes[-1]


# --- outages and bad input -----------------------------------------------------------------


async def test_redis_restart_under_a_running_cache(
    nats_server: ServerProcess,
    fresh_redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
) -> None:
    stage = await stages.start(settings_for(nats_server, fresh_redis_server))
    sym = symbol()
    before = [quote(sym, 10.0 + i, T0 + 3000 + i) for i in range(10)]
    during = [quote(sym, 20.0 + i, T0 + 4000 + i) for i in range(10)]
    after = [quote(sym, 30.0 + i, T0 + 5000 + i) for i in range(10)]

    await publish(nc, before)
    await eventually(lambda: written(stage) == 10, "quotes written before the outage")

    await asyncio.to_thread(fresh_redis_server.stop)
    await publish(nc, during)
    await eventually(lambda: stage.writer.stats.write_errors > 0, "a failed flush")
    assert not stage.writer.connected
    assert stage.status()["state"] == "degraded"
    assert written(stage) == 10 and stage.writer.pending == 10

    await asyncio.to_thread(fresh_redis_server.restart)  # empty again: no persistence
    await publish(nc, after)
    await eventually(lambda: written(stage) == 30, "buffered and new quotes written")
    assert stages.alive() and stage.writer.connected
    assert stage.writer.stats.dropped == 0

    client = aioredis.Redis.from_url(fresh_redis_server.redis_url)
    try:
        history = await history_of(client, history_key("SPOT", sym))
        assert history == list(reversed(during + after))
        assert await get_quote(client, latest_key("SPOT", sym)) == after[-1]
        stats = await stats_of(client, stats_key("SPOT", sym, T0 + 4000))
        assert stats["count"] == "20"
        assert float(stats["first"]) == 20.0 and float(stats["last"]) == 39.0
        assert await client.zcard(timeseries_key("SPOT", sym, T0 + 4000)) == 20
    finally:
        await client.aclose()


async def test_refused_writes_are_retried_without_duplicates(
    nats_server: ServerProcess, fresh_redis_server: ServerProcess, stages: Running, nc: Nats
) -> None:
    """Redis out of memory refuses every write: nothing is stored, so the batch is retried."""
    stage = await stages.start(settings_for(nats_server, fresh_redis_server))
    admin = aioredis.Redis.from_url(fresh_redis_server.redis_url)
    try:
        await admin.config_set("maxmemory", 1)  # noeviction: every write needing memory -> OOM
        sym = symbol()
        quotes = [quote(sym, 50.0 + i, T0 + 9000 + i) for i in range(10)]
        await publish(nc, quotes)
        await eventually(lambda: stage.writer.stats.write_errors >= 2, "refused flushes")
        assert written(stage) == 0 and stage.writer.pending == 10
        assert stage.status()["state"] == "degraded"

        await admin.config_set("maxmemory", 0)
        await eventually(lambda: written(stage) == 10, "the batch written once Redis takes it")
        assert await history_of(admin, history_key("SPOT", sym)) == list(reversed(quotes))
        assert (await stats_of(admin, stats_key("SPOT", sym, T0 + 9000)))["count"] == "10"
        assert await get_quote(admin, latest_key("SPOT", sym)) == quotes[-1]
        assert stage.writer.connected and stage.writer.stats.dropped == 0
    finally:
        await admin.aclose()


async def test_buffer_is_bounded_while_redis_is_down(fresh_redis_server: ServerProcess) -> None:
    """In-process use (the QuoteHandler seam): the oldest quotes beyond the bound are dropped."""
    writer = CacheWriter(fresh_redis_server.redis_url, flush_ms=10, batch_max=10, buffer_max=25)
    await asyncio.to_thread(fresh_redis_server.stop)
    await writer.start()
    assert not writer.connected
    sym = symbol()
    quotes = [quote(sym, float(i), T0 + 6000 + i) for i in range(60)]
    try:
        for q in quotes:
            await writer.on_quote(q)
        assert writer.pending == 25
        assert writer.stats.dropped == 35
        await eventually(lambda: writer.stats.write_errors > 0, "a failed flush")
        assert writer.pending == 25  # the failed batch went back, still within the bound

        await asyncio.to_thread(fresh_redis_server.restart)
        assert await writer.drained(WAIT_S)
        assert writer.stats.written == 25 and writer.stats.dropped == 35
    finally:
        await writer.stop()
    client = aioredis.Redis.from_url(fresh_redis_server.redis_url)
    try:
        history = await history_of(client, history_key("SPOT", sym))
        assert history == list(reversed(quotes[-25:]))
    finally:
        await client.aclose()


async def test_malformed_payloads_are_counted_and_skipped(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    redis: aioredis.Redis,
) -> None:
    stage = await stages.start(settings_for(nats_server, redis_server))
    sym = symbol()
    for payload in (
        b"not json",
        b"[]",
        b'{"symbol": "X"}',  # missing fields
        b'{"symbol":"X","market":"MOON","price":1,"ts":1,"recv_us":1}',  # bad market
        b'{"symbol":"X","market":"SPOT","price":"cheap","ts":1,"recv_us":1}',  # bad type
        b"",
        encode_quote(quote("btc-usdt", 1.0, T0)),  # not a symbol name: keys are built from it
        encode_quote(quote("A" * 200, 1.0, T0)),
    ):
        await nc.publish(f"quotes.spot.{sym}", payload)
    good = quote(sym, 1.5, T0 + 7000)
    await publish(nc, [good])
    await eventually(lambda: written(stage) == 1, "the valid quote written")
    assert stage.invalid == 8
    assert stages.alive()
    assert await get_quote(redis, latest_key("SPOT", sym)) == good


async def test_heartbeat_on_sow_status_cache(
    nats_server: ServerProcess, redis_server: ServerProcess, stages: Running, nc: Nats
) -> None:
    settings = settings_for(nats_server, redis_server)
    beats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_beat(msg: Any) -> None:
        await beats.put(orjson.loads(msg.data))

    sub = await nc.subscribe(status_subject("cache"), cb=on_beat)
    try:
        stage = await stages.start(settings)
        sym = symbol()
        await publish(nc, [quote(sym, 1.0, T0 + 8000), quote(sym, 2.0, T0 + 8001)])
        await eventually(lambda: written(stage) == 2, "quotes written")
        while True:  # heartbeats keep coming; wait for one that has seen both quotes
            beat = await asyncio.wait_for(beats.get(), WAIT_S)
            if beat["queue_group"] == settings.cache_queue_group and beat["written"] == 2:
                break
    finally:
        await sub.unsubscribe()
    assert beat["component"] == "cache"
    assert beat["state"] == "running"
    assert beat["redis_connected"] is True and beat["nats_connected"] is True
    assert beat["quotes_in"] == 2 and beat["batches"] >= 1
    assert beat["last_flush_ms"] is not None and beat["last_flush_ms"] >= 0
    for field in ("since", "ts", "dropped", "write_errors", "invalid", "pending", "instance"):
        assert field in beat


# --- the command ---------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("cache", epilog=cache_cli.EPILOG)(cache_cli.command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `cache` a subcommand
        pass

    return app


def test_cli_help_has_examples() -> None:
    result = CliRunner().invoke(_cli(), ["cache", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("--dragonfly-url", "--nats-url", "--queue-group", "Examples", "sow cache"):
        assert text in result.output


def test_cli_passes_flags_to_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def fake_run(self: CacheStage, stop: Any = None) -> None:
        seen["settings"] = self.settings

    monkeypatch.setattr(CacheStage, "run", fake_run)
    monkeypatch.delenv("DRAGONFLY_URL", raising=False)
    args = [
        "cache", "--dragonfly-url", "cachehost:6380", "--nats-url", "nats://bus:4222",
        "--queue-group", "g1", "--history-max", "50", "--timeseries-days", "2", "--flush-ms", "10",
    ]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    s: Settings = seen["settings"]
    assert (s.dragonfly_url, s.nats_url, s.cache_queue_group) == (
        "cachehost:6380",
        "nats://bus:4222",
        "g1",
    )
    assert (s.cache_history_max, s.cache_timeseries_days, s.cache_flush_ms) == (50, 2, 10)


def test_cli_rejects_a_bad_value() -> None:
    result = CliRunner().invoke(_cli(), ["cache", "--flush-ms", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "Invalid value for '--flush-ms'" in result.output


async def test_sow_cache_process_writes_and_stops_cleanly_on_sigterm(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats, redis: aioredis.Redis
) -> None:
    """The command as a user runs it: a process of its own, configured from the environment."""
    group = f"test-{uuid.uuid4().hex[:8]}"
    beats: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_beat(msg: Any) -> None:
        doc = orjson.loads(msg.data)
        if doc.get("queue_group") == group:
            await beats.put(doc)

    sub = await nc.subscribe(status_subject("cache"), cb=on_beat)
    env = {
        **os.environ,
        "NATS_URL": nats_server.nats_url,
        "DRAGONFLY_URL": redis_server.redis_url.removeprefix("redis://"),  # host:port/db form
        "SOW_CACHE_QUEUE_GROUP": group,
        "SOW_HEARTBEAT_INTERVAL_SECONDS": "0.1",
    }
    code = "import typer; from sowcli.cli.cache import command; typer.run(command)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "--log-level", "INFO",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        beat = await asyncio.wait_for(beats.get(), WAIT_S)  # subscribed and running
        assert beat["state"] == "running"
        sym = symbol()
        q = quote(sym, 42.0, T0 + 11_000)
        await publish(nc, [q])
        await eventually(lambda: redis.exists(latest_key("SPOT", sym)), "the quote in Redis")
        assert await get_quote(redis, latest_key("SPOT", sym)) == q
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        await sub.unsubscribe()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode()
    assert proc.returncode == 0, output
    assert "cache stopped" in output and "written=1" in output


def test_bad_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dragonfly_url"):
        CacheWriter("ftp://nowhere:1")


with contextlib.suppress(ImportError):  # once the lead registered the command
    from sowcli.cli import app as sow_app

    def test_sow_cache_is_registered() -> None:
        names = [c.name for c in sow_app.registered_commands]
        if "cache" not in names:
            pytest.skip("`sow cache` is not registered in sowcli/cli/__init__.py yet")
        result = CliRunner().invoke(sow_app, ["cache", "--help"])
        assert result.exit_code == 0 and "--dragonfly-url" in result.output


async def test_quotes_nats_drops_for_a_slow_cache_are_counted_and_said(
    nats_server: ServerProcess,
    redis_server: ServerProcess,
    stages: Running,
    nc: Nats,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the cache's NATS subscription queue overflows, nats-py drops messages: the heartbeat
    counts them (nats_dropped) and a warning says so, instead of a debug line nobody sees."""
    monkeypatch.setattr(cache_module, "NATS_PENDING_MAX", 2)
    stage = await stages.start(settings_for(nats_server, redis_server))
    sym = symbol()
    await publish(nc, [quote(sym, float(i + 1), T0 + 9000 + i) for i in range(2000)])
    await eventually(lambda: stage.status()["nats_dropped"] > 0, "drops counted")
    assert stage.writer.stats.quotes_in + stage.status()["nats_dropped"] <= 2000
    assert "NATS messages dropped: a subscriber is too slow" in caplog.text
