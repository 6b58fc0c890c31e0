"""``sow serve-api``: REST (latest, history, stats, ohlc), /health, /metrics, /docs and /ws."""

from __future__ import annotations

from typing import Annotated

import typer

from sowcli.cli.options import (
    ConfigOpt,
    DragonflyUrlOpt,
    LogFormatOpt,
    LogLevelOpt,
    NatsUrlOpt,
    run_stage,
    settings_from,
    setup,
)

EPILOG = (
    "Examples:\n\n"
    "  sow serve-api                                 # http://127.0.0.1:8080, docs at /docs\n\n"
    "  sow serve-api --host 0.0.0.0 --port 8080 --cors-origins https://dash.example.com\n\n"
    "  curl -i localhost:8080/api/prices/latest      # header X-Sow-Source: cache|questdb\n\n"
    "  curl 'localhost:8080/api/prices/BTCUSDT/SPOT/history?from=2024-01-01T00:00:00Z"
    "&to=2024-01-02T00:00:00Z'\n\n"
    "  curl 'localhost:8080/api/prices/ETHUSDT/futures/ohlc?interval=5m&from=6h'\n\n"
    "  curl localhost:8080/health ; curl localhost:8080/metrics"
)


def command(
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="Address to listen on (default 127.0.0.1).", show_default=False
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", "-p", min=0, max=65535, help="Port (default 8080).", show_default=False
        ),
    ] = None,
    dragonfly_url: DragonflyUrlOpt = None,
    questdb_url: Annotated[
        str | None,
        typer.Option(
            "--questdb-url",
            help="QuestDB PostgreSQL-wire URL (env QUESTDB_URL).",
            show_default=False,
        ),
    ] = None,
    nats_url: NatsUrlOpt = None,
    cors_origins: Annotated[
        str | None,
        typer.Option(
            "--cors-origins",
            help="Comma-separated browser origins allowed by CORS (* = any).",
            show_default=False,
        ),
    ] = None,
    rate_limit: Annotated[
        float | None,
        typer.Option(
            "--rate-limit",
            min=0,
            help="Requests per second per client IP (0 = no limit; default 50).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Serve the REST API, /health, /metrics, OpenAPI at /docs and the WebSocket bridge at /ws."""
    from sowcli.servers.api import ApiServer

    settings = settings_from(
        config, api_host=host, api_port=port, dragonfly_url=dragonfly_url, questdb_url=questdb_url,
        nats_url=nats_url, cors_origins=cors_origins, api_rate_limit_per_second=rate_limit,
        log_level=log_level, log_format=log_format,
    )  # fmt: skip
    setup(settings)
    run_stage(settings, ApiServer(settings))
