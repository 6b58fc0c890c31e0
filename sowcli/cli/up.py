"""``sow up``: the whole hub in one process — publish, cache, persist and serve-api."""

from __future__ import annotations

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
    settings_from,
    setup,
)

EPILOG = (
    "Examples:\n\n"
    "  sow up --infra --source simulate       # everything, on local servers, simulated data\n\n"
    "  sow up                                 # live Bybit; servers already running\n\n"
    "  sow up --only publish,cache            # compose stages (or --skip persist)\n\n"
    "  sow up --infra --source replay:session.jsonl.gz --speed 10\n\n"
    "  sow up --port 9090 --metrics-port 9100"
)


def command(
    infra: Annotated[
        bool, typer.Option("--infra", help="Start NATS, Redis and QuestDB first (sow infra up).")
    ] = False,
    host: Annotated[
        str | None,
        typer.Option("--host", help="API address (default 127.0.0.1).", show_default=False),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="API port (default 8080).", show_default=False)
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only", help="Run only these stages: publish,cache,persist,api.", show_default=False
        ),
    ] = None,
    skip: Annotated[
        str | None, typer.Option("--skip", help="Run all stages but these.", show_default=False)
    ] = None,
    source: SourceOpt = "bybit",
    speed: SpeedOpt = "1",
    symbols: SymbolsOpt = None,
    markets: MarketsOpt = None,
    nats_url: NatsUrlOpt = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the whole hub in one process: publish + cache + persist + serve-api (with /ws)."""
    from sowcli.pipeline import select_stages
    from sowcli.publish import SourceSpec, parse_speed
    from sowcli.up import run_up

    settings = settings_from(
        config,
        symbols=symbols,
        markets=markets,
        nats_url=nats_url,
        api_host=host,
        api_port=port,
        metrics_port=metrics_port,
        log_level=log_level,
        log_format=log_format,
    )
    setup(settings)
    SourceSpec.parse(source)  # a bad --source is reported before anything starts
    run_up(
        settings,
        select_stages(only, skip),
        infra=infra,
        source=source,
        speed=parse_speed(speed),
    )
