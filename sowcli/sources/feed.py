"""The one code path every raw Bybit frame takes, whatever its source (live, replay, simulate).

Sources push ``(connection, raw frame, receive time)`` into a :class:`Feed`; one task decodes each
frame, answers control frames (acks, pongs) back to their connection, runs the normalizer and hands
every Quote to the registered :class:`QuoteHandler`s in order. The queue between the socket and
that task is bounded: a live socket never blocks (frames beyond the bound are dropped and counted),
a replay waits for room instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

import orjson

from sowcli.logs import kv
from sowcli.model import Market, Quote
from sowcli.normalize import BybitNormalizer

log = logging.getLogger("sow.feed")

FEED_QUEUE_MAX = 100_000


@runtime_checkable
class QuoteHandler(Protocol):
    """A consumer of Quotes (the seed's MarketDataHandler). ``on_quote`` must not block for long."""

    async def start(self) -> None: ...

    async def on_quote(self, quote: Quote) -> None: ...

    async def stop(self) -> None: ...


class FrameOrigin(Protocol):
    """Where a frame came from: its market, a name for logs and a callback for control frames."""

    market: Market
    name: str
    last_data_mono: float  # set by the feed on every data frame (idle detection)

    def on_control(self, msg: dict[str, Any], recv_us: int) -> None: ...


@dataclass(slots=True)
class FeedStats:
    frames_in: dict[str, int] = field(default_factory=lambda: {"SPOT": 0, "FUTURES": 0})
    malformed: int = 0
    handler_errors: int = 0
    overflow_dropped: int = 0


def now_us() -> int:
    return time.time_ns() // 1000


class Recorder:
    """Writes every raw frame with its receive time as JSON lines (the shared recording format)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def connect(self, name: str, addr: str) -> None:
        self._write({"t": "connect", "conn": name, "ts": time.time(), "addr": addr})

    def recv(self, name: str, raw: bytes, recv_us: int) -> None:
        self._write(
            {"t": "recv", "conn": name, "ts": recv_us / 1e6, "data": raw.decode("utf-8", "replace")}
        )

    def send(self, name: str, addr: str, data: str) -> None:
        self._write({"t": "send", "conn": name, "ts": time.time(), "addr": addr, "data": data})

    def _write(self, doc: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(doc) + b"\n")

    def close(self) -> None:
        self._fh.flush()
        self._fh.close()


_RESET = -1  # recv_us of the marker entry that resets a market (an empty frame is b"")


class Feed:
    """Decode -> normalize -> dispatch, in one task, for frames from any number of connections."""

    def __init__(
        self,
        handlers: Sequence[QuoteHandler],
        *,
        spot_book: bool = True,
        recorder: Recorder | None = None,
        queue_max: int = FEED_QUEUE_MAX,
    ) -> None:
        self.handlers = list(handlers)
        self.normalizer = BybitNormalizer(spot_book=spot_book)
        self.stats = FeedStats()
        self.recorder = recorder
        # (market, symbol) -> monotonic time of its last quote: staleness and heartbeat ages
        self.last_update: dict[tuple[Market, str], float] = {}
        self._queue: deque[tuple[FrameOrigin, bytes, int]] = deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- producers ---------------------------------------------------------------------------
    def push(self, origin: FrameOrigin, raw: bytes, recv_us: int) -> None:
        """From a live socket callback: never blocks; drops (and counts) beyond the bound."""
        if len(self._queue) >= self._queue_max:
            self.stats.overflow_dropped += 1
            return
        self._queue.append((origin, raw, recv_us))
        self._wake.set()

    async def put(self, origin: FrameOrigin, raw: bytes, recv_us: int) -> None:
        """From a replay/simulation: waits for room instead of dropping."""
        while len(self._queue) >= self._queue_max:
            self._room.clear()
            await self._room.wait()
        self._queue.append((origin, raw, recv_us))
        self._wake.set()

    def connection_reset(self, origin: FrameOrigin) -> None:
        """A connection was (re)established: its market's merge state is reset, in frame order."""
        self._queue.append((origin, b"", _RESET))
        self._wake.set()

    # --- the consumer ------------------------------------------------------------------------
    async def start(self) -> None:
        for handler in self.handlers:
            await handler.start()
        self._task = asyncio.create_task(self._run(), name="feed")

    async def drained(self) -> None:
        """Wait until every queued frame has been processed (used by replay)."""
        while self._queue:
            self._room.clear()
            await self._room.wait()

    async def stop(self) -> None:
        """Process what is queued, then stop the handlers (each in turn, errors logged)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=1.0)
            except TimeoutError:
                self._task.cancel()
        for handler in self.handlers:
            try:
                await handler.stop()
            except Exception as exc:
                log.error(
                    "handler stop failed", extra=kv(handler=type(handler).__name__, error=repr(exc))
                )

    async def _run(self) -> None:
        queue = self._queue
        loads = orjson.loads
        normalizer = self.normalizer
        on_message = normalizer.on_message
        frames_in = self.stats.frames_in
        last_update = self.last_update
        recorder = self.recorder
        monotonic = time.monotonic
        while True:
            if not queue:
                self._room.set()
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = 0
            while queue and batch < 512:
                origin, raw, recv_us = queue.popleft()
                batch += 1
                market = origin.market
                if recv_us == _RESET:
                    normalizer.reset(market)
                    continue
                if recorder is not None:
                    recorder.recv(origin.name, raw, recv_us)
                frames_in[market] += 1
                try:
                    msg = loads(raw)
                except orjson.JSONDecodeError:
                    self.stats.malformed += 1
                    continue
                if type(msg) is not dict:
                    self.stats.malformed += 1
                    continue
                if "topic" not in msg:
                    origin.on_control(msg, recv_us)
                    continue
                now = monotonic()  # one clock read per frame serves both idle and stale checks
                origin.last_data_mono = now
                quote = on_message(market, msg, recv_us)
                if quote is None:
                    continue
                last_update[(quote.market, quote.symbol)] = now
                for handler in self.handlers:
                    try:
                        await handler.on_quote(quote)
                    except Exception as exc:
                        self.stats.handler_errors += 1
                        log.error(
                            "quote handler failed",
                            extra=kv(handler=type(handler).__name__, error=repr(exc)),
                        )
            if len(queue) < self._queue_max:
                self._room.set()
            if queue:  # more already waiting: let the socket and the handlers' tasks run first
                await asyncio.sleep(0)

    def ages_s(self) -> dict[tuple[Market, str], float]:
        now = time.monotonic()
        return {key: now - t for key, t in self.last_update.items()}
