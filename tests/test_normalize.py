"""The pure core: Bybit frames -> Quotes, snapshot/delta merge, spot top of book."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from sowcli.model import Market, Quote, decode_quote, encode_quote
from sowcli.normalize import NOT_DECODED, TICKER_PREFIX, BybitNormalizer
from sowcli.sources import simulate

LINEAR_SNAPSHOT: dict[str, Any] = {
    "topic": "tickers.BTCUSDT",
    "type": "snapshot",
    "data": {
        "symbol": "BTCUSDT",
        "tickDirection": "MinusTick",
        "price24hPcnt": "-0.158315",
        "lastPrice": "66666.60",
        "prevPrice24h": "79206.20",
        "highPrice24h": "79266.30",
        "lowPrice24h": "65076.90",
        "markPrice": "66666.60",
        "indexPrice": "115418.19",
        "openInterest": "492373.72",
        "turnover24h": "4936790807.6521",
        "volume24h": "73191.3870",
        "fundingRate": "-0.005",
        "bid1Price": "66666.60",
        "ask1Price": "66666.70",
    },
    "cs": 9532239429,
    "ts": 1760325052630,
}


def delta(cs: int, ts: int, **fields: str) -> dict[str, Any]:
    return {
        "topic": "tickers.BTCUSDT",
        "type": "delta",
        "data": {"symbol": "BTCUSDT", **fields},
        "cs": cs,
        "ts": ts,
    }


def test_linear_snapshot_becomes_full_quote() -> None:
    n = BybitNormalizer()
    q = n.on_message("FUTURES", LINEAR_SNAPSHOT, 123)
    assert q == Quote(
        symbol="BTCUSDT",
        market="FUTURES",
        price=66666.6,
        volume=73191.387,
        turnover=4936790807.6521,
        high24h=79266.3,
        low24h=65076.9,
        change24h=-15.8315,
        bid=66666.6,
        ask=66666.7,
        mark_price=66666.6,
        index_price=115418.19,
        funding_rate=-0.005,
        open_interest=492373.72,
        ts=1760325052630,
        recv_us=123,
        seq=9532239429,
    )


def test_delta_merges_and_absent_fields_keep_their_value() -> None:
    n = BybitNormalizer()
    n.on_message("FUTURES", LINEAR_SNAPSHOT, 1)
    q = n.on_message("FUTURES", delta(9532239517, 1760325052730, lastPrice="66666.70"), 2)
    assert q is not None
    assert q.price == 66666.7
    assert q.mark_price == 66666.6  # not in the delta: unchanged
    assert q.open_interest == 492373.72
    assert q.ts == 1760325052730 and q.seq == 9532239517
    q2 = n.on_message("FUTURES", delta(9532239602, 1760325052830, markPrice="66667.10"), 3)
    assert q2 is not None
    assert q2.price == 66666.7  # from the previous delta
    assert q2.mark_price == 66667.1


def test_delta_repeating_an_unchanged_field_is_harmless() -> None:
    n = BybitNormalizer()
    n.on_message("FUTURES", LINEAR_SNAPSHOT, 1)
    q = n.on_message(
        "FUTURES", delta(9532239500, 1760325052700, lastPrice="66666.60", bid1Price="66666.60"), 2
    )
    assert q is not None and q.price == 66666.6 and q.bid == 66666.6


def test_delta_before_snapshot_is_dropped_and_counted() -> None:
    n = BybitNormalizer()
    assert n.on_message("FUTURES", delta(1, 1, lastPrice="1"), 1) is None
    assert n.stats.dropped_deltas == 1
    assert n.stats.quotes == 0


def test_reset_forgets_the_snapshot() -> None:
    n = BybitNormalizer()
    n.on_message("FUTURES", LINEAR_SNAPSHOT, 1)
    n.reset("FUTURES")
    assert n.on_message("FUTURES", delta(9532239517, 1760325052730, lastPrice="1"), 2) is None
    assert n.stats.dropped_deltas == 1


def test_stale_frame_with_lower_cs_is_dropped() -> None:
    n = BybitNormalizer()
    n.on_message("FUTURES", LINEAR_SNAPSHOT, 1)
    n.on_message("FUTURES", delta(9532239600, 1760325052830, lastPrice="2"), 2)
    assert n.on_message("FUTURES", delta(9532239500, 1760325052730, lastPrice="1"), 3) is None
    assert n.stats.stale_frames == 1
    q = n.on_message("FUTURES", delta(9532239700, 1760325052930, markPrice="3"), 4)
    assert q is not None and q.price == 2.0


def test_empty_string_means_no_value() -> None:
    n = BybitNormalizer()
    frame = json.loads(json.dumps(LINEAR_SNAPSHOT))
    frame["data"]["fundingRate"] = ""
    q = n.on_message("FUTURES", frame, 1)
    assert q is not None and q.funding_rate is None


@pytest.mark.parametrize(
    "frame",
    [
        {"topic": "tickers.BTCUSDT", "type": "snapshot", "ts": 1, "data": ["not", "an", "object"]},
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "ts": 1,
            "data": {"symbol": "BTCUSDT", "lastPrice": "abc"},
        },
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "ts": 1,
            "data": {"symbol": "BTCUSDT", "lastPrice": ""},
        },
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "ts": 1,
            "data": {"symbol": "BTCUSDT", "lastPrice": True},
        },
        {"topic": "tickers.BTCUSDT", "type": "snapshot", "ts": 1, "data": {"symbol": "BTCUSDT"}},
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "data": {"symbol": "BTCUSDT", "lastPrice": "1"},
        },
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "ts": "soon",
            "data": {"symbol": "BTCUSDT", "lastPrice": "1"},
        },
        {
            "topic": "tickers.BTCUSDT",
            "type": "weird",
            "ts": 1,
            "data": {"symbol": "BTCUSDT", "lastPrice": "1"},
        },
        {"topic": 42, "data": {}},
        {
            "topic": "tickers.BTCUSDT",
            "type": "snapshot",
            "ts": 1,
            "cs": [],
            "data": {"symbol": "BTCUSDT", "lastPrice": "1"},
        },
    ],
)
def test_malformed_frames_are_counted_never_raised(frame: dict[str, Any]) -> None:
    n = BybitNormalizer()
    assert n.on_message("FUTURES", frame, 1) is None
    assert n.stats.invalid_frames == 1


def test_bad_delta_does_not_poison_the_merge_state() -> None:
    n = BybitNormalizer()
    n.on_message("FUTURES", LINEAR_SNAPSHOT, 1)
    assert n.on_message("FUTURES", delta(9532239500, 1760325052700, markPrice="oops"), 2) is None
    q = n.on_message("FUTURES", delta(9532239510, 1760325052710, lastPrice="5"), 3)
    assert q is not None and q.mark_price == 66666.6


SPOT_TICKER = {
    "topic": "tickers.BTCUSDT",
    "ts": 1673853746003,
    "type": "snapshot",
    "cs": 2588407389,
    "data": {
        "symbol": "BTCUSDT",
        "lastPrice": "21109.77",
        "highPrice24h": "21426.99",
        "lowPrice24h": "20575",
        "prevPrice24h": "20704.93",
        "volume24h": "6780.866843",
        "turnover24h": "141946527.22907118",
        "price24hPcnt": "0.0196",
        "usdIndexPrice": "21120.2400136",
    },
}


def book(kind: str, bids: list[list[str]], asks: list[list[str]]) -> dict[str, Any]:
    return {
        "topic": "orderbook.1.BTCUSDT",
        "type": kind,
        "ts": 1,
        "data": {"s": "BTCUSDT", "b": bids, "a": asks, "u": 1, "seq": 1},
    }


def test_spot_quote_has_no_futures_fields_and_takes_bid_ask_from_the_book() -> None:
    n = BybitNormalizer(spot_book=True)
    q = n.on_message("SPOT", SPOT_TICKER, 1)
    assert q is not None
    assert (q.bid, q.ask) == (None, None)  # no book yet
    assert q.change24h == 1.96
    assert q.mark_price is None and q.index_price is None and q.open_interest is None
    n.on_message("SPOT", book("snapshot", [["21109.7", "1"]], [["21109.8", "2"]]), 2)
    q = n.on_message("SPOT", SPOT_TICKER, 3)
    assert q is not None and (q.bid, q.ask) == (21109.7, 21109.8)
    # a delta removes the old best level (size 0) and adds the new one
    n.on_message("SPOT", book("delta", [["21109.7", "0"], ["21109.5", "3"]], []), 4)
    q = n.on_message("SPOT", SPOT_TICKER, 5)
    assert q is not None and (q.bid, q.ask) == (21109.5, 21109.8)


def test_spot_book_off_leaves_bid_ask_null() -> None:
    n = BybitNormalizer(spot_book=False)
    n.on_message("SPOT", book("snapshot", [["1", "1"]], [["2", "1"]]), 1)
    q = n.on_message("SPOT", SPOT_TICKER, 2)
    assert q is not None and q.bid is None and q.ask is None


def test_quote_json_roundtrip_uses_contract_field_names() -> None:
    q = BybitNormalizer().on_message("FUTURES", LINEAR_SNAPSHOT, 7)
    assert q is not None
    doc = json.loads(encode_quote(q))
    assert list(doc) == [
        "symbol",
        "market",
        "price",
        "volume",
        "turnover",
        "high24h",
        "low24h",
        "change24h",
        "bid",
        "ask",
        "mark_price",
        "index_price",
        "funding_rate",
        "open_interest",
        "ts",
        "recv_us",
        "seq",
    ]
    assert decode_quote(encode_quote(q)) == q


def test_samples_file_frames_never_crash(samples: Path) -> None:
    n = BybitNormalizer()
    for line in samples.read_text().splitlines():
        msg = json.loads(line)
        if "topic" in msg:
            n.on_message("FUTURES" if "openInterest" in line else "SPOT", msg, 1)
    assert n.stats.quotes >= 2


@pytest.fixture
def samples() -> Path:
    from tests.conftest import SAMPLES

    if not SAMPLES.is_file():
        pytest.skip("samples file not found")
    return SAMPLES


def test_recording_every_linear_quote_is_snapshot_merged_with_every_delta(recording: Path) -> None:
    """The recording's own promise: replaying one connection's frames in order, each linear
    ticker quote equals the snapshot merged with every delta so far."""
    conns: dict[str, str] = {}
    n = BybitNormalizer()
    reference: dict[str, dict[str, Any]] = {}
    checked = 0
    with gzip.open(recording, "rt") as fh:
        for line in fh:
            doc = json.loads(line)
            if doc.get("t") == "connect":
                conns[doc["conn"]] = "SPOT" if "/spot" in doc["addr"] else "FUTURES"
                continue
            if doc.get("t") != "recv" or conns.get(doc["conn"]) != "FUTURES":
                continue
            msg = json.loads(doc["data"])
            if not str(msg.get("topic", "")).startswith("tickers."):
                continue
            sym = msg["data"]["symbol"]
            if msg["type"] == "snapshot":
                reference[sym] = dict(msg["data"])
            else:
                reference[sym].update(msg["data"])
            q = n.on_message("FUTURES", msg, 1)
            assert q is not None, msg
            ref = reference[sym]
            assert q.price == float(ref["lastPrice"])
            assert q.bid == float(ref["bid1Price"]) and q.ask == float(ref["ask1Price"])
            assert q.mark_price == float(ref["markPrice"])
            assert q.index_price == float(ref["indexPrice"])
            assert q.open_interest == float(ref["openInterest"])
            assert q.volume == float(ref["volume24h"]) and q.turnover == float(ref["turnover24h"])
            assert q.high24h == float(ref["highPrice24h"]) and q.low24h == float(ref["lowPrice24h"])
            assert q.funding_rate == float(ref["fundingRate"])
            assert q.change24h == pytest.approx(float(ref["price24hPcnt"]) * 100)
            assert q.ts == msg["ts"] and q.seq == msg["cs"]
            checked += 1
    assert checked == 4 + 754  # 4 snapshots and 754 deltas, per the recording's README
    assert n.stats.dropped_deltas == 0 and n.stats.stale_frames == 0


# --- the typed fast path gives exactly what the dict path gives ------------------------------


def _both_paths(frames: list[tuple[Market, bytes]]) -> tuple[int, int]:
    """Feed ``frames`` to two normalizers, one through the dict path only, one the way the feed
    does (typed fast path for tickers frames, dict path for the rest); every result and every
    counter must agree. Returns (frames the fast path decoded, frames it handed back)."""
    reference, fast = BybitNormalizer(), BybitNormalizer()
    decoded = handed_back = 0
    for i, (market, raw) in enumerate(frames):
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(msg, dict) or "topic" not in msg:
            continue
        want = reference.on_message(market, msg, i)
        got: Any = NOT_DECODED
        if raw.startswith(TICKER_PREFIX):
            got = fast.ticker_from_bytes(market, raw, i)
            if got is NOT_DECODED:
                handed_back += 1
            else:
                decoded += 1
        if got is NOT_DECODED:
            got = fast.on_message(market, msg, i)
        assert got == want, raw
        assert fast.stats == reference.stats, raw
    return decoded, handed_back


def test_fast_path_equals_dict_path_on_the_real_recording(recording: Path) -> None:
    conns: dict[str, Market] = {"BYBIT.ws.2": "FUTURES", "BYBIT.ws.3": "SPOT"}
    frames: list[tuple[Market, bytes]] = []
    with gzip.open(recording, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("t") == "recv" and rec.get("conn") in conns:
                frames.append((conns[rec["conn"]], rec["data"].encode()))
    decoded, handed_back = _both_paths(frames)
    assert decoded == 4 + 754 + 81  # every tickers frame of the recording took the fast path
    assert handed_back == 0


def test_fast_path_equals_dict_path_on_simulated_frames() -> None:
    rng = random.Random(7)
    walks = simulate._walks(["BTCUSDT", "ETHUSDT", "DOGEUSDT"], rng)
    frames: list[tuple[Market, bytes]] = []
    for w in walks.values():
        frames.append(("FUTURES", simulate.linear_snapshot(w, 1)))
    for ts in range(2, 400):
        for w in walks.values():
            w.step(rng)
            frames.append(("FUTURES", simulate.linear_delta(w, ts, rng)))
            frames.extend(("SPOT", f) for f in simulate.spot_frames(w, ts, rng))
    decoded, handed_back = _both_paths(frames)
    assert decoded == 3 + 398 * 3 * 2 and handed_back == 0


ODD_TICKER_DATA: list[str] = [
    '"lastPrice":""',
    '"lastPrice":null',
    '"lastPrice":true',
    '"lastPrice":"NaN"',
    '"lastPrice":"inf"',
    '"lastPrice":"-Infinity"',
    '"lastPrice":"1_000"',
    '"lastPrice":" 5"',
    '"lastPrice":"abc"',
    '"lastPrice":7',
    '"lastPrice":7.5',
    '"lastPrice":[1]',
    '"markPrice":""',
    '"markPrice":"nan"',
    '"bid1Price":"12","ask1Price":""',
    '"price24hPcnt":"0.0123"',
    '"price24hPcnt":"-inf"',
    '"fundingRate":"-0.00012345"',
    '"symbol":5',
    '"symbol":""',
]
ODD_ENVELOPES: list[str] = [
    '"type":"delta","cs":{cs},"ts":{ts}',
    '"type":"snapshot","cs":{cs},"ts":{ts}',
    '"type":"delta","cs":"{cs}","ts":"{ts}"',
    '"type":"delta","cs":{cs}',
    '"type":"delta","cs":{cs},"ts":null',
    '"type":"delta","cs":{cs},"ts":{ts}.0',
    '"type":"delta","cs":{cs},"ts":{ts}.5',
    '"type":"delta","cs":"","ts":{ts}',
    '"type":"other","cs":{cs},"ts":{ts}',
    '"type":"delta","cs":1,"ts":{ts}',
]


def test_fast_path_equals_dict_path_on_odd_frames() -> None:
    """Odd values and envelopes (strings where numbers go, "", null, NaN, float ts, stale cs...):
    the fast path either gives the dict path's answer or hands the frame back to it."""
    frames: list[tuple[Market, bytes]] = []
    for market in ("FUTURES", "SPOT"):
        frames.append((market, orjson.dumps({**LINEAR_SNAPSHOT, "cs": 100, "ts": 1000})))
        n = 0
        for env in ODD_ENVELOPES:
            for body in ODD_TICKER_DATA:
                n += 1
                head = env.format(cs=100 + n, ts=1000 + n)
                data = body if body.startswith('"symbol"') else f'"symbol":"BTCUSDT",{body}'
                raw = f'{{"topic":"tickers.BTCUSDT",{head},"data":{{{data}}}}}'
                frames.append((market, raw.encode()))
    decoded, handed_back = _both_paths(frames)
    assert decoded > 50 and handed_back > 50  # both branches were exercised
