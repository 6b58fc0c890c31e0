"""NATS: subjects, connections that never give up, the buffered quote publisher, subscriptions.

Subjects (the contract in ARCHITECTURE.md):

- ``quotes.spot.{SYMBOL}`` / ``quotes.futures.{SYMBOL}``: one Quote JSON per message;
- ``sow.status.{component}``: heartbeats of each running stage.

Live fan-out is core NATS (at-most-once, lowest latency). :class:`NatsPublisher` is the one place
quotes are published from: handlers hand it quotes without waiting, it holds them in a bounded
buffer while NATS is unreachable (dropping the oldest beyond the bound, counted) and publishes them
once the connection is back. The connection reconnects for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.parser import AWAITING_CONTROL_LINE as _AWAITING_CONTROL_LINE
from nats.protocol.parser import AWAITING_MSG_PAYLOAD as _AWAITING_MSG_PAYLOAD
from nats.protocol.parser import Parser

from sowcli.errors import UpstreamError
from sowcli.logs import kv
from sowcli.model import Quote, encode_quote_into

log = logging.getLogger("sow.nats")
_encode_into = encode_quote_into

QUOTES_WILDCARD = "quotes.>"
PUBLISH_BATCH_MAX = 1000
# Back-pressure marks: bytes written that NATS has not taken yet (or quotes waiting, when they
# cannot even be written) beyond which the sources are asked to stop reading ...
CONGESTED_BYTES = 4 << 20
CONGESTED_AT = 20_000
RELIEVED_BYTES = 256 << 10  # ... until the backlog is down to this
BACKLOG_MAX_BYTES = 4 * CONGESTED_BYTES  # written but not taken: beyond, quotes wait in our buffer
DIRECT_WRITE_MAX = 1 << 20  # bytes waiting in the NATS socket's buffer beyond which we queue
STATUS_PREFIX = "sow.status."
_SUBJECTS: dict[tuple[str, str], str] = {}


def quote_subject(market: str, symbol: str) -> str:
    """``("SPOT", "BTCUSDT")`` -> ``quotes.spot.BTCUSDT`` (cached: it is on the hot path)."""
    key = (market, symbol)
    subject = _SUBJECTS.get(key)
    if subject is None:
        subject = _SUBJECTS[key] = f"quotes.{market.lower()}.{symbol}"
    return subject


def quote_filter(symbol: str | None = None, market: str | None = None) -> str:
    """The subject filter for one symbol and/or market (``None`` = all)."""
    m = market.lower() if market else "*"
    s = symbol.upper() if symbol else "*"
    if m == "*" and s == "*":
        return QUOTES_WILDCARD
    return f"quotes.{m}.{s}"


def dropped_by_client(nc: Client | None) -> int:
    """Messages the client dropped because a subscription's pending queue was full."""
    return getattr(nc, "slow_consumer_drops", 0)


def status_subject(component: str) -> str:
    return STATUS_PREFIX + component


def instance_id() -> str:
    """``host:pid``: tells apart several processes of one component in heartbeats."""
    return f"{socket.gethostname()}:{os.getpid()}"


def servers(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]


DirectHandler = Callable[[bytes, bytes, bytes], None]  # (subject, reply, payload)


class DirectClient(Client):
    """nats-py's client, plus plain-callback delivery for chosen subscriptions.

    nats-py hands every message through two coroutines, a ``Msg`` object (two string decodes),
    a queue and the subscription's task before a callback sees it: ~3 µs of Python per message,
    half of what a bare JetStream consume loop costs. A subscription registered with
    :meth:`deliver_direct` gets its header-less messages as ``handler(subject, reply, payload)``
    bytes, straight from the protocol parser; messages with headers (JetStream status messages)
    and every other subscription take nats-py's usual path.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}
        self.slow_consumer_drops = 0  # messages nats-py dropped for a full subscription queue
        self._ps = _DirectParser(self)

    def deliver_direct(self, sub: Any, handler: DirectHandler | None) -> bool:
        """Route ``sub``'s plain messages to ``handler`` (``None`` stops it); False if unsupported."""
        sid = getattr(sub, "_id", None)
        if not isinstance(sid, int):
            return False
        if handler is None:
            self._direct.pop(sid, None)
        else:
            self._direct[sid] = handler
        return True

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes, *rest: Any
    ) -> None:
        handler = self._direct.get(sid)
        if handler is None or headers or rest:
            await super()._process_msg(sid, subject, reply, data, headers, *rest)
            return
        self.deliver(handler, subject, reply, data)

    def deliver(self, handler: DirectHandler, subject: bytes, reply: bytes, data: bytes) -> None:
        """Count one message and hand it to ``handler``; a handler's bug is logged, and must not
        take nats-py's reading loop down."""
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(subject, reply, data)
        except Exception:
            log.exception("direct message handler failed", extra=kv(subject=subject.decode()))


class _DirectParser(Parser):
    """nats-py's protocol parser with a fast lane for plain ``MSG``s of direct subscriptions.

    At the front of the buffer, each complete ``MSG subject sid [reply] size`` whose sid is
    registered with :meth:`DirectClient.deliver_direct` goes straight to its handler: no regular
    expression, no argument dict, no coroutine per message; an incomplete one waits for the next
    read. The first thing that is anything else (``HMSG``, ``PING``, ``INFO``, a message of
    another subscription) hands the rest of the buffer to nats-py's own parser, unchanged; a
    direct message it leaves half-read is finished here.
    """

    nc: DirectClient

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        direct = self.nc._direct
        if not direct:
            await super().parse()
            return
        deliver = self.nc.deliver
        if self.state == _AWAITING_MSG_PAYLOAD and not self.header_needed:
            # nats-py's parser read the control line of a direct message, not its payload yet
            arg = self.msg_arg
            handler = direct.get(arg["sid"])
            if handler is not None:
                size = self.needed
                if len(buf) < size + 2:
                    return
                payload = bytes(buf[:size])
                del buf[: size + 2]
                self.state = _AWAITING_CONTROL_LINE
                deliver(handler, arg["subject"], arg["reply"], payload)
        if self.state == _AWAITING_CONTROL_LINE:
            while buf.startswith(b"MSG "):
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return  # the rest of the control line is still on its way
                args = bytes(buf[4:eol]).split()
                if len(args) == 4:
                    subject, sid_text, reply, size_text = args
                elif len(args) == 3:
                    subject, sid_text, size_text = args
                    reply = b""
                else:
                    break
                handler = direct.get(int(sid_text))
                if handler is None:
                    break
                start = eol + 2
                end = start + int(size_text)
                if len(buf) < end + 2:
                    return  # the rest of the payload is still on its way
                payload = bytes(buf[start:end])
                del buf[: end + 2]
                deliver(handler, subject, reply, payload)
        if buf:
            await super().parse()


async def connect(
    url: str,
    *,
    name: str,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    connect_timeout_s: float = 2.0,
    attempts: int = 1,
) -> Client:
    """Connect to NATS with reconnect-for-ever once connected.

    ``attempts`` bounds the *initial* connection (nats-py cannot retry a first connect by itself);
    the error names the URL. ``attempts=0`` tries for ever.
    """

    async def _error_cb(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and isinstance(nc, DirectClient):
            # nats-py dropped a message: its subscription's pending queue was full. Counted
            # (heartbeats carry it as nats_dropped), and said, not only logged at debug.
            nc.slow_consumer_drops += 1
            drops = nc.slow_consumer_drops
            if drops == 1 or drops % 10_000 == 0:
                log.warning(
                    "NATS messages dropped: a subscriber is too slow",
                    extra=kv(client=name, subject=exc.subject, dropped_total=drops),
                )
            return
        log.debug("nats error", extra=kv(error=repr(exc)))

    async def _disconnected() -> None:
        if nc.is_closed:
            return  # our own close(), not an outage
        log.warning("nats disconnected", extra=kv(url=url, client=name))
        if on_disconnect:
            await on_disconnect()

    async def _reconnected() -> None:
        log.info("nats reconnected", extra=kv(url=url, client=name))
        if on_reconnect:
            await on_reconnect()

    delay = 0.2
    tried = 0
    while True:
        tried += 1
        nc = DirectClient()
        try:
            await nc.connect(
                servers(url),
                name=name,
                connect_timeout=int(max(1, connect_timeout_s)),
                allow_reconnect=True,
                # Bounded for the first connection (nats-py would otherwise block in connect()
                # for ever, silently); set to "for ever" once connected, below.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py accepts floats
                ping_interval=5,
                max_outstanding_pings=2,
                pending_size=8 * 1024 * 1024,
                error_cb=_error_cb,
                disconnected_cb=_disconnected,
                reconnected_cb=_reconnected,
                skip_subject_validation=True,
            )
            nc.options["max_reconnect_attempts"] = -1
            return nc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            if attempts and tried >= attempts:
                raise UpstreamError(
                    f"NATS at {url} is unreachable: {exc or type(exc).__name__}"
                ) from None
            log.warning(
                "nats unreachable, retrying", extra=kv(url=url, attempt=tried, error=str(exc))
            )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


_PUB_PREFIX: dict[str, bytes] = {}


def _pub_prefix(subject: str) -> bytes:
    """``PUB subject `` (cached, bounded: subjects are symbols x markets, plus ack replies)."""
    prefix = _PUB_PREFIX.get(subject)
    if prefix is None:
        if len(_PUB_PREFIX) > 100_000:
            _PUB_PREFIX.clear()
        prefix = _PUB_PREFIX[subject] = b"PUB " + subject.encode() + b" "
    return prefix


def pub_line(subject: str | bytes, payload: bytes | bytearray) -> bytes:
    """One message in the NATS protocol: ``PUB subject size`` CRLF payload CRLF."""
    if isinstance(subject, bytes):
        return b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)
    return b"%s%d\r\n%s\r\n" % (_pub_prefix(subject), len(payload), payload)


def _unpub(line: bytes) -> tuple[str, bytes]:
    """:func:`pub_line` reversed: (subject, payload)."""
    subject_end = line.index(b" ", 4)
    body = line.index(b"\r\n") + 2
    return line[4:subject_end].decode(), line[body:-2]


async def write_lines(nc: Client, lines: Sequence[bytes]) -> None:
    """Publish pre-built :func:`pub_line` messages with one write instead of one ``await`` each.

    ``nc.publish`` costs ~1.5 µs of Python per message (three nested coroutines); handing nats-py
    the ``PUB`` lines of a whole batch as one buffer costs a fraction of that. When the client
    lacks the internal write call (another nats-py version), this falls back to ``publish`` one
    by one: slower, same result.
    """
    if not lines:
        return
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None:
        for line in lines:
            await nc.publish(*_unpub(line))
        return
    await send(b"".join(lines))
    await flush()


def write_nowait(nc: Client, data: bytes) -> bool:
    """Write ``data`` (:func:`pub_line` messages) without an ``await``; False = not now.

    What :func:`write_lines` hands to nats-py, written from a plain callback: straight to the
    socket when nats-py has nothing of its own waiting (so nothing published earlier can be
    overtaken), else into nats-py's pending buffer for its flusher task. It declines when the
    client is not connected, nats-py's buffer is over its bound, or the client lacks these
    internals (another nats-py version). No coroutine and no task switch per socket read: that
    is most of what a publish costs at a realistic rate. The socket's own buffer is not bounded
    here: the caller watches :func:`backlog_bytes`.
    """
    try:
        if not nc.is_connected or nc.is_connecting:
            return False
        pending = nc._pending_data_size
        if pending == 0:
            transport = nc._transport._io_writer.transport  # type: ignore[union-attr]
            if transport.is_closing():
                return False
            transport.write(data)
            return True
        flusher = nc._flusher_task
        queue = nc._flush_queue
        if flusher is None or flusher.done() or queue is None:
            return False
        if 0 < nc._max_pending_size <= pending:
            return False
        nc._pending.append(data)
        nc._pending_data_size += len(data)
        if queue.empty():  # one queued future wakes the flusher; it writes all that is pending
            queue.put_nowait(asyncio.get_running_loop().create_future())
    except AttributeError:
        return False
    return True


def backlog_bytes(nc: Client) -> int:
    """Bytes handed to the client that the NATS server has not taken yet (nats-py's pending
    buffer plus the socket's write buffer); 0 when unknown."""
    try:
        size: int = nc._pending_data_size
        size += nc._transport._io_writer.transport.get_write_buffer_size()  # type: ignore[union-attr]
    except AttributeError:
        return 0
    return size


@dataclass(slots=True)
class PublisherStats:
    published: int = 0
    buffered_peak: int = 0
    dropped: int = 0
    errors: int = 0


class NatsPublisher:
    """The QuoteHandler that publishes each Quote to ``quotes.{market}.{SYMBOL}``.

    ``on_quote`` never waits on the network: quotes go into a bounded buffer that one task drains.
    While NATS is unreachable the buffer holds up to ``buffer_max`` quotes (the oldest are dropped
    beyond that, and counted); they are published in order once the connection is back.
    """

    def __init__(
        self,
        url: str,
        *,
        buffer_max: int = 100_000,
        name: str = "sow-publish",
        on_first_connect: Callable[[Client], Awaitable[None]] | None = None,
    ) -> None:
        self.url = url
        self.on_first_connect = on_first_connect
        self.name = name
        self.buffer_max = buffer_max
        self.stats = PublisherStats()
        self.nc: Client | None = None
        self._buffer: deque[bytes] = deque()  # pub_line()s
        self._scratch = bytearray(1024)  # where each Quote is encoded (no per-quote resizing)
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._closing = False
        self._kick_scheduled = False
        self._draining = False  # the drain task holds a batch: the kick must not overtake it
        # Back-pressure: called with True when NATS reads slower than quotes arrive, False when
        # it caught up (``Publisher`` wires it to ``Feed.hold``). Never while disconnected: then
        # the exchange sockets keep flowing and the bounded buffer decides.
        self.on_congestion: Callable[[bool], None] | None = None
        self.congested = False
        # A read already taken from the socket is still processed after the pause: leave room.
        self._congested_at = max(1, min(CONGESTED_AT, buffer_max // 4))
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def start(self) -> None:
        """Connect in the background (the exchange side starts at once); publish when ready."""
        self._loop = asyncio.get_running_loop()
        self._connect_task = asyncio.create_task(self._connect(), name="nats-connect")
        self._task = asyncio.create_task(self._drain(), name="nats-publish")

    async def _connect(self) -> None:
        async def down() -> None:
            self._connected.clear()
            if self.congested:
                self._congestion(False)

        async def up() -> None:
            self._connected.set()
            self._wake.set()

        nc = await connect(
            self.url, name=self.name, on_disconnect=down, on_reconnect=up, attempts=0
        )
        if self.on_first_connect is not None:
            # e.g. make sure the JetStream stream exists before the first quote is published
            try:
                await self.on_first_connect(nc)
            except Exception as exc:
                log.warning("nats setup step failed", extra=kv(error=str(exc) or repr(exc)))
        self.nc = nc
        await up()

    async def on_quote(self, quote: Quote) -> None:
        self.on_quote_nowait(quote)

    def on_quote_nowait(self, quote: Quote) -> None:
        prefix = _pub_prefix(quote_subject(quote.market, quote.symbol))
        scratch = self._scratch
        _encode_into(quote, scratch)
        self._queue_line(b"%s%d\r\n%s\r\n" % (prefix, len(scratch), scratch))

    def publish_nowait(self, subject: str, payload: bytes) -> None:
        """Queue one message; never blocks. Drops (and counts) the oldest when the buffer is full.

        Everything queued during one pass of the event loop is handed to the client in one go
        right after it (:meth:`_kick`, a plain callback); the drain task takes over while that is
        not possible (NATS unreachable, client buffer full).
        """
        self._queue_line(pub_line(subject, payload))

    def _queue_line(self, line: bytes) -> None:
        buf = self._buffer
        if len(buf) >= self.buffer_max:
            buf.popleft()
            self.stats.dropped += 1
        buf.append(line)
        n = len(buf)
        if n > self.stats.buffered_peak:
            self.stats.buffered_peak = n
        if n >= self._congested_at and not self.congested and self._connected.is_set():
            self._congestion(True)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._kick)

    def _congestion(self, congested: bool) -> None:
        self.congested = congested
        if self.on_congestion is not None:
            self.on_congestion(congested)

    def _kick(self) -> None:
        self._kick_scheduled = False
        buf = self._buffer
        if not buf:
            return
        nc = self.nc
        if self._draining or nc is None or not self._connected.is_set():
            self._wake.set()
            return
        if self.congested and backlog_bytes(nc) > BACKLOG_MAX_BYTES:
            # NATS takes nothing (a frozen server still looks connected until its pings time
            # out): keep the quotes in the bounded buffer rather than the socket's unbounded one
            self._wake.set()
            return
        count = len(buf)
        if not write_nowait(nc, b"".join(buf)):
            self._wake.set()
            return
        buf.clear()
        self.stats.published += count
        if not self.congested and backlog_bytes(nc) > CONGESTED_BYTES:
            self._congestion(True)
            self._wake.set()  # the drain task waits for NATS to catch up, then lets go

    async def _relieve(self) -> None:
        """Congested, nothing of ours waiting: wait until NATS took most of what was written."""
        nc = self.nc
        if nc is None or not self._connected.is_set():
            self._congestion(False)
            return
        transport = nc._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.drain()  # type: ignore[no-untyped-call]  # the socket's flow control
        if backlog_bytes(nc) <= RELIEVED_BYTES:
            self._congestion(False)
        else:  # nats-py's flusher is still writing its pending buffer
            await asyncio.sleep(0.001)

    async def publish_status(self, component: str, doc: dict[str, Any]) -> None:
        """Heartbeats skip the buffer: a stale heartbeat is worse than none."""
        if self.connected:
            assert self.nc is not None
            with contextlib.suppress(Exception):
                await self.nc.publish(status_subject(component), orjson.dumps(doc))

    async def _drain(self) -> None:
        buf = self._buffer
        while True:
            if self.congested and not buf:
                await self._relieve()
                continue
            if not buf:
                self._wake.clear()
                if self._closing:
                    return
                await self._wake.wait()
                continue
            if not self._connected.is_set():
                if self._closing:
                    return
                await self._connected.wait()
                continue
            nc = self.nc
            assert nc is not None
            if nc.is_closed:
                return
            # One write for everything waiting (bounded, so a backlog does not starve others).
            batch = [buf.popleft() for _ in range(min(len(buf), PUBLISH_BATCH_MAX))]
            self._draining = True
            try:
                await write_lines(nc, batch)
            except Exception as exc:  # never let the publisher die silently
                self.stats.errors += 1
                log.error("nats publish failed", extra=kv(error=repr(exc), count=len(batch)))
                buf.extendleft(reversed(batch))  # keep them for the next try
                await asyncio.sleep(0.1)
                continue
            finally:
                self._draining = False
            self.stats.published += len(batch)
            if buf:
                await asyncio.sleep(0)

    async def stop(self, timeout_s: float = 1.5) -> None:
        """Publish what is buffered (bounded by ``timeout_s``), flush and close."""
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        if self._task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._task), timeout=max(0.05, timeout_s * 0.6)
                )
            except TimeoutError:
                self._task.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        if self.nc is not None and not self.nc.is_closed:
            left = max(0.05, deadline - time.monotonic())
            with contextlib.suppress(Exception):
                if self.nc.is_connected:
                    await asyncio.wait_for(self.nc.flush(timeout=max(1, int(left))), timeout=left)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), timeout=0.5)
        if self._buffer:
            self.stats.dropped += len(self._buffer)
            log.warning("quotes not published at shutdown", extra=kv(count=len(self._buffer)))
            self._buffer.clear()


async def subscribe(
    nc: Client, subject: str, *, queue: str = "", max_pending: int = 65_536
) -> AsyncIterator[Msg]:
    """Messages on ``subject`` as an async iterator with a bounded pending queue."""
    sub = await nc.subscribe(subject, queue=queue, pending_msgs_limit=max_pending)
    try:
        async for msg in sub.messages:
            yield msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
