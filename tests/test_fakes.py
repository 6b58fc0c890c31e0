"""Self-tests of the fake Bybit servers (tests/fakes): they must speak Bybit v5 as documented in
/work/shared/reference/bybit-v5.md, or every listener test built on them proves nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from tests.fakes import FakeBybit, FakeBybitRest
from tests.fakes.bybit_rest import kline_open

SYMBOLS = {"BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT"}
REPO = Path(__file__).resolve().parents[1]
# The fields of the linear ticker snapshot sample (bybit-v5-samples.jsonl, line 11).
LINEAR_SNAPSHOT_FIELDS = {
    "symbol", "tickDirection", "price24hPcnt", "lastPrice", "prevPrice24h", "highPrice24h",
    "lowPrice24h", "prevPrice1h", "markPrice", "indexPrice", "openInterest", "openInterestValue",
    "turnover24h", "volume24h", "fundingIntervalHour", "fundingCap", "nextFundingTime",
    "fundingRate", "bid1Price", "bid1Size", "ask1Price", "ask1Size", "preOpenPrice", "preQty",
    "curPreListingPhase",
}  # fmt: skip
SPOT_SNAPSHOT_FIELDS = {
    "symbol", "lastPrice", "highPrice24h", "lowPrice24h", "prevPrice24h", "volume24h",
    "turnover24h", "price24hPcnt", "usdIndexPrice",
}  # fmt: skip


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def request(ws: ClientConnection, **req: Any) -> dict[str, Any]:
    await ws.send(json.dumps(req))
    return await recv_json(ws)


def without_conn_id(frame: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(frame.pop("conn_id"), str)
    return frame


@pytest.fixture
async def ex() -> AsyncIterator[FakeBybit]:
    async with FakeBybit(valid_symbols=SYMBOLS, auto=False, initial_snapshot=False) as fake:
        yield fake


# ---------------------------------------------------------------------------- websocket


async def test_spot_ack_formats_and_limits(ex: FakeBybit) -> None:
    async with connect(ex.spot_url) as ws:
        ack = await request(ws, req_id="10001", op="subscribe", args=["tickers.BTCUSDT"])
        assert without_conn_id(ack) == {
            "success": True,
            "ret_msg": "subscribe",
            "req_id": "10001",
            "op": "subscribe",
        }
        eleven = [f"tickers.S{i}USDT" for i in range(11)]
        await ws.send(json.dumps({"op": "subscribe", "args": eleven}))
        raw = await ws.recv()
        assert "args size \\u003e10" in str(raw)  # Go's JSON escaping, as in the sample
        err = json.loads(raw)
        assert without_conn_id(err) == {
            "success": False,
            "ret_msg": "args size >10",
            "op": "subscribe",
        }
        bad = ["tickers.ETHUSDT", "tickers.NOPEUSDT", "tickers.BADUSDT"]
        err = await request(ws, req_id="sub-spot-1", op="subscribe", args=bad)
        assert err["success"] is False
        assert err["ret_msg"] == "Invalid symbol :[tickers.NOPEUSDT,tickers.BADUSDT]"
        assert err["req_id"] == "sub-spot-1"
    # spot: the valid topics of a partly invalid request are subscribed; >10 args subscribes nothing
    assert ex.subscribe_requests[1] == ("spot", eleven)
    assert ex.subscribe_requests[2] == ("spot", bad)
    await ex.wait_for(lambda: ex.connections("spot") == 0)
    assert ex.connects == {"spot": 1, "linear": 0}


async def test_spot_partial_subscription_is_active(ex: FakeBybit) -> None:
    async with connect(ex.spot_url) as ws:
        await request(ws, op="subscribe", args=["tickers.ETHUSDT", "tickers.NOPEUSDT"])
        assert ex.subscribed("spot") == {"tickers.ETHUSDT"}
        frame = await ex.send_ticker_snapshot("spot", "ETHUSDT", lastPrice="3001.5")
        got = await recv_json(ws)
        assert got == frame
        assert list(got) == ["topic", "ts", "type", "cs", "data"]
        assert set(got["data"]) == SPOT_SNAPSHOT_FIELDS
        assert got["data"]["lastPrice"] == "3001.5"
        assert all(isinstance(v, str) for v in got["data"].values())


async def test_linear_rejects_whole_request(ex: FakeBybit) -> None:
    async with connect(ex.linear_url) as ws:
        err = await request(
            ws, req_id="sub-linear-1", op="subscribe", args=["tickers.BTCUSDT", "tickers.NOPEUSDT"]
        )
        assert without_conn_id(err) == {
            "success": False,
            "ret_msg": "error:handler not found,topic:tickers.NOPEUSDT",
            "req_id": "sub-linear-1",
            "op": "subscribe",
        }
        assert ex.subscribed("linear") == set()
        ack = await request(ws, op="subscribe", args=["tickers.BTCUSDT"])
        assert without_conn_id(ack) == {
            "success": True,
            "ret_msg": "",
            "req_id": "",
            "op": "subscribe",
        }
        err = await request(
            ws, req_id="2", op="subscribe", args=["tickers.ETHUSDT", "tickers.BTCUSDT"]
        )
        assert err["ret_msg"] == "error:already subscribed,topic:tickers.BTCUSDT"
        assert ex.subscribed("linear") == {"tickers.BTCUSDT"}
        unsub = await request(ws, req_id="u", op="unsubscribe", args=["tickers.BTCUSDT"])
        assert unsub["success"] is True and unsub["op"] == "unsubscribe"
        assert ex.subscribed("linear") == set()


async def test_linear_snapshot_then_deltas_merge_to_state() -> None:
    async with (
        FakeBybit(valid_symbols=SYMBOLS, auto=False) as ex,
        connect(ex.linear_url) as ws,
    ):
        await ws.send(json.dumps({"op": "subscribe", "args": ["tickers.BTCUSDT"]}))
        assert (await recv_json(ws))["success"] is True
        snap = await recv_json(ws)
        assert snap["type"] == "snapshot" and snap["topic"] == "tickers.BTCUSDT"
        assert list(snap) == ["topic", "type", "data", "cs", "ts"]
        assert set(snap["data"]) >= LINEAR_SNAPSHOT_FIELDS
        assert all(isinstance(v, str) for v in snap["data"].values())
        merged = dict(snap["data"])
        last_cs = snap["cs"]
        sent = await ex.send_ticker_delta("linear", "BTCUSDT", lastPrice="65000.10")
        assert await recv_json(ws) == sent
        assert sent["data"] == {"symbol": "BTCUSDT", "lastPrice": "65000.10"}
        merged.update(sent["data"])
        for _ in range(20):  # generated deltas: few fields, always the symbol, cs increasing
            frame = await ex.send_ticker_delta("linear", "BTCUSDT")
            got = await recv_json(ws)
            assert got == frame and got["type"] == "delta"
            assert got["data"]["symbol"] == "BTCUSDT" and 1 < len(got["data"]) < 12
            assert got["cs"] > last_cs and isinstance(got["ts"], int)
            last_cs = got["cs"]
            merged.update(got["data"])
        assert merged == ex.state("linear", "BTCUSDT")


async def test_ping_pong_and_disabled_pongs(ex: FakeBybit) -> None:
    async with connect(ex.spot_url) as spot, connect(ex.linear_url) as linear:
        pong = await request(spot, op="ping")
        assert without_conn_id(pong) == {"success": True, "ret_msg": "pong", "op": "ping"}
        pong = await request(linear, op="ping")
        assert without_conn_id(pong) == {
            "success": True,
            "ret_msg": "pong",
            "req_id": "",
            "op": "ping",
        }
        assert (await request(linear, op="ping", req_id="p1"))["req_id"] == "p1"
        ex.pong_enabled = False
        await linear.send('{"op":"ping"}')
        await ex.wait_pings("linear", 3)
        await ex.send("linear", "marker")  # the next frame is the marker: no pong was sent
        async with asyncio.timeout(5):
            assert await linear.recv() == "marker"
    assert ex.pings_received == {"spot": 1, "linear": 3}


async def test_drop_aborts_and_counts(ex: FakeBybit) -> None:
    async with connect(ex.linear_url) as ws:
        await ex.wait_connects("linear", 1)
        assert ex.connections("linear") == 1
        assert await ex.drop("linear") == 1
        with pytest.raises(ConnectionClosedError) as info:
            async with asyncio.timeout(5):
                await ws.recv()
        assert info.value.rcvd is None  # no close frame: an abrupt cut
    assert ex.connections("linear") == 0
    async with connect(ex.linear_url):
        await ex.wait_connects("linear", 2)


async def test_unknown_path_and_outage_refused(ex: FakeBybit) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(f"{ex.url}/v5/public/inverse")
    assert info.value.response.status_code == 404
    ex.accepting = False
    with pytest.raises(InvalidStatus) as info:
        await connect(ex.spot_url)
    assert info.value.response.status_code == 503
    assert ex.refused == 2 and ex.connects == {"spot": 0, "linear": 0}


async def test_raw_frames_and_book(ex: FakeBybit) -> None:
    async with connect(ex.spot_url) as ws:
        await request(ws, op="subscribe", args=["orderbook.1.BTCUSDT"])
        assert await ex.send("spot", "not json{") == 1
        assert await ex.send("spot", {"topic": "tickers.BTCUSDT", "data": {"lastPrice": ""}}) == 1
        await ex.send("spot", b"\x00\x01")
        async with asyncio.timeout(5):
            assert await ws.recv() == "not json{"
            assert json.loads(await ws.recv())["data"] == {"lastPrice": ""}
            assert await ws.recv() == b"\x00\x01"
        book = await ex.send_book("spot", "BTCUSDT", ("65000.1", "1.2"), "65000.2")
        got = await recv_json(ws)
        assert got == book
        assert got["topic"] == "orderbook.1.BTCUSDT" and got["type"] == "snapshot"
        assert got["data"]["b"] == [["65000.1", "1.2"]] and got["data"]["a"] == [["65000.2", "1"]]
        assert {"s", "u", "seq"} <= set(got["data"]) and "cts" in got


async def test_auto_generator_and_delisting() -> None:
    async with (
        FakeBybit(valid_symbols=SYMBOLS, auto_interval=0.01) as ex,
        connect(ex.linear_url) as linear,
        connect(ex.spot_url) as spot,
    ):
        await linear.send(json.dumps({"op": "subscribe", "args": ["tickers.SOLUSDT"]}))
        await spot.send(json.dumps({"op": "subscribe", "args": ["tickers.SOLUSDT"]}))
        assert (await recv_json(linear))["success"] is True
        assert (await recv_json(spot))["success"] is True
        kinds = [(await recv_json(linear))["type"] for _ in range(4)]
        assert kinds == ["snapshot", "delta", "delta", "delta"]
        spot_frames = [await recv_json(spot) for _ in range(3)]
        assert all(f["type"] == "snapshot" for f in spot_frames)
        assert spot_frames[0]["cs"] < spot_frames[1]["cs"] < spot_frames[2]["cs"]
        ex.delisted.add("ETHUSDT")
        err = await request(linear, op="subscribe", args=["tickers.ETHUSDT"])
        while "success" not in err:  # skip data frames interleaved with the ack
            err = await recv_json(linear)
        assert err["ret_msg"] == "error:handler not found,topic:tickers.ETHUSDT"


async def test_idle_connection_is_closed() -> None:
    async with FakeBybit(valid_symbols=SYMBOLS, idle_timeout=0.1) as ex, connect(ex.spot_url) as ws:
        with pytest.raises(ConnectionClosedOK):
            async with asyncio.timeout(5):
                await ws.recv()
        assert ex.connects["spot"] == 1


async def test_wait_subscribed_times_out(ex: FakeBybit) -> None:
    with pytest.raises(TimeoutError):
        await ex.wait_subscribed("linear", "tickers.BTCUSDT", timeout=0.05)


async def test_replay_recording(ex: FakeBybit, recording: Path) -> None:
    async with connect(ex.linear_url, max_queue=None) as ws:
        await ex.wait_connects("linear", 1)
        frames = await ex.replay_recording(recording, "linear", topic_prefixes=("tickers.",))
        kinds = [f["type"] for f in frames]
        assert kinds.count("snapshot") == 4 and kinds.count("delta") == 754
        for frame in frames:
            assert await recv_json(ws) == frame


async def test_benchmark_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.bybit_ws",
        "--rate", "0", "--frames", "300", "--symbols", "BTCUSDT,ETHUSDT", "--market", "linear",
        cwd=REPO,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            ready = (await proc.stdout.readline()).decode().split()
            assert ready[0] == "READY" and ready[1].startswith("ws://127.0.0.1:")
            async with connect(ready[1] + "/v5/public/linear", max_queue=None) as ws:
                await ws.send('{"op":"subscribe","args":["tickers.BTCUSDT","tickers.ETHUSDT"]}')
                frames = [await recv_json(ws) for _ in range(303)]
                assert frames[0]["success"] is True
                assert [f["type"] for f in frames[1:3]] == ["snapshot", "snapshot"]
                deltas = frames[3:]
                assert all(f["type"] == "delta" for f in deltas)
                for sym in ("BTCUSDT", "ETHUSDT"):
                    cs = [f["cs"] for f in deltas if f["data"]["symbol"] == sym]
                    assert cs == sorted(cs) and len(set(cs)) == len(cs) > 100
                assert (await proc.stdout.readline()).decode().split() == ["DONE", "300"]
    finally:
        proc.terminate()
        await proc.wait()


# ---------------------------------------------------------------------------- REST

NOW = int(datetime(2026, 8, 9, 12, 30, 30, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
async def rest() -> AsyncIterator[FakeBybitRest]:
    async with FakeBybitRest(valid_symbols=SYMBOLS, now_ms=NOW) as fake:
        yield fake


@pytest.fixture
async def http(rest: FakeBybitRest) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=rest.url, timeout=5) as client:
        yield client


async def get(http: httpx.AsyncClient, path: str, **params: Any) -> dict[str, Any]:
    response = await http.get(path, params=params)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert set(body) == {"retCode", "retMsg", "result", "retExtInfo", "time"}
    return body


async def test_instruments_pagination(rest: FakeBybitRest, http: httpx.AsyncClient) -> None:
    rest.page_size = 3
    rest.status["LUNAUSDT"] = "Closed"
    seen: list[tuple[str, str]] = []
    cursor = ""
    pages = 0
    while True:
        body = await get(http, "/v5/market/instruments-info", category="linear", cursor=cursor)
        seen += [(i["symbol"], i["status"]) for i in body["result"]["list"]]
        pages += 1
        cursor = body["result"]["nextPageCursor"]
        if not cursor:
            break
    assert pages == 2 and len(seen) == 5
    assert ("LUNAUSDT", "Closed") in seen and ("BTCUSDT", "Trading") in seen
    spot = await get(http, "/v5/market/instruments-info", category="spot", status="Trading")
    assert "nextPageCursor" not in spot["result"]  # real spot answers in one page
    assert {i["symbol"] for i in spot["result"]["list"]} == SYMBOLS


async def test_kline_window_newest_first(rest: FakeBybitRest, http: httpx.AsyncClient) -> None:
    start, end = NOW - 10 * 60_000, NOW
    body = await get(
        http, "/v5/market/kline", category="linear", symbol="BTCUSDT", interval="1",
        start=start, end=end, limit=1000,
    )  # fmt: skip
    rows = body["result"]["list"]
    opens = [int(r[0]) for r in rows]
    assert opens == sorted(opens, reverse=True)
    assert opens[0] == kline_open(NOW, "1")  # the running candle is included
    assert all(start <= t <= end for t in opens) and len(rows) == 10
    for newer, older in itertools.pairwise(rows):
        assert older[4] == newer[1]  # close of a candle = open of the next
    for row in rows:
        assert all(isinstance(v, str) for v in row)
        o, h, lo, c = map(float, row[1:5])
        assert lo <= min(o, c) <= max(o, c) <= h
    again = await get(
        http, "/v5/market/kline", category="linear", symbol="BTCUSDT", interval="1",
        start=start, end=end, limit=3,
    )  # fmt: skip
    assert again["result"]["list"] == rows[:3]  # end-anchored, deterministic


async def test_kline_calendar_intervals(http: httpx.AsyncClient) -> None:
    for interval, check in (
        ("D", lambda d: (d.hour, d.minute) == (0, 0)),
        ("W", lambda d: d.weekday() == 0 and d.hour == 0),
        ("M", lambda d: d.day == 1 and d.hour == 0),
    ):
        body = await get(
            http, "/v5/market/kline", category="spot", symbol="ETHUSDT", interval=interval, limit=5
        )
        dates = [datetime.fromtimestamp(int(r[0]) / 1000, UTC) for r in body["result"]["list"]]
        assert len(dates) == 5 and all(check(d) for d in dates), (interval, dates)


async def test_business_errors(http: httpx.AsyncClient) -> None:
    bad = await get(http, "/v5/market/kline", category="linear", symbol="NOPEUSDT", interval="1")
    assert (bad["retCode"], bad["retMsg"]) == (10001, "params error: symbol invalid")
    bad = await get(http, "/v5/market/kline", symbol="BTCUSDT", interval="1", limit=1001)
    assert bad["retCode"] == 10001
    bad = await get(http, "/v5/market/kline", symbol="BTCUSDT", interval="2")
    assert bad["retCode"] == 10001


async def test_faults_and_counters(rest: FakeBybitRest, http: httpx.AsyncClient) -> None:
    rest.fail_next(2, status=429)
    rest.fail_next(1, status=403)
    assert (await http.get("/v5/market/time")).status_code == 429
    assert (await http.get("/v5/market/time")).status_code == 429
    forbidden = await http.get("/v5/market/time")
    assert (forbidden.status_code, forbidden.text) == (403, "access too frequent")
    body = await get(http, "/v5/market/time")
    assert body["result"]["timeSecond"] == str(NOW // 1000)
    rest.timeout_next(1, path="/v5/market/tickers")
    with pytest.raises(httpx.ReadTimeout):
        await http.get("/v5/market/tickers", params={"category": "spot"}, timeout=0.2)
    tickers = await get(http, "/v5/market/tickers", category="spot", symbol="BTCUSDT")
    assert {"bid1Price", "ask1Price", "usdIndexPrice"} <= set(tickers["result"]["list"][0])
    assert rest.requests[-1] == ("/v5/market/tickers", {"category": "spot", "symbol": "BTCUSDT"})
    assert rest.count("/v5/market/time") == 4 and rest.request_count == 6
    assert rest.max_requests_in(60.0) == 6


async def test_rate_limit_and_ws_linked_tickers() -> None:
    async with (
        FakeBybit(valid_symbols=SYMBOLS, auto=False) as ex,
        FakeBybitRest(valid_symbols=SYMBOLS, rate_limit=(3, 60.0), ws=ex) as rest,
        httpx.AsyncClient(base_url=rest.url) as http,
    ):
        await ex.send_ticker_snapshot("linear", "SOLUSDT", lastPrice="151.23")
        body = await get(http, "/v5/market/tickers", category="linear", symbol="SOLUSDT")
        ticker = body["result"]["list"][0]
        assert ticker["lastPrice"] == "151.23" and "markPrice" in ticker
        statuses = [(await http.get("/v5/market/time")).status_code for _ in range(3)]
        assert statuses == [200, 200, 403]
