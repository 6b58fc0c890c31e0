"""``sow publish``: Bybit v5 tickers -> Quotes -> NATS ``quotes.{spot|futures}.{SYMBOL}``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sowcli.cli.options import (
    ConfigOpt,
    LogFormatOpt,
    LogLevelOpt,
    MarketsOpt,
    MetricsPortOpt,
    NatsUrlOpt,
    SourceOpt,
    SpeedOpt,
    SymbolsOpt,
    run_stage,
    settings_from,
    setup,
)

EPILOG = (
    "Examples:\n\n"
    "  sow publish                                   # live Bybit, config.json symbols\n\n"
    "  sow publish --symbols BTCUSDT,ETHUSDT --markets futures\n\n"
    "  sow publish --source simulate                 # generated data, labelled simulated\n\n"
    "  sow publish --source replay:session.jsonl.gz --speed max\n\n"
    "  sow publish --record session.jsonl            # keep every raw frame\n\n"
    "  sow publish --metrics-port 9101               # Prometheus metrics on :9101/metrics"
)


def command(
    symbols: SymbolsOpt = None,
    markets: MarketsOpt = None,
    nats_url: NatsUrlOpt = None,
    source: SourceOpt = "bybit",
    speed: SpeedOpt = "1",
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="Append every raw frame with its receive time to FILE (JSON lines).",
            show_default=False,
        ),
    ] = None,
    spot_book: Annotated[
        bool | None,
        typer.Option(
            "--spot-book/--no-spot-book",
            help="Fill SPOT bid/ask from orderbook.1 (default on).",
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Stream Bybit tickers and publish one Quote JSON per update to NATS."""
    from sowcli.publish import Publisher, SourceSpec, parse_speed

    settings = settings_from(
        config,
        symbols=symbols,
        markets=markets,
        nats_url=nats_url,
        spot_book=spot_book,
        log_level=log_level,
        log_format=log_format,
        metrics_port=metrics_port,
    )
    setup(settings)
    pub = Publisher(
        settings, source=SourceSpec.parse(source), speed=parse_speed(speed), record=record
    )
    run_stage(settings, pub, "publisher")
