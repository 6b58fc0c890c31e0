"""``sow up`` around :class:`sowcli.pipeline.Hub`: local servers, the URLs, a live status panel.

On a terminal the status panel (one row per stage: state, restarts and its key counters) is
redrawn every second and log lines scroll above it; elsewhere (a pipe, a service manager) a
one-line summary is logged every 30 seconds instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sowcli.config import Settings
from sowcli.logs import kv
from sowcli.metrics import registry_for, serve_metrics
from sowcli.pipeline import Hub, check_dependencies, needed_servers
from sowcli.runtime import run_until_signal

log = logging.getLogger("sow.up")

# The counters worth a glance, per stage (any that a stage does not report are skipped).
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    "publish": ("frames_in", "quotes_out", "published", "reconnects", "nats_dropped"),
    "cache": ("quotes_in", "written", "dropped", "write_errors"),
    "persist": ("rows_total", "rows_per_s", "in_hand", "flush_errors"),
    "api": ("requests", "ws_clients", "clients", "errors"),
}
STATE_STYLE = {"running": "green", "finished": "cyan", "restarting": "red", "starting": "yellow"}


def start_infra(settings: Settings, servers: Sequence[str], console: Console) -> Settings:
    """``sow infra up`` for ``servers``; returns settings pointing at what answers."""
    from sowcli import infra

    with console.status(f"starting {', '.join(servers)} (sow infra up)..."):
        results = infra.up(only=[("redis" if s == "redis" else s) for s in servers])
    urls: dict[str, Any] = {}
    for r in results:
        srv = r.server
        if srv.name == "nats":
            urls["nats_url"] = srv.nats_url
        elif srv.name == "redis":
            urls["dragonfly_url"] = srv.redis_url
        elif srv.name == "questdb":
            urls["questdb_url"] = srv.questdb_url
            urls["questdb_http_url"] = srv.questdb_http_url
        console.print(f"[green]✓[/] {srv.name} {r.action} (pid {srv.pid}, ports {srv.ports})")
    return dataclasses.replace(settings, **urls)


def urls_text(settings: Settings, stages: Sequence[str]) -> Text:
    text = Text()
    if "api" in stages:
        base = f"http://{settings.api_host}:{settings.api_port}"
        text.append("API        ", "bold")
        text.append(f"{base}/api/prices/latest\n")
        text.append("Docs       ", "bold")
        text.append(f"{base}/docs\n")
        text.append("WebSocket  ", "bold")
        text.append(f"ws://{settings.api_host}:{settings.api_port}/ws\n")
        if Path(settings.api_static_dir).is_dir():
            text.append("Dashboard  ", "bold")
            text.append(f"{base}/market\n")
        text.append("Health     ", "bold")
        text.append(f"{base}/health   metrics {base}/metrics\n")
    if settings.metrics_port:
        text.append("Metrics    ", "bold")
        text.append(
            f"http://{settings.metrics_host}:{settings.metrics_port}/metrics (all stages)\n"
        )
    text.append("Console    ", "bold")
    text.append(f"sow dash --nats-url {settings.nats_url}")
    return text


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def status_table(hub: Hub) -> Table:
    table = Table(expand=False, show_edge=False, pad_edge=False)
    table.add_column("stage", style="bold")
    table.add_column("state")
    table.add_column("restarts", justify="right")
    table.add_column("figures")
    for name, doc in hub.status().items():
        state = str(doc.get("supervisor_state", "?"))
        inner = doc.get("state")
        shown = state if not inner or inner == state else f"{state} ({inner})"
        figures = "  ".join(f"{k}={_figure(doc[k])}" for k in KEY_FIGURES.get(name, ()) if k in doc)
        if name == "publish" and doc.get("simulated"):
            figures = "[bold yellow]SIMULATED[/]  " + figures
        if doc.get("last_error") and state == "restarting":
            figures += f"  [red]{doc['last_error']}[/]"
        table.add_row(
            name,
            f"[{STATE_STYLE.get(state, 'white')}]{shown}[/]",
            str(doc.get("restarts", 0)),
            figures,
        )
    return table


class _ConsoleLogHandler(logging.Handler):
    """Log lines printed through the Live console, so they scroll above the panel."""

    def __init__(self, console: Console, formatter: logging.Formatter) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record), style="dim"), soft_wrap=True)
        except Exception:
            self.handleError(record)


async def _serve(
    hub: Hub, settings: Settings, stop: asyncio.Event, console: Console, live: bool
) -> None:
    tasks = [asyncio.create_task(hub.run(stop), name="hub")]
    if settings.metrics_port:
        registry = registry_for(hub.stages)
        tasks.append(
            asyncio.create_task(
                serve_metrics(registry, settings.metrics_host, settings.metrics_port, stop)
            )
        )
    header = urls_text(settings, [sv.name for sv in hub.supervised])
    if live:
        with Live(console=console, refresh_per_second=2, transient=False) as view:
            while not stop.is_set() and not tasks[0].done():
                view.update(Panel(Group(header, Text(""), status_table(hub)), title="sow up"))
                await asyncio.wait({tasks[0]}, timeout=1.0)
            view.update(Panel(Group(Text("stopping..."), status_table(hub)), title="sow up"))
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            view.update(Panel(status_table(hub), title="sow up: stopped"))
    else:
        console.print(header)
        while not stop.is_set() and not tasks[0].done():
            await asyncio.wait({tasks[0]}, timeout=30.0)
            states = {n: d.get("supervisor_state") for n, d in hub.status().items()}
            log.info("status", extra=kv(**states))
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            raise r


def run_up(
    settings: Settings,
    stages: Sequence[str],
    *,
    infra: bool = False,
    source: str = "bybit",
    speed: float | None = 1.0,
    console: Console | None = None,
) -> None:
    """Check (or start) the servers, then run the hub until SIGINT/SIGTERM."""
    console = console or Console(stderr=True)
    servers = needed_servers(stages)
    if infra:
        settings = start_infra(settings, servers, console)
    asyncio.run(check_dependencies(settings, servers))
    hub = Hub(settings, stages, source=source, speed=speed)
    live = console.is_terminal and sys.stderr.isatty()
    root = logging.getLogger()
    saved = list(root.handlers)
    if live and saved:
        root.handlers = [_ConsoleLogHandler(console, saved[0].formatter or logging.Formatter())]
    try:
        run_until_signal(lambda stop: _serve(hub, settings, stop, console, live))
    finally:
        root.handlers = saved
