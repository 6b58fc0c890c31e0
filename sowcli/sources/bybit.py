"""The live Bybit v5 listener: one websocket per market, subscriptions, heartbeat, reconnects.

Each :class:`BybitConnection` owns one socket (``/v5/public/spot`` or ``/v5/public/linear``) and
pushes every received frame into the shared :class:`~sowcli.sources.feed.Feed`. It:

- subscribes in batches within Bybit's limits (spot: 10 args per request; linear: 200), never
  resending a topic that is already active;
- reads subscribe acks: an unknown symbol is reported once by name and dropped; on linear one bad
  topic rejects its whole request, so the good topics of that request are subscribed again; a
  failure that names no topic is split in halves until the culprit is found;
- sends the text ping ``{"op":"ping"}`` every ``ping_interval_seconds``; no pong within
  ``pong_timeout_seconds``, or no data frame for ``idle_timeout_seconds`` -> reconnect;
- reconnects with capped, jittered exponential backoff (tenacity's ``wait_random_exponential``
  via :func:`sowcli.runtime.backoff_s`, capped at ``reconnect_timeout_seconds``) and
  resubscribes everything. ``max_retries`` consecutive failed attempts (0 = never give up) raise :class:`~sowcli.errors.RetriesExhausted`, so that
  ``sow publish`` exits non-zero and a supervisor can restart it. A session that delivered data
  resets the count.

picows (a Cython websocket client) is used for the socket: it delivers frames to a plain callback
without a coroutine per message; a bare relay on it measured 0.6-0.73x the CPU per frame of the
same relay on the ``websockets`` client (benchmarks/bench_publish.py, README Performance).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from time import time_ns
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from sowcli.config import RENAMED_SYMBOLS, Settings
from sowcli.errors import RetriesExhausted
from sowcli.logs import kv
from sowcli.model import Market
from sowcli.runtime import backoff_s
from sowcli.sources.feed import Feed, Recorder

log = logging.getLogger("sow.bybit")

SPOT_ARGS_MAX = 10
LINEAR_ARGS_MAX = 200
# The exchange socket's receive buffer. Bounded (the kernel would otherwise grow it to several
# MB): one read of it is processed in one go, so it bounds how far a burst can overshoot the
# publisher's back-pressure mark, and the memory that costs. 1 MB is seconds of real traffic.
SOCKET_RCVBUF = 1 << 20
HEALTHY_SESSION_S = 10.0  # a session that delivered data for this long resets the retry count
_TOPIC_RE = re.compile(r"(?:tickers|orderbook\.\d+)\.([A-Z0-9]+)")
_req_ids = itertools.count(1)


@dataclass(slots=True)
class ConnectionStats:
    state: str = "starting"  # starting | connecting | connected | reconnecting | stopped
    since: float = field(default_factory=time.time)
    connects: int = 0
    reconnects: int = 0
    failures_in_row: int = 0
    last_error: str = ""
    pongs: int = 0


# Enum members as plain module constants: read once per frame, an attribute lookup on the enum
# class and an ``==`` between enums cost more than the rest of the callback.
_TEXT, _BINARY, _CONTINUATION, _CLOSE = (
    WSMsgType.TEXT,
    WSMsgType.BINARY,
    WSMsgType.CONTINUATION,
    WSMsgType.CLOSE,
)


class _Listener(WSListener):
    def __init__(self, conn: BybitConnection) -> None:
        self.conn = conn
        self.push = conn.feed.push
        self._parts: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.conn._on_connected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        recv_us = time_ns() // 1000
        kind = frame.msg_type
        if kind is _TEXT or kind is _BINARY:
            if frame.fin and not self._parts:
                self.push(self.conn, frame.get_payload_as_bytes(), recv_us)
            else:
                self._parts.append(frame.get_payload_as_bytes())
        elif kind is _CONTINUATION:
            self._parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                raw = b"".join(self._parts)
                self._parts.clear()
                self.push(self.conn, raw, recv_us)
        elif kind is _CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.conn._on_disconnected()


def _topics_for(symbol: str, market: Market, spot_book: bool) -> list[str]:
    topics = [f"tickers.{symbol}"]
    if market == "SPOT" and spot_book:
        topics.append(f"orderbook.1.{symbol}")
    return topics


class BybitConnection:
    """One Bybit public websocket (one market), kept alive until :meth:`stop`."""

    def __init__(
        self,
        market: Market,
        url: str,
        symbols: Iterable[str],
        feed: Feed,
        settings: Settings,
        *,
        recorder: Recorder | None = None,
    ) -> None:
        self.market: Market = market
        self.name = market.lower()
        self.url = url
        self.feed = feed
        self.settings = settings
        self.recorder = recorder
        self.stats = ConnectionStats()
        self.symbols: list[str] = list(symbols)
        self.unknown: set[str] = set()
        self.active: set[str] = set()
        self._pending: dict[str, list[str]] = {}
        self._transport: WSTransport | None = None
        self._disconnected = asyncio.Event()
        self._last_pong = 0.0
        self.last_data_mono = 0.0
        self._stop = asyncio.Event()
        self._args_max = SPOT_ARGS_MAX if market == "SPOT" else LINEAR_ARGS_MAX
        feed.add_pauser(self._pause_reading)

    # --- picows callbacks (synchronous, on the event loop) ------------------------------------
    def _on_connected(self, transport: WSTransport) -> None:
        self._transport = transport

    def _pause_reading(self, paused: bool) -> None:
        """Back-pressure from the feed: stop/resume reading the socket (TCP slows the sender)."""
        transport = self._transport
        if transport is None or transport.is_disconnected:
            return
        with contextlib.suppress(Exception):
            raw = transport.underlying_transport
            if paused:
                raw.pause_reading()
            else:
                raw.resume_reading()

    def _on_disconnected(self) -> None:
        self._disconnected.set()

    def on_control(self, msg: dict[str, Any], recv_us: int) -> None:
        """Acks and pongs, delivered by the feed task in frame order."""
        op = msg.get("op")
        if op == "ping" or msg.get("ret_msg") == "pong":
            self._last_pong = time.monotonic()
            self.stats.pongs += 1
            return
        if op == "subscribe":
            self._on_subscribe_reply(msg)
            return
        if op in ("unsubscribe",):
            return
        log.debug("unexpected control frame", extra=kv(market=self.market, frame=msg))

    # --- subscriptions -----------------------------------------------------------------------
    def wanted_topics(self) -> list[str]:
        out: list[str] = []
        for sym in self.symbols:
            if sym not in self.unknown:
                out += _topics_for(sym, self.market, self.feed.normalizer.spot_book)
        return out

    def _send(self, doc: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None or transport.is_disconnected:
            return
        text = orjson.dumps(doc)
        if self.recorder is not None:
            self.recorder.send(self.name, self.url, text.decode())
        transport.send(WSMsgType.TEXT, text)

    def _subscribe(self, topics: list[str]) -> None:
        topics = [t for t in topics if t not in self.active]
        for i in range(0, len(topics), self._args_max):
            batch = topics[i : i + self._args_max]
            req_id = f"{self.name}-{next(_req_ids)}"
            self._pending[req_id] = batch
            self._send({"req_id": req_id, "op": "subscribe", "args": batch})

    def mark_unknown(self, symbol: str, reason: str) -> None:
        """Stop asking for ``symbol`` on this market, with one warning naming it."""
        if symbol in self.unknown:
            return
        self.unknown.add(symbol)
        hint = ""
        if symbol in RENAMED_SYMBOLS:
            hint = f"; Bybit renamed it {RENAMED_SYMBOLS[symbol]}"
        log.warning(
            f"{symbol} is not available on Bybit {self.market.lower()}: skipped{hint}",
            extra=kv(market=self.market, symbol=symbol, reason=reason),
        )

    def _on_subscribe_reply(self, msg: dict[str, Any]) -> None:
        req_id = str(msg.get("req_id") or "")
        args = self._pending.pop(req_id, None)
        if msg.get("success") is True:
            if args:
                self.active.update(args)
            return
        ret = str(msg.get("ret_msg", ""))
        if args is None:  # a reply without our req_id: nothing we can match it to
            log.warning("subscribe failed", extra=kv(market=self.market, reply=ret))
            return
        if "already subscribed" in ret:
            self.active.update(t for t in args if t in ret)
            retry = [t for t in args if t not in ret]
        elif "args size" in ret:
            half = max(1, len(args) // 2)
            self._args_max = max(1, min(self._args_max, half))
            retry = args
        else:
            bad = set(_TOPIC_RE.findall(ret)) & {t.split(".")[-1] for t in args}
            if bad:
                for sym in sorted(bad):
                    self.mark_unknown(sym, ret)
                retry = [t for t in args if t.split(".")[-1] not in bad]
            elif len(args) > 1:  # the reply names no culprit: bisect
                mid = len(args) // 2
                for part in (args[:mid], args[mid:]):
                    req = f"{self.name}-{next(_req_ids)}"
                    self._pending[req] = part
                    self._send({"req_id": req, "op": "subscribe", "args": part})
                return
            else:
                self.mark_unknown(args[0].split(".")[-1], ret)
                retry = []
        if retry:
            # On spot the valid topics of a partly bad request may already be active; resending
            # them draws "already subscribed", which marks them active above.
            self._subscribe(retry)

    # --- the session loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, subscribe, keep alive; reconnect until stopped or retries are exhausted."""
        attempt = 0
        first = True
        while not self._stop.is_set():
            started = time.monotonic()
            self.stats.state = "connecting" if first else "reconnecting"
            try:
                error = await self._session()
            except Exception as exc:  # a bug must cost a reconnect, never the listener
                log.exception("bybit session failed", extra=kv(market=self.market))
                error = f"internal error: {exc!r}"
            if self._stop.is_set():
                break
            healthy = (
                self.last_data_mono >= started and time.monotonic() - started >= HEALTHY_SESSION_S
            )
            attempt = 1 if healthy else attempt + 1
            self.stats.failures_in_row = 0 if healthy else attempt
            self.stats.last_error = error
            self.stats.reconnects += 1
            first = False
            limit = self.settings.max_retries
            if limit and not healthy and attempt >= limit:
                self.stats.state = "stopped"
                raise RetriesExhausted(
                    f"Bybit {self.market.lower()} ({self.url}): {attempt} consecutive connection "
                    f"attempts failed (max_retries={limit}); last error: {error}"
                )
            delay = 0.0 if healthy else backoff_s(attempt, self.settings.reconnect_timeout_seconds)
            log.warning(
                "bybit connection lost, reconnecting",
                extra=kv(
                    market=self.market, error=error, retry_in_s=round(delay, 2), attempt=attempt
                ),
            )
            self.stats.state = "reconnecting"
            self.stats.since = time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
        self.stats.state = "stopped"

    async def _session(self) -> str:
        """One connection's life; returns why it ended."""
        self._disconnected.clear()
        self.active.clear()
        self._pending.clear()
        ssl_ctx = ssl.create_default_context() if self.url.startswith("wss:") else None
        try:
            transport, _ = await ws_connect(
                lambda: _Listener(self),
                self.url,
                ssl_context=ssl_ctx,
                websocket_handshake_timeout=10,
                enable_auto_pong=True,
            )
        except Exception as exc:
            return f"connect failed: {exc or type(exc).__name__}"
        self._transport = transport
        with contextlib.suppress(Exception):
            sock = transport.underlying_transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF)
        self.stats.connects += 1
        self.stats.state = "connected"
        self.stats.since = time.time()
        now = time.monotonic()
        self._last_pong = now
        self.last_data_mono = now
        log.info("bybit connected", extra=kv(market=self.market, url=self.url))
        if self.recorder is not None:
            self.recorder.connect(self.name, self.url)
        self.feed.connection_reset(self)
        if self.feed.held:
            self._pause_reading(True)
        self._subscribe(self.wanted_topics())
        try:
            return await self._keepalive()
        finally:
            with contextlib.suppress(Exception):
                transport.disconnect()
            self._transport = None

    async def _keepalive(self) -> str:
        s = self.settings
        tick = min(1.0, s.ping_interval_seconds / 4, s.pong_timeout_seconds / 4)
        next_ping = time.monotonic() + s.ping_interval_seconds
        ping_sent_at: float | None = None
        while True:
            stop = asyncio.ensure_future(self._stop.wait())
            down = asyncio.ensure_future(self._disconnected.wait())
            await asyncio.wait({stop, down}, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            for f in (stop, down):
                if not f.done():
                    f.cancel()
            if self._stop.is_set():
                return "stopped"
            if self._disconnected.is_set():
                return "connection closed by peer"
            now = time.monotonic()
            if ping_sent_at is not None and self._last_pong < ping_sent_at:
                if now - ping_sent_at > s.pong_timeout_seconds:
                    return f"no pong within {s.pong_timeout_seconds:g}s"
            elif ping_sent_at is not None:
                ping_sent_at = None
            if now >= next_ping:
                self._send({"op": "ping", "req_id": f"ping-{next(_req_ids)}"})
                if ping_sent_at is None:
                    ping_sent_at = now
                next_ping = now + s.ping_interval_seconds
            if now - self.last_data_mono > s.idle_timeout_seconds:
                return f"no data for {s.idle_timeout_seconds:g}s"

    async def stop(self) -> None:
        self._stop.set()
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.send_close()
                transport.disconnect()
