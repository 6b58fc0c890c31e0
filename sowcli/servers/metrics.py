"""Prometheus metrics of ``sow serve-api`` and ``sow serve-ws``: one registry per server.

=============================================  ==================================================
``sow_http_requests_total``                    requests by ``route`` (the route template, e.g.
                                               ``/api/prices/{symbol}/{market}/history``, never
                                               the raw path), ``method`` and ``status``
``sow_http_request_duration_seconds``          latency histogram by ``route`` and ``method``
``sow_http_rate_limited_total``                requests answered 429
``sow_dependency_errors_total``                failed or timed-out calls by ``dependency``
                                               (``redis``, ``questdb``, ``nats``)
``sow_latest_source_total``                    ``/api/prices/latest`` answers by ``source``
                                               (``cache`` or ``questdb``)
``sow_query_cache_total``                      history/stats/ohlc answers by ``result``
                                               (``hit``: served from the short-lived cache)
``sow_ws_*``, ``sow_quotes_seen_total``        the WebSocket bridge (clients, quotes in and out,
                                               conflation, dropped clients): read from its
                                               counters at scrape time (see
                                               :class:`sowcli.servers.ws.Bridge`)
=============================================  ==================================================

The bridge's counters are plain integers read when Prometheus scrapes, so the per-quote hot path
never touches a prometheus_client object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets sized for an API answering from memory and Redis in well under 10 ms.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class ServerMetrics:
    """The metrics of one server process (its own registry, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "sow_http_requests", "HTTP requests", ("route", "method", "status"), registry=r
        )
        self.latency = Histogram(
            "sow_http_request_duration_seconds",
            "HTTP request latency",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "sow_http_rate_limited", "Requests refused with 429 (per-IP token bucket)", registry=r
        )
        self.dependency_errors = Counter(
            "sow_dependency_errors",
            "Failed or timed-out calls to a dependency",
            ("dependency",),
            registry=r,
        )
        self.latest_source = Counter(
            "sow_latest_source",
            "/api/prices/latest answers by where they came from",
            ("source",),
            registry=r,
        )
        self.query_cache = Counter(
            "sow_query_cache",
            "history/stats/ohlc answers by short-lived cache result",
            ("result",),
            registry=r,
        )
        for dep in ("redis", "questdb", "nats"):
            self.dependency_errors.labels(dep)
        for source in ("cache", "questdb"):
            self.latest_source.labels(source)
        for result in ("hit", "miss"):
            self.query_cache.labels(result)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def register(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at scrape time by ``collect()``."""
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "ServerMetrics"]
