"""``sowcli.query`` and ``sow query`` against a real QuestDB, with rows of known values.

The rows go in over ILP/HTTP (as ``sow persist`` writes them) under symbols no other test uses,
then every query is checked against numbers worked out by hand. Hostile input must end in exit
code 2 with one clear line and no traceback, and must leave the tables as they were.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sowcli import query
from sowcli.errors import UpstreamError, UsageError
from sowcli.infra import ServerProcess
from sowcli.sinks.questdb import MARKET_DATA_DDL
from sowcli.timeparse import OHLC_INTERVALS, TimeRange, parse_time
from tests.servers import questdb_query, wait_questdb_applied

T0 = datetime(2024, 1, 1, tzinfo=UTC)
A, B = "QRYAUSDT", "QRYBUSDT"  # symbols of this module only


def minute(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


# (symbol, market, minute, price, seq)
ROWS: list[tuple[str, str, float, float, int]] = [
    *[(A, "SPOT", i, 100.0 + i, i) for i in range(10)],  # 00:00..00:09, 100..109
    (A, "SPOT", 30, 120.0, 10),  # a gap 00:10..00:29, then 00:30
    (A, "FUTURES", 5, 200.0, 1),
    (A, "FUTURES", 6, 201.0, 2),
    (B, "SPOT", 1, 5.0, 1),
    (B, "SPOT", 2, 6.0, 2),
]


def _ilp_conf(server: ServerProcess) -> str:
    return server.questdb_http_url.replace("http://", "http::addr=") + ";"


@pytest.fixture(scope="module")
def qdb(questdb_server: ServerProcess) -> Iterator[ServerProcess]:
    """The session QuestDB with ``market_data`` created and this module's rows applied."""
    from questdb.ingress import Sender, TimestampNanos

    questdb_query(questdb_server, " ".join(MARKET_DATA_DDL.split()))
    with Sender.from_conf(_ilp_conf(questdb_server)) as sender:
        for symbol, market, n, price, seq in ROWS:
            ts = minute(n)
            sender.row(
                "market_data",
                symbols={"symbol": symbol, "market": market},
                columns={"price": price, "volume": 1000.0 + seq, "seq": seq},
                at=TimestampNanos(int(ts.timestamp()) * 1_000_000_000),
            )
    wait_questdb_applied(questdb_server, "market_data")
    yield questdb_server


async def _with(server: ServerProcess, work: Any) -> Any:
    return await query.with_connection(server.questdb_url, work)


def prices(rows: query.Rows) -> list[float]:
    i = rows.columns.index("price")
    return [r[i] for r in rows.rows]


# --- the library -----------------------------------------------------------------------------


async def test_latest_gives_the_newest_row_per_symbol_and_market(qdb: ServerProcess) -> None:
    rows = await _with(qdb, lambda db: query.latest(db, symbol=A))
    got = {(d["market"], d["price"], d["timestamp"]) for d in rows.dicts()}
    assert got == {("FUTURES", 201.0, minute(6)), ("SPOT", 120.0, minute(30))}
    assert [d["market"] for d in rows.dicts()] == ["FUTURES", "SPOT"]  # ordered by symbol, market

    spot = await _with(qdb, lambda db: query.latest(db, market="spot"))
    mine = {d["symbol"]: d["price"] for d in spot.dicts() if d["symbol"] in (A, B)}
    assert mine == {A: 120.0, B: 6.0}
    assert all(d["market"] == "SPOT" for d in spot.dicts())


async def test_history_range_limit_and_order(qdb: ServerProcess) -> None:
    rng = TimeRange(minute(0), minute(10))
    rows = await _with(qdb, lambda db: query.history(db, "qryausdt", "spot", rng, limit=3))
    assert prices(rows) == [109.0, 108.0, 107.0]  # the newest 3, newest first
    assert rows.truncated

    oldest = await _with(
        qdb, lambda db: query.history(db, A, "SPOT", rng, limit=3, newest_first=False)
    )
    assert prices(oldest) == [107.0, 108.0, 109.0]

    # [from, to): the row at `to` is out, the row at `from` is in
    window = TimeRange(minute(2), minute(5))
    rows = await _with(qdb, lambda db: query.history(db, A, "SPOT", window, limit=100))
    assert prices(rows) == [104.0, 103.0, 102.0]
    assert not rows.truncated
    assert rows.rows[0][0] == minute(4)  # aware UTC datetimes


async def test_stats_numbers(qdb: ServerProcess) -> None:
    rows = await _with(
        qdb,
        lambda db: query.stats(db, A, "SPOT", window=timedelta(hours=2), now=minute(60)),
    )
    s = rows.dicts()[0]
    assert s["count"] == 11
    assert (s["first"], s["last"], s["min"], s["max"]) == (100.0, 120.0, 100.0, 120.0)
    assert s["avg"] == pytest.approx((sum(range(100, 110)) + 120) / 11)
    assert s["change"] == 20.0
    assert s["change_pct"] == pytest.approx(20.0)
    assert (s["from"], s["to"]) == (minute(-60), minute(60))

    empty = await _with(
        qdb, lambda db: query.stats(db, B, "FUTURES", window=timedelta(hours=1), now=minute(60))
    )
    e = empty.dicts()[0]
    assert e["count"] == 0 and e["first"] is None and e["change_pct"] is None


async def test_ohlc_buckets_and_fill(qdb: ServerProcess) -> None:
    five = OHLC_INTERVALS["5m"]
    rng = TimeRange(minute(0), minute(35))

    plain = await _with(qdb, lambda db: query.ohlc(db, A, "SPOT", five, rng))
    assert plain.columns == ("timestamp", "open", "high", "low", "close", "ticks")
    assert plain.rows == [
        (minute(0), 100.0, 104.0, 100.0, 104.0, 5),
        (minute(5), 105.0, 109.0, 105.0, 109.0, 5),
        (minute(30), 120.0, 120.0, 120.0, 120.0, 1),
    ]

    nulls = await _with(qdb, lambda db: query.ohlc(db, A, "SPOT", five, rng, fill="null"))
    assert [r[0] for r in nulls.rows] == [minute(m) for m in range(0, 35, 5)]
    assert nulls.rows[2] == (minute(10), None, None, None, None, 0)

    prev = await _with(qdb, lambda db: query.ohlc(db, A, "SPOT", five, rng, fill="prev"))
    assert len(prev.rows) == 7
    for m in (10, 15, 20, 25):  # the gap carries the previous close
        assert prev.rows[m // 5] == (minute(m), 109.0, 109.0, 109.0, 109.0, 0)
    assert prev.rows[6] == (minute(30), 120.0, 120.0, 120.0, 120.0, 1)

    # A range starting inside the gap: the first bucket is seeded with the last price before it,
    # and an unaligned start still gives calendar-aligned buckets.
    late = TimeRange(minute(12.5), minute(31))
    seeded = await _with(qdb, lambda db: query.ohlc(db, A, "SPOT", five, late, fill="prev"))
    assert seeded.rows[0] == (minute(10), 109.0, 109.0, 109.0, 109.0, 0)
    assert seeded.rows[-1] == (minute(30), 120.0, 120.0, 120.0, 120.0, 1)

    hourly = await _with(
        qdb,
        lambda db: query.ohlc(
            db, A, "SPOT", OHLC_INTERVALS["1h"], TimeRange(minute(0), minute(60))
        ),
    )
    assert hourly.rows == [(minute(0), 100.0, 120.0, 100.0, 120.0, 11)]


async def test_sql_runs_read_only_queries(qdb: ServerProcess) -> None:
    rows = await _with(
        qdb,
        lambda db: query.sql(
            db, f"SELECT count() AS n FROM market_data WHERE symbol = '{A}'; -- trailing"
        ),
    )
    assert rows.dicts() == [{"n": 11 + 2}]
    capped = await _with(
        qdb,
        lambda db: query.sql(db, f"SELECT price FROM market_data WHERE symbol = '{A}'", max_rows=4),
    )
    assert len(capped) == 4 and capped.truncated
    with pytest.raises(UsageError, match="QuestDB has no table"):
        await _with(qdb, lambda db: query.sql(db, "SELECT * FROM no_such_table"))
    with pytest.raises(UsageError, match="rejected"):
        await _with(qdb, lambda db: query.sql(db, "SELECT nonsense( FROM market_data"))


@pytest.mark.parametrize(
    "text",
    [
        "DROP TABLE market_data",
        "SELECT 1; DROP TABLE market_data",
        "select 1;select 2",
        "INSERT INTO market_data VALUES (now(), 'X', 'SPOT')",
        "WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a",
        "UPDATE market_data SET price = 0",
        "ALTER TABLE market_data DROP COLUMN price",
        "TRUNCATE TABLE market_data",
        "/* SELECT */ DROP TABLE x",
        "",
        " ; ",
    ],
)
def test_check_read_only_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="sql:"):
        query.check_read_only(text)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 'DROP TABLE x; --' AS s FROM market_data",
        'SELECT "update" FROM t',
        "select * from market_data -- drop it\n",
        "SHOW TABLES",
        "EXPLAIN SELECT * FROM market_data",
        "WITH x AS (SELECT 1 AS a) SELECT a FROM x;",
    ],
)
def test_check_read_only_allows(text: str) -> None:
    assert query.check_read_only(text)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: query.check_symbol("BTC'; DROP TABLE x"), "not a valid symbol"),
        (lambda: query.check_market("margin"), "not a market"),
        (lambda: query.check_limit(10_001), "between 1 and 10,000"),
        (lambda: query.check_range(TimeRange(minute(5), minute(1))), "must be before"),
    ],
)
def test_validation_raises_usage_errors(call: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        call()


async def test_ohlc_refuses_too_many_buckets(qdb: ServerProcess) -> None:
    rng = TimeRange(T0, T0 + timedelta(days=60))
    with pytest.raises(UsageError, match="buckets"):
        await _with(qdb, lambda db: query.ohlc(db, A, "SPOT", OHLC_INTERVALS["1m"], rng))


async def test_pool_works_like_a_connection(qdb: ServerProcess) -> None:
    async with query.open_pool(qdb.questdb_url, max_size=2) as pool:
        results = await asyncio.gather(
            *(query.latest(pool, symbol=A, market="FUTURES") for _ in range(5))
        )
    assert all(prices(r) == [201.0] for r in results)


async def test_unreachable_questdb_is_an_upstream_error() -> None:
    from sowcli.infra import free_port

    with pytest.raises(UpstreamError, match="cannot reach QuestDB"):
        await query.connect(f"postgres://admin:quest@127.0.0.1:{free_port()}/qdb", timeout_s=2)


# --- the command line ------------------------------------------------------------------------


def run_sow(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """``sow ARGS`` in-process through ``sowcli.cli.main`` (exit code, stdout, stderr)."""
    from sowcli.cli import app, main
    from sowcli.cli import query as query_cli

    if not any(g.name == "query" for g in app.registered_groups):  # until the lead registers it
        app.add_typer(query_cli.app, name="query")
    for key, value in (env or {}).items():
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


@pytest.fixture
def sow(
    qdb: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    def run(*args: str) -> tuple[int, str, str]:
        return run_sow(monkeypatch, capsys, *args, env={"QUESTDB_URL": qdb.questdb_url})

    return run


HOSTILE = [
    (["history", "--symbol", "BTC'; DROP TABLE market_data; --"], "not a valid symbol"),
    (["stats", "--symbol", "BTCUSDT' OR '1'='1"], "not a valid symbol"),
    (["history", "--symbol", A, "--market", "margin"], "not a market"),
    (["ohlc", "--symbol", A, "--interval", "2h"], "not a valid interval"),
    (["ohlc", "--symbol", A, "--interval", "1h; DROP TABLE market_data"], "not a valid interval"),
    (["history", "--symbol", A, "--from", "2024-01-02", "--to", "2024-01-01"], "must be before"),
    (["history", "--symbol", A, "--from", "2024-13-01"], "not a valid time"),
    (["history", "--symbol", A, "--limit", "1000000"], "between 1 and 10,000"),
    (["stats", "--symbol", A, "--window", "forever"], "not a valid duration"),
    (["ohlc", "--symbol", A, "--since", "7d", "--from", "2024-01-01"], "one of them"),
    (["latest", "--format", "xml"], "choose from table, json, csv"),
    (["sql", "DROP TABLE market_data"], "read-only"),
    (["sql", "SELECT 1; DROP TABLE market_data"], "one statement"),
    (["sql", "SELECT * FROM missing_table_x"], "no table"),
]


@pytest.mark.parametrize(("args", "message"), HOSTILE, ids=[" ".join(a)[:40] for a, _ in HOSTILE])
def test_hostile_input_exits_2_with_a_clear_message(
    sow: Any, qdb: ServerProcess, args: list[str], message: str
) -> None:
    mine = f"SELECT count() FROM market_data WHERE symbol IN ('{A}', '{B}')"
    before = questdb_query(qdb, mine)
    code, out, err = sow("query", *args)
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) <= 2
    assert questdb_query(qdb, mine) == before  # the table is still there, rows unchanged


def test_json_and_csv_output_parse(sow: Any) -> None:
    code, out, _ = sow(
        "query",
        "history",
        "--symbol",
        A,
        "--from",
        "2024-01-01T00:00:00Z",
        "--to",
        "2024-01-01T00:05:00Z",
        "--format",
        "json",
    )
    assert code == 0
    docs = json.loads(out)
    assert [d["price"] for d in docs] == [104.0, 103.0, 102.0, 101.0, 100.0]
    assert docs[0]["timestamp"] == "2024-01-01T00:04:00Z"

    code, out, _ = sow(
        "query",
        "ohlc",
        "--symbol",
        A,
        "--interval",
        "5m",
        "--from",
        "2024-01-01",
        "--to",
        "1704069300000",
        "--fill",
        "-f",
        "csv",
    )
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["timestamp"] for r in table] == [
        f"2024-01-01T00:{m:02d}:00Z" for m in range(0, 35, 5)
    ]
    assert table[0] == {
        "timestamp": "2024-01-01T00:00:00Z",
        "open": "100.0",
        "high": "104.0",
        "low": "100.0",
        "close": "104.0",
        "ticks": "5",
    }
    assert table[3]["close"] == "109.0" and table[3]["ticks"] == "0"

    code, out, _ = sow("query", "stats", "--symbol", A, "--window", "1d", "-f", "json")
    assert code == 0 and json.loads(out)[0]["symbol"] == A

    code, out, _ = sow(
        "query", "sql", f"SELECT symbol, price FROM market_data WHERE symbol = '{B}'", "-f", "json"
    )
    assert code == 0 and json.loads(out) == [
        {"symbol": B, "price": 5.0},
        {"symbol": B, "price": 6.0},
    ]


def test_table_output(sow: Any) -> None:
    code, out, err = sow("query", "latest", "--symbol", A)
    assert code == 0, err
    assert "FUTURES" in out and "201" in out and "120" in out
    assert "mark_price" not in out  # columns null on every row are left out of the table


def test_ohlc_works_as_written(sow: Any) -> None:
    code, out, err = sow("query", "ohlc", "--symbol", "BTCUSDT")
    assert code == 0, err
    assert "open" in out and "close" in out


def test_unreachable_questdb_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sowcli.infra import free_port

    url = f"postgres://admin:quest@127.0.0.1:{free_port()}/qdb"
    code, _, err = run_sow(monkeypatch, capsys, "query", "latest", env={"QUESTDB_URL": url})
    assert code == 1
    assert "cannot reach QuestDB" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["latest", "history", "stats", "ohlc", "sql"])
def test_every_command_has_help_with_an_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, _ = run_sow(monkeypatch, capsys, "query", command, "--help")
    assert code == 0
    assert "Examples:" in out and f"sow query {command}" in out


def test_missing_table_is_a_clear_message(
    fresh_questdb_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"QUESTDB_URL": fresh_questdb_server.questdb_url}
    code, _, err = run_sow(monkeypatch, capsys, "query", "latest", env=env)
    assert code == 1
    assert "no table market_data yet" in err and "sow persist" in err
    assert "Traceback" not in err


def test_time_parsing_forms() -> None:
    now = datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("now", now=now) == now
    assert parse_time("1704067200") == T0  # epoch seconds
    assert parse_time("1704067200000") == T0  # epoch ms
    assert parse_time("2024-01-01") == T0
    assert parse_time("2024-01-01T02:00:00+02:00") == T0
    assert parse_time("2024-01-01T00:00Z") == T0
    with pytest.raises(UsageError, match=r"--from '2024-13-01': not a valid time \(ISO-8601"):
        parse_time("2024-13-01", param="--from")
