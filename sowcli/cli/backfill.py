"""``sow backfill``: Bybit REST klines -> QuestDB ``candles``; ``--from-cache``: cached quotes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sowcli.cli.options import ConfigOpt, LogFormatOpt, LogLevelOpt, settings_from, setup
from sowcli.cli.query import QuestdbUrlOpt

if TYPE_CHECKING:
    from datetime import datetime

    from rich.progress import Progress, TaskID

    from sowcli.backfill import BackfillReport

EPILOG = (
    "Examples:\n\n"
    "  sow backfill --symbol BTCUSDT              # 1h SPOT candles: resume, else the last 1000\n\n"
    "  sow backfill --symbols BTCUSDT,ETHUSDT --market spot --interval 1m --from 2024-01-01\n\n"
    "  sow backfill --symbol SOLUSDT --interval D --from 2023-01-01 --to 2024-01-01\n\n"
    "  sow backfill --from-cache                  # Dragonfly history/timeseries -> market_data"
)


class RichProgress:
    """One Rich progress bar per symbol on stderr: candles covered, rows stored, ETA."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.stored: dict[str, int] = {}

    def begin(self, key: str, total: int) -> None:
        self.stored[key] = 0
        self.tasks[key] = self.progress.add_task(key, total=max(total, 1), rows="0 rows")

    def advance(self, key: str, covered: int, stored: int) -> None:
        self.stored[key] += stored
        self.progress.update(self.tasks[key], advance=covered, rows=f"{self.stored[key]:,} rows")

    def finish(self, key: str, note: str) -> None:
        task = self.tasks[key]
        total = self.progress.tasks[task].total or 1
        self.progress.update(task, completed=total, rows=note)


def _progress() -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]:>14}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _summary(report: BackfillReport) -> None:
    """One line per symbol on stderr, then the errors (each naming its symbol)."""
    from rich.console import Console

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value else "-"

    err = Console(stderr=True, highlight=False)
    for s in report.symbols:
        state = "[red]failed[/]" if s.error else "resumed" if s.resumed else "ok"
        err.print(
            f"{s.symbol} {s.market} {s.interval} {when(s.start)} → {when(s.end)}: "
            f"{s.rows:,} candles stored, {s.skipped_unclosed} unclosed skipped, "
            f"{s.requests} requests, {state}",
            soft_wrap=True,
        )
    for message in report.errors:
        err.print(f"[bold red]error:[/] {message}", soft_wrap=True)


def command(
    symbol: Annotated[
        str | None,
        typer.Option(
            "--symbol",
            "--symbols",
            "-s",
            help="Symbol(s), comma-separated (default: config symbols).",
            show_default=False,
        ),
    ] = None,
    market: Annotated[
        str | None,
        typer.Option(
            "--market",
            "-m",
            help="spot or futures (default: spot; --from-cache: both).",
            show_default=False,
        ),
    ] = None,
    interval: Annotated[
        str,
        typer.Option(
            "--interval",
            "-i",
            help="Kline interval: 1m 3m 5m 15m 30m 1h 2h 4h 6h 12h 1d 1w 1M (or 1 3 ... 720 D W M).",
        ),
    ] = "1h",
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Start (ISO-8601, epoch s/ms, or e.g. 30d); default: resume after the "
            "newest stored candle, else the last 1000 candles.",
            show_default=False,
        ),
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="End, exclusive (default: now).", show_default=False)
    ] = None,
    from_cache: Annotated[
        bool,
        typer.Option(
            "--from-cache",
            help="Instead: copy Dragonfly history/timeseries quotes into market_data.",
        ),
    ] = False,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            help="REST requests per second (backfill_requests_per_second; at most 100).",
            show_default=False,
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    questdb_url: QuestdbUrlOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Fetch Bybit klines into QuestDB `candles` (resumable, rate-limited, reruns are harmless)."""
    import asyncio
    import contextlib

    from sowcli.errors import UsageError
    from sowcli.timeparse import parse_kline_interval, parse_time, time_range

    settings = settings_from(
        config,
        questdb_url=questdb_url,
        backfill_requests_per_second=rate,
        log_level=log_level,
        log_format=log_format,
    )
    setup(settings)
    names = [s for s in (symbol or "").split(",") if s.strip()] if symbol else None
    progress = _progress() if not no_progress else None
    live = RichProgress(progress) if progress is not None else None
    with progress if progress is not None else contextlib.nullcontext():
        if from_cache:
            from sowcli.backfill import backfill_from_cache

            if start or end:
                raise UsageError(
                    "--from/--to do not apply to --from-cache (it copies what the cache holds)"
                )
            cache = asyncio.run(
                backfill_from_cache(settings, symbols=names, market=market, progress=live)
            )
            typer.echo(
                f"copied {cache.written:,} quotes of {cache.streams} streams ({cache.keys} keys) "
                f"into market_data; {cache.invalid} invalid entries skipped",
                err=True,
            )
            return
        from datetime import timedelta

        from sowcli.backfill import backfill_klines

        iv = parse_kline_interval(interval, param="--interval")
        # --to defaults to Bybit's clock (read by the library), not this machine's
        begin = parse_time(start, param="--from") if start is not None else None
        end_dt = parse_time(end, param="--to") if end is not None else None
        if begin is not None and end_dt is not None:
            time_range(begin, end_dt, default_span=timedelta(0), params=("--from", "--to"))
        report = asyncio.run(
            backfill_klines(
                settings,
                names or settings.symbols,
                market or "spot",
                iv,
                start=begin,
                end=end_dt,
                progress=live,
            )
        )
    _summary(report)
    if report.errors:
        raise typer.Exit(1)
