"""The ``sow`` command: a Typer app whose subcommands live one per module in this package.

Each subcommand parses options, loads :class:`~sowcli.config.Settings` and calls one library
function. Heavy imports (nats, redis, questdb, uvicorn, rich.live) happen inside the command that
needs them so that ``sow --help`` stays fast. :func:`main` turns a :class:`~sowcli.errors.SowError`
into one red line on stderr and the error's exit code (traceback only with ``--debug``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer

from sowcli import __version__
from sowcli.cli import (
    backfill,
    cache,
    dash,
    infra,
    persist,
    publish,
    query,
    serve_api,
    serve_ws,
    subscribe,
    up,
)

app = typer.Typer(
    name="sow",
    help=(
        "SOW Market Hub: Bybit v5 market data (SPOT and USDT linear FUTURES) over NATS, "
        "into Dragonfly/Redis and QuestDB, served over REST, WebSocket and dashboards.\n\n"
        "Example: sow publish --source simulate & sow subscribe BTCUSDT"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", envvar="SOW_DEBUG", help="Show tracebacks for errors."
    ),
) -> None:
    if debug:
        os.environ["SOW_DEBUG"] = "1"


app.command("publish", epilog=publish.EPILOG)(publish.command)
app.command("subscribe", epilog=subscribe.EPILOG)(subscribe.command)
app.command("cache", epilog=cache.EPILOG)(cache.command)
app.command("persist", epilog=persist.EPILOG)(persist.command)
app.command("serve-api", epilog=serve_api.EPILOG)(serve_api.command)
app.command("serve-ws", epilog=serve_ws.EPILOG)(serve_ws.command)
app.add_typer(infra.app, name="infra")
app.add_typer(query.app, name="query")
app.command("backfill", epilog=backfill.EPILOG)(backfill.command)
app.command("dash", epilog=dash.EPILOG)(dash.command)
app.command("up", epilog=up.EPILOG)(up.command)


def main() -> None:
    """Entry point of the ``sow`` script."""
    from sowcli.errors import SowError

    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SowError as exc:
        if os.environ.get("SOW_DEBUG"):
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click's own usage errors (Typer may bundle its own click)
        for click_exc in _click_exception_types():
            if isinstance(exc, click_exc):
                exc.show()
                sys.exit(exc.exit_code)
        raise


def _click_exception_types() -> list[type[Any]]:
    types: list[type[Any]] = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        types.append(module.ClickException)
    return types
