"""``sow persist``: every quote published on NATS ends up in QuestDB exactly once.

Real servers only: nats-server with JetStream (a fresh one per test) and QuestDB (shared; each
test writes its own symbols). The crash test runs persist as a separate process and kills it with
SIGKILL; the outage test stops and restarts a QuestDB of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import nats
import orjson
import pytest
from nats.aio.client import Client

from sowcli.bus.jetstream import TERM, ensure_persist_consumer, ensure_quotes_stream, send_acks
from sowcli.bus.nats import DirectClient
from sowcli.config import Settings
from sowcli.infra import ServerProcess
from sowcli.model import Quote
from sowcli.persist import Persister
from tests.helpers import publish_quotes as publish
from tests.servers import questdb_query, wait_questdb_applied

ACK_WAIT_S = 2.0
BASE_TS_MS = 1_780_000_000_000
COLUMNS = (
    "market", "price", "volume", "turnover", "high24h", "low24h", "change24h", "bid", "ask",
    "mark_price", "index_price", "funding_rate", "open_interest", "recv_us", "seq",
)  # fmt: skip


# --- helpers -------------------------------------------------------------------------------


def new_symbol() -> str:
    return f"P{uuid.uuid4().hex[:10].upper()}USDT"


def make_quotes(symbol: str, n: int, start: int = 0) -> list[Quote]:
    """Quotes with distinct values per row; FUTURES rows carry the futures-only fields."""
    out = []
    for i in range(start, start + n):
        futures = i % 3 == 0
        out.append(
            Quote(
                symbol=symbol,
                market="FUTURES" if futures else "SPOT",
                price=100.0 + i * 0.25,
                volume=1_000.5 + i,
                turnover=2e6 + i,
                high24h=200.0 + i,
                low24h=50.0 + i,
                change24h=-1.5 + i * 0.001,
                bid=99.75 + i * 0.25 if i % 5 else None,
                ask=100.25 + i * 0.25 if i % 5 else None,
                mark_price=100.5 + i if futures else None,
                index_price=100.4 + i if futures else None,
                funding_rate=0.0001 * (i % 7) if futures else None,
                open_interest=5e5 + i if futures else None,
                ts=BASE_TS_MS + i * 7,
                recv_us=(BASE_TS_MS + i * 7) * 1000 + 123,
                seq=10_000 + i,
            )
        )
    return out


def settings_for(nats_srv: ServerProcess, qdb: ServerProcess, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_srv.nats_url,
        "questdb_url": qdb.questdb_url,
        "questdb_http_url": qdb.questdb_http_url,
        "persist_ack_wait_seconds": ACK_WAIT_S,
        "persist_batch_rows": 500,
        "persist_flush_ms": 50,
        "heartbeat_interval_seconds": 0.2,
    }
    values.update(overrides)
    return dataclasses.replace(Settings(), **values)


def settings_env(settings: Settings, config: Path) -> dict[str, str]:
    """The environment that points a persist subprocess at the same servers and limits."""
    config.write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOW_")}
    env.update(
        NATS_URL=settings.nats_url,
        QUESTDB_URL=settings.questdb_url,
        QUESTDB_HTTP_URL=settings.questdb_http_url,
        SOW_PERSIST_ACK_WAIT_SECONDS=str(settings.persist_ack_wait_seconds),
        SOW_PERSIST_BATCH_ROWS=str(settings.persist_batch_rows),
        SOW_PERSIST_FLUSH_MS=str(settings.persist_flush_ms),
        SOW_CONFIG=str(config),
    )
    return env


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def stored_rows(qdb: ServerProcess, symbol: str) -> list[list[Any]]:
    cols = ", ".join(COLUMNS)
    return questdb_query(
        qdb,
        f"SELECT {cols}, cast(timestamp AS LONG) FROM market_data WHERE symbol = '{symbol}' "
        "ORDER BY seq",
    )


def expected_rows(quotes: list[Quote]) -> list[list[Any]]:
    return [
        [*(getattr(q, c) for c in COLUMNS), q.ts * 1000]
        for q in sorted(quotes, key=lambda q: q.seq or 0)
    ]


async def assert_stored_exactly(qdb: ServerProcess, symbol: str, quotes: list[Quote]) -> None:
    await asyncio.to_thread(wait_questdb_applied, qdb, "market_data", 60)
    rows = await asyncio.to_thread(stored_rows, qdb, symbol)
    assert len(rows) == len(quotes), f"{len(rows)} rows stored for {len(quotes)} quotes"
    for got, want in zip(rows, expected_rows(quotes), strict=True):
        same = [
            g == pytest.approx(w, rel=1e-12) if isinstance(w, float) else g == w
            for g, w in zip(got, want, strict=True)
        ]
        assert all(same), (got, want)


async def consumer_info(nc: Client, settings: Settings) -> Any:
    return await nc.jetstream().consumer_info(settings.stream_name, settings.persist_consumer)


async def all_acked(nc: Client, settings: Settings, total: int) -> bool:
    info = await consumer_info(nc, settings)
    return bool(
        info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq >= total
    )


# --- stream --------------------------------------------------------------------------------


async def test_stream_is_created_once_and_updated_when_limits_change(
    fresh_nats_server: ServerProcess,
) -> None:
    settings = dataclasses.replace(Settings(), nats_url=fresh_nats_server.nats_url)
    nc = await nats.connect(fresh_nats_server.nats_url)
    try:
        first = await ensure_quotes_stream(nc, settings)
        again = await ensure_quotes_stream(nc.jetstream(), settings)
        assert again.config.subjects == ["quotes.>"]
        assert again.config.max_bytes == first.config.max_bytes == settings.stream_max_bytes
        assert again.state.first_seq == first.state.first_seq

        await nc.publish("quotes.spot.BTCUSDT", b"{}")
        await nc.flush()
        changed = dataclasses.replace(
            settings, stream_max_age_hours=1.5, stream_max_bytes=64 * 1024**2
        )
        updated = await ensure_quotes_stream(nc, changed)
        assert updated.config.max_age == pytest.approx(1.5 * 3600)
        assert updated.config.max_bytes == 64 * 1024**2
        info = await nc.jetstream().stream_info(settings.stream_name)
        assert info.config.max_bytes == 64 * 1024**2
        assert info.state.messages == 1  # updating kept the stored messages
        assert (await ensure_quotes_stream(nc, changed)).config.max_bytes == 64 * 1024**2
    finally:
        await nc.close()


class PublishOnly:
    """A client without nats-py's internal write call: send_acks must fall back to publish."""

    def __init__(self, nc: Client) -> None:
        self.publish = nc.publish
        self.is_closed = False


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk-write", "publish-fallback"])
async def test_send_acks_acknowledges_each_message(
    fresh_nats_server: ServerProcess, bulk: bool
) -> None:
    settings = dataclasses.replace(Settings(), nats_url=fresh_nats_server.nats_url)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await ensure_quotes_stream(js, settings)
        await ensure_persist_consumer(js, settings)
        await publish(nc, make_quotes(new_symbol(), 50))
        sub = await js.pull_subscribe_bind(settings.persist_consumer, settings.stream_name)
        msgs: list[Any] = []
        while len(msgs) < 50:
            msgs += await sub.fetch(50 - len(msgs), timeout=5)
        client: Any = nc if bulk else PublishOnly(nc)
        await send_acks(client, [m.reply for m in msgs[:40]])
        await send_acks(client, [m.reply for m in msgs[40:]], TERM)
        await nc.flush()
        # JetStream applies acks asynchronously after the server received them: poll.
        for _ in range(100):
            info = await consumer_info(nc, settings)
            if (info.num_ack_pending, info.num_pending, info.ack_floor.stream_seq) == (0, 0, 50):
                break
            await asyncio.sleep(0.05)
        assert (info.num_ack_pending, info.num_pending, info.ack_floor.stream_seq) == (0, 0, 50)
    finally:
        await nc.close()


# --- the stage -----------------------------------------------------------------------------


async def test_every_quote_is_stored_once_with_its_values(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    settings = settings_for(fresh_nats_server, questdb_server)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 2_345)
    nc = await nats.connect(settings.nats_url)
    stop = asyncio.Event()
    persister = Persister(settings)
    await ensure_quotes_stream(nc, settings)  # as `sow publish` does at start
    task = asyncio.create_task(persister.run(stop))
    try:
        await publish(nc, quotes[:1000])  # before and after persist is up
        await wait_until(lambda: persister.state == "running", 60, "persist to start")
        await nc.publish("quotes.spot.BROKENUSDT", b'{"symbol": "BROKENUSDT", "price": "n/a"}')
        await publish(nc, quotes[1000:])
        await publish(nc, quotes[:300])  # the same quotes again: stored once
        await wait_until(lambda: persister.messages_total == len(quotes) + 301, 60, "all messages")
        assert persister.invalid == 1
        assert persister.rows_total == len(quotes) + 300
    finally:
        stop.set()
        await task
        await nc.close()
    await assert_stored_exactly(questdb_server, symbol, quotes)


async def test_a_partial_batch_is_written_after_flush_ms(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    """A quiet market: three quotes, far fewer than a batch, still reach QuestDB promptly."""
    settings = settings_for(fresh_nats_server, questdb_server, persist_batch_rows=5000)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 3)
    nc = await nats.connect(settings.nats_url)
    stop = asyncio.Event()
    persister = Persister(settings)
    task = asyncio.create_task(persister.run(stop))
    try:
        await wait_until(lambda: persister.state == "running", 60, "persist to start")
        await publish(nc, quotes)
        await wait_until(lambda: persister.rows_total == 3, 10, "the partial batch to be written")
        await wait_until(lambda: all_acked(nc, settings, 3), 10, "its acks")
    finally:
        stop.set()
        await task
        await nc.close()
    await assert_stored_exactly(questdb_server, symbol, quotes)


async def test_heartbeat_reports_lag_rate_and_questdb_state(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    settings = settings_for(fresh_nats_server, questdb_server)
    symbol = new_symbol()
    nc = await nats.connect(settings.nats_url)
    sub = await nc.subscribe("sow.status.persist")
    stop = asyncio.Event()
    persister = Persister(settings)
    task = asyncio.create_task(persister.run(stop))
    try:
        await wait_until(lambda: persister.state == "running", 60, "persist to start")
        await publish(nc, make_quotes(symbol, 700))
        await wait_until(lambda: persister.rows_total == 700, 60, "rows written")
        beat: dict[str, Any] = {}
        while beat.get("rows_total") != 700 or "num_pending" not in beat.get("lag", {}):
            beat = orjson.loads((await sub.next_msg(timeout=10)).data)
    finally:
        stop.set()
        await task
        await nc.close()
    assert beat["component"] == "persist"
    assert beat["state"] == "running"
    assert beat["questdb"] == "up"
    assert beat["lag"]["num_pending"] == 0
    assert beat["errors"] == 0 and beat["invalid"] == 0
    assert beat["last_flush_ts"] is not None and beat["last_flush_ms"] is not None
    assert "rows_per_s" in beat


async def test_two_processes_share_the_consumer_without_loss(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    settings = settings_for(fresh_nats_server, questdb_server, persist_batch_rows=200)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 6_000)
    nc = await nats.connect(settings.nats_url)
    stop = asyncio.Event()
    a, b = Persister(settings, name="persist-a"), Persister(settings, name="persist-b")
    tasks = [asyncio.create_task(p.run(stop)) for p in (a, b)]
    try:
        await wait_until(lambda: a.state == b.state == "running", 60, "both to start")
        await publish(nc, quotes, pause_every=500)
        await wait_until(
            lambda: a.messages_total + b.messages_total >= len(quotes), 60, "all messages"
        )
        await wait_until(lambda: all_acked(nc, settings, len(quotes)), 30, "every message acked")
        assert a.rows_total > 0 and b.rows_total > 0, "both processes took a share"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await nc.close()
    await assert_stored_exactly(questdb_server, symbol, quotes)


def spawn(command: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def persist_command() -> list[str]:
    """``python -m sowcli persist`` once registered; until then the same through the library."""
    probe = subprocess.run(
        [sys.executable, "-m", "sowcli", "persist", "--help"], capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "sowcli", "persist"]
    code = (
        "from sowcli.config import load_settings; from sowcli.logs import configure_logging; "
        "from sowcli.persist import Persister; from sowcli.runtime import run_until_signal; "
        "s = load_settings(None); configure_logging(s.log_level, s.log_format); "
        "run_until_signal(Persister(s).run)"
    )
    return [sys.executable, "-c", code]


async def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess, tmp_path: Path
) -> None:
    settings = settings_for(fresh_nats_server, questdb_server, persist_batch_rows=300)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 12_000)
    env = settings_env(settings, tmp_path / "config.json")
    command = persist_command()
    nc = await nats.connect(settings.nats_url)
    await ensure_quotes_stream(nc, settings)  # as `sow publish` does at start
    log_file = (tmp_path / "persist.log").open("wb")
    first = spawn(command, env, log_file)
    second: subprocess.Popen[bytes] | None = None
    try:
        feeder = asyncio.create_task(publish(nc, quotes, pause_every=200))

        async def mid_stream() -> bool:
            try:
                info = await consumer_info(nc, settings)
            except nats.js.errors.NotFoundError:  # not created yet by the subprocess
                return False
            return bool(info.ack_floor.stream_seq >= 2_000 and info.num_ack_pending > 0)

        await wait_until(mid_stream, 60, "the first persist to be mid-stream")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        after_kill = await consumer_info(nc, settings)
        assert 0 < after_kill.ack_floor.stream_seq < len(quotes), "killed mid-stream"
        assert after_kill.num_ack_pending > 0, "the kill left delivered, unacked quotes behind"

        second = spawn(command, env, log_file)
        await feeder
        await wait_until(lambda: all_acked(nc, settings, len(quotes)), 90, "every message acked")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log_file.close()
        await nc.close()
    await assert_stored_exactly(questdb_server, symbol, quotes)


async def test_questdb_stopped_and_started_while_quotes_flow_loses_nothing(
    fresh_nats_server: ServerProcess, fresh_questdb_server: ServerProcess
) -> None:
    qdb = fresh_questdb_server
    # ack wait well below the outage (a QuestDB restart takes seconds), so only the "in progress"
    # signals keep the held quotes from being redelivered
    settings = settings_for(fresh_nats_server, qdb, persist_ack_wait_seconds=4.0)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 8_000)
    nc = await nats.connect(settings.nats_url)
    stop = asyncio.Event()
    persister = Persister(settings)
    task = asyncio.create_task(persister.run(stop))
    try:
        await wait_until(lambda: persister.state == "running", 60, "persist to start")
        await publish(nc, quotes[:2000], pause_every=200)
        await wait_until(lambda: persister.rows_total >= 1000, 60, "rows before the outage")

        await asyncio.to_thread(qdb.stop)
        await publish(nc, quotes[2000:5000], pause_every=200)
        await wait_until(lambda: persister.questdb_state == "down", 60, "the outage to be seen")
        written_during_outage = persister.rows_total
        await publish(nc, quotes[5000:6000], pause_every=200)
        assert persister.rows_total == written_during_outage, "nothing written while down"

        await asyncio.to_thread(qdb.restart)
        await publish(nc, quotes[6000:], pause_every=200)
        await wait_until(lambda: persister.messages_total == len(quotes), 120, "all messages")
        await wait_until(lambda: all_acked(nc, settings, len(quotes)), 30, "every message acked")
        assert persister.flush_errors > 0
        assert persister.questdb_state == "up"
        # held messages were kept "in progress": the outage caused no redelivery storm
        assert (await consumer_info(nc, settings)).num_redelivered == 0
    finally:
        stop.set()
        await task
        await nc.close()
    await assert_stored_exactly(qdb, symbol, quotes)


async def test_nats_restarted_under_persist_loses_nothing(
    fresh_nats_server: ServerProcess, questdb_server: ServerProcess
) -> None:
    settings = settings_for(fresh_nats_server, questdb_server)
    symbol = new_symbol()
    quotes = make_quotes(symbol, 4_000)
    nc = await nats.connect(settings.nats_url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    stop = asyncio.Event()
    persister = Persister(settings)
    task = asyncio.create_task(persister.run(stop))
    try:
        await wait_until(lambda: persister.state == "running", 60, "persist to start")
        await publish(nc, quotes[:2000], pause_every=200)
        await wait_until(lambda: persister.rows_total >= 1000, 60, "rows before the restart")
        await asyncio.to_thread(fresh_nats_server.restart)  # JetStream keeps its store
        await wait_until(
            lambda: nc.is_connected and persister.status()["nats_connected"],
            30,
            "both clients to reconnect",
        )
        await publish(nc, quotes[2000:], pause_every=200)
        await wait_until(lambda: all_acked(nc, settings, len(quotes)), 60, "every message acked")
    finally:
        stop.set()
        await task
        await nc.close()
    await assert_stored_exactly(questdb_server, symbol, quotes)


# --- the command ---------------------------------------------------------------------------


def test_command_passes_flags_to_the_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from sowcli.cli import persist as persist_cli

    started: list[Persister] = []

    class Recorded(Persister):
        def __init__(self, settings: Settings, **kwargs: Any) -> None:
            super().__init__(settings, **kwargs)
            started.append(self)

    monkeypatch.setattr("sowcli.persist.Persister", Recorded)
    monkeypatch.setattr("sowcli.runtime.run_until_signal", lambda main: None)
    app = typer.Typer()
    app.command("persist", epilog=persist_cli.EPILOG)(persist_cli.command)
    app.command("other")(lambda: None)  # a group, so "persist" is a subcommand as in `sow`
    config = tmp_path / "config.json"
    config.write_text('{"persist_flush_ms": 100}')
    result = CliRunner().invoke(app, [
        "persist", "--config", str(config), "--nats-url", "nats://n:4222",
        "--questdb-http-url", "http://q:9000", "--questdb-url", "postgres://a:b@q:8812/qdb",
        "--batch-rows", "2000",
    ], env={"SOW_PERSIST_ACK_WAIT_SECONDS": "45"})  # fmt: skip
    assert result.exit_code == 0, result.output
    (stage,) = started
    s = stage.settings
    assert (s.nats_url, s.questdb_http_url, s.questdb_url) == (
        "nats://n:4222",
        "http://q:9000",
        "postgres://a:b@q:8812/qdb",
    )
    assert (s.persist_batch_rows, s.persist_flush_ms, s.persist_ack_wait_seconds) == (
        2000,
        100,
        45.0,
    )
    help_text = CliRunner().invoke(app, ["persist", "--help"]).output
    assert "Examples" in help_text and "sow persist" in help_text


def test_direct_delivery_parser_gives_every_message_once_in_order() -> None:
    """The fast lane of the NATS protocol parser (persist's intake): plain MSGs of a direct
    subscription, cut at every possible place and mixed with frames it must leave to nats-py
    (HMSG, other subscriptions), all arrive once, in order, byte for byte."""
    nc = DirectClient()
    got: list[tuple[bytes, bytes, bytes]] = []

    class Sub:
        _id = 7

    assert nc.deliver_direct(Sub(), lambda s, r, p: got.append((s, r, p)))
    expected: list[tuple[bytes, bytes, bytes]] = []
    wire = bytearray()
    rng = random.Random(3)
    for i in range(300):
        payload = bytes(rng.choice(b"ab \r\n{}") for _ in range(rng.randrange(0, 60)))
        subject = b"_INBOX.x"
        reply = b"$JS.ACK.QUOTES.persist.1.%d.%d.1700000000000000000.0" % (i, i) if i % 5 else b""
        wire += b"MSG %s 7 %s%d\r\n%s\r\n" % (
            subject,
            reply + b" " if reply else b"",
            len(payload),
            payload,
        )
        expected.append((subject, reply, payload))
        if i % 17 == 0:  # a message for a subscription nobody registered: nats-py drops it
            wire += b"MSG other 9 3\r\nabc\r\n"
        if i % 23 == 0:  # a status message with headers: nats-py's path (sid 7 is not in _subs)
            hdr = b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"
            wire += b"HMSG _INBOX.x 7 %d %d\r\n%s\r\n" % (len(hdr), len(hdr), hdr)

    async def feed() -> None:
        pos = 0
        while pos < len(wire):
            step = rng.choice((1, 2, 7, 64, 500, 4096))
            await nc._ps.parse(bytes(wire[pos : pos + step]))
            pos += step

    asyncio.run(feed())
    assert got == expected
    assert not nc._ps.buf
