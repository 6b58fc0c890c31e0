"""The ``publish`` stage: a source of Bybit frames -> Feed -> QuoteHandlers (NATS and any others).

:func:`run_publish` is what ``sow publish`` calls and what ``sow up`` composes. Sources:

- ``bybit`` — the live websockets (one per market), symbols checked against REST instruments-info
  first when it is reachable;
- ``replay:FILE`` — a recorded session, at ``speed`` × the recorded pace (``None`` = max);
- ``simulate`` — generated frames in Bybit's wire format, labelled simulated everywhere.

A heartbeat goes to ``sow.status.publisher`` every ``heartbeat_interval_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client

from sowcli.bus.nats import NatsPublisher, instance_id
from sowcli.config import Settings
from sowcli.errors import UpstreamError, UsageError
from sowcli.logs import kv
from sowcli.model import MARKET_NAMES, Market
from sowcli.sources.bybit import BybitConnection
from sowcli.sources.feed import Feed, QuoteHandler, Recorder

log = logging.getLogger("sow.publish")

CATEGORY = {"SPOT": "spot", "FUTURES": "linear"}


@dataclass(frozen=True, slots=True)
class SourceSpec:
    kind: str  # bybit | replay | simulate | auto (bybit when reachable, else simulate)
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        if text in ("bybit", "live", ""):
            return cls("bybit")
        if text in ("simulate", "sim", "simulated"):
            return cls("simulate")
        if text == "auto":
            return cls("auto")
        if text.startswith("replay:") and len(text) > 7:
            return cls("replay", Path(text[7:]).expanduser())
        raise UsageError(f"--source {text!r}: expected bybit, simulate, auto or replay:FILE")


def parse_speed(text: str | None) -> float | None:
    """``--speed``: a positive factor, or ``max`` (as fast as possible)."""
    if text is None or text.lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--speed {text!r}: expected a number or 'max'") from None
    if value <= 0:
        raise UsageError(f"--speed {text!r}: must be greater than 0")
    return value


async def listed_symbols(
    rest_url: str, market: Market, timeout_s: float = 5.0
) -> dict[str, str] | None:
    """symbol -> status from ``/v5/market/instruments-info``, or ``None`` when unreachable."""
    out: dict[str, str] = {}
    cursor = ""
    try:
        async with httpx.AsyncClient(base_url=rest_url, timeout=timeout_s) as client:
            for _ in range(50):  # bounded pagination
                params = {"category": CATEGORY[market], "limit": "1000"}
                if cursor:
                    params["cursor"] = cursor
                resp = await client.get("/v5/market/instruments-info", params=params)
                if resp.status_code != 200:
                    raise httpx.HTTPError(f"HTTP {resp.status_code}")
                doc = resp.json()
                if doc.get("retCode") != 0:
                    raise httpx.HTTPError(f"retCode {doc.get('retCode')}: {doc.get('retMsg')}")
                result = doc.get("result") or {}
                for item in result.get("list") or []:
                    if isinstance(item, dict) and isinstance(item.get("symbol"), str):
                        out[item["symbol"]] = str(item.get("status", ""))
                cursor = str(result.get("nextPageCursor") or "")
                if not cursor:
                    break
    except (httpx.HTTPError, ValueError, OSError) as exc:
        log.warning(
            "cannot check symbols against Bybit REST; subscribing anyway",
            extra=kv(market=market, url=rest_url, error=str(exc) or type(exc).__name__),
        )
        return None
    return out


class Publisher:
    """The running publish stage (exposed so ``sow up`` and tests can read its counters)."""

    def __init__(
        self,
        settings: Settings,
        *,
        source: SourceSpec,
        speed: float | None = None,
        record: Path | None = None,
        handlers: Sequence[QuoteHandler] = (),
        nats: bool = True,
    ) -> None:
        self.settings = settings
        self.source = source
        self.speed = speed
        self.markets: list[Market] = [MARKET_NAMES[m] for m in settings.markets]
        self.recorder = Recorder(record.open("ab")) if record else None
        self.nats = (
            NatsPublisher(
                settings.nats_url,
                buffer_max=settings.publish_buffer,
                on_first_connect=self._ensure_stream if settings.publish_ensure_stream else None,
            )
            if nats
            else None
        )
        all_handlers: list[QuoteHandler] = [self.nats] if self.nats else []
        all_handlers += list(handlers)
        self.feed = Feed(all_handlers, spot_book=settings.spot_book, recorder=self.recorder)
        if self.nats is not None:
            publisher = self.nats
            publisher.on_congestion = lambda held: self.feed.hold(publisher, held)
        self.connections: dict[Market, BybitConnection] = {}
        self.started = time.time()
        self.instance = instance_id()
        self.simulated = source.kind == "simulate"
        self._stale: set[tuple[Market, str]] = set()

    async def _ensure_stream(self, nc: Client) -> None:
        """The JetStream stream that lets ``sow persist`` lose nothing exists before we publish."""
        from sowcli.bus.jetstream import ensure_quotes_stream

        try:
            await ensure_quotes_stream(nc, self.settings)
        except UpstreamError as exc:
            log.warning(
                f"quotes are not captured for sow persist: {exc}",
                extra=kv(stream=self.settings.stream_name),
            )

    # --- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The heartbeat document (also what ``sow up`` shows)."""
        feed, norm = self.feed.stats, self.feed.normalizer.stats
        stale_after = self.settings.stale_after_seconds
        ages = self.feed.ages_s()
        markets: dict[str, Any] = {}
        for market in self.markets:
            conn = self.connections.get(market)
            entry: dict[str, Any] = {"frames_in": feed.frames_in[market]}
            if conn is not None:
                entry.update(
                    state=conn.stats.state,
                    since=conn.stats.since,
                    url=conn.url,
                    connects=conn.stats.connects,
                    reconnects=conn.stats.reconnects,
                    last_error=conn.stats.last_error,
                    unknown=sorted(conn.unknown),
                )
            else:
                entry.update(state="running" if self.source.kind != "bybit" else "starting")
            markets[market] = entry
        unknown = sorted({f"{m}:{s}" for m, c in self.connections.items() for s in c.unknown})
        doc: dict[str, Any] = {
            "component": "publisher",
            "instance": self.instance,
            "interval_s": self.settings.heartbeat_interval_seconds,
            "state": "running",
            "since": self.started,
            "ts": time.time(),
            "source": self.source.kind
            if self.source.kind != "replay"
            else f"replay:{self.source.path}",
            "simulated": self.simulated,
            "markets": markets,
            "frames_in": sum(feed.frames_in.values()),
            "quotes_out": norm.quotes,
            "reconnects": sum(c.stats.reconnects for c in self.connections.values()),
            "dropped_deltas": norm.dropped_deltas,
            "stale_frames": norm.stale_frames,
            "invalid_frames": norm.invalid_frames + feed.malformed,
            "feed_overflow": feed.overflow_dropped,
            "handler_errors": feed.handler_errors,
            "unknown_symbols": unknown,
            "stale_symbols": sorted(
                f"{m}:{s}" for (m, s), age in ages.items() if age > stale_after
            ),
            "last_age_s": {f"{m}:{s}": round(age, 3) for (m, s), age in ages.items()},
        }
        if self.nats is not None:
            doc.update(
                nats_connected=self.nats.connected,
                published=self.nats.stats.published,
                nats_buffered=self.nats.buffered,
                nats_dropped=self.nats.stats.dropped,
            )
        return doc

    def _check_stale(self) -> None:
        ages = self.feed.ages_s()
        limit = self.settings.stale_after_seconds
        for key, age in ages.items():
            if age > limit and key not in self._stale:
                self._stale.add(key)
                log.warning(
                    f"{key[1]} {key[0]} is stale: no update for {age:.0f}s",
                    extra=kv(market=key[0], symbol=key[1], age_s=round(age, 1)),
                )
            elif age <= limit and key in self._stale:
                self._stale.discard(key)
                log.info(
                    f"{key[1]} {key[0]} is updating again", extra=kv(market=key[0], symbol=key[1])
                )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_seconds)
            self._check_stale()
            if self.nats is not None:
                await self.nats.publish_status("publisher", self.status())

    # --- sources -----------------------------------------------------------------------------
    async def _validate(self, market: Market, conn: BybitConnection) -> None:
        listed = await listed_symbols(self.settings.bybit_rest_url, market)
        if listed is None:
            return
        for sym in conn.symbols:
            status = listed.get(sym)
            if status != "Trading":
                why = "not listed" if status is None else f"status {status}"
                conn.mark_unknown(sym, why)

    async def _run_bybit(self) -> None:
        urls = {"SPOT": self.settings.bybit_spot_url, "FUTURES": self.settings.bybit_linear_url}
        for market in self.markets:
            self.connections[market] = BybitConnection(
                market,
                urls[market],
                self.settings.symbols,
                self.feed,
                self.settings,
                recorder=self.recorder,
            )
        if self.settings.validate_symbols:
            await asyncio.gather(*(self._validate(m, c) for m, c in self.connections.items()))
        for market, conn in self.connections.items():
            if not conn.wanted_topics():
                log.error(f"no valid symbols left on {market.lower()}", extra=kv(market=market))
        runs = [
            asyncio.create_task(c.run(), name=f"bybit-{m}")
            for m, c in self.connections.items()
            if c.wanted_topics()
        ]
        if not runs:
            raise UsageError("none of the configured symbols is listed on Bybit")
        try:
            # The first connection to give up (RetriesExhausted) ends the stage.
            done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in runs:
                task.cancel()

    async def _bybit_reachable(self) -> str | None:
        """``None`` when Bybit's REST answers, else why not (for ``--source auto``)."""
        try:
            async with httpx.AsyncClient(base_url=self.settings.bybit_rest_url, timeout=3.0) as c:
                resp = await c.get("/v5/market/time")
            if resp.status_code == 200:
                return None
            return f"HTTP {resp.status_code}"
        except (httpx.HTTPError, OSError) as exc:
            return str(exc) or type(exc).__name__

    async def _run_source(self) -> None:
        if self.source.kind == "auto":
            why = await self._bybit_reachable()
            if why is None:
                self.source = SourceSpec("bybit")
            else:
                log.warning(
                    f"Bybit is unreachable ({why}): falling back to SIMULATED data",
                    extra=kv(url=self.settings.bybit_rest_url),
                )
                self.source = SourceSpec("simulate")
                self.simulated = True
        if self.source.kind == "bybit":
            await self._run_bybit()
        elif self.source.kind == "replay":
            from sowcli.sources.replay import replay

            assert self.source.path is not None
            await replay(self.source.path, self.feed, speed=self.speed)
        else:
            from sowcli.sources.simulate import simulate

            log.warning(
                "SIMULATED data: prices are generated, not from Bybit",
                extra=kv(symbols=len(self.settings.symbols), markets=",".join(self.markets)),
            )
            await simulate(self.feed, self.settings.symbols, self.markets)

    # --- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until the source ends (replay), ``stop`` is set, or a connection gives up."""
        stop = stop or asyncio.Event()
        if self.source.kind == "replay" and self.source.path and not self.source.path.is_file():
            raise UsageError(f"{self.source.path}: replay file not found")
        await self.feed.start()
        beat = asyncio.create_task(self._heartbeat(), name="publisher-heartbeat")
        source = asyncio.create_task(self._run_source(), name="publisher-source")
        stopper = asyncio.create_task(stop.wait(), name="publisher-stop")
        try:
            await asyncio.wait({source, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if source.done():
                source.result()  # raise RetriesExhausted / UsageError
        finally:
            for conn in self.connections.values():
                await conn.stop()
            for task in (source, stopper):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await source
            await self.feed.stop()
            beat.cancel()
            if self.recorder is not None:
                self.recorder.close()
            log.info(
                "publisher stopped",
                extra=kv(
                    **{
                        k: v
                        for k, v in self.status().items()
                        if k in ("frames_in", "quotes_out", "published")
                    }
                ),
            )


async def run_publish(
    settings: Settings,
    *,
    source: str = "bybit",
    speed: float | None = 1.0,
    record: Path | None = None,
    handlers: Sequence[QuoteHandler] = (),
    stop: asyncio.Event | None = None,
) -> Publisher:
    """Run the publish stage until ``stop`` is set (or the replay ends); returns it for its stats."""
    pub = Publisher(
        settings, source=SourceSpec.parse(source), speed=speed, record=record, handlers=handlers
    )
    await pub.run(stop)
    return pub
