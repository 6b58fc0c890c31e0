"""``sow dash``: the live console dashboard (quotes and component health from NATS)."""

from __future__ import annotations

from typing import Annotated

import typer

from sowcli.cli.options import ConfigOpt, LogLevelOpt, NatsUrlOpt, SymbolsOpt, settings_from, setup

EPILOG = (
    "Examples:\n\n"
    "  sow dash                                   # every symbol on the bus\n\n"
    "  sow dash --symbols BTCUSDT,ETHUSDT --sort basis\n\n"
    "  sow dash --market futures --sort volume --fps 2\n\n"
    "  NO_COLOR=1 sow dash                        # no colours (or --no-color)"
)


def command(
    symbols: SymbolsOpt = None,
    market: Annotated[
        str | None,
        typer.Option("--market", help="spot or futures (default: both).", show_default=False),
    ] = None,
    sort: Annotated[
        str, typer.Option("--sort", help="Row order: change, symbol, volume or basis.")
    ] = "change",
    fps: Annotated[float, typer.Option("--fps", help="Screen refreshes per second.")] = 4.0,
    no_color: Annotated[
        bool, typer.Option("--no-color", help="No colours (NO_COLOR is respected too).")
    ] = False,
    nats_url: NatsUrlOpt = None,
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Full-screen live view: prices, basis, 24 h figures and the health of every stage."""
    from rich.console import Console

    from sowcli.runtime import run_until_signal
    from sowcli.ui.dash import make_options, run_dash

    settings = settings_from(config, nats_url=nats_url, symbols=symbols, log_level=log_level)
    setup(settings)
    options = make_options(
        settings, symbols=settings.symbols if symbols else None, market=market, sort=sort, fps=fps
    )
    console = Console(highlight=False, no_color=True if no_color else None)
    run_until_signal(lambda stop: run_dash(settings, options, stop=stop, console=console))
