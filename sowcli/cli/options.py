"""Option types shared by several subcommands (``Annotated`` aliases) and the settings loader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sowcli.config import Settings, load_settings

if TYPE_CHECKING:
    from sowcli.metrics import Stage

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $SOW_CONFIG, else ./config.json if present).",
        show_default=False,
    ),
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.", show_default=False),
]
LogFormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="kv (default) or json.", show_default=False)
]
NatsUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        help="NATS URL (env NATS_URL; default nats://localhost:4222).",
        show_default=False,
    ),
]
DragonflyUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--dragonfly-url",
        help="Dragonfly/Redis URL or host:port (env DRAGONFLY_URL; default redis://localhost:6379/0).",
        show_default=False,
    ),
]
SymbolsOpt = Annotated[
    str | None,
    typer.Option(
        "--symbols", "-s", help="Comma-separated symbols, e.g. BTCUSDT,ETHUSDT.", show_default=False
    ),
]
MarketsOpt = Annotated[
    str | None,
    typer.Option(
        "--markets", "-m", help="Comma-separated markets: spot,futures.", show_default=False
    ),
]
SourceOpt = Annotated[
    str,
    typer.Option(
        "--source",
        help="bybit (live), simulate, auto (bybit if reachable, else simulate), or replay:FILE.",
    ),
]
SpeedOpt = Annotated[
    str,
    typer.Option(
        "--speed", help="Replay pace: a factor of the recorded pace (1 = real time) or max."
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        help="Serve Prometheus metrics on this port (GET /metrics); 0 = off.",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="Output format: table, json or csv.")
]


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    """Load settings with the given flag values (``None`` = flag not given) on top."""
    return load_settings(config, overrides)


def run_stage(settings: Settings, stage: Stage, component: str | None = None) -> None:
    """Run ``stage`` until SIGINT/SIGTERM; with ``metrics_port`` set (and a ``component`` name)
    also serve its Prometheus metrics meanwhile."""
    from sowcli import runtime

    if component is None or not settings.metrics_port:
        runtime.run_until_signal(stage.run)
        return
    from sowcli.metrics import run_with_metrics

    runtime.run_until_signal(
        lambda stop: run_with_metrics(
            stage, component, stop, host=settings.metrics_host, port=settings.metrics_port
        )
    )


def setup(settings: Settings) -> None:
    """Configure logging from the settings (call once per command, after loading them)."""
    from sowcli.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
