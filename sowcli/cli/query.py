"""``sow query latest | history | stats | ohlc | sql``: read QuestDB as a table, JSON or CSV.

The commands parse and check their options (a bad value is one red line and exit code 2), then call
one function of :mod:`sowcli.query`, the SQL module the API shares. ``--format table`` (default)
prints a Rich table; ``json`` (an array of objects, ISO-8601 UTC times) and ``csv`` (a header
line, then rows) are for pipes. Notes (truncated results, empty results) go to stderr so that
stdout stays parseable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from sowcli.cli.options import ConfigOpt, FormatOpt, settings_from
from sowcli.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    import psycopg

    from sowcli.query import Rows

app = typer.Typer(
    help=(
        "Read stored market data from QuestDB: latest quotes, history, stats, OHLC candles, "
        "or your own read-only SQL.\n\nExample: sow query ohlc --symbol BTCUSDT"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

FORMATS = ("table", "json", "csv")
DEFAULT_MARKET = "SPOT"

QuestdbUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--questdb-url",
        help="QuestDB PG-wire URL (env QUESTDB_URL; default postgres://...@localhost:8812/qdb).",
        show_default=False,
    ),
]
SymbolReq = Annotated[str, typer.Option("--symbol", "-s", help="Symbol, e.g. BTCUSDT (any case).")]
MarketOpt = Annotated[str, typer.Option("--market", "-m", help="SPOT or FUTURES (any case).")]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Start: ISO-8601 (UTC if no offset), epoch s/ms, now, or e.g. 7d (ago).",
        show_default=False,
    ),
]
ToOpt = Annotated[
    str | None,
    typer.Option(
        "--to", help="End (exclusive), same forms as --from (default: now).", show_default=False
    ),
]


def _epilog(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def _check_format(fmt: str) -> str:
    norm = fmt.strip().lower()
    if norm not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    return norm


def _run(
    config: Path | None,
    questdb_url: str | None,
    work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Rows]],
) -> Rows:
    import asyncio

    from sowcli.query import with_connection

    settings = settings_from(config, questdb_url=questdb_url)
    return asyncio.run(with_connection(settings.questdb_url, work))


# --- output ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    from datetime import datetime

    from sowcli.timeparse import iso

    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def render(rows: Rows, fmt: str, *, title: str | None = None, note: str | None = None) -> None:
    """Print ``rows`` to stdout as ``table``, ``json`` or ``csv`` (notes to stderr)."""
    import sys

    if fmt == "json":
        import json

        sys.stdout.write(json.dumps([{k: _plain(v) for k, v in d.items()} for d in rows.dicts()]))
        sys.stdout.write("\n")
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(rows.columns)
        for row in rows.rows:
            writer.writerow(["" if v is None else _plain(v) for v in row])
    else:
        _table(rows, title)
    _note(rows, note)


def _note(rows: Rows, note: str | None) -> None:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if not rows.rows:
        err.print("[dim]no rows[/]")
    if rows.truncated and note:
        err.print(f"[yellow]{note}[/]")


def _cell(column: str, value: Any) -> str:
    from datetime import datetime

    from sowcli.ui.format import fmt_pct, fmt_price

    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    if isinstance(value, int):
        return f"{value:,}" if column not in ("seq",) else str(value)
    if isinstance(value, float):
        if column in ("change_pct", "change24h"):
            return fmt_pct(value)
        if column in ("volume", "turnover", "open_interest"):
            return f"{value:,.2f}"
        if column == "funding_rate":
            return f"{value:.6f}"
        return fmt_price(value)
    return str(value)


def _table(rows: Rows, title: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Columns that are null on every row (FUTURES-only fields of SPOT quotes...) only take room.
    keep = [
        i
        for i, c in enumerate(rows.columns)
        if not rows.rows or any(r[i] is not None for r in rows.rows)
    ]
    table = Table(title=title, header_style="bold", show_edge=False, pad_edge=False)
    for i in keep:
        sample = next((r[i] for r in rows.rows if r[i] is not None), None)
        numeric = isinstance(sample, int | float) and not isinstance(sample, bool)
        table.add_column(rows.columns[i], justify="right" if numeric else "left", no_wrap=True)
    for row in rows.rows:
        table.add_row(*(_cell(rows.columns[i], row[i]) for i in keep))
    Console(highlight=False).print(table)


# --- commands --------------------------------------------------------------------------------


@app.command(
    epilog=_epilog(
        "sow query latest",
        "sow query latest --market futures --format json | jq '.[].price'",
        "sow query latest --symbol ETHUSDT",
    )
)
def latest(
    symbol: Annotated[
        str | None, typer.Option("--symbol", "-s", help="Only this symbol.", show_default=False)
    ] = None,
    market: Annotated[
        str | None, typer.Option("--market", "-m", help="Only SPOT or FUTURES.", show_default=False)
    ] = None,
    fmt: FormatOpt = "table",
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The newest stored quote of every symbol and market (QuestDB LATEST ON)."""
    from sowcli import query

    fmt = _check_format(fmt)
    sym = query.check_symbol(symbol, param="--symbol") if symbol is not None else None
    mkt = query.check_market(market, param="--market") if market is not None else None
    rows = _run(config, questdb_url, lambda db: query.latest(db, symbol=sym, market=mkt))
    render(rows, fmt, title="latest quotes")


@app.command(
    epilog=_epilog(
        "sow query history --symbol BTCUSDT                 # the last hour, newest first",
        "sow query history --symbol BTCUSDT --market futures --from 2024-01-01 --to 2024-01-02",
        "sow query history --symbol ETHUSDT --from 15m --limit 50 --format csv > eth.csv",
    )
)
def history(
    symbol: SymbolReq,
    market: MarketOpt = DEFAULT_MARKET,
    start: FromOpt = None,
    end: ToOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="Most rows to show (1-10,000).")
    ] = 1000,
    oldest_first: Annotated[
        bool, typer.Option("--oldest-first", help="List oldest first.")
    ] = False,
    fmt: FormatOpt = "table",
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stored quotes of one symbol in a time range (default: the last hour), newest first."""
    from datetime import timedelta

    from sowcli import query
    from sowcli.timeparse import time_range

    fmt = _check_format(fmt)
    sym = query.check_symbol(symbol, param="--symbol")
    mkt = query.check_market(market, param="--market")
    query.check_limit(limit, param="--limit")
    rng = time_range(start, end, default_span=timedelta(hours=1), params=("--from", "--to"))
    rows = _run(
        config,
        questdb_url,
        lambda db: query.history(db, sym, mkt, rng, limit=limit, newest_first=not oldest_first),
    )
    render(
        rows,
        fmt,
        title=f"{sym} {mkt}",
        note=f"more than {limit:,} rows matched: showing the newest {limit:,} "
        "(raise --limit or narrow --from/--to)",
    )


@app.command(
    epilog=_epilog(
        "sow query stats --symbol BTCUSDT",
        "sow query stats --symbol BTCUSDT --market futures --window 7d --format json",
    )
)
def stats(
    symbol: SymbolReq,
    market: MarketOpt = DEFAULT_MARKET,
    window: Annotated[
        str, typer.Option("--window", "-w", help="Look back this far: e.g. 1h, 24h, 7d.")
    ] = "24h",
    fmt: FormatOpt = "table",
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Price statistics of one symbol over a window: count, first, last, min, max, avg, change %."""
    from sowcli import query
    from sowcli.timeparse import parse_duration

    fmt = _check_format(fmt)
    sym = query.check_symbol(symbol, param="--symbol")
    mkt = query.check_market(market, param="--market")
    span = parse_duration(window, param="--window", max_span=query.MAX_STATS_WINDOW)
    rows = _run(config, questdb_url, lambda db: query.stats(db, sym, mkt, window=span))
    render(rows, fmt, title=f"{sym} {mkt} over {window}")


@app.command(
    epilog=_epilog(
        "sow query ohlc --symbol BTCUSDT                   # 1h candles of the last 7 days, SPOT",
        "sow query ohlc --symbol BTCUSDT --market futures --interval 15m --since 24h --fill",
        "sow query ohlc --symbol ETHUSDT --interval 1d --from 2024-01-01 --to 2024-02-01 -f csv",
    )
)
def ohlc(
    symbol: SymbolReq,
    market: MarketOpt = DEFAULT_MARKET,
    interval: Annotated[
        str, typer.Option("--interval", "-i", help="Candle size: 1m, 5m, 15m, 1h, 4h or 1d.")
    ] = "1h",
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Look back this far, e.g. 24h or 7d (default 7d; not with --from).",
            show_default=False,
        ),
    ] = None,
    start: FromOpt = None,
    end: ToOpt = None,
    fill: Annotated[
        bool,
        typer.Option("--fill", help="List empty buckets too, at the previous close (ticks 0)."),
    ] = False,
    fmt: FormatOpt = "table",
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Price candles (open, high, low, close, ticks) of one symbol, aligned to the UTC calendar."""
    from datetime import timedelta

    from sowcli import query
    from sowcli.timeparse import parse_duration, parse_interval, time_range

    fmt = _check_format(fmt)
    sym = query.check_symbol(symbol, param="--symbol")
    mkt = query.check_market(market, param="--market")
    iv = parse_interval(interval, param="--interval")
    if since is not None and start is not None:
        raise UsageError("--since and --from: give one of them")
    span = parse_duration(since, param="--since") if since is not None else timedelta(days=7)
    rng = time_range(start, end, default_span=span, params=("--from", "--to"))
    rows = _run(
        config,
        questdb_url,
        lambda db: query.ohlc(db, sym, mkt, iv, rng, fill="prev" if fill else "none"),
    )
    render(rows, fmt, title=f"{sym} {mkt} {iv.name}")


@app.command(
    epilog=_epilog(
        'sow query sql "SELECT symbol, market, count() FROM market_data"',
        "sow query sql \"SELECT * FROM candles WHERE symbol = 'BTCUSDT' LIMIT -5\" -f json",
        'sow query sql "SHOW TABLES"',
    )
)
def sql(
    text: Annotated[
        str,
        typer.Argument(
            help="One read-only statement: SELECT, WITH, SHOW or EXPLAIN.", metavar="SQL"
        ),
    ],
    max_rows: Annotated[
        int, typer.Option("--max-rows", help="Most rows to show (1-10,000).")
    ] = 1000,
    fmt: FormatOpt = "table",
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run your own read-only query (anything that would write is refused)."""
    from sowcli import query

    fmt = _check_format(fmt)
    query.check_limit(max_rows, param="--max-rows")
    query.check_read_only(text)  # refuse before connecting
    rows = _run(config, questdb_url, lambda db: query.sql(db, text, max_rows=max_rows))
    render(
        rows, fmt, note=f"more than {max_rows:,} rows: showing the first {max_rows:,} (--max-rows)"
    )
