"""``sow subscribe [SYMBOL]``: print live quotes from NATS."""

from __future__ import annotations

from typing import Annotated

import typer

from sowcli.cli.options import ConfigOpt, LogLevelOpt, NatsUrlOpt, settings_from, setup

EPILOG = (
    "Examples:\n\n"
    "  sow subscribe                      # every quote\n\n"
    "  sow subscribe BTCUSDT              # BTCUSDT on SPOT and FUTURES\n\n"
    "  sow subscribe BTCUSDT --market futures --json | jq .price\n\n"
    "  sow subscribe --subject 'sow.status.>' --json   # heartbeats"
)


def command(
    symbol: Annotated[
        str | None, typer.Argument(help="Symbol, e.g. BTCUSDT (default: all).", show_default=False)
    ] = None,
    market: Annotated[
        str | None,
        typer.Option("--market", help="spot or futures (default: both).", show_default=False),
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option("--subject", help="A raw NATS subject/wildcard instead.", show_default=False),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (for jq).")
    ] = False,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, help="Exit after N messages.", show_default=False),
    ] = None,
    nats_url: NatsUrlOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Print quotes live: one coloured line per quote, or JSON lines with --json."""
    from sowcli.runtime import run_until_signal
    from sowcli.subscribe import run_subscribe, subject_for

    settings = settings_from(config, nats_url=nats_url, log_level=log_level)
    setup(settings)
    subj = subject_for(symbol, market, subject)
    run_until_signal(
        lambda stop: run_subscribe(settings.nats_url, subj, as_json=as_json, count=count, stop=stop)
    )
