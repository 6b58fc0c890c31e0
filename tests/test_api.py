"""`sow serve-api` against real QuestDB, Redis and NATS: httpx in-process (ASGI) and over TCP.

QuestDB rows go in over ILP/HTTP (as `sow persist` writes them) under symbols of this module;
Redis keys are written in the cache's format. Every answer is checked against the known data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
import redis.asyncio as aioredis
import typer
from typer.testing import CliRunner
from websockets.asyncio.client import connect as ws_connect

from sowcli import query
from sowcli.bus.nats import quote_subject, status_subject
from sowcli.cli import serve_api as serve_api_cli
from sowcli.config import Settings
from sowcli.infra import ServerProcess
from sowcli.model import Quote, encode_quote
from sowcli.servers.api import ApiServer, create_app
from sowcli.servers.ws import bind_socket, wire_quote
from sowcli.sinks.cache import latest_key
from sowcli.sinks.questdb import MARKET_DATA_DDL
from sowcli.timeparse import TimeRange
from tests.servers import questdb_query, wait_questdb_applied

pytestmark = pytest.mark.timeout(180)
WAIT_S = 20.0
T0 = datetime(2024, 1, 1, tzinfo=UTC)
RUN = uuid.uuid4().hex[:6].upper()
A = f"APIA{RUN}USDT"  # history/ohlc rows on 2024-01-01
S = f"APIS{RUN}USDT"  # stats rows in the last 24 h
L = f"APIL{RUN}USDT"  # only in QuestDB: /latest falls back to it
C = f"APIC{RUN}USDT"  # only in the cache
NOW = datetime.now(UTC).replace(microsecond=0)


def minute(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


# (symbol, market, time, price, seq)
ROWS: list[tuple[str, str, datetime, float, int]] = [
    *[(A, "SPOT", minute(i), 100.0 + i, i) for i in range(10)],
    (A, "SPOT", minute(30), 120.0, 10),
    (A, "FUTURES", minute(5), 200.0, 1),
    (A, "FUTURES", minute(6), 201.0, 2),
    (S, "SPOT", NOW - timedelta(hours=25), 999.0, 1),
    (S, "SPOT", NOW - timedelta(hours=3), 10.0, 2),
    (S, "SPOT", NOW - timedelta(hours=2), 30.0, 3),
    (S, "SPOT", NOW - timedelta(minutes=30), 20.0, 4),
    (L, "SPOT", NOW - timedelta(minutes=2), 11.0, 1),
    (L, "SPOT", NOW - timedelta(minutes=1), 12.0, 2),
    (L, "FUTURES", NOW - timedelta(minutes=1), 21.0, 1),
    # the seed's example: BTCUSDT SPOT on 2024-01-01, one an hour, plus one either side
    *[
        ("BTCUSDT", "SPOT", T0 + timedelta(hours=h, minutes=17), 42_000.0 + h, 9_100_000 + h)
        for h in range(24)
    ],
    ("BTCUSDT", "SPOT", T0 - timedelta(minutes=1), 41_999.0, 9_099_999),
    ("BTCUSDT", "SPOT", T0 + timedelta(days=1), 43_000.0, 9_200_000),
]


@pytest.fixture(scope="module")
def qdb(questdb_server: ServerProcess) -> Iterator[ServerProcess]:
    """The session QuestDB with ``market_data`` and this module's rows applied."""
    from questdb.ingress import Sender, TimestampNanos

    questdb_query(questdb_server, " ".join(MARKET_DATA_DDL.split()))
    conf = questdb_server.questdb_http_url.replace("http://", "http::addr=") + ";"
    with Sender.from_conf(conf) as sender:
        for sym, market, when, price, seq in ROWS:
            sender.row(
                "market_data",
                symbols={"symbol": sym, "market": market},
                columns={"price": price, "volume": 1000.0 + seq, "seq": seq, "bid": price - 1},
                at=TimestampNanos(int(when.timestamp() * 1_000_000) * 1000),
            )
    wait_questdb_applied(questdb_server, "market_data")
    yield questdb_server


def settings_for(
    nats_server: ServerProcess, redis: ServerProcess, qdb: ServerProcess, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_server.nats_url,
        "dragonfly_url": redis.redis_url,
        "questdb_url": qdb.questdb_url,
        "questdb_http_url": qdb.questdb_http_url,
        "symbols": [A, C],
        "heartbeat_interval_seconds": 0.2,
        "api_rate_limit_per_second": 0.0,
        "api_static_dir": "/nonexistent",
    }
    values.update(extra)
    return dataclasses.replace(Settings(), **values)


@contextlib.asynccontextmanager
async def api(settings: Settings, ip: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (lifespan run), with an httpx client as if from ``ip``."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://sow.test") as client:
            yield client


@pytest.fixture
def settings(
    nats_server: ServerProcess, redis_server: ServerProcess, qdb: ServerProcess
) -> Settings:
    return settings_for(nats_server, redis_server, qdb)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api(settings) as c:
        yield c


def cache_quote(sym: str, price: float, market: str = "SPOT", ts: int = 1_767_225_600_000) -> Quote:
    return Quote(symbol=sym, market=market, price=price, volume=5.0, ts=ts, recv_us=ts * 1000,  # type: ignore[arg-type]
                 seq=ts)  # fmt: skip


def is_error(resp: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    assert "Traceback" not in resp.text
    doc: dict[str, Any] = resp.json()
    assert set(doc) == {"error", "detail"}, doc
    if error is not None:
        assert doc["error"] == error, doc
    return doc


# --- /api/prices/latest ----------------------------------------------------------------------


async def test_latest_comes_from_the_cache_in_one_round_trip(
    client: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    mine = [cache_quote(C, 1.5), cache_quote(C, 2.5, "FUTURES", ts=1_767_225_600_001)]
    for q in mine:
        await redis.set(latest_key(q.market, q.symbol), encode_quote(q))
    await client.get("/api/prices/latest")  # warm the connection pool

    before = await redis.info("commandstats")
    resp = await client.get("/api/prices/latest")
    after = await redis.info("commandstats")

    def calls(stats: dict[str, Any]) -> dict[str, int]:
        return {k: v["calls"] for k, v in stats.items() if k != "cmdstat_info"}

    diff = {k: n - calls(before).get(k, 0) for k, n in calls(after).items()}
    assert {k: n for k, n in diff.items() if n} == {"cmdstat_mget": 1}

    assert resp.status_code == 200
    assert resp.headers["x-sow-source"] == "cache"
    doc = resp.json()
    assert doc["source"] == "cache" and doc["count"] == len(doc["quotes"])
    got = [q for q in doc["quotes"] if q["symbol"] == C]
    assert got == [json.loads(wire_quote(q)) for q in reversed(mine)]  # sorted: FUTURES, SPOT
    assert got[1]["timestamp"] == "2026-01-01T00:00:00.000Z"

    one = (await client.get(f"/api/prices/latest?symbols={C.lower()}&market=spot")).json()
    assert [(q["symbol"], q["market"], q["price"]) for q in one["quotes"]] == [(C, "SPOT", 1.5)]


async def test_latest_asks_questdb_when_the_cache_has_nothing(client: httpx.AsyncClient) -> None:
    resp = await client.get(f"/api/prices/latest?symbols={L}")
    assert resp.status_code == 200 and resp.headers["x-sow-source"] == "questdb"
    doc = resp.json()
    assert doc["source"] == "questdb"
    assert [(q["market"], q["price"], q["seq"]) for q in doc["quotes"]] == [
        ("FUTURES", 21.0, 1),
        ("SPOT", 12.0, 2),
    ]
    spot = doc["quotes"][1]
    assert spot["timestamp"] == (NOW - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert spot["ts"] == int((NOW - timedelta(minutes=1)).timestamp() * 1000)


async def test_cache_down_latest_falls_back_and_health_says_503(
    nats_server: ServerProcess, fresh_redis_server: ServerProcess, qdb: ServerProcess
) -> None:
    settings = settings_for(nats_server, fresh_redis_server, qdb, api_redis_timeout_seconds=0.3)
    async with api(settings) as client:
        await asyncio.to_thread(fresh_redis_server.stop)

        resp = await client.get("/api/prices/latest")
        assert resp.status_code == 200
        assert resp.headers["x-sow-source"] == "questdb"
        quotes = {(q["symbol"], q["market"]): q["price"] for q in resp.json()["quotes"]}
        assert quotes[(L, "SPOT")] == 12.0 and quotes[(A, "SPOT")] == 120.0

        await wait_for_nats(client)
        health = await client.get("/health")
        assert health.status_code == 503
        doc = health.json()
        assert doc["status"] == "down" and doc["error"] == "unavailable"
        assert doc["detail"].startswith("redis is down")
        deps = doc["dependencies"]
        assert deps["redis"]["state"] == "down" and deps["redis"]["latency_ms"] is None
        assert deps["questdb"]["state"] == "up" and deps["nats"]["state"] == "up"

        metrics = (await client.get("/metrics")).text
        assert re.search(r'sow_dependency_errors_total\{dependency="redis"\} [1-9]', metrics)
        assert 'sow_latest_source_total{source="questdb"} 1.0' in metrics


async def wait_for_nats(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        deps = (await client.get("/health")).json()["dependencies"]
        if deps["nats"]["state"] == "up":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("NATS never came up")


async def test_health_ok_with_every_dependency(client: httpx.AsyncClient) -> None:
    await wait_for_nats(client)
    resp = await client.get("/health")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["status"] == "ok" and doc["component"] == "api"
    for name in ("redis", "questdb", "nats"):
        dep = doc["dependencies"][name]
        assert dep["state"] == "up" and dep["required"] is True
        assert isinstance(dep["latency_ms"], float)


# --- history, stats, ohlc --------------------------------------------------------------------


def prices(doc: dict[str, Any], key: str = "quotes", field: str = "price") -> list[Any]:
    return [row[field] for row in doc[key]]


async def test_history_range_limit_order(client: httpx.AsyncClient) -> None:
    base = f"/api/prices/{A}/SPOT/history?from=2024-01-01T00:00:00Z&to=2024-01-01T00:10:00Z"
    doc = (await client.get(base + "&limit=3")).json()
    assert prices(doc) == [109.0, 108.0, 107.0]
    assert (doc["count"], doc["truncated"], doc["limit"], doc["order"]) == (3, True, 3, "desc")
    assert (doc["from"], doc["to"]) == ("2024-01-01T00:00:00.000Z", "2024-01-01T00:10:00.000Z")
    first = doc["quotes"][0]
    assert first["timestamp"] == "2024-01-01T00:09:00.000Z"
    assert first["ts"] == 1704067740000 and first["seq"] == 9 and first["bid"] == 108.0
    assert first["symbol"] == A and first["market"] == "SPOT" and first["recv_us"] is None

    asc = (await client.get(base + "&limit=3&order=asc")).json()
    assert prices(asc) == [107.0, 108.0, 109.0]

    # lower case, epoch milliseconds, [from, to)
    window = f"/api/prices/{A.lower()}/spot/history?from=1704067320000&to=1704067500000"
    assert prices((await client.get(window)).json()) == [104.0, 103.0, 102.0]

    # default: the last hour
    recent = (await client.get(f"/api/prices/{S}/SPOT/history")).json()
    assert prices(recent) == [20.0]


async def test_the_seed_urls(client: httpx.AsyncClient, settings: Settings) -> None:
    url = "/api/prices/BTCUSDT/SPOT/history?from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z"
    resp = await client.get(url)
    assert resp.status_code == 200
    doc = resp.json()
    mine = [q for q in doc["quotes"] if 9_100_000 <= (q["seq"] or 0) < 9_100_024]
    assert [q["price"] for q in mine] == [42_000.0 + h for h in reversed(range(24))]
    assert all("2024-01-01T" in q["timestamp"] for q in doc["quotes"])
    # ... and exactly what sow query history finds in QuestDB for the same range
    rows = await query.with_connection(
        settings.questdb_url,
        lambda db: query.history(db, "BTCUSDT", "SPOT", TimeRange(T0, T0 + timedelta(days=1))),
    )
    assert [q["seq"] for q in doc["quotes"]] == [r["seq"] for r in rows.dicts()]

    for other in (
        "/api/prices/latest",
        "/api/prices/BTCUSDT/SPOT/stats",
        "/api/prices/BTCUSDT/SPOT/ohlc?interval=1h&from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z",
        "/api/prices/ETHUSDT/FUTURES/history",
        "/health",
        "/metrics",
        "/docs",
        "/openapi.json",
    ):
        assert (await client.get(other)).status_code == 200, other


async def test_stats_over_the_last_24_hours(client: httpx.AsyncClient) -> None:
    doc = (await client.get(f"/api/prices/{S}/spot/stats")).json()
    assert doc["symbol"] == S and doc["market"] == "SPOT" and doc["window"] == "1d"
    assert doc["count"] == 3
    assert (doc["first"], doc["last"], doc["min"], doc["max"]) == (10.0, 20.0, 10.0, 30.0)
    assert doc["avg"] == pytest.approx(20.0)
    assert (doc["change"], doc["change_pct"]) == (10.0, pytest.approx(100.0))
    span = datetime.fromisoformat(doc["to"]) - datetime.fromisoformat(doc["from"])
    assert span == timedelta(hours=24)

    hour = (await client.get(f"/api/prices/{S}/SPOT/stats?window=1h")).json()
    assert (hour["count"], hour["first"], hour["window"]) == (1, 20.0, "1h")
    empty = (await client.get(f"/api/prices/{S}/FUTURES/stats")).json()
    assert empty["count"] == 0 and empty["first"] is None and empty["change_pct"] is None


async def test_ohlc_buckets_and_fill(client: httpx.AsyncClient) -> None:
    base = (
        f"/api/prices/{A}/SPOT/ohlc?interval=5M&from=2024-01-01T00:00:00Z&to=2024-01-01T00:35:00Z"
    )
    doc = (await client.get(base)).json()
    assert (doc["interval"], doc["fill"], doc["count"]) == ("5m", "none", 3)
    assert doc["candles"] == [
        {"timestamp": "2024-01-01T00:00:00.000Z", "open": 100.0, "high": 104.0, "low": 100.0,
         "close": 104.0, "ticks": 5},
        {"timestamp": "2024-01-01T00:05:00.000Z", "open": 105.0, "high": 109.0, "low": 105.0,
         "close": 109.0, "ticks": 5},
        {"timestamp": "2024-01-01T00:30:00.000Z", "open": 120.0, "high": 120.0, "low": 120.0,
         "close": 120.0, "ticks": 1},
    ]  # fmt: skip
    nulls = (await client.get(base + "&fill=null")).json()
    assert nulls["count"] == 7 and nulls["candles"][2]["open"] is None
    prev = (await client.get(base + "&fill=prev")).json()
    assert prev["candles"][2] == {"timestamp": "2024-01-01T00:10:00.000Z", "open": 109.0,
                                  "high": 109.0, "low": 109.0, "close": 109.0, "ticks": 0}  # fmt: skip


async def test_identical_queries_share_a_short_lived_answer(settings: Settings) -> None:
    url = f"/api/prices/{A}/FUTURES/history?from=2024-01-01&to=2024-01-02"
    async with api(settings) as client:
        first, second = await client.get(url), await client.get(url)
        assert (first.headers["x-sow-cache"], second.headers["x-sow-cache"]) == ("miss", "hit")
        assert first.content == second.content and prices(first.json()) == [201.0, 200.0]
        together = await asyncio.gather(*(client.get(url + "&limit=5") for _ in range(10)))
        assert [r.headers["x-sow-cache"] for r in together].count("miss") == 1
    async with api(dataclasses.replace(settings, api_query_cache_ms=0)) as client:
        assert {(await client.get(url)).headers["x-sow-cache"] for _ in range(2)} == {"miss"}


# --- hostile input ---------------------------------------------------------------------------

BAD_REQUESTS = [
    "/api/prices/BTC-USDT/SPOT/history",
    "/api/prices/B/SPOT/history",
    "/api/prices/" + "A" * 31 + "/SPOT/history",
    "/api/prices/%F0%9F%92%A5%F0%9F%92%A5/SPOT/history",
    "/api/prices/%FF%FE/SPOT/stats",
    "/api/prices/BTCUSDT%00/SPOT/history",
    "/api/prices/BTCUSDT/OPTIONS/history",
    "/api/prices/BTCUSDT/%E2%80%8BSPOT/ohlc",
    "/api/prices/BTCUSDT/SPOT/ohlc?interval=2m",
    "/api/prices/BTCUSDT/SPOT/ohlc?interval=",
    "/api/prices/BTCUSDT/SPOT/ohlc?fill=zero",
    "/api/prices/BTCUSDT/SPOT/history?from=2024-01-02&to=2024-01-01",
    "/api/prices/BTCUSDT/SPOT/history?from=2024-01-01&to=2024-01-01",
    "/api/prices/BTCUSDT/SPOT/history?from=2024-01-01&to=2024-03-01",
    "/api/prices/BTCUSDT/SPOT/ohlc?interval=1m&from=2023-01-01&to=2024-01-01",
    "/api/prices/BTCUSDT/SPOT/history?limit=0",
    "/api/prices/BTCUSDT/SPOT/history?limit=10001",
    "/api/prices/BTCUSDT/SPOT/history?limit=abc",
    "/api/prices/BTCUSDT/SPOT/history?limit=" + "9" * 400,
    "/api/prices/BTCUSDT/SPOT/history?limit=-1e309",
    "/api/prices/BTCUSDT/SPOT/history?from=" + "9" * 30,
    "/api/prices/BTCUSDT/SPOT/history?from=%00",
    "/api/prices/BTCUSDT/SPOT/history?from=2024-13-01",
    "/api/prices/BTCUSDT/SPOT/history?from=1999-12-31",
    "/api/prices/BTCUSDT/SPOT/history?to=%F0%9F%92%A5",
    "/api/prices/BTCUSDT/SPOT/history?=&&==&from",
    "/api/prices/BTCUSDT/SPOT/history?order=sideways",
    "/api/prices/BTCUSDT/SPOT/stats?window=0s",
    "/api/prices/BTCUSDT/SPOT/stats?window=999d",
    "/api/prices/BTCUSDT/SPOT/stats?window=%25s",
    "/api/prices/latest?market=moon",
    "/api/prices/latest?symbols=BTCUSDT,ETH-USDT",
    "/api/prices/latest?symbols=" + ",".join(["BTCUSDT"] * 1001),
]


async def test_bad_input_is_a_json_400_never_a_500(client: httpx.AsyncClient) -> None:
    for url in BAD_REQUESTS:
        doc = is_error(await client.get(url), 400, "bad_request")
        assert doc["detail"], url
    detail = is_error(await client.get("/api/prices/BTC-USDT/SPOT/history"), 400)["detail"]
    assert detail == "symbol 'BTC-USDT': not a valid symbol (2-30 letters and digits, e.g. BTCUSDT)"
    detail = is_error(await client.get(BAD_REQUESTS[13]), 400)["detail"]
    assert "at most 31d" in detail

    is_error(await client.get("/api/nothing/here"), 404, "not_found")
    is_error(await client.get("/api/prices/BTCUSDT/SPOT"), 404, "not_found")
    is_error(await client.post("/api/prices/latest"), 405, "method_not_allowed")
    is_error(await client.get("/api/prices/latest?x=" + "y" * 9000), 414, "uri_too_long")
    big = await client.request("GET", "/api/prices/latest", content=b"x" * 100_000)
    is_error(big, 413, "too_large")


# --- rate limit, CORS, metrics, static ---------------------------------------------------------


async def test_rate_limit_per_client_ip(settings: Settings) -> None:
    limited = dataclasses.replace(settings, api_rate_limit_per_second=0.5, api_rate_limit_burst=3)
    async with api(limited, ip="10.1.1.1") as one:
        codes = [(await one.get("/api/prices/latest")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        resp = await one.get("/health")
        doc = is_error(resp, 429, "rate_limited")
        assert "10.1.1.1" in doc["detail"]
        assert int(resp.headers["retry-after"]) >= 1
        metrics = await one.get("/metrics")  # the scraper is never limited
        assert metrics.status_code == 200
        assert "sow_http_rate_limited_total 2.0" in metrics.text
        app = one._transport.app  # type: ignore[attr-defined]
        other = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("10.2.2.2", 1)), base_url="http://t"
        )
        async with other:
            assert (await other.get("/api/prices/latest")).status_code == 200


async def test_cors_allow_list(settings: Settings) -> None:
    async with api(settings) as client:
        ok = await client.get("/api/prices/latest", headers={"Origin": "http://localhost:3000"})
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "x-sow-source" in ok.headers["access-control-expose-headers"].lower()
        evil = await client.get("/api/prices/latest", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in evil.headers
        pre = await client.options(
            "/api/prices/latest",
            headers={"Origin": "http://127.0.0.1:3000", "Access-Control-Request-Method": "GET"},
        )
        assert pre.status_code == 200 and "GET" in pre.headers["access-control-allow-methods"]
        denied = await client.options(
            "/api/prices/latest",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert denied.status_code == 400
    custom = dataclasses.replace(settings, cors_origins=["https://dash.example"])
    async with api(custom) as client:
        resp = await client.get("/health", headers={"Origin": "https://dash.example"})
        assert resp.headers["access-control-allow-origin"] == "https://dash.example"


async def test_metrics_count_routes_and_latency(client: httpx.AsyncClient) -> None:
    await client.get(f"/api/prices/{A}/SPOT/history?from=2024-01-01&to=2024-01-02")
    await client.get("/api/prices/BTC-USDT/SPOT/history")
    text = (await client.get("/metrics")).text
    route = 'route="/api/prices/{symbol}/{market}/history"'
    assert re.search(
        r"sow_http_requests_total\{[^}]*" + re.escape(route) + r'[^}]*status="200"\} 1\.0', text
    )
    assert re.search(
        r"sow_http_requests_total\{[^}]*" + re.escape(route) + r'[^}]*status="400"\} 1\.0', text
    )
    assert re.search(r'sow_http_request_duration_seconds_bucket\{le="0\.005",[^}]*' + re.escape(route), text) or (
        re.search(r"sow_http_request_duration_seconds_bucket\{[^}]*" + re.escape(route), text)
    )  # fmt: skip
    for name in ("sow_ws_clients", "sow_quotes_seen_total", "sow_dependency_errors_total",
                 "sow_query_cache_total", "sow_ws_clients_dropped_total"):  # fmt: skip
        assert name in text


async def test_static_dashboard_at_market(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>sow market</html>")
    async with api(dataclasses.replace(settings, api_static_dir=str(tmp_path))) as client:
        resp = await client.get("/market/")
        assert resp.status_code == 200 and "sow market" in resp.text
        is_error(await client.get("/market/missing.js"), 404)
    async with api(settings) as client:  # no export: no mount
        is_error(await client.get("/market/"), 404)


# --- a real server over TCP --------------------------------------------------------------------


async def test_real_server_over_tcp_with_websocket(
    nats_server: ServerProcess, settings: Settings, redis: aioredis.Redis
) -> None:
    sym = f"APIT{RUN}USDT"
    settings = dataclasses.replace(settings, symbols=[sym])
    await redis.set(latest_key("SPOT", sym), encode_quote(cache_quote(sym, 3.25)))
    server = ApiServer(settings)
    sock = bind_socket("127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop, sock=sock))
    nc = await nats.connect(nats_server.nats_url)
    beats: list[dict[str, Any]] = []

    async def on_beat(msg: Any) -> None:
        beats.append(orjson.loads(msg.data))

    await nc.subscribe(status_subject("api"), cb=on_beat)
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            latest = await http.get("/api/prices/latest")
            assert latest.headers["x-sow-source"] == "cache"
            assert [q["price"] for q in latest.json()["quotes"]] == [3.25]
            assert "server" not in latest.headers
            seed = await http.get(
                "/api/prices/BTCUSDT/SPOT/history?from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z"
            )
            assert seed.status_code == 200 and seed.json()["count"] >= 24

        # bounded request heads over a real socket: JSON 414 and 431, never a hang
        for head, status in (
            (b"GET /?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 414),
            (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n", 431),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head)
            answer = await asyncio.wait_for(reader.read(), WAIT_S)
            writer.close()
            top, _, body = answer.partition(b"\r\n\r\n")
            assert top.startswith(b"HTTP/1.1 %d" % status), top[:80]
            assert set(orjson.loads(body)) == {"error", "detail"}

        await asyncio.wait_for(server.service.bridge.subscribed.wait(), WAIT_S)
        async with ws_connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            assert json.loads(await ws.recv())["type"] == "status"
            await ws.send(json.dumps({"type": "subscribe", "symbols": [sym]}))
            snap = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert snap["type"] == "snapshot" and [q["price"] for q in snap["quotes"]] == [3.25]
            q = cache_quote(sym, 4.5, "FUTURES", ts=1_767_225_700_000)
            await nc.publish(quote_subject("FUTURES", sym), encode_quote(q))
            batch = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert batch["type"] == "quotes" and batch["quotes"] == [json.loads(wire_quote(q))]

        deadline = time.monotonic() + WAIT_S
        while not any(b["requests"] >= 2 for b in beats) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        beat = beats[-1]
        assert beat["component"] == "api" and beat["requests"] >= 2
        assert {"ws_clients", "quotes_in", "quotes_out", "dropped", "errors"} <= set(beat)
    finally:
        await nc.close()
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_frozen_questdb_costs_a_timeout_not_a_hang(
    nats_server: ServerProcess, redis_server: ServerProcess, fresh_questdb_server: ServerProcess
) -> None:
    frozen = fresh_questdb_server
    questdb_query(frozen, " ".join(MARKET_DATA_DDL.split()))
    settings = settings_for(nats_server, redis_server, frozen, api_questdb_timeout_seconds=1.0)
    async with api(settings) as client:
        url = f"/api/prices/{A}/SPOT/history"
        assert (await client.get(url)).status_code == 200
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await until_state(frozen.pid, "T")
            async with asyncio.timeout(WAIT_S):
                resp = await client.get(url + "?limit=7")
                assert resp.status_code in (503, 504)
                is_error(resp, resp.status_code)
                health = await client.get("/health")
            assert health.status_code == 503 and "questdb is down" in health.json()["detail"]
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        deadline = time.monotonic() + WAIT_S
        while (await client.get(url + "?limit=8")).status_code != 200:
            assert time.monotonic() < deadline, "QuestDB never answered again"
            await asyncio.sleep(0.2)


async def until_state(pid: int, state: str) -> None:
    """Wait until /proc says the process is in ``state`` (a JVM takes a moment to stop)."""
    deadline = time.monotonic() + WAIT_S
    stat = Path(f"/proc/{pid}/stat")
    while (await asyncio.to_thread(stat.read_text)).rsplit(")", 1)[1].split()[0] != state:
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        await asyncio.sleep(0.02)


# --- OpenAPI and the command -------------------------------------------------------------------


async def test_openapi_documents_every_endpoint(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/api/prices/latest",
        "/api/prices/{symbol}/{market}/history",
        "/api/prices/{symbol}/{market}/stats",
        "/api/prices/{symbol}/{market}/ohlc",
        "/health",
        "/metrics",
    }
    params = {
        p["name"]
        for p in spec["paths"]["/api/prices/{symbol}/{market}/history"]["get"]["parameters"]
    }
    assert params == {"symbol", "market", "from", "to", "limit", "order"}
    assert "ErrorOut" in spec["components"]["schemas"]


def test_serve_api_command_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(main: Any) -> None:
        seen["settings"] = main.__self__.settings

    monkeypatch.setattr("sowcli.runtime.run_until_signal", fake_run)
    app = typer.Typer()
    app.command("serve-api", epilog=serve_api_cli.EPILOG)(serve_api_cli.command)
    result = CliRunner().invoke(
        app,
        ["--host", "0.0.0.0", "--port", "9080", "--rate-limit", "5", "--cors-origins",
         "https://a.example,https://b.example", "--questdb-url", "postgres://q:1/qdb",
         "--dragonfly-url", "cache:6380"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.api_host, s.api_port, s.api_rate_limit_per_second) == ("0.0.0.0", 9080, 5.0)
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert (s.questdb_url, s.dragonfly_url) == ("postgres://q:1/qdb", "cache:6380")
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "Examples" in help_text and "/api/prices/latest" in help_text
