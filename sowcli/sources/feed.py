"""The one code path every raw Bybit frame takes, whatever its source (live, replay, simulate).

Sources push ``(connection, raw frame, receive time)`` into a :class:`Feed`, which decodes each
frame, answers control frames (acks, pongs) back to their connection, runs the normalizer and hands
every Quote to the registered :class:`QuoteHandler`s in order.

When every handler also has the synchronous ``on_quote_nowait`` (the NATS publisher and the cache
writer do), a frame from a live socket is processed right in the socket's callback: no queue, no
task switch per read. That is what keeps ``sow publish`` cheap at a realistic rate, where each
socket read carries only a few frames (benchmarks/bench_publish.py). Otherwise, and for replays and
simulations, frames go through a bounded queue that one task drains: a live socket never blocks
(frames beyond the bound are dropped and counted), a replay waits for room instead.

Back-pressure: a handler that cannot keep up (the NATS publisher when NATS reads slower than the
exchange sends) calls :meth:`Feed.hold`; live sockets then stop reading (TCP flow control slows
the sender) and replays wait, until it lets go. A hold expires after ``HOLD_MAX_S`` so that an
exchange connection is never starved into a timeout: past that the handler's own bounded buffer
decides (it drops the oldest, and counts them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, runtime_checkable

import orjson

from sowcli.logs import kv
from sowcli.model import Market, Quote
from sowcli.normalize import NOT_DECODED, TICKER_PREFIX, BybitNormalizer

log = logging.getLogger("sow.feed")

FEED_QUEUE_MAX = 100_000
HOLD_MAX_S = 2.0  # the longest a handler may keep the sources from reading


@runtime_checkable
class QuoteHandler(Protocol):
    """A consumer of Quotes (the seed's MarketDataHandler). ``on_quote`` must not block for long."""

    async def start(self) -> None: ...

    async def on_quote(self, quote: Quote) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class SyncQuoteHandler(QuoteHandler, Protocol):
    """A QuoteHandler that can also take a quote synchronously, without an ``await``."""

    def on_quote_nowait(self, quote: Quote) -> None: ...


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
        # All handlers synchronous -> live frames are processed inline (see the module docstring).
        sync = [h for h in self.handlers if isinstance(h, SyncQuoteHandler)]
        self._sync: list[Callable[[Quote], None]] | None = None
        if len(sync) == len(self.handlers):
            self._sync = [h.on_quote_nowait for h in sync]
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
        self._holds: dict[object, asyncio.TimerHandle] = {}
        self._released = asyncio.Event()
        self._released.set()
        self._pausers: list[Callable[[bool], None]] = []

    # --- producers ---------------------------------------------------------------------------
    def push(self, origin: FrameOrigin, raw: bytes, recv_us: int) -> None:
        """From a live socket callback: never blocks; drops (and counts) beyond the bound."""
        sync = self._sync
        if sync is not None and not self._queue and self._task is not None and not self._stopping:
            quote = self._decode(origin, raw, recv_us)
            if quote is not None:
                self._dispatch_nowait(sync, quote)
            return
        if len(self._queue) >= self._queue_max:
            self.stats.overflow_dropped += 1
            return
        self._queue.append((origin, raw, recv_us))
        self._wake.set()

    async def put(self, origin: FrameOrigin, raw: bytes, recv_us: int) -> None:
        """From a replay/simulation: waits for room (and while a handler holds) instead of dropping."""
        if self._holds:
            await self._released.wait()
        while len(self._queue) >= self._queue_max:
            self._room.clear()
            await self._room.wait()
        self._queue.append((origin, raw, recv_us))
        self._wake.set()

    def connection_reset(self, origin: FrameOrigin) -> None:
        """A connection was (re)established: its market's merge state is reset, in frame order."""
        if not self._queue:
            self.normalizer.reset(origin.market)
            return
        self._queue.append((origin, b"", _RESET))
        self._wake.set()

    # --- back-pressure -----------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return bool(self._holds)

    def add_pauser(self, pause: Callable[[bool], None]) -> None:
        """A live source's ``pause(True/False)``: stop/resume reading while a handler holds."""
        self._pausers.append(pause)

    def hold(self, holder: object, held: bool) -> None:
        """``holder`` cannot keep up (True) or can again (False); see the module docstring."""
        if held == (holder in self._holds):
            return
        if held:
            loop = asyncio.get_running_loop()
            self._holds[holder] = loop.call_later(HOLD_MAX_S, self._expire, holder)
            if len(self._holds) == 1:
                self._released.clear()
                self._pause(True)
        else:
            self._holds.pop(holder).cancel()
            if not self._holds:
                self._released.set()
                self._pause(False)

    def _expire(self, holder: object) -> None:
        log.warning(
            "a quote handler could not catch up: reading again; its buffer bound decides now",
            extra=kv(handler=type(holder).__name__, held_s=HOLD_MAX_S),
        )
        self.hold(holder, False)

    def _pause(self, paused: bool) -> None:
        for pause in self._pausers:
            pause(paused)

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

    def _decode(self, origin: FrameOrigin, raw: bytes, recv_us: int) -> Quote | None:
        """One frame -> the Quote it produces, if any (control frames go back to ``origin``)."""
        market = origin.market
        if self.recorder is not None:
            self.recorder.recv(origin.name, raw, recv_us)
        self.stats.frames_in[market] += 1
        quote: Quote | None = NOT_DECODED
        if raw.startswith(TICKER_PREFIX):  # the hot path: typed decoding of a tickers frame
            quote = self.normalizer.ticker_from_bytes(market, raw, recv_us)
        if quote is NOT_DECODED:
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self.stats.malformed += 1
                return None
            if type(msg) is not dict:
                self.stats.malformed += 1
                return None
            if "topic" not in msg:
                origin.on_control(msg, recv_us)
                return None
            quote = self.normalizer.on_message(market, msg, recv_us)
        now = time.monotonic()  # one clock read per frame serves both idle and stale checks
        origin.last_data_mono = now
        if quote is not None:
            self.last_update[(quote.market, quote.symbol)] = now
        return quote

    def _dispatch_nowait(self, sync: list[Callable[[Quote], None]], quote: Quote) -> None:
        for on_quote in sync:
            try:
                on_quote(quote)
            except Exception as exc:
                self._handler_failed(on_quote, exc)

    def _handler_failed(self, handler: object, exc: Exception) -> None:
        self.stats.handler_errors += 1
        name = type(getattr(handler, "__self__", handler)).__name__
        log.error("quote handler failed", extra=kv(handler=name, error=repr(exc)))

    async def _run(self) -> None:
        queue = self._queue
        decode = self._decode
        sync = self._sync
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
                if recv_us == _RESET:
                    self.normalizer.reset(origin.market)
                    continue
                quote = decode(origin, raw, recv_us)
                if quote is None:
                    continue
                if sync is not None:
                    self._dispatch_nowait(sync, quote)
                    continue
                for handler in self.handlers:
                    try:
                        await handler.on_quote(quote)
                    except Exception as exc:
                        self._handler_failed(handler, exc)
            if len(queue) < self._queue_max:
                self._room.set()
            if queue:  # more already waiting: let the socket and the handlers' tasks run first
                await asyncio.sleep(0)

    def ages_s(self) -> dict[tuple[Market, str], float]:
        now = time.monotonic()
        return {key: now - t for key, t in self.last_update.items()}
