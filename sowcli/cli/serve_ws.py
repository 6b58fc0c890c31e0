"""``sow serve-ws``: the NATS -> browser WebSocket bridge (the same bridge as ``/ws``)."""

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
    "  sow serve-ws                                  # ws://127.0.0.1:8081/ws\n\n"
    "  sow serve-ws --host 0.0.0.0 --allowed-origins https://dash.example.com\n\n"
    "  sow serve-ws --max-clients 5000 --batch-ms 250\n\n"
    "  python -m websockets ws://127.0.0.1:8081/ws   # then type "
    '{"type":"subscribe","symbols":["*"]}'
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
            "--port", "-p", min=0, max=65535, help="Port (default 8081).", show_default=False
        ),
    ] = None,
    nats_url: NatsUrlOpt = None,
    dragonfly_url: DragonflyUrlOpt = None,
    allowed_origins: Annotated[
        str | None,
        typer.Option(
            "--allowed-origins",
            help="Comma-separated browser origins allowed to connect (* = any).",
            show_default=False,
        ),
    ] = None,
    max_clients: Annotated[
        int | None,
        typer.Option(
            "--max-clients", min=1, help="Most clients at once (default 1000).", show_default=False
        ),
    ] = None,
    batch_ms: Annotated[
        int | None,
        typer.Option(
            "--batch-ms",
            min=1,
            help="Update batches at most this often (default 100).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Bridge NATS quotes to browsers over WebSocket: snapshot, then conflated batches."""
    from sowcli.servers.ws import WsServer

    settings = settings_from(
        config, ws_host=host, ws_port=port, nats_url=nats_url, dragonfly_url=dragonfly_url,
        ws_allowed_origins=allowed_origins, ws_max_clients=max_clients, ws_batch_ms=batch_ms,
        log_level=log_level, log_format=log_format,
    )  # fmt: skip
    setup(settings)
    run_stage(settings, WsServer(settings))
