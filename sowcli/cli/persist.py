"""``sow persist``: JetStream ``QUOTES`` -> QuestDB ``market_data``, every tick exactly once."""

from __future__ import annotations

from typing import Annotated

import typer

from sowcli.cli.options import (
    ConfigOpt,
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
    "  sow persist                                   # local NATS and QuestDB\n\n"
    "  sow persist --questdb-http-url http://db:9000 --questdb-url postgres://admin:quest@db:8812/qdb\n\n"
    "  sow persist --batch-rows 20000 --flush-ms 100  # bigger writes, fresher data\n\n"
    "  sow persist & sow persist                     # two processes share the consumer\n\n"
    "  sow subscribe --subject sow.status.persist --json   # lag, rows/s, errors"
)


def command(
    nats_url: NatsUrlOpt = None,
    questdb_url: Annotated[
        str | None,
        typer.Option(
            "--questdb-url",
            help="QuestDB PostgreSQL-wire URL, to create the tables "
            "(env QUESTDB_URL; default postgres://admin:quest@localhost:8812/qdb).",
            show_default=False,
        ),
    ] = None,
    questdb_http_url: Annotated[
        str | None,
        typer.Option(
            "--questdb-http-url",
            help="QuestDB HTTP URL for ILP writes "
            "(env QUESTDB_HTTP_URL; default http://localhost:9000).",
            show_default=False,
        ),
    ] = None,
    batch_rows: Annotated[
        int | None,
        typer.Option(
            "--batch-rows",
            min=1,
            help="Rows per QuestDB write (default 10000).",
            show_default=False,
        ),
    ] = None,
    flush_ms: Annotated[
        int | None,
        typer.Option(
            "--flush-ms",
            min=1,
            help="Write a partial batch after this many ms (default 250).",
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Store every quote of the JetStream stream QUOTES in QuestDB market_data (ack after write)."""
    from sowcli.persist import Persister

    settings = settings_from(
        config,
        nats_url=nats_url,
        questdb_url=questdb_url,
        questdb_http_url=questdb_http_url,
        persist_batch_rows=batch_rows,
        persist_flush_ms=flush_ms,
        log_level=log_level,
        log_format=log_format,
        metrics_port=metrics_port,
    )
    setup(settings)
    run_stage(settings, Persister(settings), "persist")
