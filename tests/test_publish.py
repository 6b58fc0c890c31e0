"""`sow publish` end to end: fake Bybit exchange -> the real listener -> a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from sowcli.bus.nats import BACKLOG_MAX_BYTES, NatsPublisher, backlog_bytes
from sowcli.config import Settings
from sowcli.errors import RetriesExhausted
from sowcli.model import Quote, decode_quote
from sowcli.publish import Publisher, SourceSpec
from sowcli.sources import feed as feed_module
from tests.fakes.bybit_rest import FakeBybitRest
from tests.fakes.bybit_ws import FakeBybit

pytestmark = pytest.mark.timeout(120)


def settings_for(ex: FakeBybit | None, nats_url: str, **kw: Any) -> Settings:
    base = Settings()
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "symbols": ["BTCUSDT", "ETHUSDT"],
        "validate_symbols": False,
        "heartbeat_interval_seconds": 0.2,
        "reconnect_timeout_seconds": 0.5,
    }
    if ex is not None:
        values.update(bybit_spot_url=ex.spot_url, bybit_linear_url=ex.linear_url)
    values.update(kw)
    return dataclasses.replace(base, **values)


class Collector:
    """A real NATS subscriber that keeps what it receives."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.quotes: list[Quote] = []
        self.status: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def start(self, subject: str = "quotes.>") -> None:
        async def on_quote(msg: Any) -> None:
            self.quotes.append(decode_quote(msg.data))
            self._changed.set()

        async def on_status(msg: Any) -> None:
            self.status.append(json.loads(msg.data))
            self._changed.set()

        await self.nc.subscribe(subject, cb=on_quote)
        await self.nc.subscribe("sow.status.publisher", cb=on_status)
        await self.nc.flush()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.2)

    def of(self, market: str, symbol: str) -> list[Quote]:
        return [q for q in self.quotes if q.market == market and q.symbol == symbol]


@contextlib.asynccontextmanager
async def collector(url: str, subject: str = "quotes.>") -> AsyncIterator[Collector]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    c = Collector(nc)
    await c.start(subject)
    try:
        yield c
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(pub: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(pub.run(stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_quotes_flow_on_both_markets_with_spot_bid_ask(nats_server: Any) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex,
        collector(nats_server.nats_url) as c,
    ):
        pub = Publisher(settings_for(ex, nats_server.nats_url), source=SourceSpec("bybit"))
        async with running(pub):
            await c.wait(
                lambda: all(
                    len(c.of(m, s)) >= 3
                    for m in ("SPOT", "FUTURES")
                    for s in ("BTCUSDT", "ETHUSDT")
                )
            )
        spot = c.of("SPOT", "BTCUSDT")[-1]
        fut = c.of("FUTURES", "BTCUSDT")[-1]
        assert spot.bid is not None and spot.ask is not None and spot.bid < spot.ask
        assert spot.mark_price is None and spot.open_interest is None
        assert fut.mark_price is not None and fut.open_interest is not None and fut.bid is not None
        state = ex.state("linear", "BTCUSDT")
        assert fut.price <= float(state["highPrice24h"])
        assert all(q.recv_us > 0 and q.seq for q in c.quotes)


async def test_linear_deltas_are_merged_into_the_snapshot(nats_server: Any) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex,
        collector(nats_server.nats_url, "quotes.futures.>") as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=["BTCUSDT"], markets=["futures"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            # a delta before any snapshot: dropped, never published as a partial quote
            await ex.send(
                "linear",
                {
                    "topic": "tickers.BTCUSDT",
                    "type": "delta",
                    "ts": 1,
                    "cs": 1,
                    "data": {"symbol": "BTCUSDT", "lastPrice": "1.0"},
                },
            )
            await ex.send_ticker_snapshot("linear", "BTCUSDT", lastPrice="100.5", markPrice="100.4")
            await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice="101.0")
            await ex.send_ticker_delta("linear", "BTCUSDT", markPrice="100.9", lastPrice="101.0")
            await c.wait(lambda: len(c.quotes) >= 3)
            await until(lambda: pub.feed.normalizer.stats.dropped_deltas == 1)
        prices = [(q.price, q.mark_price) for q in c.quotes]
        assert prices == [(100.5, 100.4), (101.0, 100.4), (101.0, 100.9)]
        assert all(q.volume is not None for q in c.quotes)  # kept from the snapshot


async def test_unknown_symbol_warns_once_and_the_others_flow(
    nats_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sow")
    async with (
        FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex,
        collector(nats_server.nats_url) as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=["BTCUSDT", "NOPEUSDT", "ETHUSDT"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await c.wait(
                lambda: all(
                    c.of(m, sym) for m in ("SPOT", "FUTURES") for sym in ("BTCUSDT", "ETHUSDT")
                )
            )
            # on linear the whole first request was rejected: the good topics were resent
            assert {"tickers.BTCUSDT", "tickers.ETHUSDT"} <= ex.subscribed("linear")
            await c.wait(lambda: any("FUTURES:NOPEUSDT" in s["unknown_symbols"] for s in c.status))
        warnings = [r.getMessage() for r in caplog.records if "NOPEUSDT" in r.getMessage()]
        assert len([w for w in warnings if "linear" in w or "futures" in w]) == 1, warnings
        assert len([w for w in warnings if "spot" in w]) == 1, warnings
        assert not c.of("SPOT", "NOPEUSDT") and not c.of("FUTURES", "NOPEUSDT")


async def test_symbols_checked_against_rest_instruments_before_subscribing(
    nats_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sow")
    async with (
        FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex,
        FakeBybitRest(valid_symbols={"BTCUSDT", "ETHUSDT"}) as rest,
        collector(nats_server.nats_url) as c,
    ):
        s = settings_for(
            ex,
            nats_server.nats_url,
            symbols=["BTCUSDT", "MATICUSDT", "ETHUSDT"],
            validate_symbols=True,
            bybit_rest_url=rest.url,
        )
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await c.wait(lambda: bool(c.of("FUTURES", "ETHUSDT")) and bool(c.of("SPOT", "ETHUSDT")))
        requested = [a for _, args in ex.subscribe_requests for a in args]
        assert not any("MATICUSDT" in a for a in requested)  # never sent to the exchange
        assert any("renamed it POLUSDT" in r.getMessage() for r in caplog.records)


async def test_more_than_ten_spot_symbols_are_batched(nats_server: Any) -> None:
    symbols = [f"C{i:02d}USDT" for i in range(23)]
    async with (
        FakeBybit(valid_symbols=set(symbols), auto_interval=0.05) as ex,
        collector(nats_server.nats_url, "quotes.spot.>") as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=symbols, markets=["spot"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_for(lambda: {f"tickers.{x}" for x in symbols} <= ex.subscribed("spot"))
            await c.wait(lambda: {q.symbol for q in c.quotes} == set(symbols))
        spot_requests = [args for m, args in ex.subscribe_requests if m == "spot"]
        assert spot_requests and all(len(args) <= 10 for args in spot_requests)


async def test_disconnect_mid_stream_reconnects_and_resubscribes(nats_server: Any) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT"}, auto_interval=0.02) as ex,
        collector(nats_server.nats_url, "quotes.futures.>") as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=["BTCUSDT"], markets=["futures"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await c.wait(lambda: len(c.quotes) >= 3)
            await ex.drop("linear")
            await ex.wait_connects("linear", 2)
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            before = len(c.quotes)
            await c.wait(lambda: len(c.quotes) >= before + 3)
            assert pub.connections["FUTURES"].stats.reconnects == 1
        # the merge state was reset: after the reconnect the first quote came from a snapshot
        assert pub.feed.normalizer.stats.dropped_deltas == 0


async def test_missing_pong_forces_a_reconnect(nats_server: Any) -> None:
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto_interval=0.05) as ex:
        ex.pong_enabled = False
        s = settings_for(
            ex,
            nats_server.nats_url,
            symbols=["BTCUSDT"],
            markets=["spot"],
            ping_interval_seconds=0.2,
            pong_timeout_seconds=0.3,
        )
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_pings("spot", 1)
            await ex.wait_connects("spot", 2, timeout=10)
            ex.pong_enabled = True
        assert "no pong" in pub.connections["SPOT"].stats.last_error


async def test_no_data_for_too_long_forces_a_reconnect(nats_server: Any) -> None:
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex:
        s = settings_for(
            ex,
            nats_server.nats_url,
            symbols=["BTCUSDT"],
            markets=["futures"],
            idle_timeout_seconds=0.5,
        )
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_connects("linear", 2, timeout=10)
        assert "no data" in pub.connections["FUTURES"].stats.last_error


async def test_max_retries_gives_up_with_a_clear_error(nats_server: Any) -> None:
    s = settings_for(
        None,
        nats_server.nats_url,
        markets=["futures"],
        max_retries=3,
        bybit_linear_url="ws://127.0.0.1:9/v5/public/linear",
        reconnect_timeout_seconds=0.05,
    )
    pub = Publisher(s, source=SourceSpec("bybit"))
    with pytest.raises(RetriesExhausted, match="3 consecutive connection attempts failed"):
        await asyncio.wait_for(pub.run(asyncio.Event()), 30)


async def test_malformed_frames_are_counted_and_skipped(nats_server: Any) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex,
        collector(nats_server.nats_url) as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=["BTCUSDT"], markets=["futures"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            await ex.send_ticker_snapshot("linear", "BTCUSDT", lastPrice="10")
            for bad in [
                "this is not json",
                "",
                "[1, 2, 3]",
                {
                    "topic": "tickers.BTCUSDT",
                    "type": "delta",
                    "ts": 2,
                    "data": {"lastPrice": ["5"]},
                },
                {"topic": "tickers.BTCUSDT", "type": "delta", "ts": 3, "data": "nope"},
                {"topic": "tickers.BTCUSDT", "type": "delta", "data": {"symbol": "BTCUSDT"}},
                {
                    "topic": "tickers.BTCUSDT",
                    "type": "delta",
                    "ts": 4,
                    "data": {"symbol": "BTCUSDT", "lastPrice": "twelve"},
                },
            ]:
                await ex.send("linear", bad)
            await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice="11")
            await c.wait(lambda: [q.price for q in c.quotes][-1:] == [11.0])
            await c.wait(lambda: bool(c.status) and c.status[-1]["invalid_frames"] >= 6)
        assert [q.price for q in c.quotes] == [10.0, 11.0]


async def test_heartbeat_reports_connections_counters_and_ages(nats_server: Any) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.05) as ex,
        collector(nats_server.nats_url) as c,
    ):
        ex.quiet.add("ETHUSDT")  # subscribable but silent: must show up as stale
        s = settings_for(ex, nats_server.nats_url, markets=["futures"], stale_after_seconds=0.5)
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await c.wait(lambda: any("FUTURES:ETHUSDT" in x["stale_symbols"] for x in c.status))
        beat = c.status[-1]
        assert beat["component"] == "publisher" and beat["simulated"] is False
        assert beat["markets"]["FUTURES"]["state"] == "connected"
        assert beat["frames_in"] > 0 and beat["quotes_out"] > 0
        assert {"reconnects", "dropped_deltas", "unknown_symbols", "last_age_s"} <= set(beat)
        assert beat["last_age_s"]["FUTURES:BTCUSDT"] < beat["last_age_s"]["FUTURES:ETHUSDT"]
        assert "FUTURES:BTCUSDT" not in beat["stale_symbols"]


async def test_nats_restart_under_a_running_publisher_loses_nothing(fresh_nats_server: Any) -> None:
    """NATS goes away while Bybit keeps sending: quotes are buffered, published once NATS is
    back, and the exchange connection stays up throughout. The QUOTES JetStream stream that
    publish creates at start (file storage, kept across the restart) sees every quote the
    listener produced."""
    url = fresh_nats_server.nats_url
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex:
        s = settings_for(ex, url, symbols=["BTCUSDT"], markets=["futures"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            await ex.send_ticker_snapshot("linear", "BTCUSDT", lastPrice="100")
            assert pub.nats is not None
            await until(lambda: pub.nats is not None and pub.nats.stats.published == 1)
            await asyncio.to_thread(fresh_nats_server.stop)
            await until(lambda: pub.nats is not None and not pub.nats.connected)
            for i in range(50):
                await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice=f"{101 + i}")
            await until(lambda: pub.feed.normalizer.stats.quotes == 51)
            assert pub.nats.buffered == 50
            await asyncio.to_thread(fresh_nats_server.restart)
            await until(lambda: pub.nats is not None and pub.nats.stats.published == 51, 30)
            assert pub.nats.stats.dropped == 0
            assert ex.connects["linear"] == 1  # the exchange side never reconnected
            await until(lambda: nc.is_connected, 30)
            info = await js.stream_info("QUOTES")
            for _ in range(100):
                if info.state.messages >= 51:
                    break
                await asyncio.sleep(0.05)
                info = await js.stream_info("QUOTES")
            assert info.state.messages == 51
            last = await js.get_last_msg("QUOTES", "quotes.futures.BTCUSDT")
            assert decode_quote(last.data).price == 150.0
    await nc.close()


async def test_buffer_bound_drops_oldest_and_counts(fresh_nats_server: Any) -> None:
    url = fresh_nats_server.nats_url
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex:
        s = settings_for(ex, url, symbols=["BTCUSDT"], markets=["futures"], publish_buffer=10)
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            await until(lambda: pub.nats is not None and pub.nats.connected)
            await asyncio.to_thread(fresh_nats_server.stop)
            await until(lambda: pub.nats is not None and not pub.nats.connected)
            await ex.send_ticker_snapshot("linear", "BTCUSDT", lastPrice="1")
            for i in range(24):
                await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice=f"{2 + i}")
            await until(lambda: pub.feed.normalizer.stats.quotes == 25)
            assert pub.nats is not None
            assert pub.nats.buffered == 10 and pub.nats.stats.dropped == 15
            await asyncio.to_thread(fresh_nats_server.restart)


@dataclasses.dataclass
class Frozen:
    """A publisher under a full-speed Bybit stream, its nats-server frozen with SIGSTOP."""

    pub: Publisher
    nats_pub: NatsPublisher
    server: Any
    stream: asyncio.Task[int]
    thawed: bool = False

    def thaw(self) -> None:
        if not self.thawed:
            os.kill(self.server.pid, signal.SIGCONT)
            self.thawed = True

    async def stop_stream(self) -> None:
        self.stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.stream


@contextlib.asynccontextmanager
async def nats_frozen_under_full_speed(server: Any) -> AsyncIterator[Frozen]:
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=True) as ex:
        s = settings_for(
            ex, server.nats_url, symbols=["BTCUSDT"], markets=["futures"], publish_buffer=20_000
        )
        pub = Publisher(s, source=SourceSpec("bybit"))
        assert pub.nats is not None
        nats_pub = pub.nats
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            await until(lambda: nats_pub.stats.published >= 1)
            stream = asyncio.create_task(ex.stream_deltas("linear", rate=0))
            os.kill(server.pid, signal.SIGSTOP)
            frozen = Frozen(pub, nats_pub, server, stream)
            try:
                yield frozen
            finally:
                frozen.thaw()
                await frozen.stop_stream()


async def test_a_stalled_nats_pauses_reading_instead_of_dropping(fresh_nats_server: Any) -> None:
    """nats-server frozen (SIGSTOP) while Bybit streams at full speed: the connection stays up,
    so the publisher's buffers fill; past its congestion mark it stops reading the exchange
    socket (TCP slows the sender) instead of dropping. Once NATS runs again every quote reaches
    the QUOTES stream, the last one last."""
    async with nats_frozen_under_full_speed(fresh_nats_server) as frozen:
        pub, nats_pub = frozen.pub, frozen.nats_pub
        await until(lambda: pub.feed.held, 20)
        assert nats_pub.congested and nats_pub.connected
        frozen.thaw()
        await until(lambda: not pub.feed.held, 20)
        await frozen.stop_stream()
        quotes = pub.feed.normalizer.stats
        await until(lambda: nats_pub.stats.published == quotes.quotes, 20)
        assert nats_pub.stats.dropped == 0 and pub.feed.stats.overflow_dropped == 0
        last = pub.feed.normalizer._tickers[("FUTURES", "BTCUSDT")]
    assert quotes.quotes > 20_000  # more than the buffer holds went through the stall
    nc = await nats.connect(fresh_nats_server.nats_url)
    try:
        js = nc.jetstream()
        stored = 0

        async def stored_all() -> bool:
            nonlocal stored
            stored = (await js.stream_info("QUOTES")).state.messages
            return stored >= quotes.quotes

        async with asyncio.timeout(20):
            while not await stored_all():
                await asyncio.sleep(0.05)
        assert stored == quotes.quotes
        got = await js.get_last_msg("QUOTES", "quotes.futures.BTCUSDT")
        assert decode_quote(got.data) == last
    finally:
        await nc.close()


async def test_a_frozen_nats_never_grows_memory_past_the_bounds(
    fresh_nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-server frozen for longer than a hold may last: the exchange is read again, and what
    NATS cannot take waits in the bounded buffer (oldest dropped, counted), not in the socket's
    unbounded one."""
    monkeypatch.setattr(feed_module, "HOLD_MAX_S", 0.3)
    async with nats_frozen_under_full_speed(fresh_nats_server) as frozen:
        nats_pub = frozen.nats_pub
        await until(lambda: nats_pub.stats.dropped > 0, 30)  # the hold expired
        assert nats_pub.nc is not None
        assert backlog_bytes(nats_pub.nc) <= BACKLOG_MAX_BYTES + (1 << 20)
        assert nats_pub.buffered <= 20_000


class _AsyncHandler:
    """A handler as the README shows it: ``async on_quote`` only (the queued path)."""

    def __init__(self) -> None:
        self.quotes: list[Quote] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def on_quote(self, quote: Quote) -> None:
        await asyncio.sleep(0)  # may await: the feed waits for it, in order
        self.quotes.append(quote)


class _SyncHandler(_AsyncHandler):
    """A handler with ``on_quote_nowait`` too: frames are handled right in the socket callback."""

    def on_quote_nowait(self, quote: Quote) -> None:
        if quote.price == 13.0:
            raise RuntimeError("a bug in a handler")
        self.quotes.append(quote)


@pytest.mark.parametrize("handler_type", [_AsyncHandler, _SyncHandler])
async def test_custom_handlers_get_every_quote_in_order(
    nats_server: Any, handler_type: type[_AsyncHandler]
) -> None:
    """Both kinds of QuoteHandler see exactly what NATS subscribers see; a handler that raises
    is counted and costs only its own call."""
    async with (
        FakeBybit(valid_symbols={"BTCUSDT"}, auto=False, initial_snapshot=False) as ex,
        collector(nats_server.nats_url, "quotes.futures.BTCUSDT") as c,
    ):
        s = settings_for(ex, nats_server.nats_url, symbols=["BTCUSDT"], markets=["futures"])
        mine = handler_type()
        pub = Publisher(s, source=SourceSpec("bybit"), handlers=[mine])
        async with running(pub):
            await ex.wait_subscribed("linear", "tickers.BTCUSDT")
            await ex.send_ticker_snapshot("linear", "BTCUSDT", lastPrice="10")
            for i in range(20):
                await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice=f"{11 + i}")
            await c.wait(lambda: len(c.quotes) == 21)
        failed = 1 if handler_type is _SyncHandler else 0
        assert pub.feed.stats.handler_errors == failed
        expected = [q for q in c.quotes if not (failed and q.price == 13.0)]
        assert mine.quotes == expected
        assert [q.price for q in c.quotes] == [float(p) for p in range(10, 31)]


async def test_a_hold_expires_so_an_exchange_socket_is_never_starved(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feed_module, "HOLD_MAX_S", 0.2)
    feed = feed_module.Feed([])
    paused: list[bool] = []
    feed.add_pauser(paused.append)
    feed.hold("a slow handler", True)
    feed.hold("another", True)
    assert feed.held and paused == [True]
    feed.hold("another", False)
    assert feed.held and paused == [True]
    await until(lambda: not feed.held, 5)
    assert paused == [True, False]
    assert "could not catch up" in caplog.text


async def test_record_then_replay_gives_the_same_quotes(nats_server: Any, tmp_path: Path) -> None:
    rec = tmp_path / "session.jsonl"
    async with (
        FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex,
        collector(nats_server.nats_url) as live,
    ):
        pub = Publisher(
            settings_for(ex, nats_server.nats_url), source=SourceSpec("bybit"), record=rec
        )
        async with running(pub):
            await live.wait(lambda: len(live.quotes) >= 40)
    async with collector(nats_server.nats_url) as replayed:
        n = len(live.quotes)
        rpub = Publisher(
            settings_for(None, nats_server.nats_url), source=SourceSpec("replay", rec), speed=None
        )
        await rpub.run(asyncio.Event())
        await replayed.wait(lambda: len(replayed.quotes) >= rpub.feed.normalizer.stats.quotes)
    assert len(replayed.quotes) >= n
    key = lambda q: (q.market, q.symbol, q.seq, q.price, q.bid, q.ask, q.recv_us)  # noqa: E731
    assert [key(q) for q in replayed.quotes[:n]] == [key(q) for q in live.quotes]
    kinds = {json.loads(line)["t"] for line in rec.read_text().splitlines()}
    assert kinds == {"connect", "send", "recv"}


async def test_replay_of_the_real_recording(nats_server: Any, recording: Path) -> None:
    async with collector(nats_server.nats_url) as c:
        pub = Publisher(
            settings_for(None, nats_server.nats_url),
            source=SourceSpec("replay", recording),
            speed=None,
        )
        await pub.run(asyncio.Event())
        await c.wait(lambda: len(c.quotes) >= 839)
    assert len(c.quotes) == 4 + 754 + 81
    assert {q.symbol for q in c.quotes if q.market == "FUTURES"} == {
        "BTCUSDT",
        "ETHUSDT",
        "SOLUSDT",
        "DOGEUSDT",
    }
    assert {q.symbol for q in c.quotes if q.market == "SPOT"} == {"BTCUSDT", "ETHUSDT"}
    assert pub.feed.normalizer.stats.dropped_deltas == 0


async def test_simulated_source_is_labelled(nats_server: Any) -> None:
    async with collector(nats_server.nats_url) as c:
        pub = Publisher(settings_for(None, nats_server.nats_url), source=SourceSpec("simulate"))
        async with running(pub):
            await c.wait(
                lambda: len({(q.market, q.symbol) for q in c.quotes}) == 4 and bool(c.status)
            )
        assert c.status[-1]["simulated"] is True and c.status[-1]["source"] == "simulate"
        fut = c.of("FUTURES", "BTCUSDT")
        assert fut and all(q.mark_price is not None for q in fut)
        spot = c.of("SPOT", "ETHUSDT")
        assert spot and spot[-1].bid is not None


# --- the command itself, as a user runs it ------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOW_", "NATS_"))}
    env.update(extra)
    return env


async def test_sigterm_stops_publish_cleanly_and_fast(nats_server: Any, tmp_path: Path) -> None:
    async with (
        FakeBybit(valid_symbols={"BTCUSDT"}, auto_interval=0.02) as ex,
        collector(nats_server.nats_url) as c,
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sowcli",
            "publish",
            "--symbols",
            "BTCUSDT",
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=_env(
                NATS_URL=nats_server.nats_url,
                SOW_BYBIT_SPOT_URL=ex.spot_url,
                SOW_BYBIT_LINEAR_URL=ex.linear_url,
                SOW_VALIDATE_SYMBOLS="false",
            ),
        )
        await c.wait(lambda: len(c.quotes) >= 5, timeout=30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        elapsed = time.monotonic() - t0
        await ex.wait_for(lambda: ex.connections("spot") == 0 and ex.connections("linear") == 0)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    print(f"publish stopped {elapsed:.2f}s after SIGTERM")


async def test_subscribe_command_filters(nats_server: Any) -> None:
    async with FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex:
        pub = Publisher(settings_for(ex, nats_server.nats_url), source=SourceSpec("bybit"))
        async with running(pub):

            async def sub(*args: str) -> list[str]:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "sowcli",
                    "subscribe",
                    *args,
                    "--count",
                    "8",
                    "--nats-url",
                    nats_server.nats_url,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=_env(),
                )
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, err.decode()
                return out.decode().splitlines()

            lines = await sub("BTCUSDT", "--json")
            docs = [json.loads(x) for x in lines]
            assert len(docs) == 8 and {d["symbol"] for d in docs} == {"BTCUSDT"}
            assert {d["market"] for d in docs} == {"SPOT", "FUTURES"}
            docs = [json.loads(x) for x in await sub("--market", "futures", "--json")]
            assert {d["market"] for d in docs} == {"FUTURES"}
            assert {d["symbol"] for d in docs} == {"BTCUSDT", "ETHUSDT"}
            docs = [json.loads(x) for x in await sub("--subject", "quotes.spot.ETHUSDT", "--json")]
            assert {(d["market"], d["symbol"]) for d in docs} == {("SPOT", "ETHUSDT")}
            lines = await sub("ethusdt", "--market", "spot")
            assert all("SPOT" in x and "ETHUSDT" in x for x in lines)
            assert not any(x.startswith("{") for x in lines)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sowcli",
        "subscribe",
        "BTC/USDT",
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"BTC/USDT" in err and b"Traceback" not in err


async def test_publish_exits_nonzero_with_one_line_when_retries_run_out(nats_server: Any) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sowcli",
        "publish",
        "--markets",
        "futures",
        stderr=asyncio.subprocess.PIPE,
        env=_env(
            NATS_URL=nats_server.nats_url,
            SOW_BYBIT_LINEAR_URL="ws://127.0.0.1:9/x",
            SOW_VALIDATE_SYMBOLS="0",
            SOW_MAX_RETRIES="2",
            SOW_RECONNECT_TIMEOUT_SECONDS="0.1",
            SOW_LOG_LEVEL="ERROR",
        ),
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3
    assert b"2 consecutive connection attempts failed" in err and b"Traceback" not in err


async def test_subscribe_says_when_nats_is_unreachable() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sowcli",
        "subscribe",
        "--nats-url",
        "nats://127.0.0.1:9",
        stderr=asyncio.subprocess.PIPE,
        env=_env(SOW_LOG_LEVEL="ERROR"),
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert b"NATS at nats://127.0.0.1:9 is unreachable" in err and b"Traceback" not in err


async def test_publish_keeps_the_exchange_side_running_while_nats_is_down_at_start(
    fresh_nats_server: Any,
) -> None:
    """NATS not there yet when publish starts: quotes are buffered and flow once it comes up."""
    url = fresh_nats_server.nats_url
    await asyncio.to_thread(fresh_nats_server.stop)
    async with FakeBybit(valid_symbols={"BTCUSDT"}, auto_interval=0.05) as ex:
        s = settings_for(ex, url, symbols=["BTCUSDT"], markets=["futures"])
        pub = Publisher(s, source=SourceSpec("bybit"))
        async with running(pub):
            await until(lambda: pub.feed.normalizer.stats.quotes >= 3)
            assert pub.nats is not None and pub.nats.stats.published == 0
            await asyncio.to_thread(fresh_nats_server.restart)
            await until(lambda: pub.nats is not None and pub.nats.stats.published >= 3, 30)
            assert pub.nats.stats.dropped == 0


async def test_auto_source_falls_back_to_labelled_simulation_when_bybit_is_unreachable(
    nats_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sow")
    s = settings_for(None, nats_server.nats_url, bybit_rest_url="http://127.0.0.1:9")
    async with collector(nats_server.nats_url) as c:
        pub = Publisher(s, source=SourceSpec.parse("auto"))
        async with running(pub):
            await c.wait(lambda: len(c.quotes) >= 4 and bool(c.status))
        assert c.status[-1]["simulated"] is True and c.status[-1]["source"] == "simulate"
    assert any("falling back to SIMULATED data" in r.getMessage() for r in caplog.records)


async def test_auto_source_uses_bybit_when_reachable(nats_server: Any) -> None:
    async with FakeBybit(valid_symbols={"BTCUSDT", "ETHUSDT"}, auto_interval=0.02) as ex, \
            FakeBybitRest(valid_symbols={"BTCUSDT", "ETHUSDT"}) as rest, \
            collector(nats_server.nats_url) as c:  # fmt: skip
        s = settings_for(ex, nats_server.nats_url, bybit_rest_url=rest.url)
        pub = Publisher(s, source=SourceSpec.parse("auto"))
        async with running(pub):
            await c.wait(lambda: len(c.quotes) >= 4 and bool(c.status))
        assert c.status[-1]["simulated"] is False and c.status[-1]["source"] == "bybit"
        assert ex.connects["linear"] == 1
