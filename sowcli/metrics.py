"""Prometheus metrics for every long-running stage, derived from its heartbeat document.

Each stage already keeps plain counters for its ``sow.status.*`` heartbeat (:meth:`status`).
:class:`StatusCollector` turns that document into Prometheus metrics **when Prometheus scrapes**,
so the per-quote hot path never touches a metrics object. Naming, for a stage ``publisher``:

- a number ``frames_in`` -> ``sow_publisher_frames_in_total`` (a counter) when the field is one of
  the cumulative counts (see :data:`COUNTER_SUFFIXES`), else ``sow_publisher_<field>`` (a gauge);
- a boolean -> a 0/1 gauge; the ``state`` string -> ``sow_publisher_state{state="running"} 1``;
- a dict of dicts (``markets: {"SPOT": {...}}``) -> the inner numbers with a label named after the
  key in the singular (``sow_publisher_markets_frames_in_total{market="SPOT"}``); a dict of numbers
  (``last_age_s: {"SPOT:BTCUSDT": 0.2}``) -> one gauge with a ``key`` label;
- a list -> a gauge with its length (``sow_publisher_unknown_symbols_count``).

:func:`serve_metrics` serves ``GET /metrics`` on a port of its own (``--metrics-port``) from the
event loop the stages run on; ``sow serve-api`` also serves them on its own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sowcli.logs import kv
from sowcli.runtime import bind_socket

log = logging.getLogger("sow.metrics")

# Fields that only ever grow (reset on restart): exposed as counters.
COUNTER_SUFFIXES = (
    "frames_in", "quotes_out", "quotes_in", "published", "reconnects", "connects", "dropped",
    "dropped_deltas", "stale_frames", "invalid_frames", "invalid", "feed_overflow",
    "handler_errors", "errors", "write_errors", "written", "batches", "rows", "rows_total",
    "acked", "redelivered", "restarts", "requests", "sent", "conflated", "disconnected",
)  # fmt: skip
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")
MAX_SERIES_PER_FIELD = 2000  # bounds a scrape even with thousands of symbols


class HasStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


def _name(*parts: str) -> str:
    return _NAME_RE.sub("_", "_".join(p for p in parts if p)).lower()


def _singular(key: str) -> str:
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


def _is_counter(field: str) -> bool:
    return field.endswith(COUNTER_SUFFIXES)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def status_metrics(component: str, doc: dict[str, Any]) -> Iterator[Metric]:
    """The Prometheus metrics of one heartbeat document."""
    base = _name("sow", component)
    state = doc.get("state")
    if isinstance(state, str):
        fam = GaugeMetricFamily(
            base + "_state", f"{component} state (1 = current)", labels=["state"]
        )
        fam.add_metric([state], 1.0)
        yield fam
    for field, value in doc.items():
        if field in ("state", "component", "instance", "ts", "since", "interval_s"):
            continue
        number = _number(value)
        if number is not None:
            yield _family(base, field, number)
        elif isinstance(value, dict):
            yield from _dict_metrics(base, field, value)
        elif isinstance(value, list):
            fam = GaugeMetricFamily(_name(base, field, "count"), f"{component} {field} (count)")
            fam.add_metric([], float(len(value)))
            yield fam


def _family(base: str, field: str, number: float) -> Metric:
    name = _name(base, field)
    if _is_counter(field):
        counter = CounterMetricFamily(name, field.replace("_", " "))
        counter.add_metric([], number)
        return counter
    gauge = GaugeMetricFamily(name, field.replace("_", " "))
    gauge.add_metric([], number)
    return gauge


def _dict_metrics(base: str, field: str, value: dict[str, Any]) -> Iterator[Metric]:
    items = list(value.items())[:MAX_SERIES_PER_FIELD]
    if items and all(isinstance(v, dict) for _, v in items):
        label = _singular(field)
        families: dict[str, Metric] = {}
        for key, inner in items:
            for sub, v in inner.items():
                number = _number(v)
                if number is None:
                    continue
                name = _name(base, field, sub)
                fam = families.get(name)
                if fam is None:
                    cls = CounterMetricFamily if _is_counter(sub) else GaugeMetricFamily
                    fam = families[name] = cls(name, f"{field} {sub}", labels=[label])
                fam.add_metric([str(key)], number)  # type: ignore[attr-defined]
        yield from families.values()
        return
    numbers = [(k, _number(v)) for k, v in items]
    if numbers and all(n is not None for _, n in numbers):
        cls = CounterMetricFamily if _is_counter(field) else GaugeMetricFamily
        fam2 = cls(_name(base, field), field.replace("_", " "), labels=["key"])
        for key, n in numbers:
            assert n is not None
            fam2.add_metric([str(key)], n)
        yield fam2


class StatusCollector(Collector):
    """A prometheus_client collector over named stages' :meth:`status` documents."""

    def __init__(self, stages: Callable[[], Iterable[tuple[str, HasStatus]]]) -> None:
        self._stages = stages

    def collect(self) -> Iterator[Metric]:
        for component, stage in self._stages():
            try:
                doc = stage.status()
            except Exception as exc:  # a metrics scrape must never take a stage down
                log.debug("status() failed", extra=kv(component=component, error=repr(exc)))
                continue
            yield from status_metrics(component, doc)


def registry_for(stages: Callable[[], Iterable[tuple[str, HasStatus]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(stages))
    return registry


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, stop: asyncio.Event
) -> None:
    """Serve ``GET /metrics`` (Prometheus text format) until ``stop`` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if parts[0] == b"GET" and path == b"/metrics":
                body, status, ctype = generate_latest(registry), "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    sock = bind_socket(host, port, what="--metrics-port")
    server = await asyncio.start_server(handle, sock=sock, limit=16 * 1024)
    log.info("metrics listening", extra=kv(url=f"http://{host}:{port}/metrics"))
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


class Stage(HasStatus, Protocol):
    async def run(self, stop: asyncio.Event | None = None) -> None: ...


async def run_with_metrics(
    stage: Stage, component: str, stop: asyncio.Event, *, host: str, port: int
) -> None:
    """Run ``stage`` until ``stop``; with ``port`` > 0 also serve its metrics meanwhile."""
    if not port:
        await stage.run(stop)
        return
    registry = registry_for(lambda: [(component, stage)])
    metrics_stop = asyncio.Event()
    server = asyncio.create_task(serve_metrics(registry, host, port, metrics_stop))
    await asyncio.sleep(0)
    if server.done():
        server.result()  # cannot listen: a ConfigError naming the port
    try:
        await stage.run(stop)
    finally:
        metrics_stop.set()
        with contextlib.suppress(Exception):
            await server


__all__ = [
    "StatusCollector",
    "registry_for",
    "run_with_metrics",
    "serve_metrics",
    "status_metrics",
]
