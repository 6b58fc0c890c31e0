"""``sow cache``: NATS ``quotes.>`` -> Dragonfly/Redis (latest, history, timeseries, stats)."""

from __future__ import annotations

from typing import Annotated

import typer

from sowcli.cli.options import (
    ConfigOpt,
    DragonflyUrlOpt,
    LogFormatOpt,
    LogLevelOpt,
    MetricsPortOpt,
    NatsUrlOpt,
    run_stage,
    settings_from,
    setup,
)

EPILOG = (
    "Examples:\n\n"
    "  sow cache                                     # localhost NATS and Redis/Dragonfly\n\n"
    "  sow cache --dragonfly-url redis://cache:6379/0 --nats-url nats://bus:4222\n\n"
    "  DRAGONFLY_URL=localhost:6379 sow cache --history-max 500 --timeseries-days 3\n\n"
    "  sow cache & sow cache      # two processes share the load (queue group)\n\n"
    "  redis-cli GET latest:spot:BTCUSDT ; redis-cli HGETALL stats:futures:ETHUSDT:$(date -u +%F)"
)


def command(
    dragonfly_url: DragonflyUrlOpt = None,
    nats_url: NatsUrlOpt = None,
    queue_group: Annotated[
        str | None,
        typer.Option(
            "--queue-group",
            help="NATS queue group shared by cache processes (default sow-cache).",
            show_default=False,
        ),
    ] = None,
    history_max: Annotated[
        int | None,
        typer.Option(
            "--history-max",
            min=1,
            help="Entries kept per history list (default 1000).",
            show_default=False,
        ),
    ] = None,
    timeseries_days: Annotated[
        int | None,
        typer.Option(
            "--timeseries-days",
            min=1,
            help="Days timeseries/stats keys live (default 7).",
            show_default=False,
        ),
    ] = None,
    flush_ms: Annotated[
        int | None,
        typer.Option(
            "--flush-ms",
            min=1,
            help="Longest a quote waits before it is written (default 50).",
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Keep the latest quote, history, daily timeseries and daily stats in Dragonfly/Redis."""
    from sowcli.sinks.cache import CacheStage

    settings = settings_from(
        config, dragonfly_url=dragonfly_url, nats_url=nats_url, cache_queue_group=queue_group,
        cache_history_max=history_max, cache_timeseries_days=timeseries_days,
        cache_flush_ms=flush_ms, log_level=log_level, log_format=log_format, metrics_port=metrics_port,
    )  # fmt: skip
    setup(settings)
    run_stage(settings, CacheStage(settings), "cache")
