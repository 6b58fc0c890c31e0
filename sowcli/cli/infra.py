"""``sow infra up | down | status``: local NATS, Redis and QuestDB servers for a developer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sowcli.errors import UsageError

app = typer.Typer(
    help=(
        "Start, stop and check local NATS (JetStream), Redis-protocol and QuestDB servers, "
        "with data and logs under SOW_HOME (default ~/.local/share/sow). "
        "Docker users can run docker-compose.yml instead.\n\n"
        "Example: sow infra up && sow infra status"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="SOW_HOME",
        help="Data folder (env SOW_HOME; default $XDG_DATA_HOME/sow or ~/.local/share/sow).",
        show_default=False,
    ),
]
OnlyOpt = Annotated[
    str | None,
    typer.Option(
        "--only",
        help="Comma-separated servers: nats,redis,questdb (default: all).",
        show_default=False,
    ),
]

# the role a bare `--port SERVER=N` sets
_PRIMARY_ROLE = {"nats": "client", "redis": "client", "questdb": "http"}


def _only(value: str | None) -> list[str] | None:
    return [part for part in value.split(",") if part.strip()] if value else None


def parse_ports(values: list[str]) -> dict[str, dict[str, int]]:
    """``["nats=14222", "questdb.pg=18812"]`` -> ``{"nats": {"client": 14222}, ...}``."""
    from sowcli.infra import DEFAULT_PORTS

    ports: dict[str, dict[str, int]] = {}
    for value in values:
        key, sep, number = value.partition("=")
        server, _, role = key.strip().lower().partition(".")
        role = role or _PRIMARY_ROLE.get(server, "")
        roles = DEFAULT_PORTS.get(server, {})
        if not sep or role not in roles:
            choices = ", ".join(f"{s}.{r}" for s, rs in DEFAULT_PORTS.items() for r in rs)
            raise UsageError(f"--port {value!r}: expected SERVER[.ROLE]=PORT with one of {choices}")
        try:
            port = int(number)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise UsageError(f"--port {value!r}: {number!r} is not a port number (1-65535)")
        ports.setdefault(server, {})[role] = port
    return ports


def _ports_text(ports: dict[str, int]) -> str:
    return " ".join(f"{role}={port}" for role, port in ports.items())


@app.command(epilog="Example: sow infra up --only nats,redis --port redis=6380")
def up(
    home: HomeOpt = None,
    only: OnlyOpt = None,
    port: Annotated[
        list[str] | None,
        typer.Option(
            "--port",
            "-p",
            metavar="SERVER=PORT",
            help="SERVER[.ROLE]=PORT, repeatable: nats[.client|.monitor], redis, "
            "questdb[.http|.pg|.ilp|.health]. Default ports: 4222/8222, 6379, 9000/8812/9009/9003.",
            show_default=False,
        ),
    ] = None,
    questdb_heap: Annotated[
        str, typer.Option("--questdb-heap", envvar="SOW_QUESTDB_HEAP", help="QuestDB -Xmx.")
    ] = "1g",
) -> None:
    """Start the servers that are not running yet (detached; they outlive this command).

    A server started earlier by `sow infra up` is left as it is, and a healthy server already
    answering on a port is reused rather than started twice.
    """
    from rich.console import Console
    from rich.table import Table

    from sowcli import infra

    console = Console()
    with console.status("starting servers") as spinner:
        results = infra.up(
            home,
            _only(only),
            parse_ports(port or []),
            questdb_heap=questdb_heap,
            progress=spinner.update,
        )
    table = Table("server", "action", "pid", "ports", "ready")
    env: dict[str, str] = {}
    for r in results:
        env.update(r.server.env_vars())
        table.add_row(
            r.server.name,
            r.action,
            str(r.server.pid) if r.server.managed else "-",
            _ports_text(r.server.ports),
            f"{r.ready_s:.1f} s" if r.action == "started" else "",
        )
    console.print(table)
    console.print(f"data and logs under {home or infra.sow_home()}; point sow at them with:")
    for key, value in env.items():
        console.print(f"  export {key}={value}", highlight=False, soft_wrap=True)


@app.command(epilog="Example: sow infra down --only questdb")
def down(home: HomeOpt = None, only: OnlyOpt = None) -> None:
    """Stop the servers that `sow infra up` started (servers it only reused keep running)."""
    from rich.console import Console

    from sowcli import infra

    console = Console()
    with console.status("stopping servers"):
        outcome = infra.down(home, _only(only))
    for name, what in outcome.items():
        console.print(f"{name}: {what}", highlight=False)


@app.command(epilog="Example: sow infra status --format json")
def status(
    home: HomeOpt = None,
    only: OnlyOpt = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="Output format: table or json.")
    ] = "table",
) -> None:
    """Show each server's state, pid, ports, health and probe latency.

    Exit code 0 when every server shown is healthy, 3 otherwise.
    """
    from sowcli import infra

    if format not in ("table", "json"):
        raise UsageError(f"--format {format!r}: choose table or json")
    rows = infra.status(home, _only(only))
    if format == "json":
        typer.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("server", "state", "pid", "ports", "health", "latency")
        for row in rows:
            table.add_row(
                row.name,
                row.state,
                str(row.pid) if row.pid else "-",
                _ports_text(row.ports),
                "[green]healthy[/]" if row.healthy else "[red]down[/]",
                f"{row.latency_ms:.1f} ms" if row.latency_ms is not None else "-",
            )
        Console().print(table)
    if not all(row.healthy for row in rows):
        raise typer.Exit(3)
