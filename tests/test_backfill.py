"""``sow backfill`` against the fake Bybit REST server and a real QuestDB (and a real Redis).

The fake's clock is frozen (``now_ms``), so the candles it serves, including the running one, are
known exactly; every test uses its own symbols because the ``candles`` table is shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sowcli import query
from sowcli.backfill import (
    KLINE_PATH,
    PAGE_CANDLES,
    backfill_from_cache,
    backfill_klines,
)
from sowcli.config import Settings
from sowcli.errors import ExchangeBanned, UsageError
from sowcli.infra import ServerProcess
from sowcli.model import Quote, encode_quote
from sowcli.timeparse import KLINE_INTERVALS, TimeRange, from_epoch_ms, to_epoch_ms
from tests.fakes.bybit_rest import FakeBybitRest
from tests.servers import questdb_query, wait_questdb_applied

NOW = datetime(2024, 1, 10, 12, 34, 56, tzinfo=UTC)
NOW_MS = to_epoch_ms(NOW)
H1 = KLINE_INTERVALS["1h"]
M1 = KLINE_INTERVALS["1m"]
HOUR_MS = 3_600_000


def settings_for(rest: FakeBybitRest, qdb: ServerProcess, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "bybit_rest_url": rest.url,
        "questdb_url": qdb.questdb_url,
        "questdb_http_url": qdb.questdb_http_url,
        "backfill_requests_per_second": 100.0,
    }
    values.update(extra)
    return dataclasses.replace(Settings(), **values)


async def stored(
    qdb: ServerProcess, symbol: str, interval: Any = H1, market: str = "SPOT"
) -> list[tuple[Any, ...]]:
    await asyncio.to_thread(wait_questdb_applied, qdb, "candles")
    rng = TimeRange(datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    rows = await query.with_connection(
        qdb.questdb_url, lambda db: query.candles(db, symbol, market, interval, rng)
    )
    return rows.rows


def expected(
    rest: FakeBybitRest, symbol: str, code: str, opens: range, category: str = "spot"
) -> list[tuple[Any, ...]]:
    """The rows the fake serves for candles opening at ``opens``, as ``query.candles`` returns them."""
    out = []
    for open_ms in opens:
        row = rest.kline_row(category, symbol, code, open_ms)
        out.append(tuple(float(v) for v in row[1:7]))
    return out


def kline_requests(rest: FakeBybitRest, symbol: str | None = None) -> list[dict[str, str]]:
    """The kline requests the fake received (for ``symbol`` only, if given)."""
    return [
        p
        for path, p in rest.requests
        if path == KLINE_PATH and (symbol is None or p.get("symbol") == symbol)
    ]


# --- klines ----------------------------------------------------------------------------------


async def test_rows_match_the_fake_and_a_rerun_changes_nothing(
    questdb_server: ServerProcess,
) -> None:
    sym = "BFAUSDT"
    start = datetime(2024, 1, 1, tzinfo=UTC)
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        settings = settings_for(rest, questdb_server)
        report = await backfill_klines(settings, [sym], "spot", H1, start=start)
        assert report.errors == []
        # 2024-01-01 00:00 .. 2024-01-10 11:00 are closed; 12:00 is running and is skipped
        opens = range(
            to_epoch_ms(start), to_epoch_ms(datetime(2024, 1, 10, 12, tzinfo=UTC)), HOUR_MS
        )
        assert report.rows == len(opens) == 228
        assert report.symbols[0].skipped_unclosed == 1

        rows = await stored(questdb_server, sym)
        assert [r[0] for r in rows] == [from_epoch_ms(ms) for ms in opens]
        assert [r[4:10] for r in rows] == expected(rest, sym, "60", opens)
        assert {(r[1], r[2], r[3]) for r in rows} == {(sym, "SPOT", "1h")}
        assert datetime(2024, 1, 10, 12, tzinfo=UTC) not in {r[0] for r in rows}

        again = await backfill_klines(settings, [sym], "spot", H1, start=start)
        assert again.rows == 228
        assert await stored(questdb_server, sym) == rows  # DEDUP: same rows, same count


async def test_resume_continues_after_the_newest_candle(questdb_server: ServerProcess) -> None:
    sym = "BFBUSDT"
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        settings = settings_for(rest, questdb_server)
        first = await backfill_klines(
            settings, [sym], "spot", H1, start=datetime(2024, 1, 9, tzinfo=UTC)
        )
        assert first.rows == 36  # 2024-01-09 00:00 .. 2024-01-10 11:00
        await asyncio.to_thread(wait_questdb_applied, questdb_server, "candles")

        rest.requests.clear()
        rest.now_ms = NOW_MS + 3 * HOUR_MS  # three hours later: 12:00, 13:00, 14:00 have closed
        resumed = await backfill_klines(settings, [sym], "spot", H1)
        assert resumed.symbols[0].resumed
        assert resumed.rows == 3
        sent = kline_requests(rest, sym)
        assert len(sent) == 1
        assert int(sent[0]["start"]) == to_epoch_ms(datetime(2024, 1, 10, 12, tzinfo=UTC))
        rows = await stored(questdb_server, sym)
        assert len(rows) == 39
        assert rows[-1][0] == datetime(2024, 1, 10, 14, tzinfo=UTC)

        rest.requests.clear()
        idle = await backfill_klines(settings, [sym], "spot", H1)  # nothing new has closed
        assert idle.rows == 0 and len(kline_requests(rest, sym)) == 1


async def test_without_history_or_from_it_takes_the_last_1000_candles(
    questdb_server: ServerProcess,
) -> None:
    sym = "BFCUSDT"
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        report = await backfill_klines(settings_for(rest, questdb_server), [sym], "futures", H1)
        assert report.rows == 999  # 1000 candles of range, the running one skipped
        sent = kline_requests(rest, sym)
        assert [p["category"] for p in sent] == ["linear"]
        assert len(await stored(questdb_server, sym, market="FUTURES")) == 999


async def test_pages_are_fixed_windows_of_1000_candles(questdb_server: ServerProcess) -> None:
    sym = "BFDUSDT"
    start = datetime(2024, 1, 8, tzinfo=UTC)
    end = start + timedelta(minutes=2500)
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        report = await backfill_klines(
            settings_for(rest, questdb_server), [sym], "spot", M1, start=start, end=end
        )
        assert report.rows == 2500
        sent = kline_requests(rest, sym)
        s0 = to_epoch_ms(start)
        window = PAGE_CANDLES * 60_000
        assert [(int(p["start"]), int(p["end"]), p["limit"]) for p in sent] == [
            (s0, s0 + window - 1, "1000"),
            (s0 + window, s0 + 2 * window - 1, "1000"),
            (s0 + 2 * window, to_epoch_ms(end) - 1, "1000"),
        ]
        rows = await stored(questdb_server, sym, M1)
        opens = range(s0, to_epoch_ms(end), 60_000)
        assert [r[0] for r in rows] == [from_epoch_ms(ms) for ms in opens]
        assert [r[4:10] for r in rows] == expected(rest, sym, "1", opens)


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_429_and_5xx_are_retried(questdb_server: ServerProcess, status: int) -> None:
    sym = f"BFE{status}USDT"
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        rest.fail_next(2, status, path=KLINE_PATH)
        report = await backfill_klines(
            settings_for(rest, questdb_server),
            [sym],
            "spot",
            H1,
            start=datetime(2024, 1, 10, tzinfo=UTC),
            retry_initial_s=0.01,
        )
        assert report.errors == [] and report.rows == 12
        assert len(kline_requests(rest, sym)) == 3  # two failures, then the answer


async def test_timeouts_are_retried(questdb_server: ServerProcess) -> None:
    sym = "BFFUSDT"
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        rest.timeout_next(1, path=KLINE_PATH)
        report = await backfill_klines(
            settings_for(rest, questdb_server),
            [sym],
            "spot",
            H1,
            start=datetime(2024, 1, 10, tzinfo=UTC),
            retry_initial_s=0.01,
            request_timeout_s=0.5,
        )
        assert report.errors == [] and report.rows == 12
        assert len(kline_requests(rest, sym)) == 2


async def test_retries_are_capped(questdb_server: ServerProcess) -> None:
    sym = "BFGUSDT"
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        rest.fail_next(50, 503, path=KLINE_PATH)
        report = await backfill_klines(
            settings_for(rest, questdb_server),
            [sym],
            "spot",
            H1,
            start=datetime(2024, 1, 10, tzinfo=UTC),
            retry_initial_s=0.01,
            attempts=3,
        )
        assert report.errors == [f"{sym}: Bybit kept failing after 3 attempts: HTTP 503"]
        assert len(kline_requests(rest, sym)) == 3


async def test_403_stops_at_once_with_the_ban_message(questdb_server: ServerProcess) -> None:
    syms = ["BFHUSDT", "BFIUSDT", "BFJUSDT"]
    async with FakeBybitRest(valid_symbols=set(syms), now_ms=NOW_MS) as rest:
        rest.fail_next(1, 403, path=KLINE_PATH)
        with pytest.raises(ExchangeBanned, match=r"banned .* at least 10 minutes"):
            await backfill_klines(
                settings_for(rest, questdb_server),
                syms,
                "spot",
                M1,
                start=datetime(2024, 1, 1, tzinfo=UTC),
                retry_initial_s=0.01,
                concurrency=1,
            )
        assert len(kline_requests(rest)) == 1  # no retry, no other symbol


async def test_retcode_error_names_the_symbol_and_the_others_go_on(
    questdb_server: ServerProcess,
) -> None:
    good = "BFKUSDT"
    async with FakeBybitRest(valid_symbols={good}, now_ms=NOW_MS) as rest:
        report = await backfill_klines(
            settings_for(rest, questdb_server),
            ["ETHX", good],
            "spot",
            H1,
            start=datetime(2024, 1, 10, tzinfo=UTC),
        )
        assert report.errors == ["ETHX: Bybit retCode 10001 params error: symbol invalid"]
        assert {s.symbol: s.rows for s in report.symbols} == {"ETHX": 0, good: 12}
        assert len(await stored(questdb_server, good)) == 12


async def test_retcode_10006_is_a_rate_limit_and_retried(questdb_server: ServerProcess) -> None:
    sym = "BFLUSDT"
    busy = json.dumps(
        {
            "retCode": 10006,
            "retMsg": "Too many visits!",
            "result": {},
            "retExtInfo": {},
            "time": NOW_MS,
        }
    )
    async with FakeBybitRest(valid_symbols={sym}, now_ms=NOW_MS) as rest:
        rest.fail_next(1, 200, path=KLINE_PATH, body=busy)
        report = await backfill_klines(
            settings_for(rest, questdb_server),
            [sym],
            "spot",
            H1,
            start=datetime(2024, 1, 10, tzinfo=UTC),
            retry_initial_s=0.01,
        )
        assert report.errors == [] and report.rows == 12


async def test_rate_limiter_keeps_under_the_configured_rate(questdb_server: ServerProcess) -> None:
    syms = ["BFMUSDT", "BFNUSDT"]
    async with FakeBybitRest(valid_symbols=set(syms), now_ms=NOW_MS) as rest:
        settings = settings_for(rest, questdb_server, backfill_requests_per_second=5.0)
        await backfill_klines(
            settings,
            syms,
            "spot",
            M1,
            start=datetime(2024, 1, 1, tzinfo=UTC),
            end=datetime(2024, 1, 3, 12, tzinfo=UTC),  # 3,600 minutes each: 4 pages each
        )
        assert len(rest.requests) == 8
        # a bucket of 5 tokens refilled at 5/s: never more than 5 + 5 requests in any second
        assert rest.max_requests_in(1.0) <= 10


async def test_settings_over_bybit_limits_are_refused(questdb_server: ServerProcess) -> None:
    async with FakeBybitRest(valid_symbols={"BFOUSDT"}, now_ms=NOW_MS) as rest:
        settings = settings_for(rest, questdb_server, backfill_requests_per_second=500.0)
        with pytest.raises(UsageError, match="at most 100"):
            await backfill_klines(settings, ["BFOUSDT"], "spot", H1)
        assert rest.requests == []


# --- the command line --------------------------------------------------------------------------


def run_sow(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
) -> tuple[int, str, str]:
    from sowcli.cli import app, backfill, main

    if not any(c.name == "backfill" for c in app.registered_commands):  # until the lead does
        app.command("backfill", epilog=backfill.EPILOG)(backfill.command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SOW_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["sow", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli_env(rest: FakeBybitRest, qdb: ServerProcess) -> dict[str, str]:
    return {
        "SOW_BYBIT_REST_URL": rest.url,
        "QUESTDB_URL": qdb.questdb_url,
        "QUESTDB_HTTP_URL": qdb.questdb_http_url,
        "SOW_BACKFILL_REQUESTS_PER_SECOND": "100",
    }


async def test_cli_reports_a_bad_symbol_and_stores_the_good_one(
    questdb_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = "BFPUSDT"
    async with FakeBybitRest(valid_symbols={good}) as rest:
        args = [
            "backfill",
            "--symbols",
            f"{good},ETHX",
            "--interval",
            "60",
            "--from",
            "2024-01-10",
            "--to",
            "2024-01-11",
        ]
        code, _, err = await asyncio.to_thread(
            run_sow, monkeypatch, capsys, args, cli_env(rest, questdb_server)
        )
    assert code == 1
    assert "ETHX: Bybit retCode 10001 params error: symbol invalid" in err
    assert f"{good} SPOT 1h" in err and "24 candles stored" in err
    assert "Traceback" not in err
    assert len(await stored(questdb_server, good)) == 24


async def test_cli_403_exits_with_the_ban_message(
    questdb_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with FakeBybitRest(valid_symbols={"BFQUSDT"}) as rest:
        rest.fail_next(1, 403)
        args = ["backfill", "--symbol", "BFQUSDT", "--no-progress"]
        code, _, err = await asyncio.to_thread(
            run_sow, monkeypatch, capsys, args, cli_env(rest, questdb_server)
        )
    assert code == 1
    assert "HTTP 403" in err and "10 minutes" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "7m"], "not a Bybit kline interval"),
        (["--market", "options"], "not a market"),
        (["--symbol", "BTC'; DROP TABLE candles"], "not a valid symbol"),
        (["--from", "2024-02-01", "--to", "2024-01-01"], "must be before"),
        (["--from", "yesterday"], "not a valid time"),
        (["--rate", "1000"], "at most 100"),
    ],
)
async def test_cli_bad_options_exit_2(
    questdb_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    async with FakeBybitRest(valid_symbols={"BTCUSDT"}) as rest:
        full = ["backfill", *(["--symbol", "BTCUSDT"] if "--symbol" not in args else []), *args]
        code, _, err = await asyncio.to_thread(
            run_sow, monkeypatch, capsys, full, cli_env(rest, questdb_server)
        )
        assert rest.requests == []
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_cli_help_has_examples(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_sow(monkeypatch, capsys, ["backfill", "--help"], {})
    assert (
        code == 0
        and "Examples:" in out
        and "sow backfill --symbol" in out
        and "--from-cache" in out
    )


# --- --from-cache ------------------------------------------------------------------------------


def quote(symbol: str, market: str, ts: datetime, price: float, seq: int) -> Quote:
    return Quote(
        symbol=symbol,
        market=market,  # type: ignore[arg-type]
        price=price,
        volume=10.0,
        bid=price - 0.5 if market == "SPOT" else None,
        ts=to_epoch_ms(ts),
        recv_us=to_epoch_ms(ts) * 1000 + 7,
        seq=seq,
    )


async def test_from_cache_moves_history_and_timeseries_once(
    questdb_server: ServerProcess, redis_server: ServerProcess
) -> None:
    import redis.asyncio as aioredis

    sym = "CACHEAUSDT"
    day = datetime(2024, 2, 1, tzinfo=UTC)
    quotes = [quote(sym, "SPOT", day + timedelta(seconds=i), 50.0 + i, 1000 + i) for i in range(30)]
    fut = [quote(sym, "FUTURES", day + timedelta(seconds=i), 60.0 + i, 2000 + i) for i in range(5)]
    client = aioredis.from_url(redis_server.redis_url)
    try:
        # history: the newest 20 (newest first); timeseries: all 30 -> 10..29 overlap
        await client.lpush(f"history:spot:{sym}", *[encode_quote(q) for q in quotes[10:]])
        await client.zadd(
            f"timeseries:spot:{sym}:2024-02-01", {encode_quote(q): q.ts for q in quotes}
        )
        await client.lpush(f"history:spot:{sym}", b"not a quote")
        await client.lpush(f"history:futures:{sym}", *[encode_quote(q) for q in fut])
    finally:
        await client.aclose()

    settings = dataclasses.replace(
        Settings(),
        dragonfly_url=redis_server.redis_url,
        questdb_url=questdb_server.questdb_url,
        questdb_http_url=questdb_server.questdb_http_url,
    )
    report = await backfill_from_cache(settings, symbols=[sym])
    assert (report.streams, report.written, report.invalid) == (2, 35, 1)

    def rows() -> list[list[Any]]:
        wait_questdb_applied(questdb_server, "market_data")
        return questdb_query(
            questdb_server,
            f"SELECT timestamp, market, price, bid, seq, recv_us FROM market_data WHERE symbol = '{sym}' "
            "ORDER BY market, timestamp",
        )

    first = await asyncio.to_thread(rows)
    assert len(first) == 35
    spot = [r for r in first if r[1] == "SPOT"]
    assert [r[2] for r in spot] == [q.price for q in quotes]
    assert spot[0] == ["2024-02-01T00:00:00.000000Z", "SPOT", 50.0, 49.5, 1000, quotes[0].recv_us]
    assert [r[3] for r in first if r[1] == "FUTURES"] == [None] * 5

    again = await backfill_from_cache(settings, symbols=[sym], market="spot")
    assert again.streams == 1
    assert await asyncio.to_thread(rows) == first  # DEDUP: nothing duplicated


async def test_cli_from_cache(
    questdb_server: ServerProcess,
    redis_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis.asyncio as aioredis

    sym = "CACHEBUSDT"
    day = datetime(2024, 2, 2, tzinfo=UTC)
    quotes = [quote(sym, "FUTURES", day + timedelta(seconds=i), 7.0 + i, 10 + i) for i in range(4)]
    client = aioredis.from_url(redis_server.redis_url)
    try:
        await client.lpush(f"history:futures:{sym}", *[encode_quote(q) for q in quotes])
    finally:
        await client.aclose()
    env = {
        "DRAGONFLY_URL": redis_server.redis_url,
        "QUESTDB_URL": questdb_server.questdb_url,
        "QUESTDB_HTTP_URL": questdb_server.questdb_http_url,
    }
    args = ["backfill", "--from-cache", "--symbol", sym, "--market", "futures", "--no-progress"]
    code, _, err = await asyncio.to_thread(run_sow, monkeypatch, capsys, args, env)
    assert code == 0, err
    assert "copied 4 quotes of 1 streams" in err
    count = await asyncio.to_thread(
        questdb_query, questdb_server, f"SELECT count() FROM market_data WHERE symbol = '{sym}'"
    )
    assert count == [[4]]


@pytest.mark.parametrize(
    ("text", "name", "code"),
    [
        ("1", "1m", "1"),
        ("1m", "1m", "1"),
        ("60", "1h", "60"),
        ("1h", "1h", "60"),
        ("4H", "4h", "240"),
        ("720", "12h", "720"),
        ("D", "1d", "D"),
        ("1d", "1d", "D"),
        ("W", "1w", "W"),
        ("M", "1M", "M"),
        ("1M", "1M", "M"),
        ("1mo", "1M", "M"),
    ],
)
def test_kline_intervals(text: str, name: str, code: str) -> None:
    from sowcli.timeparse import parse_kline_interval

    interval = parse_kline_interval(text)
    assert (interval.name, interval.code) == (name, code)


def test_month_candles_follow_the_calendar() -> None:
    month = KLINE_INTERVALS["1M"]
    dec = to_epoch_ms(datetime(2024, 12, 1, tzinfo=UTC))
    assert from_epoch_ms(month.next_start(dec)) == datetime(2025, 1, 1, tzinfo=UTC)
    with pytest.raises(UsageError, match="not a Bybit kline interval"):
        from sowcli.timeparse import parse_kline_interval

        parse_kline_interval("m")
