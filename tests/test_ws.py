"""`sow serve-ws`: the WebSocket bridge over a real uvicorn socket, real NATS and real Redis.

Quotes are published straight to NATS (as `sow publish` does) under symbols of each test's own;
a websockets client plays the browser. Nothing asserts wall-clock timing: conflation is checked
by counting, slowness by socket buffers that fill up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import orjson
import pytest
import redis.asyncio as aioredis
import typer
from nats.aio.client import Client as Nats
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sowcli.bus.nats import status_subject
from sowcli.cli import serve_ws as serve_ws_cli
from sowcli.config import Settings
from sowcli.infra import ServerProcess
from sowcli.model import Quote, encode_quote
from sowcli.servers.ws import WsServer, bind_socket, iso_ms, wire_quote
from sowcli.sinks.cache import latest_key
from tests.helpers import publish_quotes as publish

pytestmark = pytest.mark.timeout(120)
WAIT_S = 20.0  # bound of every wait below (a hang guard, not a performance threshold)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def symbol() -> str:
    return f"W{uuid.uuid4().hex[:10].upper()}USDT"


def quote(
    sym: str, price: float, ts: int, *, market: str = "SPOT", seq: int | None = None
) -> Quote:
    return Quote(
        symbol=sym,
        market=market,  # type: ignore[arg-type]
        price=price,
        volume=1.0,
        bid=price - 0.5,
        ask=price + 0.5,
        ts=ts,
        recv_us=ts * 1000,
        seq=ts if seq is None else seq,
    )


def settings_for(nats_server: ServerProcess, redis: ServerProcess, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_server.nats_url,
        "dragonfly_url": redis.redis_url,
        "symbols": [symbol()],
        "heartbeat_interval_seconds": 0.2,
        "ws_batch_ms": 100,
    }
    values.update(extra)
    return dataclasses.replace(Settings(), **values)


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(settings: Settings, sock: socket.socket | None = None) -> AsyncIterator[WsServer]:
    """A WsServer on a free port in this event loop, subscribed to NATS."""
    server = WsServer(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop, sock=sock or bind_socket("127.0.0.1", 0)))
    try:
        await eventually(lambda: server.bridge.subscribed.is_set() or task.done(), "subscription")
        assert not task.done(), task.exception()
        yield server
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def url(server: WsServer, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def recv(ws: ClientConnection, timeout: float = WAIT_S) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return doc


async def recv_until(
    ws: ClientConnection, check: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Every message up to and including the first one ``check`` accepts."""
    seen = []
    deadline = time.monotonic() + WAIT_S
    while True:
        doc = await recv(ws, max(0.1, deadline - time.monotonic()))
        seen.append(doc)
        if check(doc):
            return seen


async def subscribe(ws: ClientConnection, symbols: list[str]) -> dict[str, Any]:
    """Subscribe and return the snapshot (skipping status messages)."""
    await ws.send(json.dumps({"type": "subscribe", "symbols": symbols}))
    return (await recv_until(ws, lambda d: d["type"] == "snapshot"))[-1]


def quotes_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [q for d in docs if d["type"] in ("quotes", "snapshot") for q in d["quotes"]]


# --- protocol --------------------------------------------------------------------------------


async def test_snapshot_from_the_cache_then_conflated_batches(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats, redis: aioredis.Redis
) -> None:
    settings = settings_for(nats_server, redis_server)
    sym = settings.symbols[0]
    cached = [quote(sym, 100.0, T0), quote(sym, 200.0, T0 + 1, market="FUTURES")]
    for q in cached:
        await redis.set(latest_key(q.market, q.symbol), encode_quote(q))

    async with serving(settings) as server, connect(url(server)) as ws:
        hello = await recv(ws)
        assert hello["type"] == "status" and hello["nats"] == "connected"
        assert hello["batch_ms"] == 100
        # permessage-deflate, compressed once per message for every client
        assert ws.response is not None
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in ext and "server_no_context_takeover" in ext

        snap = await subscribe(ws, ["*"])
        assert snap["cache"] is True and snap["symbols"] == ["*"]
        mine = [q for q in snap["quotes"] if q["symbol"] == sym]
        assert mine == [json.loads(wire_quote(q)) for q in reversed(cached)]  # FUTURES < SPOT
        assert mine[1]["timestamp"] == "2026-01-01T00:00:00.000Z"
        assert {"symbol", "price", "market", "timestamp", "ts", "seq", "bid"} <= set(mine[0])

        # 200 updates of one stream published at once: the client gets a few batches, each with
        # at most one quote per stream, prices in order, ending with the newest.
        burst = [quote(sym, 1000.0 + i, T0 + 10 + i) for i in range(200)]
        await publish(nc, burst)
        docs = await recv_until(
            ws, lambda d: any(q["price"] == 1199.0 for q in d.get("quotes", []))
        )
        batches = [d for d in docs if d["type"] == "quotes"]
        prices = [q["price"] for q in quotes_of(batches) if q["symbol"] == sym]
        assert prices[-1] == 1199.0
        assert prices == sorted(prices)  # never an older value after a newer one
        assert len(prices) < len(burst) / 4  # conflated
        for batch in batches:
            keys = [(q["symbol"], q["market"]) for q in batch["quotes"]]
            assert len(keys) == len(set(keys))
        assert server.bridge.stats.quotes_in >= 200

        # an older quote arriving late is not forwarded
        await publish(nc, [quote(sym, 1.0, T0), quote(sym, 2000.0, T0 + 500)])
        docs = await recv_until(
            ws, lambda d: any(q["price"] == 2000.0 for q in d.get("quotes", []))
        )
        assert 1.0 not in [q["price"] for q in quotes_of(docs)]


async def test_symbol_lists_unsubscribe_and_ping(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats
) -> None:
    a, b = symbol(), symbol()
    settings = settings_for(nats_server, redis_server, symbols=[a, b])
    async with serving(settings) as server, connect(url(server, "/")) as ws:
        await recv(ws)
        snap = await subscribe(ws, [b.lower(), "  " + b])
        assert snap["symbols"] == [b] and snap["quotes"] == []

        await publish(
            nc, [quote(a, 1.0, T0), quote(b, 2.0, T0), quote(b, 3.0, T0 + 1, market="FUTURES")]
        )
        docs = await recv_until(ws, lambda d: len(quotes_of([d])) >= 1 and any(
            q["market"] == "FUTURES" for q in quotes_of([d])))  # fmt: skip
        got = {(q["symbol"], q["market"], q["price"]) for q in quotes_of(docs)}
        assert (b, "FUTURES", 3.0) in got and all(s == b for s, _, _ in got)

        await ws.send(json.dumps({"type": "unsubscribe", "symbols": [b]}))
        assert (await recv_until(ws, lambda d: d["type"] == "unsubscribed"))[-1]["symbols"] == [b]
        await publish(nc, [quote(b, 4.0, T0 + 2)])
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        docs = await recv_until(ws, lambda d: d["type"] == "pong")
        assert docs[-1]["id"] == 7
        assert quotes_of(docs) == []  # nothing for a symbol no longer subscribed

        # "*" minus one symbol
        snap = await subscribe(ws, ["*"])
        assert {q["symbol"] for q in snap["quotes"]} >= {a, b}
        await ws.send(json.dumps({"type": "unsubscribe", "symbols": [a]}))
        await recv_until(ws, lambda d: d["type"] == "unsubscribed")
        await publish(nc, [quote(a, 5.0, T0 + 3), quote(b, 6.0, T0 + 3)])
        docs = await recv_until(ws, lambda d: any(q["price"] == 6.0 for q in quotes_of([d])))
        assert 5.0 not in [q["price"] for q in quotes_of(docs)]


async def test_invalid_messages_get_errors_then_1008(
    nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    settings = settings_for(nats_server, redis_server, ws_max_invalid_messages=6)
    bad: list[str | bytes] = [
        "not json",
        "[1, 2]",
        json.dumps({"type": "dance"}),
        json.dumps({"type": "subscribe", "symbols": ["BTC-USDT"]}),
        json.dumps({"type": "subscribe", "symbols": "💥" * 40}),
        b"\x00binary",
    ]
    async with serving(settings) as server, connect(url(server)) as ws:
        await recv(ws)
        details = []
        for message in bad[:-1]:
            await ws.send(message)
            doc = await recv(ws)
            assert doc["type"] == "error" and doc["error"] == "bad_request", doc
            details.append(doc["detail"])
        assert "not JSON" in details[0] and "unknown type 'dance'" in details[2]
        assert "BTC-USDT" in details[3]
        await ws.send(bad[-1])  # the sixth: closed with 1008 (policy violation)
        assert (await recv(ws))["type"] == "error"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert server.bridge.stats.dropped_abuse == 1

    # a flood of valid messages is rate-limited (and counts as abuse)
    settings = settings_for(nats_server, redis_server, ws_max_invalid_messages=1000)
    async with serving(settings) as server, connect(url(server)) as ws:
        await recv(ws)
        for i in range(80):
            await ws.send(json.dumps({"type": "ping", "id": i}))
        docs = [await recv(ws) for _ in range(80)]
        assert any(d["type"] == "error" and d["error"] == "rate_limited" for d in docs)


async def test_origin_allow_list_and_max_clients(
    nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    settings = settings_for(
        nats_server, redis_server, ws_allowed_origins=["http://good.example"], ws_max_clients=2
    )
    async with serving(settings) as server:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(server), origin="http://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        assert orjson.loads(refused.value.response.body)["error"] == "forbidden_origin"

        own = f"http://127.0.0.1:{server.port}"  # the server's own origin is always fine
        async with (
            connect(url(server), origin="http://good.example") as one,  # type: ignore[arg-type]
            connect(url(server), origin=own) as two,  # type: ignore[arg-type]
        ):
            await recv(one)
            await recv(two)
            with pytest.raises(InvalidStatus) as full:
                async with connect(url(server)):  # no Origin: not a browser, allowed... if room
                    pass
            assert full.value.response.status_code == 503
            assert orjson.loads(full.value.response.body)["error"] == "too_many_clients"
        await eventually(lambda: not server.bridge.clients, "clients gone")
        async with connect(url(server)) as three:  # a freed slot is reusable
            assert (await recv(three))["type"] == "status"
        s = server.bridge.stats
        assert (s.refused_origin, s.refused_full) == (1, 1)


async def test_keepalive_and_message_size_bounds(
    nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    settings = settings_for(
        nats_server, redis_server, ws_ping_interval_seconds=0.2, ws_ping_timeout_seconds=0.3,
        ws_max_message_bytes=1024,
    )  # fmt: skip
    async with serving(settings) as server:
        # a client that answers no ping (its reading is paused) is closed by the server
        quiet = await connect(url(server), ping_interval=None)
        await recv(quiet)
        quiet.transport.pause_reading()
        await eventually(lambda: not server.bridge.clients, "the keepalive to close it")
        quiet.transport.abort()

        # a live client answers pings and stays; an oversized message closes it with 1009
        async with connect(url(server)) as ws:
            await recv(ws)
            await asyncio.sleep(1.0)  # several ping intervals
            assert len(server.bridge.clients) == 1
            await ws.send(json.dumps({"type": "subscribe", "symbols": ["A" * 2000]}))
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# --- slow clients ----------------------------------------------------------------------------


def small_buffers_listener() -> socket.socket:
    """A listening socket whose accepted sockets inherit a small send buffer, so that a client
    that stops reading fills the server's buffers within a few batches."""
    sock = bind_socket("127.0.0.1", 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    return sock


async def slow_connection(server: WsServer) -> ClientConnection:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", server.port or 0))
    return await connect(url(server), sock=raw, compression=None, max_size=None)


def wave(symbols: list[str], n: int) -> list[Quote]:
    return [quote(s, n * 10_000 + i + 0.123456789, T0 + n) for i, s in enumerate(symbols)]


async def test_a_client_that_stops_reading_is_dropped_others_are_not(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats
) -> None:
    symbols = [symbol() for _ in range(300)]
    settings = settings_for(
        nats_server, redis_server, symbols=symbols[:5], ws_client_queue_bytes=16_384,
        ws_slow_client_seconds=1.0,
    )  # fmt: skip
    async with serving(settings, small_buffers_listener()) as server:
        fast = await connect(url(server))
        slow = await slow_connection(server)
        await subscribe(fast, ["*"])
        await subscribe(slow, ["*"])
        slow.transport.pause_reading()  # the browser tab froze

        seen: dict[str, float] = {}

        async def read_fast() -> None:
            while True:
                for q in quotes_of([await recv(fast)]):
                    seen[q["symbol"]] = q["price"]

        reader = asyncio.create_task(read_fast())
        n = 0
        deadline = time.monotonic() + WAIT_S
        while server.bridge.stats.dropped_slow == 0 and time.monotonic() < deadline:
            n += 1
            await publish(nc, wave(symbols, n))
            await asyncio.sleep(0.05)
        assert server.bridge.stats.dropped_slow == 1, "the slow client was never dropped"
        await publish(nc, wave(symbols, n + 1))
        final = {q.symbol: q.price for q in wave(symbols, n + 1)}
        await eventually(lambda: seen == final, "the fast client to see every final price")
        reader.cancel()
        assert len(server.bridge.clients) == 1  # the fast one, still connected

        slow.transport.resume_reading()
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(WAIT_S):
                while True:
                    await slow.recv()
        await fast.close()


async def test_a_client_behind_for_a_while_gets_only_the_latest_values(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats
) -> None:
    symbols = [symbol() for _ in range(300)]
    settings = settings_for(
        nats_server, redis_server, symbols=symbols[:5], ws_client_queue_bytes=16_384,
        ws_slow_client_seconds=60.0,
    )  # fmt: skip
    async with serving(settings, small_buffers_listener()) as server:
        slow = await slow_connection(server)
        await subscribe(slow, ["*"])
        slow.transport.pause_reading()
        n = 0
        deadline = time.monotonic() + WAIT_S
        while server.bridge.status()["clients_behind"] == 0 and time.monotonic() < deadline:
            n += 1
            await publish(nc, wave(symbols, n))
            await asyncio.sleep(0.05)
        assert server.bridge.status()["clients_behind"] == 1
        for extra in range(1, 6):  # more waves while it is behind: conflated, not queued
            await publish(nc, wave(symbols, n + extra))
            await asyncio.sleep(0.15)  # pacing: one wave per batch window
        await eventually(lambda: server.bridge.stats.conflated >= 2 * len(symbols), "conflation")
        final = {q.symbol: q.price for q in wave(symbols, n + 5)}

        slow.transport.resume_reading()
        seen: dict[str, float] = {}
        received = 0
        async with asyncio.timeout(WAIT_S):
            while seen != final:
                for q in quotes_of([await recv(slow)]):
                    seen[q["symbol"]] = q["price"]
                    received += 1
        # Far fewer quotes than were published: the backlog was conflated, not replayed.
        assert received < (n + 5) * len(symbols) / 2
        assert server.bridge.stats.dropped_slow == 0
        await slow.close()


# --- dependencies ----------------------------------------------------------------------------


async def test_nats_restart_is_a_status_message_only(
    fresh_nats_server: ServerProcess, redis_server: ServerProcess
) -> None:
    settings = settings_for(fresh_nats_server, redis_server)
    sym = settings.symbols[0]
    async with serving(settings) as server, connect(url(server)) as ws:
        await recv(ws)
        await subscribe(ws, [sym])
        await asyncio.to_thread(fresh_nats_server.restart)
        docs = await recv_until(ws, lambda d: d["type"] == "status" and d["nats"] == "connected")
        assert next(d["nats"] for d in docs if d["type"] == "status") == "reconnecting"
        client = await nats.connect(fresh_nats_server.nats_url)
        try:
            # the bridge's subscription is restored; the WebSocket never closed
            await eventually(lambda: server.bridge.nats_state == "connected", "reconnect")
            for i in range(50):
                await publish(client, [quote(sym, 42.0 + i, T0 + i)])
                with contextlib.suppress(TimeoutError):
                    doc = await recv(ws, timeout=0.2)
                    if quotes_of([doc]):
                        break
            else:
                raise AssertionError("no quote after the NATS restart")
        finally:
            await client.close()
        assert server.bridge.stats.nats_reconnects >= 1


async def test_snapshot_without_the_cache_comes_from_memory(
    nats_server: ServerProcess, fresh_redis_server: ServerProcess, nc: Nats
) -> None:
    settings = settings_for(nats_server, fresh_redis_server, api_redis_timeout_seconds=0.2)
    sym = settings.symbols[0]
    async with serving(settings) as server:
        await publish(nc, [quote(sym, 7.5, T0)])
        await eventually(lambda: server.bridge.stats.quotes_in >= 1, "the quote")
        await asyncio.to_thread(fresh_redis_server.stop)
        async with connect(url(server)) as ws:
            await recv(ws)
            snap = await subscribe(ws, [sym])
            assert snap["cache"] is False
            assert [q["price"] for q in snap["quotes"]] == [7.5]


async def test_heartbeat_health_and_metrics(
    nats_server: ServerProcess, redis_server: ServerProcess, nc: Nats
) -> None:
    import httpx

    settings = settings_for(nats_server, redis_server)
    beats: list[dict[str, Any]] = []

    async def on_beat(msg: Any) -> None:
        beats.append(orjson.loads(msg.data))

    sub = await nc.subscribe(status_subject("ws"), cb=on_beat)
    async with serving(settings) as server, connect(url(server)) as ws:
        await recv(ws)
        await subscribe(ws, ["*"])
        await publish(nc, [quote(settings.symbols[0], 1.0, T0)])
        await eventually(lambda: any(b["clients"] == 1 and b["quotes_in"] >= 1 for b in beats),
                         "a heartbeat")  # fmt: skip
        beat = beats[-1]
        assert beat["component"] == "ws" and beat["state"] == "running"
        assert {"quotes_out", "dropped", "errors", "nats_connected"} <= set(beat)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            health = await http.get("/health")
            assert health.status_code == 200
            assert health.json()["dependencies"]["nats"]["state"] == "up"
            metrics = (await http.get("/metrics")).text
            assert "sow_ws_clients 1.0" in metrics
            assert "sow_quotes_seen_total" in metrics
    await sub.unsubscribe()


def test_iso_ms() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(T0 + 123) == "2026-01-01T00:00:00.123Z"
    with pytest.raises(ValueError):
        iso_ms(10**20)


# --- the command -----------------------------------------------------------------------------


def test_serve_ws_command_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(main: Any) -> None:
        server = main.__self__
        seen["settings"] = server.settings

    monkeypatch.setattr("sowcli.runtime.run_until_signal", fake_run)
    app = typer.Typer()
    app.command("serve-ws", epilog=serve_ws_cli.EPILOG)(serve_ws_cli.command)
    result = CliRunner().invoke(
        app,
        ["--port", "9100", "--host", "0.0.0.0", "--max-clients", "7", "--batch-ms", "250",
         "--allowed-origins", "http://a.example,http://b.example", "--nats-url", "nats://x:1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.ws_port, s.ws_host, s.ws_max_clients, s.ws_batch_ms) == (9100, "0.0.0.0", 7, 250)
    assert s.ws_allowed_origins == ["http://a.example", "http://b.example"]
    assert s.nats_url == "nats://x:1"

    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "Examples" in help_text and "sow serve-ws" in help_text
